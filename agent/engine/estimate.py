"""The memory estimate: what loading a model will cost, before loading it.

Owns ``estimate_memory`` (named components, anonymous vs file-backed), ``largest_ctx_that_fits``
(n_ctx = 'auto') and ``choose_mode`` (load_mode = 'auto'). Pure functions of the GGUF header
(``ModelInfo``), the settings and, for the exact plan, llama.cpp's own sizes (``LlamaSizes`` from
a ``sizer``: the engine's no-alloc probe, agent.engine.llamacpp). Without a sizer the estimate
is header-only: the hand model below, which `model inspect` can use without loading llama.cpp.

The estimate is of the steady-state peak of anonymous memory (RssAnon): after load, with the
context full and the largest prompt batch evaluated, because that is what the OOM killer and the
memory cgroup see. File-backed weight pages (RssFile) are reported apart: the kernel can drop
them under pressure and read them again, so they cost speed, not an OOM kill.

Every formula below was calibrated on llama-cpp-python 0.3.36 (x86-64, 2 threads) against
llama.cpp's own buffer sizes and measured RssAnon, for six model shapes, n_ctx 256-4096 and
n_batch 32-512; docs/memory-modes.md has the formulas, the data and the command that re-measures.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal

from agent.models.gguf_info import ModelInfo

Mode = Literal["fit", "fast"]
Source = Literal["llama.cpp", "header"]

MiB = 1024 * 1024

# llama.cpp rounds every context up to a multiple of 256 (llama-context.cpp, GGML_PAD(n_ctx, 256)).
CTX_PAD = 256
# llama-cpp-python runs prompt batches in micro-batches of at most 512 tokens (Llama(n_ubatch=512)).
MAX_UBATCH = 512

# Bytes per KV cache element (ggml block size / bytes per block).
KV_BYTES = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "f32": 4.0}

# Anonymous memory of this process before any model is loaded: Python, pydantic, numpy, and
# libllama's own data. Measured as RssAnon after `import agent.cli, llama_cpp` on x86-64 (33 MiB);
# the engine replaces it with the process's real RssAnon before load.
DEFAULT_RUNTIME_BYTES = 34 * MiB
# What one model load and run add regardless of shapes (backend registry, thread pool, graph
# metadata actually touched, the run's Python objects and sampler thread): 1.8 MiB right after
# loading the 512-token test model, up to 2.5 MiB more at steady state in the calibration runs.
LOAD_FIXED_BYTES = 3 * MiB
# llama.cpp's vocabulary tables (token text, scores, token->id map, piece cache) per token.
# Fitted on synthetic byte-fallback vocabularies of 512-152k tokens: 147 bytes per token.
# BPE vocabularies also load a merges table, which this does not model (see docs/memory-modes.md).
VOCAB_BYTES_PER_TOKEN = 148
# Per vocabulary entry for sampling: llama.cpp's output row (4 B float); llama-cpp-python's
# Llama keeps a candidates record array (12 B), its ids (4 B) and zero probabilities (4 B); the
# sampler chain's candidate array (12 B) that glibc keeps after use. Measured resident: 15.6-16.8
# B per entry of llama-cpp-python's 20 right after load (Gemma 3 262k and qwen-0.5b 152k
# vocabularies), the sampler's 12 after the first token.
OUTPUT_ROW_BYTES_PER_TOKEN = 4
SAMPLER_BYTES_PER_TOKEN = 12 + 4 + 4 + 12
LOGITS_BYTES_PER_TOKEN = OUTPUT_ROW_BYTES_PER_TOKEN + SAMPLER_BYTES_PER_TOKEN


@dataclass(frozen=True)
class LlamaSizes:
    """llama.cpp's own numbers for one context size (the engine's no-alloc probe): what its CPU
    backend repacks on this CPU in fast mode, and the KV, compute and output buffers it allocates."""

    repacked: int  # bytes of weights copied into repacking buffers in fast mode (0 on CPUs that repack nothing)
    repacked_duplicates: int  # of which copies of a tensor that also stays in use from the file (tied output)
    kv: int
    compute: int
    output: int
    host_tables: int | None = None  # the model's vocabulary and metadata tables, measured; None: use the formula


# padded n_ctx -> llama.cpp's sizes; the caller fixes batch sizes, KV types and flash attention.
# (padded n_ctx per sequence, sequences) -> llama.cpp's sizes for a context of that many
# sequences (slots) of that size each.
Sizer = Callable[[int, int], LlamaSizes]


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per component. ``anon_bytes`` is what must fit the budget; ``file_bytes`` is the part of
    the mapped model file that inference keeps reading (page cache, droppable)."""

    mode: Mode
    n_ctx: int  # as llama.cpp will allocate it (padded to 256)
    n_batch: int
    n_ubatch: int
    slots: int  # sequences decoded together (engine.max_parallel); n_ctx is each one's
    weights_mapped: int  # the whole weight data, mapped from the file (file-backed)
    file_working_set: int  # the mapped bytes still read during generation
    repacked_weights: int  # fast mode: the interleaved copy in anonymous memory
    kv_cache: int
    compute_buffer: int  # llama.cpp's graph buffer ("CPU compute buffer size" in its log)
    cpu_work_buffer: int  # ggml-cpu scratch: softmax(KQ) cast to f16, activations quantised to q8_0
    logits: int
    vocab: int
    runtime: int  # the process before load (Python, libraries) plus fixed per-load cost
    source: Source = "header"  # llama.cpp: repacked, KV, compute and output buffers are llama.cpp's own sizes
    notes: tuple[str, ...] = field(default=())

    @property
    def anon_bytes(self) -> int:
        return (
            self.repacked_weights
            + self.kv_cache
            + self.compute_buffer
            + self.cpu_work_buffer
            + self.logits
            + self.vocab
            + self.runtime
        )

    @property
    def file_bytes(self) -> int:
        return self.file_working_set

    def as_dict(self) -> dict[str, int]:
        """Components in bytes, in the order they are usually read (file-backed first)."""
        return {
            "weights_mapped": self.weights_mapped,
            "file_working_set": self.file_working_set,
            "repacked_weights": self.repacked_weights,
            "kv_cache": self.kv_cache,
            "compute_buffer": self.compute_buffer,
            "cpu_work_buffer": self.cpu_work_buffer,
            "logits": self.logits,
            "vocab": self.vocab,
            "runtime": self.runtime,
        }

    def describe(self) -> str:
        """One line per anonymous component, for error messages and logs."""
        parts = [
            f"{k.replace('_', ' ')} {_mib(v)}"
            for k, v in self.as_dict().items()
            if k not in ("weights_mapped", "file_working_set")
        ]
        return (
            f"{self.mode} mode, n_ctx {self.n_ctx}"
            + (f" x {self.slots} slots" if self.slots > 1 else "")
            + f", n_batch {self.n_batch} ({self.source_text}): "
            f"anonymous {_mib(self.anon_bytes)} = "
            + " + ".join(parts)
            + f" (plus {_mib(self.file_bytes)} of file-backed weights in use)"
        )

    @property
    def source_text(self) -> str:
        if self.source == "llama.cpp":
            return "exact plan: llama.cpp's own buffer sizes on this CPU"
        return "header-only estimate"


