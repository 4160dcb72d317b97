"""The seam between the engine and llama-cpp-python: everything that reaches below ``Llama()``.

Owns: constructing ``Llama`` with the model/context parameters its constructor does not expose
(``use_extra_bufts``, ``n_outputs_max``); routing llama.cpp's log into Python logging and
capturing the buffer sizes it reports at load; asking llama.cpp what a load would allocate before
making it (``BufferProbe``: a ``no_alloc`` load; ``cpu_repack``: which weights this CPU's backend
repacks, asked of ggml itself); the abort callback type; ``malloc_trim`` (agent.system.libc,
re-exported).

Process-wide state lives here on purpose and only here: llama.cpp's log callback and
llama-cpp-python's default-parameter functions are process-global by nature, so the objects that
stand in for them are too, guarded by one lock.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import logging
import pathlib
import re
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import llama_cpp
import llama_cpp.llama_cpp as C

from agent.engine.estimate import LlamaSizes, ubatch_size
from agent.system.libc import LIBC

log = logging.getLogger("agent.engine.llama")

GGML_TYPES = {"f32": C.GGML_TYPE_F32, "f16": C.GGML_TYPE_F16, "q8_0": C.GGML_TYPE_Q8_0, "q4_0": C.GGML_TYPE_Q4_0}

# llama_decode's return value when the abort callback stopped it (llama-context.cpp: GGML_STATUS_ABORTED -> 2).
DECODE_ABORTED = 2

AbortCallback = C.ggml_abort_callback


class _LogSink:
    """llama.cpp's single process-wide log callback, forwarded to the ``agent.engine.llama`` logger.

    llama.cpp logs buffer sizes at INFO while loading; a capture collects those lines so the
    load report can show llama.cpp's own numbers next to the estimate.
    """

    # ggml.h: 1 DEBUG, 2 INFO, 3 WARN, 4 ERROR, 5 CONT (continues the previous line). llama.cpp's
    # INFO is a page of model details per load: DEBUG here. (llama-cpp-python's own table is off by one.)
    _LEVELS = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}
    # What llama.cpp reports when our abort callback stops a decode (GGML_STATUS_ABORTED = 1,
    # llama_decode -> 2, the micro-batch dropped from the KV cache): a cancel, not a failure.
    _QUIET = (
        "removing memory module entries",
        "compute status: 1",
        "compute_async failed with error 1",
        "failed to decode, ret = 2",
        # Sliding-window models (Gemma 3): llama.cpp warns that the full-size SWA cache is in use.
        # The engine keeps it on purpose (prefix reuse needs it) and plans for it.
        "using full-size SWA cache",
        # A vocabulary quirk of some real files (Gemma 3: '</s>' typed as normal text), which
        # llama.cpp corrects itself; nothing for the operator to do.
        "was not control-type; this is probably a bug in the model",
    )

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._capture: list[str] | None = None
        self._quiet = False
        self._last_level = logging.DEBUG
        # The ctypes object must outlive every call llama.cpp makes to it: keep it on the sink.
        self._cfunc = C.llama_log_callback(self._on_log)
        self._installed = False

    def _on_log(self, level: int, text: bytes, _user: Any) -> None:
        try:
            line = text.decode("utf-8", "replace")
            py_level = self._last_level if level == 5 else self._LEVELS.get(level, logging.DEBUG)
            self._last_level = py_level
            if py_level >= logging.WARNING and (self._quiet or any(q in line for q in self._QUIET)):
                py_level = logging.DEBUG
            cap = self._capture
            if cap is not None:
                cap.append(line)
            if log.isEnabledFor(py_level) and line.strip():
                log.log(py_level, "%s", line.rstrip())
        except Exception:  # noqa: BLE001  an exception must never cross back into C
            pass

    def install(self) -> None:
        # llama-cpp-python installs its own callback when it is imported; ours replaces it.
        with self._lock:
            if not self._installed:
                C.llama_log_set(self._cfunc, ctypes.c_void_p(0))
                self._installed = True

    @contextlib.contextmanager
    def capture(self, *, quiet: bool = False) -> Iterator[list[str]]:
        """Collect llama.cpp's lines meanwhile; ``quiet``: its warnings too go to DEBUG (a planning
        probe repeats the real load's warnings, which the real load will give once)."""
        lines: list[str] = []
        self._capture, self._quiet = lines, quiet
        try:
            yield lines
        finally:
            self._capture, self._quiet = None, False


LOG_SINK = _LogSink()

