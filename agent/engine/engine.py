"""The inference engine: the one owner of the llama.cpp model in this process.

Owns ``Engine`` (load with a memory plan, generate with streaming, stop sequences, cancellation
and deadlines, unload that gives memory back, page residency and warm-up) and its data types.
llama-cpp-python's exceptions end here: callers see ``EngineError`` and its subclasses only.

Jobs: a completion of a prompt, or a chat rendered with the model's chat template
(``agent.engine.chat``); either may be constrained to JSON by a grammar (``agent.engine.grammar``,
sampled by ``agent.engine.sampling``). The KV cache is kept between jobs and only the part of a
prompt after the prefix it shares with the cache is evaluated (``agent.engine.prefix``), with an
optional prefix persisted across restarts (``agent.engine.prompt_cache``).

Several jobs at once: ``engine.max_parallel`` slots, each a llama.cpp sequence with a KV cache
of its own, decoded together by one scheduler thread (``agent.engine.batch``, continuous
batching). ``generate`` may be called from several threads: each call waits for its own job.
``load`` and ``unload`` are serialised by a lock; any thread may cancel a job through the
``cancel`` event it passed in.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypedDict, Unpack

import llama_cpp.llama_cpp as C

from agent.codes import ErrorCode
from agent.config import Settings
from agent.config.sections import EngineSettings, MemorySettings
from agent.engine import llamacpp
from agent.engine.batch import Job, Run, Scheduler, Slot
from agent.engine.chat import template_for
from agent.engine.estimate import (
    LOAD_FIXED_BYTES,
    MemoryEstimate,
    ubatch_size,
)
from agent.engine.grammar import GrammarCache
from agent.engine.plan import PlanInputs, will_not_fit
from agent.engine.plan import plan as plan_load
from agent.engine.prefix import KVSequence, common_prefix
from agent.engine.prompt_cache import PromptCache
from agent.engine.residency import LayerResidency, layer_residency, warm_up
from agent.engine.sampling import Sampler
from agent.engine.types import (
    GenerationRequest,
    GenerationResult,
    LoadPlan,
    LoadReport,
    RequestLimits,
    TokenCallback,
    fit_context,
)
from agent.errors import ContextTooLong, EdgeAgentError, EngineError, WillNotFit
from agent.models.gguf_info import ModelInfo, read_model_info
from agent.system.libc import LIBC
from agent.system.memory import Budget, MiB, proc_status, process_cpu_count

log = logging.getLogger(__name__)

# A prompt that starts with engine.prompt_cache's text may tokenize differently in the last few
# tokens of the prefix (a merge across the boundary): it still counts as starting with it.
_PREFIX_SLACK = 8


# ---------------------------------------------------------------------------------------------
# the engine
# ---------------------------------------------------------------------------------------------


class EngineOptions(TypedDict, total=False):
    """``Engine``'s keyword arguments that ``Engine.from_settings`` does not take from the settings
    (state_dir it defaults to device.state_dir)."""

    budget: Budget | None
    force: bool
    clock: Callable[[], float]
    state_dir: Path | str | None


class Engine:
    """Owns one model. ``load()`` plans memory and loads; ``generate()`` runs one request;
    ``unload()`` frees it all. Construct it unloaded, e.g. with ``Engine.from_settings``."""

    def __init__(
        self,
        model_path: Path | str,
        *,
        engine: EngineSettings | None = None,
        memory: MemorySettings | None = None,
        allow_non_4bit: bool = False,
        budget: Budget | None = None,
        force: bool = False,
        clock: Callable[[], float] = time.monotonic,
        state_dir: Path | str | None = None,
    ) -> None:
        """``budget`` overrides memory.budget_mb resolution (tests, the CLI); ``force`` loads even
        when the estimate exceeds the budget (the report says so); ``clock`` is the monotonic clock
        deadlines are measured on; ``state_dir`` holds engine.prompt_cache's state file (None: the
        prefix is kept in memory only)."""
        self.model_path = Path(model_path)
        self.settings = engine or EngineSettings()
        self.memory_settings = memory or MemorySettings()
        self.allow_non_4bit = allow_non_4bit
        self.limits = RequestLimits.from_settings(self.settings)
        self._budget_override = budget
        self._force = force
        self._clock = clock
        self._lock = threading.RLock()
        self._closing = threading.Event()
        self._llama: Any = None  # llama_cpp.Llama: llama-cpp-python's objects are used untyped here
        self._info: ModelInfo | None = None
        self._report: LoadReport | None = None
        self._sched: Scheduler | None = None
        # llama.cpp keeps only the function pointer: this object must live as long as the context.
        self._abort_cfunc = llamacpp.AbortCallback(self._abort_check)
        self._piece_buf = ctypes.create_string_buffer(64)
        self._state_dir = None if state_dir is None else Path(state_dir)
        self.grammars = GrammarCache()
        self._prompt_cache: PromptCache | None = None

    @classmethod
    def from_settings(cls, settings: Settings, **kw: Unpack[EngineOptions]) -> Engine:
        """The daemon's engine: the model from model.path, which must lie inside device.models_dir."""
        options: EngineOptions = {"state_dir": settings.device.state_dir, **kw}
        return cls(
            settings.model_file(),
            engine=settings.engine,
            memory=settings.memory,
            allow_non_4bit=settings.model.allow_non_4bit,
            **options,
        )

    # ------------------------------------------------------------------ state

    @property
    def loaded(self) -> bool:
        return self._llama is not None

    @property
    def report(self) -> LoadReport | None:
        return self._report

    @property
    def info(self) -> ModelInfo | None:
        return self._info

    @property
    def n_ctx(self) -> int:
        """The context of one slot, tokens (0 while nothing is loaded)."""
        llama, sched = self._llama, self._sched
        return 0 if llama is None else llama.n_ctx() // (sched.n_slots if sched is not None else 1)

    @property
    def slots(self) -> int:
        """Jobs decoded together (0 when nothing is loaded)."""
        sched = self._sched
        return sched.n_slots if sched is not None else 0

    def busy_slots(self) -> int:
        sched = self._sched
        return sched.busy() if sched is not None else 0

    def kv_tokens(self) -> int:
        """KV cells in use over every slot, tokens (telemetry)."""
        sched = self._sched
        return sched.kv_tokens() if sched is not None else 0

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unload()

    def _require(self) -> Any:
        if self._llama is None:
            raise EngineError("the model is not loaded", code=ErrorCode.model_not_loaded)
        return self._llama

    # ------------------------------------------------------------------ load / unload

    @property
    def plan_inputs(self) -> PlanInputs:
        """What this engine's memory plan is made from (``agent.engine.plan``)."""
        return PlanInputs(
            self.model_path,
            self.settings,
            self.memory_settings,
            self.allow_non_4bit,
            self._budget_override,
            self._force,
        )

    def plan(self, *, runtime_bytes: int | None = None, exact: bool = True) -> LoadPlan:
        """``agent.engine.plan.plan`` for this engine's settings: mode and n_ctx, nothing loaded."""
        return plan_load(self.plan_inputs, runtime_bytes=runtime_bytes, exact=exact)

    def load(self) -> LoadReport:
        """Plan, then load the model (closing a loaded one first). Raises WillNotFit (nothing was
        loaded), ModelError (bad file) or EngineError."""
        with self._lock:
            self.unload()
            self._closing.clear()
            LIBC.malloc_trim()
            plan = self.plan(runtime_bytes=proc_status().rss_anon)
            # The probe's tables are freed: give the heap back, then take the process as it is
            # now (with what the probe could not give back) as the estimate's runtime term.
            LIBC.malloc_trim()
            before = proc_status()
            est = dataclasses.replace(plan.estimate, runtime=before.rss_anon + LOAD_FIXED_BYTES)
            mode, n_ctx, budget = plan.mode, plan.n_ctx, plan.budget
            if est.anon_bytes > budget.bytes and not self._force:
                raise WillNotFit(will_not_fit(est, budget, f"n_ctx {n_ctx}"))
            s = self.settings
            n_threads = s.n_threads if s.n_threads != "auto" else process_cpu_count()
            n_batch = min(s.n_batch, n_ctx)
            notes = list(budget.notes) + list(plan.notes)
            if est.anon_bytes > budget.bytes:
                notes.append(
                    f"forced: the estimate {est.anon_bytes / MiB:.0f} MiB exceeds the budget {budget.bytes / MiB:.0f} MiB"
                )
            if est.anon_bytes + est.file_bytes > budget.bytes:
                notes.append(
                    "the weights in use do not all fit in RAM next to the anonymous memory: the kernel will read "
                    "them from storage during generation (slow, but not an OOM)"
                )
            t0 = time.monotonic()
            try:
                ctx = llamacpp.ContextArgs(
                    n_ctx, n_batch, ubatch_size(n_ctx, n_batch), n_threads, s.type_k, s.type_v, s.flash_attn, plan.slots
                )
                llama, lines = llamacpp.construct_llama(str(self.model_path), repack=(mode == "fast"), ctx=ctx)
            except EdgeAgentError:
                raise
            except Exception as e:  # noqa: BLE001  llama-cpp-python raises ValueError/RuntimeError/OSError
                raise EngineError(
                    f"llama.cpp could not load {self.model_path}: {e}", code=ErrorCode.model_not_loaded
                ) from e
            load_ms = (time.monotonic() - t0) * 1000
            self._llama, self._info = llama, plan.info
            self._sched = Scheduler(
                llama,
                self._slots_for(llama, plan.slots),
                n_batch=n_batch,
                closing=self._closing,
                prepare=self._prepare,
                abort_callback=self._abort_cfunc,
            )
            buffers = llamacpp.buffer_sizes(lines)
            if mode == "fast" and not any("REPACK" in k for k in buffers):
                notes.append("llama.cpp repacked nothing on this CPU: fast mode costs no extra memory here")
            notes.extend(_plan_mismatches(est, buffers))
            self._report = LoadReport(
                model=str(self.model_path),
                mode=mode,
                mode_reason=plan.mode_reason,
                n_ctx=llama.n_ctx() // plan.slots,
                n_ctx_reason=plan.n_ctx_reason,
                n_batch=n_batch,
                n_threads=n_threads,
                budget=budget,
                estimate=est,
                before=before,
                after=proc_status(),
                load_ms=load_ms,
                llama_buffers=buffers,
                notes=notes,
                plan_ms=plan.probe_ms,
                slots=plan.slots,
                slots_reason=plan.slots_reason,
            )
            log.info("loaded %s", self._report.summary())
            if s.warmup:
                self.warmup(progress=False)
            return self._report

    def unload(self) -> None:
        """Free the model and give the memory back to the OS. A running generation is stopped
        (finish_reason 'canceled') first. Safe to call when nothing is loaded."""
        self._closing.set()
        with self._lock:
            sched, self._sched = self._sched, None
            if sched is not None:
                sched.close()  # jobs in flight end 'aborted'
            llama, self._llama = self._llama, None
            if llama is None:
                return
            llama.close()
            del llama
            # The numpy arrays of the Llama object go with its last reference; collect now so the
            # heap is really free before trimming it.
            gc.collect()
            LIBC.malloc_trim()
            self._report = None

    # ------------------------------------------------------------------ generate

    def _abort_check(self, _data: Any) -> bool:
        # Called by llama.cpp between graph nodes, from its compute thread: never raise.
        try:
            sched = self._sched
            return self._closing.is_set() or (sched is not None and sched.abort_wanted())
        except Exception:  # noqa: BLE001
            return False

    def count_tokens(self, text: str) -> int:
        # The tokenizer reads the vocabulary only: safe next to a decode on the scheduler thread.
        return len(self._tokenize(self._require(), text))

    def _tokenize(self, llama: Any, text: str) -> list[int]:
        # Chat templates write the BOS text themselves ({{ bos_token }}); llama.cpp would add the
        # model's BOS as well, and two BOS tokens degrade the output.
        bos = llama.token_bos()
        starts_with_bos = bos >= 0 and text.startswith(llama._model.token_get_text(bos) or "\x00")
        try:
            return list(llama.tokenize(text.encode("utf-8"), add_bos=not starts_with_bos, special=True))
        except Exception as e:  # noqa: BLE001
            raise EngineError(f"tokenising the prompt failed: {e}") from e

    def _check_request(self, req: GenerationRequest) -> None:
        lim = self.limits
        n_bytes = req.text_bytes()
        if n_bytes > lim.max_prompt_bytes:
            what = "the messages' contents are" if req.is_chat else "prompt is"
            raise EngineError(
                f"{what} {n_bytes} bytes, more than engine.max_prompt_bytes {lim.max_prompt_bytes}",
                code=ErrorCode.prompt_too_large,
            )
        if req.max_tokens < 1:
            raise EngineError(f"max_tokens must be at least 1 (got {req.max_tokens})", code=ErrorCode.invalid_request)
        if req.max_tokens > lim.max_tokens_limit:
            raise EngineError(
                f"max_tokens {req.max_tokens} is more than engine.max_tokens_limit {lim.max_tokens_limit}",
                code=ErrorCode.max_tokens_too_large,
            )
        if req.messages is not None:
            if not req.messages:
                raise EngineError("a chat needs at least one message", code=ErrorCode.invalid_request)
            for i, m in enumerate(req.messages):
                if m.role not in ("system", "user", "assistant"):
                    raise EngineError(
                        f"messages[{i}].role must be system, user or assistant, got {m.role!r}",
                        code=ErrorCode.invalid_request,
                    )
        rf = req.response_format
        if rf is not None and (rf.type, rf.schema is None) not in (("json_object", True), ("json_schema", False)):
            raise EngineError(
                "response_format must be json_object, or json_schema with a schema", code=ErrorCode.invalid_request
            )

    def _fit_context(self, tokens: list[int], max_tokens: int, n_ctx: int, bos: int) -> tuple[list[int], int, int]:
        """The prompt's tokens as evaluated (keep_tail may cut its front, keeping a leading BOS),
        the tokens dropped, and how many may be generated (agent.engine.types.fit_context)."""
        fit = fit_context(len(tokens), max_tokens, n_ctx, self.limits.context_overflow)
        if not fit.fits:
            raise ContextTooLong(fit.refusal(len(tokens)))
        if not fit.dropped:
            return tokens, 0, fit.allowed
        head = [tokens[0]] if tokens and tokens[0] == bos else []
        tail = tokens[len(tokens) - (fit.keep - len(head)) :]
        return head + tail, len(tokens) - len(head) - len(tail), fit.allowed

    def measure(self, req: GenerationRequest) -> int:
        """The request's prompt tokens with this model's tokenizer (a chat: its rendered template),
        as generate() would evaluate them before any keep_tail cut. Safe next to a running decode.
        Raises NoChatTemplate (a chat for a model without one) and EngineError."""
        llama = self._require()
        return len(self._tokenize(llama, self._prompt_text(llama, req)))

    @property
    def tokenizer_key(self) -> str:
        """Names this load's tokenizer and per-slot context: a queued job's measure holds while it
        is unchanged."""
        st = self.model_path.stat()
        return f"{self.model_path}:{st.st_size}:{st.st_mtime_ns}:{self.n_ctx}"

    def _slots_for(self, llama: Any, n: int) -> list[KVSequence]:
        """One KV sequence per slot, emptied; slot 0 gets engine.prompt_cache's prefix back from its
        state file when there is a valid one."""
        n_swa = int(C.llama_model_n_swa(llama._model.model))
        slots = [KVSequence(i, n_swa=n_swa) for i in range(n)]
        for kv in slots:
            kv.forget(llama.ctx)
        self._prompt_cache = None
        prefix, state_dir = self.settings.prompt_cache, self._state_dir
        if prefix and state_dir is None:
            log.info("engine.prompt_cache is set but the engine has no state folder: the prefix is not persisted")
        elif prefix and state_dir is not None:
            tokens = self._tokenize(llama, prefix)
            try:
                if len(tokens) > self.n_ctx_of(llama, n) // 2:
                    raise EngineError(
                        f"the prefix is {len(tokens)} tokens, more than half of n_ctx {self.n_ctx_of(llama, n)}: it "
                        "would leave little room for the jobs that start with it"
                    )
                pc = PromptCache.open(state_dir / "prompt-cache", llama, self.model_path, tokens)
            except (OSError, EngineError) as e:
                log.warning("engine.prompt_cache is off for this load: %s", e)
            else:
                self._prompt_cache = pc
                if pc.restore(llama.ctx, slots[0]):
                    log.info("prompt cache: restored %d tokens of KV from %s", len(slots[0]), pc.kv_path)
        return slots

    @staticmethod
    def n_ctx_of(llama: Any, slots: int) -> int:
        return int(llama.n_ctx()) // max(1, slots)

    def _prepare(self, slot: Slot, job: Job) -> int:
        """On the scheduler thread, when a job takes a slot: make the slot's cache hold the longest
        prefix of the job's prompt it can without evaluating it, and return that length (the prompt
        tokens the job does not evaluate). engine.prompt_cache's prefix is restored from its file
        when it gives more than the cache holds; when the job starts with a prefix that has no valid
        file yet, the prefix is evaluated first and saved."""
        llama, kv, tokens = self._require(), slot.kv, job.tokens
        n = kv.reuse(llama.ctx, tokens)
        pc = self._prompt_cache
        if pc is None or not pc.tokens:
            return n
        m = min(common_prefix(pc.tokens, tokens), len(tokens) - 1)
        if m <= n:
            return n
        if pc.saved:
            if pc.restore(llama.ctx, kv):
                return kv.truncate(llama.ctx, m)
            n = 0  # restore() emptied the sequence
        if m >= len(pc.tokens) - _PREFIX_SLACK:
            # The job starts with the prefix's text (its last tokens may merge differently with
            # what follows): evaluate the prefix's own tokens, save them, keep what the job shares.
            assert self._sched is not None
            if self._sched.decode_seq(kv, pc.tokens[len(kv) :], job.run):
                pc.save(llama.ctx, kv)
            # Evaluated for this job: only what the cache held before counts as cached.
            return min(n, kv.truncate(llama.ctx, min(m, len(kv))))
        return n

    def _prompt_text(self, llama: Any, req: GenerationRequest) -> str:
        if req.messages is None:
            return req.prompt
        return template_for(llama, self.settings.chat_template).render(req.messages)

    def generate(
        self,
        req: GenerationRequest,
        *,
        on_token: TokenCallback | None = None,
        cancel: threading.Event | None = None,
        deadline: float | None = None,
    ) -> GenerationResult:
        """Run one request; several may run at once (one per slot, from different threads).
        ``on_token(index, text)`` is called for each piece of new text (index 0, 1, 2 ...; text
        never empty; the pieces add up to ``result.text``), on the engine's scheduler thread: it
        must be quick. ``cancel`` may be set from any thread; ``deadline`` is a time on the engine's
        clock (time.monotonic by default). Raises ContextTooLong, NoChatTemplate, SchemaRefused,
        OutputTruncated (structured output cut short: the partial result is attached), EngineError.

        The prompt's longest prefix shared with what a slot's KV cache holds (an earlier job, or
        engine.prompt_cache) is not evaluated again: ``stats.prompt_tokens_cached`` counts it."""
        self._check_request(req)
        with self._lock:
            llama, sched = self._require(), self._sched
        if sched is None:
            raise EngineError("the model is not loaded", code=ErrorCode.model_not_loaded)
        vocab = llama._model.vocab
        # Everything that can refuse the request comes before it waits for a slot.
        text = self._prompt_text(llama, req)
        grammar = self.grammars.get(req.response_format) if req.response_format is not None else None
        tokens = self._tokenize(llama, text)
        if not tokens:
            # Nothing to condition on and no BOS to add: llama.cpp would sample from no logits.
            raise EngineError("the prompt is empty and the model adds no BOS token", code=ErrorCode.invalid_request)
        tokens, dropped, allowed = self._fit_context(
            tokens, req.max_tokens, self.n_ctx_of(llama, sched.n_slots), C.llama_vocab_bos(vocab)
        )
        job = Job(
            req=req,
            tokens=tokens,
            dropped=dropped,
            allowed=allowed,
            sampler=Sampler(req, vocab, grammar.sampler(vocab) if grammar is not None else None),
            run=Run(cancel, deadline, self._clock, self._closing),
            on_token=on_token,
            structured=grammar is not None,
        )
        sched.submit(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return job.result

    # ------------------------------------------------------------------ residency / warm-up

    def _model_info(self) -> ModelInfo:
        # Reading the header maps the file's first pages (and the kernel reads ahead around them):
        # read it once, so residency() does not disturb what it measures.
        if self._info is None:
            self._info = read_model_info(self.model_path)
        return self._info

    def residency(self) -> list[LayerResidency]:
        """Per transformer layer, the share of its bytes in the page cache (mincore(2)). Does not
        need the lock: it reads the file's page-cache state, not the model."""
        return layer_residency(self.model_path, self._model_info().layers)

    def warmup(self, progress: bool = False) -> float:
        """Read every page of the weights, layer by layer in file order (tqdm bar on stderr with
        ``progress``). Returns milliseconds taken."""
        info = self._model_info()
        ranges = [(r.name, r.offset, r.nbytes) for r in info.other_ranges] + [
            (f"blk.{r.index}", r.offset, r.nbytes) for r in info.layers
        ]
        ranges.sort(key=lambda r: r[1])
        t0 = time.monotonic()
        warm_up(self.model_path, ranges, progress=progress)
        return (time.monotonic() - t0) * 1000


def _plan_mismatches(est: MemoryEstimate, buffers: dict[str, int]) -> list[str]:
    """Where llama.cpp's real buffers differ from the plan by more than rounding: a note in the
    report (and a warning in the log), because the next plan on this board would be as wrong."""
    if est.source != "llama.cpp":
        return []
    real = {
        "repacked weights": sum(v for k, v in buffers.items() if k.endswith(" model") and "_Mapped" not in k),
        "KV cache": sum(v for k, v in buffers.items() if k.endswith(" KV")),
        "compute buffer": sum(v for k, v in buffers.items() if k.endswith(" compute")),
    }
    planned = {"repacked weights": est.repacked_weights, "KV cache": est.kv_cache, "compute buffer": est.compute_buffer}
    out = []
    for name, value in real.items():
        if abs(value - planned[name]) > 64 * 1024 + 0.01 * planned[name]:
            out.append(
                f"llama.cpp allocated {value / MiB:.1f} MiB of {name}, the plan said {planned[name] / MiB:.1f} MiB"
            )
            log.warning("plan mismatch: %s", out[-1])
    return out
