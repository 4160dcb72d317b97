"""The runner: claims queued jobs and runs them on the engine, one worker thread per slot.

Owns which jobs are running, stopping them (``cancel``, ``preempt``, a shutdown), holding new
starts (``hold``/``release``: intake paused, a model swap, an unwritable store), and settling each
run: the pure decision in ``agent.jobs.outcome``, persisted before it is published. An outcome that
cannot be written (a full disk) is kept and written again as soon as the store takes writes: a job
never stays IN_PROGRESS while the daemon is up.

Several jobs run at once, one worker thread each, up to ``capacity()`` (the engine's slots,
engine.max_parallel, lowered by the memory governor). Claims are made one at a time: each looks at
the whole queue, judges every job on its own (its prompt measured with the loaded model's
tokenizer, the context rule, its memory), and the pure queue policy (``agent.jobs.schedule``)
picks the first one that can start; every other job gets a recorded, announced reason to wait.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from agent.codes import ErrorCode, JobStatus, WaitReason
from agent.config.live import INTAKE_PAUSED
from agent.config.sections import GovernorSettings
from agent.engine.types import EngineLike, GenerationRequest, GenerationResult, fit_context
from agent.errors import EngineError, OutputTruncated, StoreError
from agent.jobs.admission import Admission
from agent.jobs.gate import Gate, Slot, StopReason
from agent.jobs.health import StoreHealth
from agent.jobs.outcome import Requeue, RequeueReason, conclude
from agent.jobs.protocol import ErrorInfo, JobOutcome, JobSubmit, ResultMessage, StreamChunk, Timings
from agent.jobs.results import JobResults
from agent.jobs.schedule import RUN, Pick, Queued, Verdict, held, pick
from agent.jobs.store import JobRecord, JobStore, QueuedJob
from agent.mqtt.transport import PublishHandle

log = logging.getLogger(__name__)

# How often an idle worker looks at the queue without being woken: expiries are due at their time.
IDLE_POLL_S = 1.0
# The most queued jobs one claim looks at (store.queue_max is usually far below).
QUEUE_SCAN = 1000
# What each hold of the runner means to a queued job.
_HOLD_REASONS: dict[str, tuple[WaitReason, str]] = {
    INTAKE_PAUSED: (WaitReason.paused, "intake is paused (intake.paused); queued jobs start when it is resumed"),
    "model change": (WaitReason.model, "the model is being changed; queued jobs start on the new one"),
    "memory": (WaitReason.memory, "the memory governor holds new jobs under memory pressure"),
}


class Runner:
    def __init__(
        self,
        store: JobStore,
        results: JobResults,
        gate: Gate,
        *,
        engine: Callable[[], EngineLike | None],
        publish: Callable[..., PublishHandle],
        send_outcome: Callable[[JobRecord], object],
        health: StoreHealth,
        admit: Callable[[int], Admission] | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        capacity: Callable[[], int] = lambda: 1,
        governor: Callable[[], GovernorSettings] = GovernorSettings,
        max_result_bytes: Callable[[str], int | None] = lambda topic: None,
    ) -> None:
        """``gate``: the holds and the running jobs (shared with the supervisor and the governor).
        ``engine()`` gives the engine in force (None while no model is loaded); ``publish`` is
        the transport's publish (statuses, stream pieces); ``send_outcome`` hands a stored terminal
        record to the outbox; ``admit(tokens)`` (the memory governor) decides whether a job whose KV
        cache holds that many tokens may start now, must wait in the queue, or can never fit this
        board. ``clock`` is wall time (timestamps, expiry); ``monotonic`` is the engine's clock, on
        which deadlines are handed to it. ``capacity()``: how many jobs may run at once now (read
        before every claim; workers are added as it grows). ``governor()``: the settings that bound
        memory waits (reserve_after_s, memory_wait_max_s). ``max_result_bytes(topic)``: the largest result the
        broker takes on that topic (None: no limit); a larger one fails with result_too_large instead."""
        self._store = store
        self._results = results
        self._gate = gate
        self._engine = engine
        self._publish = publish
        self._send_outcome = send_outcome
        self._max_result_bytes = max_result_bytes
        self._admit = admit
        self._health = health
        self._clock = clock
        self._monotonic = monotonic
        self._capacity = capacity
        self._governor = governor
        self._told: dict[str, set[WaitReason]] = {}  # the wait reasons logged per queued job
        self._lock = threading.Lock()
        self._claim_lock = threading.Lock()  # one claim at a time: slot count and queue order hold
        self._on_thread_start: Callable[[], object] = lambda: None
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self.last_tokens_per_s: float | None = None  # of the last job that generated (telemetry)
        self.last_slot_wait_ms: float | None = None  # of the last job the engine ran (telemetry)
        gate.on_release(self.wake)

    # ------------------------------------------------------------------ control

    def start(self, *, on_thread_start: Callable[[], object] = lambda: None) -> None:
        """Start the worker threads; ``on_thread_start`` runs first on each (its priority)."""
        self._on_thread_start = on_thread_start
        self._add_workers(self._capacity())

    def _add_workers(self, n: int) -> None:
        """Have at least ``n`` worker threads (never fewer than one)."""

        def work() -> None:
            self._on_thread_start()
            self._work_loop()

        with self._lock:
            while len(self._threads) < max(1, n) and not self._stopping.is_set():
                t = threading.Thread(target=work, name=f"edge-agent-runner-{len(self._threads)}", daemon=True)
                t.start()
                self._threads.append(t)

    def wake(self) -> None:
        self._wake.set()

    @property
    def thread_ids(self) -> list[int]:
        """The workers' kernel thread ids (their priority is the inference priority)."""
        return [t.native_id for t in self._threads if t.native_id is not None]

    def stop(self, grace_s: float, *, force: bool = False) -> None:
        """Shutdown: no new starts; running jobs get ``grace_s`` to finish (none with ``force``),
        then they are stopped and requeued without the run counting."""
        self._stopping.set()
        self._wake.set()
        if not self._gate.wait_idle(0 if force else grace_s):
            log.warning("running job(s) did not finish within %.0f s: stopping them; they will be requeued", grace_s)
            self._gate.stop(StopReason.SHUTDOWN)
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join()

    def force_stop(self) -> None:
        """A second stop signal: stop running jobs now (they are requeued)."""
        self._stopping.set()
        self._wake.set()
        self._gate.stop(StopReason.SHUTDOWN)

    # ------------------------------------------------------------------ the work loop

    def _work_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                ran = self.work_once()
            except Exception:  # a bug must not silently stop the worker: log and keep serving
                log.exception("runner error")
                ran = False
            if not ran:
                self._wake.wait(IDLE_POLL_S)
                self._wake.clear()

    def work_once(self) -> bool:
        """Expire what is due, look at the queue, and claim and run one job if one can start now.
        False when nothing ran."""
        if self._stopping.is_set() or not self._health.writable:
            return False
        with self._claim_lock:
            capacity = max(1, self._capacity())
            holds, running = set(self._gate.holds), self._gate.running
            now = self._clock()
            try:
                for expired in self._store.expire_queued(now):
                    self._send_outcome(expired)
                if "store" in holds:
                    return False  # nothing can be recorded; the device status says the store is unwritable
                rec = self._schedule(now, holds, running, capacity)
            except StoreError as e:
                self._health.failed(e)
                return False
            if rec is None:
                return False
            slot = self._take_slot(rec)
        if capacity > 1:
            self._add_workers(capacity)
            self._wake.set()  # another worker may claim the next job for the next free slot
        self._run(rec, slot)
        return True

    def _schedule(self, now: float, holds: set[str], running: list[str], capacity: int) -> JobRecord | None:
        """Judge the queue, carry out the policy's pick (ends, waits), and claim the job it starts."""
        queue = self._store.queue_view(now, QUEUE_SCAN)
        if not queue:
            return None
        g = self._governor()
        engine = self._engine()
        hold = next(
            (_HOLD_REASONS.get(h, (WaitReason.paused, f"new starts are held ({h})")) for h in sorted(holds)), None
        )
        if hold is None and engine is None:
            hold = (WaitReason.model, "no model is loaded (it is being loaded or replaced, or its load failed)")
        ctx = None
        if hold is None:
            assert engine is not None
            ctx = _Context(engine.tokenizer_key, engine.n_ctx, engine.limits.context_overflow)
        items = [
            Queued(q.job_id, RUN if ctx is None else self._judge(q, engine, ctx), q.memory_wait_s(now)) for q in queue
        ]
        if hold is not None:
            decided = held(items, hold[0], hold[1], running=len(running), memory_wait_max_s=g.memory_wait_max_s)
        else:
            if len(running) >= capacity:
                busy = f"all {capacity} slot(s) are running jobs ({', '.join(running)})"
            else:
                busy = f"the free slot(s) go to jobs ahead of it in the queue ({len(running)} of {capacity} running)"
            decided = pick(
                items,
                free_slots=capacity - len(running),
                running=len(running),
                reserve_after_s=g.reserve_after_s,
                memory_wait_max_s=g.memory_wait_max_s,
                slot_detail=busy,
            )
        self._carry_out(decided, {q.job_id: q.waiting_for for q in queue}, now)
        if decided.start is None:
            return None
        rec = self._store.claim(decided.start, now)
        self._told.pop(decided.start, None)
        if rec is None:
            self._wake.set()  # canceled or claimed meanwhile: look again
        return rec

    def _judge(self, q: QueuedJob, engine: EngineLike | None, ctx: _Context) -> Verdict:
        """One queued job on its own: measured with the loaded tokenizer (once per tokenizer and
        context), the context rule, then memory."""
        assert engine is not None
        key = ctx.tokenizer_key
        try:
            tokens = q.prompt_tokens
            if tokens is None or q.measured_for != key:
                rec = self._store.get(q.job_id)
                job = rec.job() if rec is not None else None
                if job is None:
                    return Verdict.end(ErrorCode.internal, "the stored request is missing")
                tokens = engine.measure(GenerationRequest.from_job(job))
                self._store.measured(q.job_id, tokens, key)
            fit = fit_context(tokens, q.max_tokens, ctx.n_ctx, ctx.overflow)
        except EngineError as e:
            if e.code is ErrorCode.model_not_loaded:
                return Verdict.wait(WaitReason.model, str(e))
            return Verdict.end(e.code if isinstance(e.code, ErrorCode) else ErrorCode.engine_error, str(e))
        if not fit.fits:
            return Verdict.end(ErrorCode.context_too_long, fit.refusal(tokens))
        if self._admit is None:
            return RUN
        verdict = self._admit(fit.keep + fit.allowed)
        if verdict.verdict == "reject":
            return Verdict.end(verdict.code or ErrorCode.insufficient_memory, verdict.reason)
        if verdict.verdict == "wait":
            return Verdict.wait(WaitReason.memory, verdict.reason)
        return RUN

    def _carry_out(self, decided: Pick, queued: dict[str, str | None], now: float) -> None:
        """End what the policy ended; record, announce and log each wait whose reason changed."""
        for job_id, code, message in decided.ends:
            if self._store.finish(job_id, JobOutcome.refused(code, message), now):
                level = logging.ERROR if code.status is JobStatus.FAILED else logging.WARNING
                log.log(level, "job %s %s %s: %s", job_id, code.status.value, code.value, message)
                self._send_outcome(self._stored(job_id))
            self._told.pop(job_id, None)
        for job_id, reason, detail in decided.waits:
            if queued.get(job_id) == reason.value or not self._store.waiting(job_id, reason.value, detail, now):
                continue
            told = self._told.setdefault(job_id, set())
            if reason not in told:
                told.add(reason)
                log.info("job %s waits for %s: %s", job_id, reason.value, detail)
            rec = self._store.get(job_id)
            if rec is not None and rec.status is JobStatus.QUEUED:
                self._publish_status(rec)
        if len(self._told) > 4 * QUEUE_SCAN:  # jobs that ended elsewhere (canceled, expired)
            self._told = {k: v for k, v in self._told.items() if k in queued}

    def _take_slot(self, rec: JobRecord) -> Slot | None:
        """Count the claimed job as running (None: it must go back without running)."""
        return self._gate.enter(rec.job_id, stopping=self._stopping.is_set())

    def _run(self, rec: JobRecord, slot: Slot | None) -> None:
        if slot is None:
            self._settle(rec, Requeue(StopReason.SHUTDOWN))
            log.info("job %s claimed as new starts were stopped: requeued without running", rec.job_id)
            return
        started = self._clock()
        timeout_text = ""
        ended: GenerationResult | BaseException
        try:
            self._publish_status(rec)
            job = rec.job()
            assert job is not None, "a claimed job always has its request"
            deadline, timeout_text = self._deadline(job, started)
            engine = self._engine()
            if engine is None:
                raise EngineError(
                    "no model is loaded (loading failed or it is being replaced)", code=ErrorCode.model_not_loaded
                )
            ended = engine.generate(
                GenerationRequest.from_job(job),
                on_token=self._streamer(rec.job_id, job),
                cancel=slot.cancel,
                deadline=deadline,
            )
        except Exception as e:  # the job still gets its one outcome instead of staying IN_PROGRESS
            if not isinstance(e, EngineError):
                log.exception("job %s failed unexpectedly", rec.job_id)
            ended = e
        produced = ended.result if isinstance(ended, OutputTruncated) else ended
        stats = produced.stats if isinstance(produced, GenerationResult) else None
        if stats is not None and stats.completion_tokens:
            self.last_tokens_per_s = stats.tokens_per_s
        if stats is not None and stats.slot_wait_ms is not None:
            self.last_slot_wait_ms = round(stats.slot_wait_ms, 1)
        timings = Timings(
            queue_ms=max(0.0, ((rec.started_at or started) - rec.created_at) * 1000.0),
            slot_wait_ms=stats.slot_wait_ms if stats else None,
            first_token_ms=stats.time_to_first_token_ms if stats else None,
            slots_in_use=stats.slots_in_use if stats else None,
            prompt_ms=stats.prompt_ms if stats else 0.0,
            generation_ms=stats.generation_ms if stats else 0.0,
            tokens_per_s=stats.tokens_per_s if stats else 0.0,
        )
        try:
            self._settle(rec, conclude(ended, stop=slot.stop, timings=timings, timeout_text=timeout_text))
        finally:
            self._gate.leave(rec.job_id)

    def _settle(self, rec: JobRecord, decision: JobOutcome | Requeue) -> None:
        """Persist how the run ended, then publish it. Retried until the store takes it: while the
        store is unwritable this worker waits here (it could claim nothing anyway)."""
        while True:
            try:
                if isinstance(decision, Requeue):
                    why: RequeueReason = "shutdown" if decision.reason is StopReason.SHUTDOWN else "preempt"
                    what = self._store.requeue(rec.job_id, why, self._clock())
                    if what == "failed_preempted":
                        self._send_outcome(self._stored(rec.job_id))
                    elif what != "not_running":
                        log.warning(
                            "job %s stopped (%s): back in the queue, %s",
                            rec.job_id,
                            _STOPPED[decision.reason],
                            "this run counts as an attempt"
                            if what == "requeued_counted"
                            else "this run does not count as an attempt",
                        )
                    return
                decision = self._sendable(rec, decision)
                if self._store.finish(rec.job_id, decision, self._clock()):
                    self._send_outcome(self._stored(rec.job_id))
                else:  # e.g. canceled while queued in a race: the first outcome stands
                    log.warning("job %s already had an outcome; this run's %s is dropped", rec.job_id, decision.status)
                return
            except StoreError as e:
                self._health.failed(e)
                if self._stopping.is_set() and not self._health.writable:
                    log.error(
                        "job %s: its outcome could not be written before the stop; it runs again after the restart",
                        rec.job_id,
                    )
                    return
                self._health.wait_writable(IDLE_POLL_S)

    def _sendable(self, rec: JobRecord, outcome: JobOutcome) -> JobOutcome:
        """The outcome, or result_too_large when its result message is more than the broker takes: a result
        that can never be delivered must still tell the client why, not wait in the outbox forever."""
        topic = self._results.topics.result(rec.job_id)
        limit = self._max_result_bytes(topic)
        if limit is None:
            return outcome
        size = len(
            ResultMessage.of(
                outcome, job_id=rec.job_id, device_id=self._results.device_id, attempt=rec.attempt, ts=self._clock()
            ).to_payload()
        )
        if size <= limit:
            return outcome
        log.error(
            "job %s: its result is %d bytes, the broker takes %d: failed with result_too_large", rec.job_id, size, limit
        )
        return JobOutcome(
            status=JobStatus.FAILED,
            finish_reason=outcome.finish_reason,
            usage=outcome.usage,
            timings=outcome.timings,
            error=ErrorInfo(
                code=ErrorCode.result_too_large,
                message=f"the result is {size} bytes and the broker takes {limit} bytes in one message (its "
                "Maximum Packet Size): ask for fewer max_tokens or raise the broker's limit",
            ),
        )

    def _stored(self, job_id: str) -> JobRecord:
        rec = self._store.get(job_id)
        assert rec is not None
        return rec

    # ------------------------------------------------------------------ per job

    def _publish_status(self, rec: JobRecord) -> None:
        msg = rec.status_message(self._results.device_id, self._clock())
        self._publish(self._results.topics.status(rec.job_id), msg.to_payload(), qos=1)

    def _streamer(self, job_id: str, job: JobSubmit) -> Callable[[int, str], None] | None:
        if not job.stream:
            return None
        topic = self._results.topics.stream(job_id)

        def on_token(index: int, text: str) -> None:
            self._publish(topic, StreamChunk(job_id=job_id, index=index, text=text).to_payload(), qos=0)

        return on_token

    def _deadline(self, job: JobSubmit, started: float) -> tuple[float | None, str]:
        """The engine's deadline on its monotonic clock (the earlier of timeout_s and expires_at),
        and what a TIMED_OUT result says about it."""
        ends = []
        if job.timeout_s is not None:
            ends.append((started + job.timeout_s, f"ran longer than timeout_s={job.timeout_s:g}"))
        if job.expires_at is not None:
            ends.append((job.expires_at.timestamp(), f"passed expires_at={job.expires_at.isoformat()}"))
        if not ends:
            return None, ""
        end, why = min(ends)
        return self._monotonic() + (end - self._clock()), why


@dataclass(frozen=True)
class _Context:
    """What one look at the queue judges every job by: the loaded tokenizer and its context."""

    tokenizer_key: str
    n_ctx: int
    overflow: str


_STOPPED = {
    StopReason.SHUTDOWN: "the daemon is stopping; it runs again after the restart",
    StopReason.PREEMPT: "preempted by a model change or memory pressure",
    StopReason.CANCEL: "canceled",
}


__all__ = ["Runner", "StopReason"]