# Serialises every Llama() construction in the process: the default-parameter functions are
# swapped on the llama_cpp module for the duration of one constructor call.
_CONSTRUCT_LOCK = threading.Lock()


@contextlib.contextmanager
def _default_params(*, use_extra_bufts: bool, n_outputs_max: int, n_seq_max: int = 1) -> Iterator[None]:
    """Make ``Llama.__init__`` start from our parameters.

    ``Llama()`` builds its structs with ``llama_cpp.llama_model_default_params()`` and
    ``llama_context_default_params()`` and exposes neither ``use_extra_bufts`` (weight repacking
    into anonymous memory) nor ``n_outputs_max``. It looks both functions up on the module at call
    time, so wrapping them for the duration of the constructor is enough; the caller then checks
    ``Llama.model_params`` to prove the value took effect.
    """
    orig_model, orig_context = C.llama_model_default_params, C.llama_context_default_params

    def model_params() -> Any:
        p = orig_model()
        p.use_extra_bufts = use_extra_bufts
        return p

    def context_params() -> Any:
        p = orig_context()
        p.n_outputs_max = n_outputs_max
        # Several sequences (slots), each with a KV cache of its own of n_ctx / n_seq_max cells:
        # llama.cpp's advice for sequences that do not share a long prefix, and what the plan sizes.
        p.n_seq_max = n_seq_max
        p.kv_unified = False
        return p

    C.llama_model_default_params = model_params
    C.llama_context_default_params = context_params
    try:
        yield
    finally:
        C.llama_model_default_params = orig_model
        C.llama_context_default_params = orig_context


@dataclass(frozen=True)
class ContextArgs:
    """What a llama.cpp context is made with, as far as it decides memory: ``n_ctx`` per slot, ``slots``
    sequences, batch sizes, threads, KV cache types and flash attention. The load and the probe use the
    same value, so the probe's sizes are the load's."""

    n_ctx: int
    n_batch: int
    n_ubatch: int
    n_threads: int
    type_k: str
    type_v: str
    flash_attn: bool
    slots: int = 1


def construct_llama(path: str, *, repack: bool, ctx: ContextArgs) -> tuple[llama_cpp.Llama, list[str]]:
    """Load ``path`` with mmap (never mlock) and return the Llama and llama.cpp's load log.

    verbose=True keeps llama-cpp-python from redirecting the process's stdout/stderr file
    descriptors to /dev/null during load (it does that with verbose=False, and every other thread
    of the daemon would lose its log lines meanwhile); its own Python prints are swallowed here
    instead, and llama.cpp's log goes through LOG_SINK.
    """
    LOG_SINK.install()
    with _CONSTRUCT_LOCK, LOG_SINK.capture() as lines:
        with (
            _default_params(use_extra_bufts=repack, n_outputs_max=ctx.slots, n_seq_max=ctx.slots),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            llama = llama_cpp.Llama(
                path,
                n_ctx=ctx.n_ctx * ctx.slots,
                n_batch=ctx.n_batch,
                n_ubatch=ctx.n_ubatch,
                n_threads=ctx.n_threads,
                n_threads_batch=ctx.n_threads,
                use_mmap=True,
                use_mlock=False,
                type_k=GGML_TYPES[ctx.type_k],
                type_v=GGML_TYPES[ctx.type_v],
                flash_attn=ctx.flash_attn,
                logits_all=False,
                verbose=True,
            )
    if bool(llama.model_params.use_extra_bufts) != repack:
        llama.close()
        raise RuntimeError("llama-cpp-python did not take use_extra_bufts from llama_model_default_params()")
    return llama, lines


_SIZE_RE = re.compile(r"(\S+)\s+(model|KV|compute|output) buffer size\s*=\s*([\d.]+) MiB")


def buffer_sizes(lines: list[str]) -> dict[str, int]:
    """llama.cpp's reported buffers from its load log, bytes: {"CPU_Mapped model": ..., "CPU_REPACK model": ...,
    "CPU KV": ..., "CPU compute": ..., "CPU output": ...}."""
    out: dict[str, int] = {}
    for line in lines:
        m = _SIZE_RE.search(line)
        if m:
            key = f"{m.group(1)} {m.group(2)}"
            out[key] = out.get(key, 0) + int(float(m.group(3)) * 1024 * 1024)
    return out


# ---------------------------------------------------------------------------------------------
# Planning with llama.cpp's own numbers
# ---------------------------------------------------------------------------------------------

_KV_SIZE_RE = re.compile(r"^llama_(?:kv_cache|memory_recurrent)\w*:\s+size =\s*([\d.]+) MiB")


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_size_t)
        for n in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def heap_in_use() -> int | None:
    """Bytes malloc has handed out and not had back (glibc >= 2.33 mallinfo2: arena chunks in use
    plus mmap'd chunks, all arenas); None without mallinfo2. Unlike RssAnon it does not depend on
    what earlier frees left in the heap, so a difference measures one step's allocations."""
    fn = getattr(LIBC.lib, "mallinfo2", None)
    if fn is None:
        return None
    fn.restype, fn.argtypes = _MallInfo2, []
    m = fn()
    return int(m.uordblks + m.hblkhd)


