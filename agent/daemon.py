"""The daemon: wires the store, the engine and the transport, and owns the job life cycle.

Threads and who does what:
- the transport's network thread calls ``_on_message``: a job is parsed, written to the store, and
  only then acknowledged to the broker (manual ack), so a crash before the write means redelivery;
- one worker thread claims jobs from the store (priority, then arrival) and runs them on the engine;
- the main thread handles signals (handlers only set flags), the systemd watchdog, resending
  undelivered results after a reconnect, and retention.

Every terminal outcome is written to the store before it is published, and marked delivered on
PUBACK; whatever is not delivered is published again after every reconnect and every restart.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from agent import __version__
from agent.config import Settings, load_settings
from agent.errors import EXIT_CANNOT_START, EdgeAgentError, EngineError, StoreError
from agent.engine import GenerationRequest, RequestLimits
from agent.protocol import (
    DeviceStatus,
    ErrorCode,
    ErrorInfo,
    InvalidJob,
    JobStatus,
    JobSubmit,
    StreamChunk,
    Timings,
    Topics,
    Usage,
    parse_submit,
)
from agent.store import Accepted, JobRecord, JobStore
from agent.system.priority import apply_priority
from agent.system.sdnotify import Notifier
from agent.telemetry import collect as collect_telemetry
from agent.transport import InboundMessage, MqttTransport

log = logging.getLogger(__name__)

# Settings that SIGHUP may change in place; everything else needs a restart and is reported as such.
RELOADABLE = {
    ("engine", "max_tokens_limit"),
    ("engine", "max_prompt_bytes"),
    ("engine", "context_overflow"),
    ("store", "queue_max"),
    ("store", "max_attempts"),
    ("store", "keep_finished"),
    ("store", "keep_finished_days"),
    ("store", "prune_interval_s"),
    ("priority", "nice"),
    ("priority", "oom_score_adj"),
    ("telemetry", "interval_s"),
    ("service", "shutdown_grace_s"),
}

# Results resent per main-loop pass: the transport holds a bounded number of messages in RAM.
RESEND_BATCH = 50


@dataclass
class _Running:
    job_id: str
    cancel: threading.Event = field(default_factory=threading.Event)
    why: str | None = None  # "cancel" or "shutdown" once cancel is set


class Daemon:
    def __init__(
        self,
        settings: Settings,
        *,
        engine: Any,
        config_path: Path | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        notifier: Notifier | None = None,
    ) -> None:
        """``clock`` is wall time (job timestamps, expiry); ``monotonic`` must be the engine's clock,
        on which job deadlines are handed to it."""
        self.settings = settings
        self.monotonic = monotonic
        self.engine = engine
        self.config_path = config_path
        self.clock = clock
        self.notifier = notifier or Notifier()
        self.topics = Topics(settings.mqtt.prefix, settings.device.id)
        try:
            settings.device.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create device.state_dir {settings.device.state_dir}: {e.strerror}") from None
        self.store = JobStore(
            settings.store.path,
            queue_max=settings.store.queue_max,
            max_attempts=settings.store.max_attempts,
            keep_finished=settings.store.keep_finished,
            keep_finished_days=settings.store.keep_finished_days,
            synchronous=settings.store.synchronous,
        )
        subs = [(self.topics.submit, 1), (self.topics.cancel_filter, 1)]
        if settings.mqtt.fleet_group:
            subs.append((self.topics.fleet_submit(settings.mqtt.fleet_group), 1))
        self.transport = MqttTransport(
            settings.mqtt,
            will=(self.topics.device_status, self._device_status("offline")),
            on_message=self._on_message,
            on_connect=self._on_connect,
            subscriptions=subs,
        )
        self._lock = threading.Lock()
        self._running: _Running | None = None
        self._cancel_requests: set[str] = set()
        # Results published and not yet acknowledged: a resend pass must not send them again.
        self._inflight: dict[str, Any] = {}
        self._wake = threading.Event()  # the worker: a job may be waiting
        self._tick = threading.Event()  # the main loop: something to do now
        self._resend = threading.Event()
        self._draining = threading.Event()  # no new job is started
        self._stop_requested = 0  # count of SIGTERM/SIGINT
        self._reload_requested = False
        self._worker: threading.Thread | None = None
        self._last_prune = 0.0
        self._last_telemetry = 0.0

    # ----------------------------------------------------------------- life cycle

    def start(self) -> None:
        """Recover what a crash left, load the model, start the worker and the connection."""
        for note in apply_priority(self.settings.priority.nice, self.settings.priority.oom_score_adj):
            log.info("priority: %s", note)
        for job_id, action in self.store.recover(self.clock()):
            log.warning("recovered job %s after an unclean stop: %s", job_id, action)
        self.engine.load()  # logs its plan and measured memory
        self._resend.set()
        self._worker = threading.Thread(target=self._work_loop, name="edge-agent-worker", daemon=True)
        self._worker.start()
        self.transport.start()
        self.notifier.ready(f"serving {self.settings.model.path}")

    def serve(self, *, passes: int | None = None, install_signals: bool = True) -> int:
        """Start, run the main loop until stopped (or for ``passes`` passes), shut down; returns the exit code."""
        if install_signals:
            self._install_signals()
        try:
            self.start()
        except EdgeAgentError as e:
            # Model missing or will not fit, store unusable: a restart would fail the same way.
            e.exit_code = EXIT_CANNOT_START  # type: ignore[attr-defined]
            self._close_after_failed_start()
            raise
        try:
            n = 0
            while self._stop_requested == 0 and (passes is None or n < passes):
                try:
                    self.main_pass()
                except Exception:  # a bug in one pass (a resend, a prune) must not end the service
                    log.exception("main loop error; carrying on")
                    self._tick.wait(1.0)  # do not spin if the same error repeats every pass
                n += 1
        finally:
            self.shutdown()
        return 0

    def _close_after_failed_start(self) -> None:
        self._draining.set()
        self._wake.set()
        self.transport.stop()
        self.engine.unload()
        self.store.close()

    def main_pass(self, *, wait_s: float | None = None) -> None:
        """One pass of the main loop: watchdog, reload, resend, retention, telemetry. Waits for the next tick first."""
        interval = min(self.notifier.watchdog_interval_s or 5.0, self.settings.telemetry.interval_s)
        self._tick.wait(wait_s if wait_s is not None else interval)
        self._tick.clear()
        now = self.clock()
        self.notifier.watchdog()
        if self._reload_requested:
            self._reload_requested = False
            self.reload()
        if self._resend.is_set() and self.transport.connected:
            self._resend.clear()
            self.resend_undelivered()
        if now - self._last_prune >= self.settings.store.prune_interval_s:
            self._last_prune = now
            removed = self.store.prune(now)
            if removed:
                log.info("retention: removed %d finished jobs", removed)
        if now - self._last_telemetry >= self.settings.telemetry.interval_s and self.transport.connected:
            self._last_telemetry = now
            self.publish_telemetry(now)

    def publish_telemetry(self, now: float) -> None:
        with self._lock:
            running = self._running.job_id if self._running else None
        t = collect_telemetry(
            self.settings.device.id, now, engine=self.engine, queue_depth=self.store.queued_count(), running_job=running
        )
        self.transport.publish(f"{self.topics.root}/telemetry", t.to_payload(), qos=0)

    def request_stop(self) -> None:
        self._stop_requested += 1
        self._draining.set()
        if self._stop_requested > 1:
            self._abort_running("shutdown")  # a second signal forces
        self._tick.set()
        self._wake.set()

    def shutdown(self) -> None:
        """Stop taking jobs, let the running one finish within the grace period, else requeue it."""
        self.notifier.stopping()
        self._draining.set()
        self._wake.set()
        if self._worker is not None:
            grace = self.settings.service.shutdown_grace_s
            self._worker.join(timeout=grace if self._stop_requested <= 1 else 0)
            if self._worker.is_alive():
                log.warning("running job did not finish within %.0f s: stopping it; it will be requeued", grace)
                self._abort_running("shutdown")
                self._worker.join()
        self.transport.stop(publish=(self.topics.device_status, self._device_status("stopping")))
        self.engine.unload()
        self.store.close()
        log.info("stopped")

    def _install_signals(self) -> None:
        def on_stop(signum: int, _frame: Any) -> None:
            self.request_stop()

        def on_hup(signum: int, _frame: Any) -> None:
            self._reload_requested = True
            self._tick.set()

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_hup)

    def reload(self) -> None:
        """SIGHUP: re-read the configuration file and apply what is safe to change while running."""
        try:
            new = load_settings(self.config_path)
        except Exception as e:  # a bad edit must not take a running board down
            log.error("reload refused, keeping the running configuration: %s", e)
            return
        old_d, new_d = self.settings.model_dump(), new.model_dump()
        changed = [(sec, key) for sec in new_d for key in new_d[sec] if old_d[sec].get(key) != new_d[sec].get(key)]
        for sec, key in changed:
            if (sec, key) in RELOADABLE:
                setattr(getattr(self.settings, sec), key, getattr(getattr(new, sec), key))
                log.info("reload: %s.%s = %r", sec, key, new_d[sec][key])
            else:
                log.warning("reload: %s.%s changed; it takes effect after a restart", sec, key)
        self.store.configure(
            queue_max=self.settings.store.queue_max,
            max_attempts=self.settings.store.max_attempts,
            keep_finished=self.settings.store.keep_finished,
            keep_finished_days=self.settings.store.keep_finished_days,
        )
        self.engine.limits = RequestLimits.from_settings(self.settings.engine)
        apply_priority(self.settings.priority.nice, self.settings.priority.oom_score_adj)

    # ----------------------------------------------------------------- inbound

    def _on_connect(self) -> None:
        self.transport.publish(self.topics.device_status, self._device_status("online"), qos=1, retain=True)
        self._resend.set()
        self._tick.set()

    def _on_message(self, msg: InboundMessage) -> None:
        try:
            job_id = self.topics.job_id_from_cancel_topic(msg.topic)
            if job_id is not None:
                self.cancel(job_id)
            else:
                self._on_submit(msg.payload, msg.topic)
        except StoreError as e:
            # Not acknowledged: the broker keeps the message and redelivers it after the next connect.
            log.error("job store failed, message on %s left unacknowledged: %s", msg.topic, e)
            return
        self.transport.ack(msg)

    def _on_submit(self, payload: bytes, topic: str) -> None:
        now = self.clock()
        try:
            job = parse_submit(
                payload,
                max_prompt_bytes=self.settings.engine.max_prompt_bytes,
                max_tokens_limit=self.settings.engine.max_tokens_limit,
            )
        except InvalidJob as e:
            if e.job_id is None:
                log.error("refused a message on %s with no readable job_id: %s [%s]", topic, e.message, e.code)
                return
            log.warning("job %s refused: %s [%s]", e.job_id, e.message, e.code.value)
            self._after_accept(self.store.reject(e.job_id, e.code, e.message, now, raw=payload))
            return
        self._after_accept(self.store.accept(job, payload, now))

    def _after_accept(self, accepted: Accepted) -> None:
        rec = accepted.record
        if accepted.outcome == "new":
            self._publish_status(rec)
            self._wake.set()
        elif accepted.outcome == "duplicate_pending":
            log.info("job %s received again while %s: ignored", rec.job_id, rec.status.value)
        else:  # finished earlier, or refused now (invalid, queue full, expired): (re)send the stored outcome
            if accepted.outcome != "duplicate_finished":
                log.warning("job %s %s: %s", rec.job_id, rec.status.value, rec.error_code)
            self._publish_outcome(rec)

    def cancel(self, job_id: str) -> str:
        what = self.store.cancel(job_id, self.clock())
        if what == "canceled_queued":
            self._publish_outcome(self.store.get(job_id))
        elif what == "running":
            with self._lock:
                self._cancel_requests.add(job_id)
                if self._running is not None and self._running.job_id == job_id:
                    self._running.why = "cancel"
                    self._running.cancel.set()
        log.info("cancel %s: %s", job_id, what)
        return what

    # ----------------------------------------------------------------- worker

    def _work_loop(self) -> None:
        while not self._draining.is_set():
            try:
                ran = self.work_once()
            except Exception:  # a bug must not silently stop the worker: log and keep serving
                log.exception("worker error")
                ran = False
            if not ran:
                self._wake.wait(timeout=1.0)  # re-check expiries about once a second
                self._wake.clear()

    def work_once(self) -> bool:
        """Expire what is due, then claim and run one job. Returns False when nothing was waiting."""
        now = self.clock()
        for rec in self.store.expire_queued(now):
            self._publish_outcome(rec)
        if self._draining.is_set():
            return False
        rec = self.store.claim_next(now)
        if rec is None:
            return False
        self._run(rec)
        return True

    def _run(self, rec: JobRecord) -> None:
        running = _Running(rec.job_id)
        with self._lock:
            # A stop sets _draining before it aborts the running job under this lock: checked
            # here, a job claimed as a stop began is not missed by that abort, and never starts
            # (unless a cancel for it is pending: that runs to its CANCELED outcome at once).
            stopping = self._draining.is_set() and rec.job_id not in self._cancel_requests
            if not stopping:
                self._running = running
                if rec.job_id in self._cancel_requests:
                    running.why = "cancel"
                    running.cancel.set()
        if stopping:
            self.store.requeue(rec.job_id, self.clock())
            log.info("job %s claimed as the agent began to stop: requeued without running", rec.job_id)
            return
        self._publish_status(rec)
        job = rec.job()
        started = self.clock()
        deadline, timeout_text = self._deadline(job, started)
        stream_topic = self.topics.stream(rec.job_id)

        def on_token(index: int, text: str) -> None:
            if job.stream:
                chunk = StreamChunk(job_id=rec.job_id, index=index, text=text)
                self.transport.publish(stream_topic, chunk.to_payload(), qos=0)

        status, text, finish, usage, stats, error = JobStatus.FAILED, "", None, None, None, None
        try:
            result = self.engine.generate(
                GenerationRequest.from_job(job),
                on_token=on_token,
                cancel=running.cancel,
                deadline=deadline,
            )
            text, finish, stats = result.text, result.finish_reason, result.stats
            usage = Usage(
                prompt_tokens=stats.prompt_tokens,
                completion_tokens=stats.completion_tokens,
                prompt_tokens_cached=stats.prompt_tokens_cached,
            )
            if finish == "canceled" and running.why == "shutdown":
                self.store.requeue(rec.job_id, self.clock())
                log.warning("job %s stopped by shutdown: requeued", rec.job_id)
                return
            if finish == "canceled":
                status, error = JobStatus.CANCELED, ErrorInfo(code=ErrorCode.canceled, message="canceled by request")
            elif finish == "timeout":
                status, error = JobStatus.TIMED_OUT, ErrorInfo(code=ErrorCode.timeout, message=timeout_text)
            else:
                status = JobStatus.SUCCEEDED
        except EngineError as e:
            # The code decides the status: context_too_long, will_not_fit, prompt_too_large ... are
            # REJECTED (the same request fails the same way on any retry); the rest FAILED.
            code = e.code if isinstance(e.code, ErrorCode) else ErrorCode.internal
            status, error = code.status, ErrorInfo(code=code, message=str(e))
        except MemoryError:
            status, error = JobStatus.REJECTED, ErrorInfo(code=ErrorCode.will_not_fit, message="out of memory")
        except Exception as e:  # a bug: the job still gets its one outcome instead of staying IN_PROGRESS
            log.exception("job %s failed unexpectedly", rec.job_id)
            status, error = JobStatus.FAILED, ErrorInfo(code=ErrorCode.internal, message=f"{type(e).__name__}: {e}")
        finally:
            with self._lock:
                self._running = None
                self._cancel_requests.discard(rec.job_id)
        timings = Timings(
            queue_ms=max(0.0, ((rec.started_at or started) - rec.created_at) * 1000.0),
            prompt_ms=stats.prompt_ms if stats else 0.0,
            generation_ms=stats.generation_ms if stats else 0.0,
            tokens_per_s=stats.tokens_per_s if stats else 0.0,
        )
        body = {
            "text": text or None,
            "finish_reason": finish,
            "usage": usage.model_dump() if usage else None,
            "timings": timings.model_dump(),
            "error": error.model_dump(mode="json") if error else None,
        }
        if self.store.finish(rec.job_id, status, body, self.clock()):
            self._publish_outcome(self.store.get(rec.job_id))
        else:  # e.g. canceled while queued in a race: the first outcome stands
            log.warning("job %s already had an outcome; this run's %s is dropped", rec.job_id, status)

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
        return self.monotonic() + (end - self.clock()), why

    def _abort_running(self, why: str) -> None:
        with self._lock:
            if self._running is not None:
                self._running.why = self._running.why or why
                self._running.cancel.set()

    # ----------------------------------------------------------------- outbound

    def _device_status(self, state: str) -> bytes:
        model = str(self.settings.model.path) if state == "online" else None
        return DeviceStatus(
            state=state, device_id=self.settings.device.id, agent_version=__version__, model=model, ts=self.clock()
        ).to_payload()

    def _publish_status(self, rec: JobRecord) -> None:
        msg = rec.status_message(self.settings.device.id, self.clock())
        self.transport.publish(self.topics.status(rec.job_id), msg.to_payload(), qos=1)

    def _publish_outcome(self, rec: JobRecord, *, resend: bool = False) -> Any:
        """Publish a stored terminal outcome (status, then result); the result's PUBACK marks it delivered.

        Returns the result's publish handle. A publish that fails (offline, queue full) is not retried
        here: the result stays undelivered in the store and the main loop resends it (on its next pass
        while connected, or after the next connect). With ``resend``, a result still waiting for its
        PUBACK is not sent again: its handle is returned instead.
        """
        job_id = rec.job_id
        with self._lock:
            pending = self._inflight.get(job_id)
        if resend and pending is not None and not pending.done:
            return pending
        self._publish_status(rec)
        payload = rec.result_message(self.settings.device.id).to_payload()

        def delivered() -> None:
            self.store.mark_delivered(job_id)
            with self._lock:
                self._inflight.pop(job_id, None)

        handle = self.transport.publish(self.topics.result(job_id), payload, qos=1, on_delivered=delivered)
        with self._lock:
            if not handle.done:
                self._inflight[job_id] = handle
        if handle.done and not handle.delivered:
            # Refused at once. A full outgoing queue (a burst of jobs) is followed by no reconnect, so
            # waiting for the next connect could leave the result undelivered for as long as the link holds.
            self._resend.set()
            self._tick.set()  # resend on the next pass, which paces itself on PUBACKs
        return handle

    def resend_undelivered(self, *, wait_s: float = 10.0) -> int:
        """Publish undelivered results in batches, waiting for each batch's acknowledgements so the
        transport's bounded queue is never overrun. Returns how many were published."""
        sent = 0
        with self._lock:  # forget handles the transport failed (link lost): those results go again
            self._inflight = {k: h for k, h in self._inflight.items() if not h.done}
        while self.transport.connected and self._stop_requested == 0:
            batch = self.store.undelivered(limit=RESEND_BATCH)
            if not batch:
                break
            handles = [self._publish_outcome(rec, resend=True) for rec in batch]
            sent += len(batch)
            self.notifier.watchdog()  # a long backlog must not look like a hung main loop
            if not all(h.wait(wait_s) for h in handles):
                self._resend.set()  # link lost or broker slow: carry on after the next connect or pass
                break
        if sent:
            log.info("resent %d undelivered result(s)", sent)
        return sent
