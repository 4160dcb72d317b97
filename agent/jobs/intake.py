"""Intake: job submissions and cancels, from message to store to acknowledgement.

Owns the rule the whole delivery guarantee rests on: a message is acknowledged to the broker only
after what it asked for is in the store. Anything that prevents the write (a full disk, a read-only
filesystem) leaves the message unacknowledged, so the broker keeps it and delivers it again on the
next connection; ``pause()`` makes that the rule for every message until ``resume()``. Refusals
(invalid payloads, a full queue, expired jobs) are stored outcomes like any other and are
published through the outbox.

Handlers run on the transport's network thread: they do one store transaction and return. The
QUEUED status is published before the message is acknowledged, and the transport keeps that order
when its outgoing queue is full: the acknowledgement waits until the status is queued, so a burst
of jobs slows the broker down instead of losing statuses (docs/mqtt-transport.md, Bursts).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from agent.config.sections import EngineSettings
from agent.errors import StoreError
from agent.jobs.health import StoreHealth
from agent.jobs.protocol import InvalidJob, parse_submit
from agent.jobs.store import EARLY_CANCEL_KEEP_S, Accepted, JobRecord, JobStore
from agent.mqtt.topics import Topics
from agent.mqtt.transport import InboundMessage, PublishHandle

log = logging.getLogger(__name__)


class Intake:
    def __init__(
        self,
        store: JobStore,
        topics: Topics,
        *,
        limits: Callable[[], EngineSettings],
        ack: Callable[[InboundMessage], bool],
        publish: Callable[..., PublishHandle],
        send_outcome: Callable[[JobRecord], object],
        cancel_running: Callable[[str], bool],
        job_queued: Callable[[], None],
        health: StoreHealth,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``limits()`` gives the engine settings in force (payload limits change live); ``ack``
        acknowledges an inbound message; ``publish`` is the best-effort publish (QUEUED status);
        ``send_outcome`` hands a stored terminal record to the outbox; ``cancel_running`` stops a
        running job; ``job_queued`` wakes the runner."""
        self._store = store
        self._topics = topics
        self._limits = limits
        self._ack = ack
        self._publish = publish
        self._send_outcome = send_outcome
        self._cancel_running = cancel_running
        self._job_queued = job_queued
        self._health = health
        self._clock = clock
        self._paused = threading.Event()

    def pause(self) -> None:
        """Acknowledge nothing until ``resume()``: messages stay with the broker."""
        self._paused.set()

    def resume(self) -> None:
        self._paused.clear()

    @property
    def paused(self) -> bool:
        return self._paused.is_set()

    def on_message(self, msg: InboundMessage) -> None:
        """An inbound submit or cancel."""
        if self._paused.is_set():
            log.debug("intake paused: %s (mid %d) left unacknowledged", msg.topic, msg.mid)
            return
        try:
            job_id = self._topics.job_id_from_cancel_topic(msg.topic)
            if job_id is not None:
                self.cancel(job_id)
            else:
                self.submit(msg.payload, msg.topic)
        except StoreError as e:
            # Not acknowledged: the broker keeps the message and delivers it again after the next
            # connect, which the daemon makes once the store takes writes again.
            self._health.failed(e)
            return
        self._ack(msg)

    def submit(self, payload: bytes, topic: str) -> None:
        now = self._clock()
        limits = self._limits()
        try:
            job = parse_submit(
                payload, max_prompt_bytes=limits.max_prompt_bytes, max_tokens_limit=limits.max_tokens_limit
            )
        except InvalidJob as e:
            if e.job_id is None:
                log.error("refused a message on %s with no readable job_id: %s [%s]", topic, e.message, e.code)
                return
            log.warning("job %s refused: %s [%s]", e.job_id, e.message, e.code.value)
            self._after_accept(self._store.reject(e.job_id, e.code, e.message, now, raw=payload))
            return
        via = "handed" if job.handed_from is not None else "fleet" if topic == self._topics.fleet_publish else None
        self._after_accept(self._store.accept(job, payload, now, via=via))

    def _after_accept(self, accepted: Accepted) -> None:
        rec = accepted.record
        if accepted.outcome == "new":
            msg = rec.status_message(self._topics.device_id, self._clock())
            self._publish(self._topics.status(rec.job_id), msg.to_payload(), qos=1)
            self._job_queued()
        elif accepted.outcome == "duplicate_pending":
            # A submitter resends a job whose QUEUED it did not see (lost with a broker's session, or in
            # flight): it is not run twice, and the current status tells the submitter to stop resending.
            log.info("job %s received again while %s: status sent again, not run twice", rec.job_id, rec.status.value)
            msg = rec.status_message(self._topics.device_id, self._clock())
            self._publish(self._topics.status(rec.job_id), msg.to_payload(), qos=1)
        else:  # finished earlier, refused now (invalid, queue full, expired), or canceled before it came
            if accepted.outcome == "canceled_before_arrival":
                log.info("job %s CANCELED on arrival: its cancel came first", rec.job_id)
            elif accepted.outcome != "duplicate_finished":
                log.warning("job %s %s: %s", rec.job_id, rec.status.value, rec.error_code)
            self._send_outcome(rec)

    def cancel(self, job_id: str) -> str:
        what = self._store.cancel(job_id, self._clock())
        if what == "canceled_queued":
            rec = self._store.get(job_id)
            assert rec is not None
            self._send_outcome(rec)
        elif what == "running":
            self._cancel_running(job_id)
        handoff = self._store.get_handoff(job_id) if what == "unknown" else None
        if handoff is not None and handoff.to is not None:
            # Handed to a peer of the fleet: the cancel follows it (and is kept here too, should it come back).
            self._publish(Topics(self._topics.prefix, handoff.to).cancel(job_id), b"", qos=1)
            log.info("cancel %s: the job was handed to %s; the cancel is sent on there", job_id, handoff.to)
        elif what == "unknown":
            log.info(
                "cancel %s: no such job yet; it is canceled if it arrives within %.0f s", job_id, EARLY_CANCEL_KEEP_S
            )
        else:
            log.info("cancel %s: %s", job_id, what)
        return what


__all__ = ["Intake"]