def _mib_bytes(text: str) -> int:
    # llama.cpp prints sizes with 2 decimals of MiB: the parsed value is within 5 KiB of the real one.
    return int(float(text) * 1024 * 1024)


@dataclass(frozen=True)
class ContextSizes:
    """What llama.cpp allocates for one context, as it reports it: KV cache (every layer's cells,
    sliding-window layers sized as configured), the compute buffer of the worst-case graph, and the
    output (logits) buffer. Bytes."""

    n_ctx: int
    kv: int
    compute: int
    output: int


class BufferProbe:
    """A model loaded with ``no_alloc`` (llama.cpp "only load metadata and simulate memory
    allocations"): no tensor data is read or allocated, but every context created from it runs
    llama.cpp's own sizing (KV cache cells per layer, sliding-window layers, graph reservation) and
    logs what it would allocate. One probe serves any number of ``context()`` calls, so planning
    can search n_ctx cheaply.

    Cost, measured on 2 x86 cores (docs/memory-modes.md): the model part is the vocabulary load
    (about 0.5 s and 40 MiB of transient heap for Gemma 3's 262k tokens, 20 ms for the tiny
    preset); each context 5-30 ms. Everything is freed by ``close()``.

    The model is opened without mmap: llama.cpp asserts that no_alloc is not combined with
    mapped weight buffers (llama-model.cpp load_tensors), and without mmap it reads only the
    header. Repacking is decided apart (``cpu_repack``): with no_alloc the weight buffers are
    empty placeholders and llama.cpp reports them as 0 bytes.
    """

    def __init__(self, path: str, *, n_threads: int = 1) -> None:
        LOG_SINK.install()
        self.path = path
        self.n_threads = n_threads
        params = C.llama_model_default_params()
        params.no_alloc = True
        params.use_extra_bufts = False
        params.load_mode = C.LLAMA_LOAD_MODE_NONE
        t0 = time.monotonic()
        with _CONSTRUCT_LOCK, LOG_SINK.capture(quiet=True) as lines:
            heap_before = heap_in_use()
            self._model = C.llama_model_load_from_file(path.encode("utf-8"), params)
            heap_after = heap_in_use()
        self.load_ms = (time.monotonic() - t0) * 1000
        # The model's host-side tables (vocabulary, its lookup maps and piece cache, metadata):
        # what the real load builds too. Live heap bytes, exact whatever the heap held before;
        # None where the C library cannot say (musl).
        self.host_bytes = None if heap_before is None or heap_after is None else max(0, heap_after - heap_before)
        if not self._model:
            errors = [ln.strip() for ln in lines if "error" in ln.lower() or "failed" in ln.lower()]
            raise RuntimeError("; ".join(errors[-3:]) or "llama_model_load_from_file gave no model and no reason")
        self.context_ms: list[float] = []

    def context(
        self, *, n_ctx: int, n_batch: int, n_ubatch: int, type_k: str, type_v: str, flash_attn: bool, slots: int = 1
    ) -> ContextSizes:
        """Create and free one no_alloc context with the parameters ``construct_llama`` gives Llama()."""
        if self._model is None:
            raise RuntimeError("the probe is closed")
        cp = _context_params(ContextArgs(n_ctx, n_batch, n_ubatch, self.n_threads, type_k, type_v, flash_attn, slots))
        t0 = time.monotonic()
        with _CONSTRUCT_LOCK, LOG_SINK.capture(quiet=True) as lines:
            ctx = C.llama_init_from_model(self._model, cp)
            if ctx:
                n = int(C.llama_n_ctx(ctx))
                C.llama_free(ctx)
        self.context_ms.append((time.monotonic() - t0) * 1000)
        if not ctx:
            errors = [ln.strip() for ln in lines if "error" in ln.lower() or "failed" in ln.lower()]
            raise RuntimeError(f"no context of {n_ctx} tokens: " + ("; ".join(errors[-3:]) or "no reason given"))
        kv = sum(_mib_bytes(m.group(1)) for m in map(_KV_SIZE_RE.search, lines) if m)
        buffers = buffer_sizes(lines)
        compute = sum(v for k, v in buffers.items() if k.endswith(" compute"))
        output = sum(v for k, v in buffers.items() if k.endswith(" output"))
        return ContextSizes(n_ctx=n, kv=kv, compute=compute, output=output)

    def close(self) -> None:
        model, self._model = self._model, None
        if model:
            C.llama_model_free(model)

    def __enter__(self) -> BufferProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _context_params(a: ContextArgs) -> Any:
    """The context parameters Llama() builds from construct_llama's arguments, as far as they decide
    memory (n_ctx, batch sizes, KV types, flash attention, one output row). Everything else keeps
    llama.cpp's defaults in both, including ``swa_full`` (a full-size cache for sliding-window
    layers, which prefix reuse needs). tests/test_estimate.py checks that the probe's sizes equal
    the real load's."""
    cp = C.llama_context_default_params()
    cp.n_ctx = a.n_ctx * a.slots
    cp.n_seq_max = a.slots
    cp.kv_unified = False
    cp.n_batch = min(a.n_ctx, a.n_batch)
    cp.n_ubatch = min(cp.n_batch, a.n_ubatch)
    cp.n_threads = a.n_threads
    cp.n_threads_batch = a.n_threads
    cp.type_k = GGML_TYPES[a.type_k]
    cp.type_v = GGML_TYPES[a.type_v]
    cp.flash_attn_type = C.LLAMA_FLASH_ATTN_TYPE_ENABLED if a.flash_attn else C.LLAMA_FLASH_ATTN_TYPE_DISABLED
    cp.n_outputs_max = a.slots
    return cp


