"""Durable publishing: what is owed upstream, published until the broker acknowledges it.

The outbox publishes items from sources (job results now, the telemetry spool next) over the
transport, keeps the ones waiting for their PUBACK in flight so a resend pass never sends them
twice, records delivery in the source, and resends what is still undelivered in paced batches
after every reconnect and every restart. It never holds an item only in memory: a source's
``pending()`` is the queue, on disk.

Failures in the bookkeeping never turn into a resend storm: an acknowledgement that cannot be
recorded (the disk is full) is remembered in memory, the item is not sent again, and recording is
retried on the main loop until it succeeds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from agent.errors import StoreError

log = logging.getLogger(__name__)

# Items published per resend batch before waiting for their acknowledgements: the transport holds
# a bounded number of messages in RAM.
RESEND_BATCH = 50


@dataclass(frozen=True)
class Outgoing:
    """One message owed upstream. ``key`` is unique within its source and stable across restarts."""

    key: str
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    # Best-effort messages sent just before this one, on every (re)send: a job's terminal status
    # precedes its result. Their delivery is not tracked.
    before: tuple[tuple[str, bytes], ...] = ()


class OutboxSource(Protocol):
    """A durable queue of outgoing messages (the job store, the telemetry spool)."""

    name: str

    def pending(self, limit: int) -> list[Outgoing]:
        """Undelivered items, oldest first, at most ``limit``. Raises StoreError when unreadable."""
        ...

    def delivered(self, keys: Sequence[str]) -> None:
        """The broker acknowledged these. Raises StoreError when it cannot be recorded (the outbox
        keeps them as acknowledged in memory and records them later: they are not sent again)."""
        ...


class Handle(Protocol):
    """A publish's fate, as agent.mqtt.transport.PublishHandle reports it."""

    @property
    def done(self) -> bool: ...

    @property
    def delivered(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> bool: ...


class Publisher(Protocol):
    """The part of agent.mqtt.transport.MqttTransport the outbox uses (tests: an in-memory one)."""

    @property
    def connected(self) -> bool: ...

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        *,
        on_delivered: Callable[[], None] | None = None,
    ) -> Handle: ...


class _Settled:
    """A handle for an item already acknowledged (its delivery only waits to be recorded)."""

    done = True
    delivered = True

    def wait(self, timeout: float | None = None) -> bool:
        return True


class _Claim:
    """An item one thread is publishing right now: taken under the lock before the publish, so a second
    sender (the runner's send and a resend pass, at the same moment) sees it in flight and does not
    publish it again. It becomes that publish's handle once the publisher returns one."""

    def __init__(self) -> None:
        self._handle: Handle | None = None
        self._bound = threading.Event()

    def bind(self, handle: Handle) -> None:
        self._handle = handle
        self._bound.set()

    @property
    def done(self) -> bool:
        return self._handle is not None and self._handle.done

    @property
    def delivered(self) -> bool:
        return self._handle is not None and self._handle.delivered

    def wait(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._bound.wait(timeout) or self._handle is None:
            return False
        return self._handle.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))