def pad_ctx(n_ctx: int) -> int:
    return -(-max(1, n_ctx) // CTX_PAD) * CTX_PAD


def ubatch_size(n_ctx: int, n_batch: int) -> int:
    """The micro-batch llama.cpp computes at once: llama-cpp-python clamps n_batch to n_ctx and
    n_ubatch to 512."""
    return max(1, min(n_batch, n_ctx, MAX_UBATCH))


def kv_cache_bytes(info: ModelInfo, n_ctx: int, type_k: str = "f16", type_v: str = "f16") -> int:
    """n_ctx x n_layer x n_head_kv x (head_dim x bytes_k + head_dim_v x bytes_v)."""
    head_dim_v = getattr(info, "head_dim_v", info.head_dim)
    per_token_layer = info.n_head_kv * (info.head_dim * KV_BYTES[type_k] + head_dim_v * KV_BYTES[type_v])
    return int(pad_ctx(n_ctx) * info.n_layer * per_token_layer)


def compute_buffer_bytes(info: ModelInfo, n_ctx: int, n_ubatch: int, *, flash_attn: bool = False) -> int:
    """llama.cpp's compute buffer for the worst-case graph (a full micro-batch against a full KV
    cache, one output row), as a function of shapes. Per token of the micro-batch, f32:

    without flash attention, the larger of
      attention: n_kv x (n_head + 1) + 5 x n_embd + 2 x n_embd_kv   (KQ scores + mask + Q/K/V/residuals)
      FFN:       n_kv + 3 x n_ff + 3 x n_embd + 2 x n_embd_kv        (mask + gate/up/act + residuals)
    with flash attention (mask in f16, no KQ matrix; fitted, an upper bound within 2 % for
    real-model shapes):
      n_kv / 2 + max(3 x n_ff + 3.75 x n_embd + 2 x n_embd_kv, 4 x n_embd + 4 x n_embd_kv)

    This reproduces llama.cpp's own "compute buffer size" within 0.1 % without flash attention.
    llama.cpp's default would also reserve n_ubatch x n_vocab x 4 bytes for logits of every
    token; the engine asks for one output row per batch (n_outputs_max = 1), which is all it reads.
    """
    n_kv = pad_ctx(n_ctx)
    e, f, h = info.n_embd, info.n_ff, info.n_head
    e_kv = info.n_head_kv * info.head_dim
    if flash_attn:
        per_token = n_kv / 2 + max(3 * f + 3.75 * e + 2 * e_kv, 4 * e + 4 * e_kv)
    else:
        per_token = max(n_kv * (h + 1) + 5 * e + 2 * e_kv, n_kv + 3 * f + 3 * e + 2 * e_kv)
    per_token += 4  # tensor alignment
    # The output row (n_vocab floats) is computed last, when the layer tensors are free again; it
    # only sets the size for a huge vocabulary and a tiny micro-batch.
    return int(max(per_token * n_ubatch, info.n_vocab + 2 * e * n_ubatch) * 4)


def cpu_work_bytes(info: ModelInfo, n_ctx: int, n_ubatch: int, *, flash_attn: bool = False) -> int:
    """ggml-cpu's work buffer, allocated on first use and kept: for KQV = V x softmax(KQ) the f32
    scores are converted to the f16 of the V cache (n_ubatch x n_kv x n_head x 2 bytes); every
    matrix product also quantises its input activations to q8_0 (n_ubatch x max(n_ff, n_embd) x 34/32)."""
    act = int(n_ubatch * max(info.n_ff, info.n_embd) * 34 // 32)
    if flash_attn:
        return act
    return max(act, int(n_ubatch * pad_ctx(n_ctx) * info.n_head * 2))


def _token_embd_bytes(info: ModelInfo) -> int:
    for r in getattr(info, "other_ranges", ()):
        if r.name == "token_embd.weight":
            return int(r.nbytes)
    return 0


@dataclass(frozen=True)
class Serving:
    """How a model is served, besides its context and load mode: the settings every estimate, and
    every search over contexts, modes and slots, is made with.

    ``runtime_bytes`` is the process's anonymous memory before the load; the engine passes its own
    RssAnon, `model inspect` leaves the measured default. With ``sizer`` (the exact plan) the
    repacked weights, KV cache, compute and output buffers are llama.cpp's own sizes for this CPU;
    without it they come from the header by the formulas above, repacking as an upper bound.
    ``slots`` jobs are served at a time, each with its own ``n_ctx`` of KV cache and row of logits.
    """

    n_batch: int
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: bool = False
    runtime_bytes: int | None = None
    sizer: Sizer | None = None
    slots: int = 1


def estimate_memory(info: ModelInfo, serving: Serving, *, n_ctx: int, mode: Mode) -> MemoryEstimate:
    """Estimate the steady-state memory of serving ``info`` at ``n_ctx`` in ``mode`` as ``serving`` says."""
    if mode not in ("fit", "fast"):
        raise ValueError(f"mode must be 'fit' or 'fast', not {mode!r}")
    if serving.type_k not in KV_BYTES or serving.type_v not in KV_BYTES:
        raise ValueError(f"KV cache types must be one of {', '.join(KV_BYTES)}")
    ctx = pad_ctx(n_ctx)
    batch = max(1, min(serving.n_batch, ctx))
    ub = ubatch_size(ctx, serving.n_batch)
    slots, flash_attn, runtime_bytes = serving.slots, serving.flash_attn, serving.runtime_bytes
    notes: list[str] = []
    if serving.sizer is not None:
        sizes = serving.sizer(ctx, slots)
        repacked = sizes.repacked if mode == "fast" else 0
        # A repacked duplicate (the tied output matrix) leaves its source in use from the file.
        leaves_file = repacked - (sizes.repacked_duplicates if mode == "fast" else 0)
        kv, compute = sizes.kv, sizes.compute
        logits = sizes.output + int(info.n_vocab) * SAMPLER_BYTES_PER_TOKEN
        vocab = sizes.host_tables if sizes.host_tables is not None else int(info.n_vocab) * VOCAB_BYTES_PER_TOKEN
        source: Source = "llama.cpp"
    else:
        repacked = int(info.repackable_bytes) if mode == "fast" else 0
        tied_dup = _token_embd_bytes(info) if (mode == "fast" and getattr(info, "tied_embeddings", False)) else 0
        leaves_file = repacked - tied_dup
        kv = kv_cache_bytes(info, ctx, serving.type_k, serving.type_v) * slots
        compute = compute_buffer_bytes(info, ctx, ub, flash_attn=flash_attn)
        logits = int(info.n_vocab) * LOGITS_BYTES_PER_TOKEN * slots
        vocab = int(info.n_vocab) * VOCAB_BYTES_PER_TOKEN
        source = "header"
        if mode == "fast":
            notes.append(
                "repacked bytes are an upper bound: CPUs without a repack kernel (e.g. Cortex-A72) copy nothing"
            )
    return MemoryEstimate(
        mode=mode,
        n_ctx=ctx,
        n_batch=batch,
        n_ubatch=ub,
        slots=slots,
        weights_mapped=int(info.weights_bytes),
        file_working_set=max(0, int(info.weights_bytes) - leaves_file),
        repacked_weights=repacked,
        kv_cache=kv,
        compute_buffer=compute,
        cpu_work_buffer=cpu_work_bytes(info, ctx, ub, flash_attn=flash_attn),
        logits=logits,
        vocab=vocab,
        runtime=(DEFAULT_RUNTIME_BYTES if runtime_bytes is None else int(runtime_bytes)) + LOAD_FIXED_BYTES,
        source=source,
        notes=tuple(notes),
    )


def largest_ctx_that_fits(
    info: ModelInfo, serving: Serving, budget_bytes: int, mode: Mode, cap: int = 4096
) -> int | None:
    """The largest context (a multiple of 256, at most ``cap`` rounded down to 256, and at least
    256) whose anonymous estimate fits ``budget_bytes``; None when not even the smallest does.

    The caller caps at min(engine.auto_ctx_max, n_ctx_train): a model's training context (32k for
    Qwen2.5) is far more than a small board should reserve by default.
    """

    def fits(ctx: int) -> bool:
        return estimate_memory(info, serving, n_ctx=ctx, mode=mode).anon_bytes <= budget_bytes

    hi = max(1, cap // CTX_PAD)
    if not fits(CTX_PAD):
        return None
    lo = 1  # the estimate grows with n_ctx, so bisect on multiples of 256
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid * CTX_PAD):
            lo = mid
        else:
            hi = mid - 1
    return lo * CTX_PAD


@dataclass(frozen=True)
class ModeChoice:
    mode: Mode
    reason: str
    fast: MemoryEstimate
    fit: MemoryEstimate


def choose_mode(info: ModelInfo, serving: Serving, *, budget_bytes: int, headroom_pct: float, n_ctx: int) -> ModeChoice:
    """load_mode 'auto': fast only when its estimate stays headroom_pct under the budget.

    The headroom absorbs what the estimate cannot see (other processes growing, a BPE merges
    table, allocator fragmentation); fit needs little anonymous memory, so choosing it wrongly
    costs speed, while choosing fast wrongly costs an OOM kill.
    """
    fast = estimate_memory(info, serving, n_ctx=n_ctx, mode="fast")
    fit = estimate_memory(info, serving, n_ctx=n_ctx, mode="fit")
    limit = int(budget_bytes * (1 - headroom_pct / 100))
    if fast.anon_bytes <= limit:
        return ModeChoice(
            "fast",
            f"fast estimate {_mib(fast.anon_bytes)} <= budget {_mib(budget_bytes)} less {headroom_pct:g}% headroom "
            f"({_mib(limit)})",
            fast,
            fit,
        )
    return ModeChoice(
        "fit",
        f"fast estimate {_mib(fast.anon_bytes)} > budget {_mib(budget_bytes)} less {headroom_pct:g}% headroom "
        f"({_mib(limit)}); fit needs {_mib(fit.anon_bytes)}",
        fast,
        fit,
    )


def most_slots_that_fit(
    info: ModelInfo, serving: Serving, budget_bytes: int, mode: Mode, *, n_ctx: int, cap: int
) -> int | None:
    """engine.max_parallel 'auto': the most slots, up to ``cap``, whose estimate at ``n_ctx`` per
    slot fits ``budget_bytes``; None when not even one does (``serving.slots`` is not read). The
    estimate grows with each slot."""
    best = None
    for slots in range(1, max(1, cap) + 1):
        est = estimate_memory(info, replace(serving, slots=slots), n_ctx=n_ctx, mode=mode)
        if est.anon_bytes > budget_bytes:
            break
        best = slots
    return best


def _mib(n: float) -> str:
    return f"{n / MiB:.1f} MiB"
