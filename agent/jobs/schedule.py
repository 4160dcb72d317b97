"""Which queued job starts next, and why each other one waits: the queue policy, as a pure function.

The runner judges every queued job on its own (``Verdict``: its context, its memory, or a hold that
stops every job) and hands the queue, in priority-then-arrival order, to ``pick``. The rules:

* A job that cannot start now never stops one behind it that can: the first job that can start
  takes the free slot, so priority order is kept among the jobs that can start.
* A job that has waited for memory for ``reserve_after_s`` reserves the next free capacity: jobs
  behind it wait (``reserved``) until it starts, so a stream of small jobs cannot starve a large one.
* A job that has waited for memory for ``memory_wait_max_s`` while nothing else ran ends FAILED
  ``memory_wait_exceeded``: no wait is unbounded.
* A job that can never run here (its prompt fills the context, a chat without a template, more
  memory than the board has) ends at once with its code.

Every job that does not start gets a ``WaitReason`` and a sentence; the runner records it, announces
it on the job's status topic when it changes, and logs it. No I/O and no clock here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from agent.codes import ErrorCode, WaitReason


@dataclass(frozen=True)
class Verdict:
    """One queued job judged alone: it can ``run`` now, must ``wait`` (with a reason), or ``end``
    (it can never run here: ``code`` and ``detail`` are its outcome)."""

    kind: Literal["run", "wait", "end"]
    reason: WaitReason | None = None
    detail: str = ""
    code: ErrorCode | None = None

    @classmethod
    def wait(cls, reason: WaitReason, detail: str) -> Verdict:
        return cls("wait", reason, detail)

    @classmethod
    def end(cls, code: ErrorCode, detail: str) -> Verdict:
        return cls("end", None, detail, code)


RUN = Verdict("run")


@dataclass(frozen=True)
class Queued:
    """A queued job as the policy sees it. ``memory_wait_s``: how long it has been waiting for
    memory without a break (0 when it was not waiting for memory)."""

    job_id: str
    verdict: Verdict
    memory_wait_s: float = 0.0


@dataclass(frozen=True)
class Pick:
    """What to do now: claim ``start`` (None: nothing), record each wait, end each job in ``ends``."""

    start: str | None
    waits: list[tuple[str, WaitReason, str]] = field(default_factory=list)
    ends: list[tuple[str, ErrorCode, str]] = field(default_factory=list)


def pick(
    queue: Sequence[Queued],
    *,
    free_slots: int,
    running: int,
    reserve_after_s: float,
    memory_wait_max_s: float,
    slot_detail: str = "every slot is running a job",
) -> Pick:
    """The queue policy (module docstring). ``queue`` is in start order (priority, then arrival);
    ``free_slots`` the slots free now, ``running`` the jobs running now."""
    start: str | None = None
    waits: list[tuple[str, WaitReason, str]] = []
    ends: list[tuple[str, ErrorCode, str]] = []
    reserving: Queued | None = None
    taken = 0  # free slots spoken for by runnable jobs
    for q in queue:
        v = q.verdict
        if v.kind == "end":
            assert v.code is not None
            ends.append((q.job_id, v.code, v.detail))
            continue
        if v.kind == "wait":
            assert v.reason is not None
            if v.reason is WaitReason.memory and running == 0 and q.memory_wait_s >= memory_wait_max_s:
                ends.append(
                    (
                        q.job_id,
                        ErrorCode.memory_wait_exceeded,
                        f"waited {q.memory_wait_s:.0f} s for memory with no other job running "
                        f"(governor.memory_wait_max_s {memory_wait_max_s:g}): {v.detail}",
                    )
                )
                continue
            waits.append((q.job_id, v.reason, v.detail))
            if v.reason is WaitReason.memory and reserving is None and q.memory_wait_s >= reserve_after_s:
                reserving = q
            continue
        if reserving is not None:
            waits.append(
                (
                    q.job_id,
                    WaitReason.reserved,
                    f"job {reserving.job_id} ahead of it has waited {reserving.memory_wait_s:.0f} s for memory "
                    f"(governor.reserve_after_s {reserve_after_s:g}) and takes the next free capacity",
                )
            )
        elif taken < free_slots:
            # The first takes a slot now; the others a slot still free, at the next passes.
            start = start or q.job_id
            taken += 1
        else:
            waits.append((q.job_id, WaitReason.slot, slot_detail))
    return Pick(start, waits, ends)


def held(queue: Sequence[Queued], reason: WaitReason, detail: str, *, running: int, memory_wait_max_s: float) -> Pick:
    """A hold stops every job (intake paused, no model, the governor holding jobs): each waits for
    it. A memory hold is bounded like any memory wait."""
    return pick(
        [Queued(q.job_id, Verdict.wait(reason, detail), q.memory_wait_s) for q in queue],
        free_slots=0,
        running=running,
        reserve_after_s=float("inf"),
        memory_wait_max_s=memory_wait_max_s,
    )


__all__ = ["Pick", "Queued", "RUN", "Verdict", "held", "pick"]