@dataclass(frozen=True)
class RepackPlan:
    """The weights llama.cpp's CPU backend copies into its extra buffer types (``CPU_REPACK`` ...)
    in fast mode on this CPU: they become anonymous memory; the rest stays in the mapped file."""

    nbytes: int
    tensors: int
    duplicate_bytes: int = 0  # of nbytes: copies of a tensor that is also read from the file (a tied output)
    by_type: dict[str, int] = field(default_factory=dict)
    buffer_types: tuple[str, ...] = ()

    def describe(self) -> str:
        if not self.buffer_types:
            return "this CPU backend has no repacking buffer types"
        if not self.nbytes:
            return f"{'/'.join(self.buffer_types)} repacks none of this model's weights"
        kinds = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in sorted(self.by_type.items(), key=lambda kv: -kv[1]))
        return f"{'/'.join(self.buffer_types)} repacks {self.tensors} tensors ({kinds})"


class _GgmlInitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


class _TensorHead(ctypes.Structure):
    # The first two members of struct ggml_tensor (ggml.h): its type and its buffer.
    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p)]


_GET_ROWS_SUFFIXES = ("token_embd.weight", "pos_embd.weight", "token_types.weight", "per_layer_token_embd.weight")


class _Ggml:
    """The few ggml C functions that decide where a weight goes, bound once per process."""

    def __init__(self) -> None:
        lib_dir = pathlib.Path(C.__file__).parent / "lib"
        libs = [ctypes.CDLL(str(p)) for p in (lib_dir / "libggml-base.so", lib_dir / "libggml.so") if p.exists()]

        def fn(name: str, res: Any, *args: Any) -> Any:
            for lib in libs:
                f = getattr(lib, name, None)
                if f is not None:
                    f.restype, f.argtypes = res, list(args)
                    return f
            raise OSError(f"ggml function {name} not found in {lib_dir}")

        vp, i64 = ctypes.c_void_p, ctypes.c_int64
        self.init = fn("ggml_init", vp, _GgmlInitParams)
        self.free = fn("ggml_free", None, vp)
        self.overhead = fn("ggml_tensor_overhead", ctypes.c_size_t)
        self.new_4d = fn("ggml_new_tensor_4d", vp, vp, ctypes.c_int, i64, i64, i64, i64)
        self.mul_mat = fn("ggml_mul_mat", vp, vp, vp, vp)
        self.mul_mat_id = fn("ggml_mul_mat_id", vp, vp, vp, vp, vp)
        self.get_rows = fn("ggml_get_rows", vp, vp, vp, vp)
        self.alloc_buffer = fn("ggml_backend_buft_alloc_buffer", vp, vp, ctypes.c_size_t)
        self.free_buffer = fn("ggml_backend_buffer_free", None, vp)
        self.supports_op = fn("ggml_backend_dev_supports_op", ctypes.c_bool, vp, vp)
        self.buft_name = fn("ggml_backend_buft_name", ctypes.c_char_p, vp)
        dev_by_type = fn("ggml_backend_dev_by_type", vp, ctypes.c_int)
        dev_reg = fn("ggml_backend_dev_backend_reg", vp, vp)
        proc_address = fn("ggml_backend_reg_get_proc_address", vp, vp, ctypes.c_char_p)
        C.llama_backend_init()
        self.cpu = dev_by_type(0)  # GGML_BACKEND_DEVICE_TYPE_CPU
        if not self.cpu:
            raise OSError("ggml has no CPU device")
        self.extra_bufts: list[int] = []
        # llama.cpp's make_cpu_buft_list: the CPU device's extra buffer types, in its order.
        addr = proc_address(dev_reg(self.cpu), b"ggml_backend_dev_get_extra_bufts")
        if addr:
            arr = ctypes.CFUNCTYPE(ctypes.POINTER(vp), vp)(addr)(self.cpu)
            i = 0
            while arr and arr[i]:
                self.extra_bufts.append(arr[i])
                i += 1

    def first_taker(self, type_id: int, shape: tuple[int, ...], op: str, n_expert_used: int) -> int | None:
        """Index of the first extra buffer type that supports ``op`` on this weight, as llama.cpp's
        weight_buft_supported asks it: a dummy zero-size buffer of that type on the weight, then
        ggml_backend_dev_supports_op on the operation that uses it (512 tokens of f32 input)."""
        ne = [*shape, 1, 1, 1][:4]
        ctx = self.init(_GgmlInitParams(self.overhead() * 8, None, True))
        if not ctx:
            raise MemoryError("ggml_init failed")
        try:
            w = self.new_4d(ctx, type_id, *ne)
            if op == "get_rows":
                ids = self.new_4d(ctx, C.GGML_TYPE_I32, 512, 1, 1, 1)
                node = self.get_rows(ctx, w, ids)
            elif op == "mul_mat_id":
                b = self.new_4d(ctx, C.GGML_TYPE_F32, ne[0], n_expert_used, 512, 1)
                ids = self.new_4d(ctx, C.GGML_TYPE_I32, n_expert_used, 512, 1, 1)
                node = self.mul_mat_id(ctx, w, b, ids)
            else:
                b = self.new_4d(ctx, C.GGML_TYPE_F32, ne[0], 512, ne[2], ne[3])
                node = self.mul_mat(ctx, w, b)
            head = _TensorHead.from_address(w)
            for i, buft in enumerate(self.extra_bufts):
                buf = self.alloc_buffer(buft, 0)
                head.buffer = buf
                try:
                    ok = self.supports_op(self.cpu, node)
                finally:
                    head.buffer = None
                    self.free_buffer(buf)
                if ok:
                    return i
            return None
        finally:
            self.free(ctx)


