"""Where each reading and event goes: published now, or into the spool.

The rule keeps the spool off the flash card while the board is online, and keeps order:

* connected and nothing spooled: publish now (QoS 1) and watch the publish;
* not connected, or the spool still holds a backlog (the outbox drains it oldest first): spool,
  so nothing overtakes what is waiting;
* a publish refused at once, or failed later before its acknowledgement (connection lost): spool
  it then (``poll``), under its original time, so it is sent in its place.

Nothing is sent twice by this module: a message is either watched in memory or in the spool, never
both. The outbox (agent.mqtt.outbox) publishes the spool's ``pending()`` after a reconnect,
paced, and calls ``delivered``. One owner thread (the daemon's main loop) calls ``send`` and
``poll``; the publish handles are resolved on the network thread, and only read here.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from agent.errors import StoreError
from agent.telemetry.spool import Kind, TelemetrySpool

log = logging.getLogger(__name__)

Route = Literal["published", "spooled", "lost"]


class PublishResult(Protocol):
    """What ``publish`` returns (agent.mqtt.transport.PublishHandle has these)."""

    @property
    def done(self) -> bool: ...

    @property
    def delivered(self) -> bool: ...

    @property
    def error(self) -> str | None: ...


@dataclass
class _Watched:
    kind: Kind
    topic: str
    payload: bytes
    ts: float
    result: PublishResult


class Uplink:
    """``publish(topic, payload)`` sends at QoS 1 and returns a ``PublishResult``; ``connected()``
    says whether the link is up. ``lost`` counts messages that could neither be published nor
    spooled (the spool's disk failed)."""

    def __init__(
        self,
        spool: TelemetrySpool,
        publish: Callable[[str, bytes], PublishResult],
        connected: Callable[[], bool],
        *,
        max_watched: int = 256,
    ) -> None:
        self.spool = spool
        self._publish = publish
        self._connected = connected
        self._watched: deque[_Watched] = deque()
        self._max_watched = max_watched
        self.lost = 0

    def send(self, kind: Kind, topic: str, payload: bytes, *, ts: float) -> Route:
        """Publish now or spool (see the module's rule). ``ts``: when the message was made."""
        self.poll()
        if self._connected() and self.spool.rows == 0 and len(self._watched) < self._max_watched:
            result = self._publish(topic, payload)
            if not (result.done and not result.delivered):
                self._watched.append(_Watched(kind, topic, payload, ts, result))
                return "published"
            log.debug("publish to %s refused (%s): spooled", topic, result.error)
        return self._spool(kind, topic, payload, ts)

    def poll(self) -> int:
        """Spool the watched publishes that failed; forget the delivered ones. Returns how many were
        spooled. Call it every main-loop pass, and before the outbox's resend after a reconnect."""
        moved = 0
        still: deque[_Watched] = deque()
        while self._watched:
            w = self._watched.popleft()
            if not w.result.done:
                still.append(w)
            elif not w.result.delivered:
                self._spool(w.kind, w.topic, w.payload, w.ts)
                moved += 1
        self._watched = still
        return moved

    @property
    def watched(self) -> int:
        """Publishes waiting for their acknowledgement."""
        return len(self._watched)

    def _spool(self, kind: Kind, topic: str, payload: bytes, ts: float) -> Route:
        try:
            added = self.spool.add(kind, topic, payload, ts=ts)
        except StoreError as e:
            self.lost += 1
            log.warning("telemetry %s to %s lost: the spool cannot be written (%s)", kind, topic, e)
            return "lost"
        return "spooled" if added.stored else "lost"


__all__ = ["PublishResult", "Route", "Uplink"]
