"""The engine's data types: requests, results, load plans and reports.

Importable without llama-cpp-python (nothing here touches it), so the protocol, the runner, the
CLI's `model inspect` and the tests of the job path do not pay for loading libllama.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from agent.config.sections import EngineSettings
from agent.engine.estimate import MemoryEstimate, Mode
from agent.models.gguf_info import ModelInfo
from agent.system.memory import Budget, MiB, ProcStatus

# "aborted": stopped because the model was being unloaded, not by the job's own cancel event or
# deadline; the runner requeues such a job instead of reporting it CANCELED.
FinishReason = Literal["stop", "length", "canceled", "timeout", "aborted"]
TokenCallback = Callable[[int, str], None]
ChatRole = Literal["system", "user", "assistant"]


@dataclass(frozen=True)
class ChatMessage:
    role: ChatRole
    content: str


@dataclass(frozen=True)
class ResponseFormat:
    """Constrained output: ``json_object`` (any JSON object) or ``json_schema`` (``schema`` a JSON Schema)."""

    type: Literal["json_object", "json_schema"]
    schema: dict[str, Any] | None = None

    def effective_schema(self) -> dict[str, Any]:
        """The schema the grammar is built from: json_object is the schema of any object."""
        return {"type": "object"} if self.type == "json_object" else dict(self.schema or {})

    def key(self) -> str:
        """sha256 of the canonical JSON of the effective schema: the grammar cache's key."""
        text = json.dumps(self.effective_schema(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class GenerationRequest:
    """One generation. A completion of ``prompt``, or, when ``messages`` is set, a chat rendered with
    the model's chat template (``prompt`` is then unused). ``response_format`` constrains either."""

    prompt: str = ""
    max_tokens: int = 128
    temperature: float = 0.7  # <= 0: greedy (deterministic)
    top_p: float = 0.95
    seed: int | None = None  # None: a random seed per request
    stop: list[str] = field(default_factory=list)
    messages: tuple[ChatMessage, ...] | None = None
    response_format: ResponseFormat | None = None

    @property
    def is_chat(self) -> bool:
        return self.messages is not None

    def text_bytes(self) -> int:
        """UTF-8 bytes of the text the client sent: the prompt, or every message's content."""
        if self.messages is not None:
            return sum(len(m.content.encode("utf-8")) for m in self.messages)
        return len(self.prompt.encode("utf-8"))

    @classmethod
    def from_job(cls, job: Any) -> GenerationRequest:
        """The engine's request for a job (an ``agent.jobs.protocol.JobSubmit``): every field the
        engine acts on, and nothing of the job's delivery (ids, priority, expiry, streaming)."""
        messages = None
        if getattr(job, "messages", None) is not None:
            messages = tuple(ChatMessage(m.role, m.content) for m in job.messages)
        rf = getattr(job, "response_format", None)
        return cls(
            prompt=job.prompt or "",
            max_tokens=job.max_tokens,
            temperature=job.temperature,
            top_p=job.top_p,
            seed=job.seed,
            stop=list(job.stop or []),
            messages=messages,
            response_format=None if rf is None else ResponseFormat(rf.type, rf.json_schema),
        )


@dataclass(frozen=True)
class ContextFit:
    """How a prompt of ``prompt_tokens`` tokens fits one slot's context (``fit_context``).

    ``fits`` False: the prompt leaves no room to generate and engine.context_overflow is "refuse"
    (the job is REJECTED context_too_long). Otherwise ``keep`` prompt tokens are evaluated (the last
    ones, when ``dropped`` > 0) and at most ``allowed`` tokens are generated."""

    fits: bool
    keep: int
    dropped: int
    allowed: int
    n_ctx: int

    def refusal(self, prompt_tokens: int) -> str:
        return (
            f"the prompt is {prompt_tokens} tokens and the context holds {self.n_ctx} per job (engine.n_ctx, per "
            "slot): nothing would be left to generate. Shorten the prompt, raise engine.n_ctx, or set "
            "engine.context_overflow = 'keep_tail'"
        )


def fit_context(prompt_tokens: int, max_tokens: int, n_ctx: int, overflow: str) -> ContextFit:
    """The one context rule, on the model's own token count (docs/protocol.md, "Context").

    * prompt + max_tokens fits: runs as asked.
    * the prompt fits (at least one token of room) but prompt + max_tokens does not: runs, and stops
      at the end of the context with finish_reason "length" (as llama-server and Ollama do); the
      result's usage says how many tokens it was allowed.
    * the prompt does not fit: ``refuse`` rejects it; ``keep_tail`` keeps its last tokens (and a
      leading BOS), leaving room for min(max_tokens, n_ctx // 2) new tokens.
    """
    if prompt_tokens < n_ctx:
        return ContextFit(True, prompt_tokens, 0, max(0, min(max_tokens, n_ctx - prompt_tokens)), n_ctx)
    if overflow == "keep_tail" and n_ctx >= 2:
        room = max(1, min(max_tokens, n_ctx // 2))
        return ContextFit(True, n_ctx - room, prompt_tokens - (n_ctx - room), room, n_ctx)
    return ContextFit(False, prompt_tokens, 0, 0, n_ctx)


@dataclass(frozen=True)
class GenerationStats:
    prompt_tokens: int  # tokens of the prompt (after keep_tail trimming), cached ones included
    completion_tokens: int
    prompt_ms: float
    generation_ms: float
    tokens_per_s: float  # completion tokens / generation time
    peak_rss_anon: int  # bytes, sampled during the run
    prompt_tokens_dropped: int = 0  # context_overflow = keep_tail: tokens cut from the front
    # Of prompt_tokens, those whose KV was already there (the previous job's shared prefix, or
    # engine.prompt_cache restored from its file) and were not evaluated again.
    prompt_tokens_cached: int = 0
    slot_wait_ms: float = 0.0  # from the request to a free slot (every slot busy with other jobs)
    time_to_first_token_ms: float | None = None  # from the start in a slot to the first generated text
    slots_in_use: int = 1  # jobs in the engine's slots when this one took its slot, itself included
    # The most tokens this run could generate: max_tokens, or less when prompt + max_tokens would
    # pass the end of the slot's context (the job then ends "length" at the context's end).
    max_tokens_allowed: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GenerationResult:
    text: str
    finish_reason: FinishReason
    stats: GenerationStats

    def as_dict(self) -> dict[str, Any]:
        return {"text": self.text, "finish_reason": self.finish_reason, "stats": self.stats.as_dict()}


@dataclass(frozen=True)
class RequestLimits:
    """The per-request bounds; replaceable on a loaded engine (SIGHUP reload)."""

    max_tokens_limit: int = 1024
    max_prompt_bytes: int = 262144
    context_overflow: Literal["refuse", "keep_tail"] = "refuse"

    @classmethod
    def from_settings(cls, s: EngineSettings) -> RequestLimits:
        return cls(s.max_tokens_limit, s.max_prompt_bytes, s.context_overflow)


@dataclass(frozen=True)
class LoadPlan:
    """What load() will do, decided from the GGUF header, the settings, the budget and (the exact
    plan, ``estimate.source == "llama.cpp"``) llama.cpp's own sizes from a no-alloc probe."""

    mode: Mode
    mode_reason: str
    n_ctx: int
    n_ctx_reason: str
    estimate: MemoryEstimate
    budget: Budget
    info: ModelInfo
    slots: int = 1  # jobs decoded together (engine.max_parallel), each with n_ctx of its own
    slots_reason: str = "engine.max_parallel"
    notes: tuple[str, ...] = ()  # what the probe found (repacking on this CPU, fallbacks)
    probe_ms: float | None = None  # what asking llama.cpp cost; None for a header-only plan


@dataclass(frozen=True)
class LoadReport:
    model: str
    mode: Mode
    mode_reason: str
    n_ctx: int
    n_ctx_reason: str
    n_batch: int
    n_threads: int
    budget: Budget
    estimate: MemoryEstimate
    before: ProcStatus  # this process just before the load
    after: ProcStatus  # just after it
    load_ms: float
    llama_buffers: dict[str, int]  # llama.cpp's own buffer sizes from its load log, bytes
    notes: list[str] = field(default_factory=list)
    plan_ms: float | None = None  # the exact plan's probe, before load_ms
    slots: int = 1  # jobs decoded together; n_ctx is each one's
    slots_reason: str = "engine.max_parallel"

    def summary(self) -> str:
        return (
            f"{Path(self.model).name}: {self.mode} mode ({self.mode_reason}); n_ctx {self.n_ctx} ({self.n_ctx_reason}); "
            f"{self.slots} slot(s) ({self.slots_reason}); "
            f"{self.n_threads} threads; {'planned' if self.estimate.source == 'llama.cpp' else 'estimated (header only)'} "
            f"{self.estimate.anon_bytes / MiB:.0f} MiB anonymous of budget "
            f"{self.budget.bytes / MiB:.0f} MiB ({self.budget.source}); RssAnon {self.after.rss_anon / MiB:.0f} MiB, "
            f"RssFile {self.after.rss_file / MiB:.0f} MiB after load; {self.load_ms:.0f} ms"
            + (f" (plan {self.plan_ms:.0f} ms)" if self.plan_ms is not None else "")
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "mode": self.mode,
            "mode_reason": self.mode_reason,
            "n_ctx": self.n_ctx,
            "n_ctx_reason": self.n_ctx_reason,
            "slots": self.slots,
            "slots_reason": self.slots_reason,
            "n_batch": self.n_batch,
            "n_threads": self.n_threads,
            "budget": self.budget.as_dict(),
            "estimate": {
                "source": self.estimate.source,
                "components": self.estimate.as_dict(),
                "anon_bytes": self.estimate.anon_bytes,
                "file_bytes": self.estimate.file_bytes,
            },
            "plan_ms": None if self.plan_ms is None else round(self.plan_ms, 1),
            "memory": {"before_load": self.before.as_dict(), "after_load": self.after.as_dict()},
            "load_ms": round(self.load_ms, 1),
            "llama_buffers": self.llama_buffers,
            "notes": list(self.notes),
        }


@runtime_checkable
class EngineLike(Protocol):
    """What the job path needs from an engine. ``agent.engine.Engine`` is the real one; tests may
    pass a fake that the same contract tests (tests/test_engine_contract.py) hold to it."""

    limits: RequestLimits

    @property
    def loaded(self) -> bool: ...

    @property
    def report(self) -> LoadReport | None: ...

    @property
    def slots(self) -> int:
        """Jobs that run at once (``generate`` from that many threads); 0 when nothing is loaded."""
        ...

    @property
    def n_ctx(self) -> int:
        """The context of one slot, tokens (only while loaded)."""
        ...

    @property
    def tokenizer_key(self) -> str:
        """Names the loaded tokenizer and per-slot context: a queued job is measured again when it changes."""
        ...

    def measure(self, req: GenerationRequest) -> int:
        """The request's prompt tokens with the loaded model's tokenizer (a chat: its rendered
        template). Raises EngineError (no_chat_template, model_not_loaded ...)."""
        ...

    def load(self) -> LoadReport: ...

    def unload(self) -> None: ...

    def generate(
        self,
        req: GenerationRequest,
        *,
        on_token: TokenCallback | None = None,
        cancel: Any = None,
        deadline: float | None = None,
    ) -> GenerationResult: ...