class Outbox:
    """Publishes source items at least once. Thread-safe: ``send`` from any thread, ``run_pass``
    from the main loop; acknowledgements arrive on the transport's network thread.

    ``on_store_error`` is told about every failure to read or record a source (the daemon's store
    health); ``wake`` asks the main loop for a pass soon (a publish was refused at once);
    ``keepalive`` is called between resend batches (the systemd watchdog).
    """

    def __init__(
        self,
        publisher: Publisher,
        *,
        on_store_error: Callable[[StoreError], None] = lambda e: None,
        wake: Callable[[], None] = lambda: None,
        keepalive: Callable[[], None] = lambda: None,
        batch: int = RESEND_BATCH,
        ack_timeout_s: float = 10.0,
    ) -> None:
        self._publisher = publisher
        self._on_store_error = on_store_error
        self._wake = wake
        self._keepalive = keepalive
        self._batch = batch
        self._ack_timeout_s = ack_timeout_s
        self._lock = threading.Lock()
        self._sources: dict[str, OutboxSource] = {}
        self._inflight: dict[tuple[str, str], Handle] = {}
        self._acked: dict[str, set[str]] = {}  # acknowledged, not yet recorded in the source
        # Acknowledged since the current resend pass began: the pass read its items before, and must
        # not publish one again that its first sender has had delivered meanwhile.
        self._recent: dict[str, set[str]] = {}
        self._resend = threading.Event()
        self._resend.set()  # whatever a previous run left undelivered goes out after the first connect
        self._after_connect = True  # the pending resend follows a (re)connect: worth a log line

    def add_source(self, source: OutboxSource) -> None:
        self._sources[source.name] = source
        self._acked.setdefault(source.name, set())

    # ------------------------------------------------------------------ sending

    def send(self, source: OutboxSource, item: Outgoing) -> Handle:
        """Publish one item now. An item still waiting for its acknowledgement, or already
        acknowledged, is not published again: its handle is returned. A publish that fails
        (offline, queue full) is left to the resend pass; nothing is lost, the source keeps it."""
        return self._send(source, item, resending=False)

    def _send(self, source: OutboxSource, item: Outgoing, *, resending: bool) -> Handle:
        key = (source.name, item.key)
        with self._lock:
            if item.key in self._acked.get(source.name, ()):
                return _Settled()
            if resending and item.key in self._recent.get(source.name, ()):
                return _Settled()  # delivered by its first sender since this pass read it
            pending = self._inflight.get(key)
            if pending is not None and not pending.done:
                return pending
            claim = self._inflight[key] = _Claim()

        def acknowledged() -> None:
            self._acknowledged(source, item.key)

        try:
            for topic, payload in item.before:
                self._publisher.publish(topic, payload, qos=1)
            handle = self._publisher.publish(
                item.topic, item.payload, qos=item.qos, retain=item.retain, on_delivered=acknowledged
            )
        except BaseException:
            with self._lock:
                if self._inflight.get(key) is claim:
                    del self._inflight[key]
            raise
        claim.bind(handle)
        with self._lock:
            if self._inflight.get(key) is claim:
                if handle.done:
                    del self._inflight[key]  # settled at once (refused, or acknowledged already)
                else:
                    self._inflight[key] = handle
        if handle.done and not handle.delivered:
            # Refused at once. A full outgoing queue (a burst) is followed by no reconnect, so
            # waiting for the next connect could leave the item undelivered as long as the link holds.
            self._resend.set()
            self._wake()
        return handle

    def _acknowledged(self, source: OutboxSource, key: str) -> None:
        # On the network thread, before the handle's waiters wake: they then see the effect. The
        # source records the delivery before the item leaves _inflight: a resend pass in between
        # would otherwise find it undelivered and not in flight, and publish it a second time.
        try:
            source.delivered([key])
        except StoreError as e:
            with self._lock:
                self._acked.setdefault(source.name, set()).add(key)
            self._on_store_error(e)
            self._wake()
        finally:
            with self._lock:
                self._inflight.pop((source.name, key), None)
                recent = self._recent.setdefault(source.name, set())
                if len(recent) >= 4096:  # no pass is reading: nothing to guard, keep it small
                    recent.clear()
                recent.add(key)

    # ------------------------------------------------------------------ main loop

    def request_resend(self) -> None:
        """Resend everything undelivered on the next pass (after a connect)."""
        self._after_connect = True
        self._resend.set()

    @property
    def unrecorded(self) -> int:
        """Acknowledged items whose delivery is not recorded yet."""
        with self._lock:
            return sum(len(v) for v in self._acked.values())

    def run_pass(self, *, should_stop: Callable[[], bool] = lambda: False) -> int:
        """Record acknowledgements that could not be recorded before, then, when a resend is due
        and the link is up, publish everything undelivered in batches, waiting for each batch's
        acknowledgements so the transport's bounded queue is never overrun. Returns items sent."""
        if not self._record_acked():
            return 0  # the store still fails: resending would only pile more on it
        if not self._resend.is_set() or not self._publisher.connected:
            return 0
        self._resend.clear()
        after_connect, self._after_connect = self._after_connect, False
        with self._lock:  # handles the transport failed (link lost): those items go again
            self._inflight = {k: h for k, h in self._inflight.items() if not h.done}
        sent = 0
        for source in list(self._sources.values()):
            sent += self._resend_source(source, should_stop)
        if sent:
            # After a connect this is news; after publishes refused in a burst it is routine.
            log.log(logging.INFO if after_connect else logging.DEBUG, "resent %d undelivered message(s)", sent)
        return sent

    def _record_acked(self) -> bool:
        for name, source in self._sources.items():
            with self._lock:
                keys = sorted(self._acked.get(name, ()))
            if not keys:
                continue
            try:
                source.delivered(keys)
            except StoreError as e:
                self._on_store_error(e)
                return False
            with self._lock:
                self._acked[name].difference_update(keys)
        return True

    def _resend_source(self, source: OutboxSource, should_stop: Callable[[], bool]) -> int:
        sent = 0
        while self._publisher.connected and not should_stop():
            with self._lock:
                self._recent[source.name] = set()
                skip = set(self._acked.get(source.name, ())) | {
                    k for (n, k), h in self._inflight.items() if n == source.name and not h.done
                }
            try:
                # Ask past the items that are skipped, so a backlog of them cannot hide the rest.
                items = [i for i in source.pending(self._batch + len(skip)) if i.key not in skip][: self._batch]
            except StoreError as e:
                self._on_store_error(e)
                self._resend.set()
                break
            if not items:
                break
            handles = [self._send(source, item, resending=True) for item in items]
            sent += len(items)
            self._keepalive()  # a long backlog must not look like a hung main loop
            if not all(h.wait(self._ack_timeout_s) for h in handles):
                self._resend.set()  # link lost or broker slow: carry on after the next connect or pass
                break
        return sent


__all__ = ["Outbox", "OutboxSource", "Outgoing", "Publisher", "RESEND_BATCH"]