@functools.cache
def _ggml() -> _Ggml:
    return _Ggml()


def cpu_repack(tensors: Iterable[Any], *, tied_embeddings: bool, n_expert_used: int = 2) -> RepackPlan:
    """Ask this CPU's ggml backend which weights it would take into its extra (repacking) buffer
    types with ``use_extra_bufts`` on: exactly the decision llama.cpp makes at load, for the CPU
    the process runs on (x86 AVX2 repacks Q4_0/Q4_K/IQ4_NL; ARM with dotprod also Q8_0 and Q6_K; a
    Cortex-A72 nothing). ``tensors``: the header's TensorEntry list. A tied output matrix is a
    duplicate of ``token_embd`` used by a matrix product and is asked about as one. Takes about
    5 ms for 300 tensors. Raises OSError when ggml's functions cannot be found."""
    import gguf  # costly: gguf pulls in numpy; only the repack probe needs it

    g = _ggml()
    names = tuple(g.buft_name(b).decode() for b in g.extra_bufts)
    total, count, duplicates = 0, 0, 0
    by_type: dict[str, int] = {}

    def ask(t: Any, op: str, *, duplicate: bool = False) -> None:
        nonlocal total, count, duplicates
        if g.first_taker(int(gguf.GGMLQuantizationType[t.type_name]), tuple(t.shape), op, n_expert_used) is not None:
            total += t.nbytes
            count += 1
            duplicates += t.nbytes if duplicate else 0
            by_type[t.type_name] = by_type.get(t.type_name, 0) + t.nbytes

    if not g.extra_bufts:
        return RepackPlan(0, 0, 0, {}, names)
    for t in tensors:
        if len(t.shape) < 2 or not t.name.endswith(".weight"):
            continue  # norms and biases: element-wise ops, never repacked
        if t.name.endswith(_GET_ROWS_SUFFIXES):
            ask(t, "get_rows")
            if t.name == "token_embd.weight" and tied_embeddings:
                ask(t, "mul_mat", duplicate=True)
        elif "_exps." in t.name and len(t.shape) == 3:
            ask(t, "mul_mat_id")
        else:
            ask(t, "mul_mat")
    return RepackPlan(total, count, duplicates, by_type, names)


