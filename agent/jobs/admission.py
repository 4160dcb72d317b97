"""Admission: may a measured job start now, on this board's memory? Pure.

The runner asks it for every queued job that passed the context rule (``agent.engine.types.fit_context``):
the job's KV cache and the model's working set against what the agent could hold now and the most it could
ever hold. The memory governor supplies only its posture (``agent.governor.policy.Posture``: whether the
model is wanted, whether jobs may start, the reduced context, whether to keep a reserve).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from agent.codes import ErrorCode
from agent.config.sections import GovernorSettings

MiB = 1024 * 1024


class Posture(Protocol):
    """What admission reads of the memory governor's posture (``agent.governor.policy.Posture``)."""

    @property
    def model_wanted(self) -> bool: ...

    @property
    def start_jobs(self) -> bool: ...

    @property
    def hold_unfit(self) -> bool: ...

    def context_tokens(self, n_ctx: int, shrink_ctx_pct: int) -> int: ...


@dataclass(frozen=True)
class Admission:
    verdict: Literal["run", "wait", "reject"]
    reason: str
    code: ErrorCode | None = None  # for "reject": the job's REJECTED code


def admit(
    *,
    kv_bytes: int,
    model_bytes: int,
    tokens: int,
    available_bytes: int,
    capacity_bytes: int,
    posture: Posture,
    settings: GovernorSettings,
    n_ctx: int,
    mem_total: int,
) -> Admission:
    """May a job start now?

    kv_bytes        KV cache the job needs (prompt tokens + max_tokens);
    model_bytes     the loaded model's working set (weights it touches, buffers);
    tokens          prompt tokens + max_tokens;
    available_bytes what the agent could hold now (``available_to_agent``);
    capacity_bytes  the most it could ever hold on this board (the memory budget: cgroup limit or
                    MemTotal less the reserve);
    n_ctx           the loaded context; mem_total: MemTotal (for the warn reserve).

    reject: it can never fit this board (REJECTED will_not_fit, "do not retry here").
    wait:   not now (the governor holds jobs, the model is unloaded, or memory is short); it stays
            queued and is asked again.
    """
    need = kv_bytes + model_bytes
    if need > capacity_bytes:
        return Admission(
            "reject",
            f"needs {need // MiB} MiB (model {model_bytes // MiB} + KV {kv_bytes // MiB} for {tokens} tokens) but this "
            f"board can give the agent at most {capacity_bytes // MiB} MiB; lower max_tokens or the prompt",
            ErrorCode.will_not_fit,
        )
    if not posture.model_wanted:
        return Admission("wait", "the model is unloaded under memory pressure")
    if not posture.start_jobs:
        return Admission("wait", "jobs are paused under memory pressure")
    limit = posture.context_tokens(n_ctx, settings.shrink_ctx_pct)
    if tokens > limit:
        return Admission("wait", f"{tokens} tokens exceed the reduced context of {limit} under memory pressure")
    reserve = int(mem_total * settings.mem_available_warn_pct / 100) if posture.hold_unfit else 0
    if need > available_bytes - reserve:
        return Admission(
            "wait",
            f"needs {need // MiB} MiB, {max(0, available_bytes - reserve) // MiB} MiB available"
            + (f" after the warn reserve of {reserve // MiB} MiB" if reserve else ""),
        )
    return Admission("run", "fits")
