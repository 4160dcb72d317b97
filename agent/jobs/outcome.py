"""How a run ends: the pure decision from what the engine returned (or raised) to one JobOutcome,
or to putting the job back in the queue.

Owns ``StopReason`` (why the runner asked a running job to stop) and ``conclude``. No I/O: the
runner passes in what happened, the store persists the outcome, the protocol renders it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from agent.codes import ErrorCode, JobStatus
from agent.engine.types import GenerationResult
from agent.errors import EngineError, OutputTruncated
from agent.jobs.gate import StopReason
from agent.jobs.protocol import ErrorInfo, JobOutcome, Timings, Usage


@dataclass(frozen=True)
class Requeue:
    """The job goes back to the queue instead of ending."""

    reason: StopReason


def conclude(
    ended: GenerationResult | BaseException,
    *,
    stop: StopReason | None,
    timings: Timings,
    timeout_text: str = "",
) -> JobOutcome | Requeue:
    """Decide how a run ended.

    ``ended`` is the engine's result or the exception it raised; ``stop`` is the reason the runner
    asked the job to stop, if it did. A job the runner stopped for a shutdown or a preemption is
    requeued unless it had already finished; a run cut short by the model being unloaded under it
    ("aborted") is requeued as a preemption, never reported as CANCELED.
    """
    requeue_for = stop if stop in (StopReason.SHUTDOWN, StopReason.PREEMPT) else None
    if isinstance(ended, BaseException):
        if requeue_for is not None and isinstance(ended, EngineError) and ended.code is ErrorCode.model_not_loaded:
            return Requeue(requeue_for)  # the model went away because of the stop itself
        return _from_error(ended, timings)
    result = ended
    if result.finish_reason in ("canceled", "aborted") and (requeue_for or result.finish_reason == "aborted"):
        return Requeue(requeue_for or StopReason.PREEMPT)
    usage = _usage(result)
    text = result.text or None
    if result.finish_reason == "canceled":
        error = ErrorInfo(code=ErrorCode.canceled, message="canceled by request")
        return JobOutcome(
            status=JobStatus.CANCELED, text=text, finish_reason="canceled", usage=usage, timings=timings, error=error
        )
    if result.finish_reason == "timeout":
        error = ErrorInfo(code=ErrorCode.timeout, message=timeout_text or "ran longer than its time limit")
        return JobOutcome(
            status=JobStatus.TIMED_OUT, text=text, finish_reason="timeout", usage=usage, timings=timings, error=error
        )
    return JobOutcome(
        status=JobStatus.SUCCEEDED, text=text, finish_reason=result.finish_reason, usage=usage, timings=timings
    )


def _usage(result: GenerationResult) -> Usage:
    s = result.stats
    return Usage(
        prompt_tokens=s.prompt_tokens,
        completion_tokens=s.completion_tokens,
        prompt_tokens_cached=s.prompt_tokens_cached,
        max_tokens_allowed=s.max_tokens_allowed,
        prompt_tokens_dropped=s.prompt_tokens_dropped,
    )


def _from_error(e: BaseException, timings: Timings) -> JobOutcome:
    if isinstance(e, OutputTruncated) and isinstance(e.result, GenerationResult):
        # Structured output cut short: not valid JSON, so not a success; what was generated and
        # what it cost are still the client's to see.
        r = e.result
        finish = r.finish_reason if r.finish_reason in ("stop", "length") else None
        return JobOutcome(
            status=e.code.status,
            text=r.text or None,
            finish_reason=finish,
            usage=_usage(r),
            timings=timings,
            error=ErrorInfo(code=e.code, message=str(e)),
        )
    if isinstance(e, EngineError):
        # The code decides the status: context_too_long, will_not_fit, prompt_too_large ... are
        # REJECTED (the same request fails the same way on any retry); the rest FAILED.
        code = e.code if isinstance(e.code, ErrorCode) else ErrorCode.engine_error
        message = str(e)
    elif isinstance(e, MemoryError):
        code, message = ErrorCode.will_not_fit, "out of memory while running the job"
    else:  # a bug: the job still gets its one outcome instead of staying IN_PROGRESS
        code, message = ErrorCode.internal, f"{type(e).__name__}: {e}"
    return JobOutcome(status=code.status, timings=timings, error=ErrorInfo(code=code, message=message))


RequeueReason = Literal["shutdown", "preempt"]
Requeued = Literal["requeued", "requeued_counted", "failed_preempted"]


def requeue_decision(
    reason: RequeueReason, *, preemptions: int, attempt: int, max_preemptions: int, max_attempts: int
) -> Requeued:
    """What becomes of a running job put back in the queue (``preemptions`` counts this one).

    shutdown  the run is not counted (the attempt is given back): requeued.
    preempt   the first ``max_preemptions`` preemptions are free (requeued); later ones count as an
              attempt (requeued_counted), and once attempts reach ``max_attempts`` the job ends FAILED
              'preempted' (failed_preempted, with ``preempted_too_often``). So a job preempted again
              and again always ends.
    """
    if reason == "shutdown" or preemptions <= max_preemptions:
        return "requeued"
    return "failed_preempted" if attempt >= max_attempts else "requeued_counted"


def preempted_too_often(preemptions: int, attempts: int) -> JobOutcome:
    """The outcome of a job whose preemptions used up its attempts (store.max_attempts)."""
    return JobOutcome.refused(
        ErrorCode.preempted,
        f"preempted {preemptions} time(s) (memory pressure or a model change) and started {attempts} time(s) "
        "(store.max_attempts); it may succeed later or on another device",
    )


__all__ = ["Requeue", "RequeueReason", "Requeued", "StopReason", "conclude", "preempted_too_often", "requeue_decision"]
