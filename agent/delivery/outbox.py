"""Durable publishing: what is owed upstream, published until the broker acknowledges it.

The outbox publishes items from sources (job results now, the telemetry spool next) over the
transport, keeps the ones waiting for their PUBACK in flight so a resend pass never sends them
twice, records delivery in the source, and resends what is still undelivered in paced batches
after every reconnect and every restart. It never holds an item only in memory: a source's
``pending()`` is the queue, on disk.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


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
