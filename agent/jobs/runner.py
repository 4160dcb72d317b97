"""The runner: claims queued jobs and runs them on the engine, one worker thread per slot.

Owns which jobs are running, stopping them (``cancel``, ``preempt``, a shutdown), holding new
starts (``hold``/``release``: intake paused, a model swap, an unwritable store), and settling each
run: the pure decision in ``agent.jobs.outcome``, persisted before it is published. An outcome that
cannot be written (a full disk) is kept and written again as soon as the store takes writes: a job
never stays IN_PROGRESS while the daemon is up.

Several jobs run at once, one worker thread each, up to ``capacity()`` (the engine's slots,
engine.max_parallel, lowered by the memory governor). A worker claims a job only when a slot is
free, and claims are made one at a time in queue order (priority, then arrival): the free slot
goes to the most urgent queued job.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.codes import ErrorCode
from agent.delivery.sources import JobResults
from agent.engine.types import EngineLike, GenerationRequest, GenerationResult
from agent.errors import EngineError, StoreError
from agent.health import StoreHealth
from agent.governor.policy import Admission
from agent.jobs.outcome import Requeue, StopReason, conclude
from agent.protocol import JobOutcome, JobSubmit, StreamChunk, Timings
from agent.store import JobRecord, JobStore

log = logging.getLogger(__name__)

# How often an idle worker looks at the queue without being woken: expiries are due at their time.
IDLE_POLL_S = 1.0


@dataclass
class _Slot:
    job_id: str
    cancel: threading.Event = field(default_factory=threading.Event)
    stop: StopReason | None = None


class Runner:
    def __init__(
        self,
        store: JobStore,
        results: JobResults,
        *,
        engine: Callable[[], EngineLike | None],
        publish: Callable[..., Any],
        send_outcome: Callable[[JobRecord], Any],
        health: StoreHealth,
        admit: Callable[[JobRecord], Admission] | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        capacity: Callable[[], int] = lambda: 1,
    ) -> None:
        """``engine()`` gives the engine in force (None while no model is loaded); ``publish`` is
        the transport's best-effort publish (statuses, stream pieces); ``send_outcome`` hands a
        stored terminal record to the outbox; ``admit`` (the memory governor) decides whether the
        next job may start now, must wait in the queue, or can never fit this board. ``clock`` is
        wall time (timestamps, expiry);
        ``monotonic`` is the engine's clock, on which deadlines are handed to it. ``capacity()``:
        how many jobs may run at once now (read before every claim; workers are added as it grows)."""
        self._store = store
        self._results = results
        self._engine = engine
        self._publish = publish
        self._send_outcome = send_outcome
        self._admit = admit
        self._health = health
        self._clock = clock
        self._monotonic = monotonic
        self._capacity = capacity
        self._lock = threading.Lock()
        self._claim_lock = threading.Lock()  # one claim at a time: slot count and queue order hold
        self._on_thread_start: Callable[[], Any] = lambda: None
        self._idle = threading.Condition(self._lock)
        self._slots: dict[str, _Slot] = {}
        self._cancel_requests: set[str] = set()
        self._holds: set[str] = set()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self.last_tokens_per_s: float | None = None  # of the last job that generated (telemetry)
        self.last_slot_wait_ms: float | None = None  # of the last job the engine ran (telemetry)

    # ------------------------------------------------------------------ control

    def start(self, *, on_thread_start: Callable[[], Any] = lambda: None) -> None:
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

    def hold(self, reason: str) -> None:
        """Start no new job until ``release(reason)``; running jobs go on."""
        with self._lock:
            self._holds.add(reason)

    def release(self, reason: str) -> None:
        with self._lock:
            self._holds.discard(reason)
        self._wake.set()

    def set_hold(self, reason: str, on: bool) -> None:
        (self.hold if on else self.release)(reason)

    @property
    def thread_ids(self) -> list[int]:
        """The workers' kernel thread ids (their priority is the inference priority)."""
        return [t.native_id for t in self._threads if t.native_id is not None]

    @property
    def holds(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._holds)

    @property
    def running(self) -> list[str]:
        with self._lock:
            return list(self._slots)

    def cancel(self, job_id: str) -> bool:
        """A cancel request for a job the store says is running: stop it (it ends CANCELED). The
        request is also kept for a job claimed but not yet started. True if it was running here."""
        with self._lock:
            self._cancel_requests.add(job_id)
            slot = self._slots.get(job_id)
            if slot is None:
                return False
            slot.stop = slot.stop or StopReason.CANCEL
            slot.cancel.set()
            return True

    def preempt(self, job_ids: list[str] | None = None) -> list[str]:
        """Stop running jobs (all, or these) and put them back in the queue. Returns their ids."""
        return self._stop_running(StopReason.PREEMPT, job_ids)

    def quiesce(self, grace_s: float, reason: str) -> list[str]:
        """Hold new starts (``reason``), let running jobs finish within ``grace_s``, then preempt
        what still runs and wait for it to be requeued. Returns the preempted ids. The caller
        releases the hold when done."""
        self.hold(reason)
        if self._wait_idle(grace_s):
            return []
        preempted = self.preempt()
        self._wait_idle(None)
        return preempted

    def stop(self, grace_s: float, *, force: bool = False) -> None:
        """Shutdown: no new starts; running jobs get ``grace_s`` to finish (none with ``force``),
        then they are stopped and requeued without the run counting."""
        self._stopping.set()
        self._wake.set()
        if not self._wait_idle(0 if force else grace_s):
            log.warning("running job(s) did not finish within %.0f s: stopping them; they will be requeued", grace_s)
            self._stop_running(StopReason.SHUTDOWN, None)
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join()

    def force_stop(self) -> None:
        """A second stop signal: stop running jobs now (they are requeued)."""
        self._stopping.set()
        self._wake.set()
        self._stop_running(StopReason.SHUTDOWN, None)

    def _stop_running(self, why: StopReason, job_ids: list[str] | None) -> list[str]:
        with self._lock:
            hit = [s for s in self._slots.values() if job_ids is None or s.job_id in job_ids]
            for slot in hit:
                slot.stop = slot.stop or why
                slot.cancel.set()
            return [s.job_id for s in hit]

    def _wait_idle(self, timeout: float | None) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: not self._slots, timeout)

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
        """Expire what is due, then claim and run one job if a slot is free. False when nothing ran."""
        if self._stopping.is_set() or not self._health.writable:
            return False
        with self._claim_lock:
            capacity = max(1, self._capacity())
            with self._lock:
                if self._holds or len(self._slots) >= capacity:
                    return False
            now = self._clock()
            try:
                for rec in self._store.expire_queued(now):
                    self._send_outcome(rec)
                if self._engine() is None:
                    return False  # no model (a swap, or a failed load): jobs wait in the queue, they do not fail
                rec = self._admitted(now)
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

    def _admitted(self, now: float) -> JobRecord | None:
        """Claim the next job if memory admits it. One that must wait stays queued, and holds the
        jobs behind it (queue order is kept); one that can never fit ends REJECTED."""
        if self._admit is None:
            return self._store.claim_next(now)
        while True:
            head = self._store.peek_next(now)
            if head is None:
                return None
            verdict = self._admit(head)
            if verdict.verdict == "wait":
                log.debug("job %s waits for memory: %s", head.job_id, verdict.reason)
                return None
            if verdict.verdict == "reject":
                outcome = JobOutcome.refused(verdict.code or ErrorCode.insufficient_memory, verdict.reason)
                if self._store.finish(head.job_id, outcome, now):
                    log.warning("job %s refused: %s", head.job_id, verdict.reason)
                    self._send_outcome(self._stored(head.job_id))
                continue
            rec = self._store.claim(head.job_id, now)
            if rec is not None:
                return rec  # else canceled or claimed meanwhile: look again

    def _take_slot(self, rec: JobRecord) -> _Slot | None:
        """Count the claimed job as running (None: it must go back without running)."""
        slot = _Slot(rec.job_id)
        with self._lock:
            # A stop or a hold set just before this claim: the job goes back without running
            # (unless a cancel for it is pending: that ends CANCELED at once, below).
            blocked = (self._stopping.is_set() or bool(self._holds)) and rec.job_id not in self._cancel_requests
            if not blocked:
                self._slots[rec.job_id] = slot
                if rec.job_id in self._cancel_requests:
                    slot.stop = StopReason.CANCEL
                    slot.cancel.set()
        return None if blocked else slot

    def _run(self, rec: JobRecord, slot: _Slot | None) -> None:
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
                raise EngineError("no model is loaded (loading failed or it is being replaced)",
                                  code=ErrorCode.model_not_loaded)  # fmt: skip
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
        stats = ended.stats if isinstance(ended, GenerationResult) else None
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
            with self._idle:
                self._slots.pop(rec.job_id, None)
                self._cancel_requests.discard(rec.job_id)
                self._idle.notify_all()

    def _settle(self, rec: JobRecord, decision: JobOutcome | Requeue) -> None:
        """Persist how the run ended, then publish it. Retried until the store takes it: while the
        store is unwritable this worker waits here (it could claim nothing anyway)."""
        while True:
            try:
                if isinstance(decision, Requeue):
                    what = self._store.requeue(rec.job_id, decision.reason.value, self._clock())
                    if what == "failed_preempted":
                        self._send_outcome(self._stored(rec.job_id))
                    elif what != "not_running":
                        log.warning("job %s stopped (%s): requeued (%s)", rec.job_id, decision.reason.value, what)
                    return
                if self._store.finish(rec.job_id, decision, self._clock()):
                    self._send_outcome(self._stored(rec.job_id))
                else:  # e.g. canceled while queued in a race: the first outcome stands
                    log.warning("job %s already had an outcome; this run's %s is dropped", rec.job_id, decision.status)
                return
            except StoreError as e:
                self._health.failed(e)
                if self._stopping.is_set() and not self._health.writable:
                    log.error("job %s: its outcome could not be written before the stop; it runs again after "
                              "the restart", rec.job_id)  # fmt: skip
                    return
                self._health.wait_writable(IDLE_POLL_S)

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


__all__ = ["Runner", "StopReason"]