class ExactSizer:
    """The exact plan's source of sizes (an ``agent.engine.estimate.Sizer``): which weights this
    CPU's backend repacks (``cpu_repack``) and, per context size, the KV, compute and output
    buffers llama.cpp reports for a no-alloc context of that size (``BufferProbe``), with the
    model's host-side tables as the probe measured them. One probe serves every size a planner
    asks about; answers are cached per n_ctx. Raises RuntimeError when llama.cpp cannot read the
    model or size a context; close() (or ``with``) frees the probe."""

    def __init__(self, path: Any, info: Any, *, n_batch: int, type_k: str, type_v: str, flash_attn: bool) -> None:

        self._ubatch_size = ubatch_size
        self._info = info
        self._type_k, self._type_v, self._flash_attn = type_k, type_v, flash_attn
        self._n_batch = n_batch
        self._cache: dict[tuple[int, int], Any] = {}
        self.notes: list[str] = []
        t0 = time.monotonic()
        self.repack: RepackPlan | None
        try:
            self.repack = cpu_repack(
                info.tensors, tied_embeddings=info.tied_embeddings, n_expert_used=max(1, info.n_expert_used)
            )
            self.notes.append(f"fast mode on this CPU: {self.repack.describe()}")
        except OSError as e:
            # ggml's C functions are not reachable in this build: fall back to the header's upper bound.
            self.repack = None
            self.notes.append(f"repacked bytes are the header's upper bound: cannot ask ggml ({e})")
        self._repack_ms = (time.monotonic() - t0) * 1000
        self._probe = BufferProbe(str(path))

    def __call__(self, n_ctx: int, slots: int = 1) -> Any:

        if (n_ctx, slots) not in self._cache:
            n_batch = min(self._n_batch, n_ctx)
            c = self._probe.context(
                n_ctx=n_ctx,
                n_batch=n_batch,
                n_ubatch=self._ubatch_size(n_ctx, n_batch),
                slots=slots,
                type_k=self._type_k,
                type_v=self._type_v,
                flash_attn=self._flash_attn,
            )
            if self.repack is not None:
                repacked, dup = self.repack.nbytes, self.repack.duplicate_bytes
            else:
                repacked = int(self._info.repackable_bytes)
                dup = (
                    next((r.nbytes for r in self._info.other_ranges if r.name == "token_embd.weight"), 0)
                    if self._info.tied_embeddings
                    else 0
                )
            self._cache[(n_ctx, slots)] = LlamaSizes(repacked, dup, c.kv, c.compute, c.output, self._probe.host_bytes)
        return self._cache[(n_ctx, slots)]

    def elapsed_ms(self) -> float:
        """What asking llama.cpp cost so far: the repack query, the probe's model, its contexts."""
        return self._repack_ms + self._probe.load_ms + sum(self._probe.context_ms)

    def close(self) -> None:
        self._probe.close()

    def __enter__(self) -> ExactSizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def token_piece(vocab: Any, token: int, buf: ctypes.Array[ctypes.c_char]) -> tuple[bytes, ctypes.Array[ctypes.c_char]]:
    """The bytes of one token (llama-cpp-python's detokenize asserts pieces fit 32 bytes)."""
    n = C.llama_token_to_piece(vocab, token, buf, len(buf), 0, False)
    if n < 0:
        buf = ctypes.create_string_buffer(-n)
        n = C.llama_token_to_piece(vocab, token, buf, len(buf), 0, False)
    return buf.raw[:n], buf


def system_info() -> str:
    """llama.cpp's own line about this build and CPU (features, the CPU variant it chose)."""
    return str(llama_cpp.llama_print_system_info().decode(errors="replace"))
