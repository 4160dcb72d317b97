"""Outbox sources: the durable queues the outbox publishes from.

``JobResults`` is the job store seen as an outbox source: every terminal job whose result the
broker has not acknowledged, as its status and result messages.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from agent.jobs.store import JobRecord, JobStore
from agent.mqtt.outbox import Outgoing
from agent.mqtt.topics import Topics


class JobResults:
    """Terminal jobs as outbox items: the status message first (best effort), then the result
    (tracked). Keyed by job id; delivery is recorded with ``JobStore.mark_delivered``."""

    name = "results"

    def __init__(self, store: JobStore, topics: Topics, *, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.topics = topics
        self.device_id = topics.device_id
        self._clock = clock

    def item(self, rec: JobRecord) -> Outgoing:
        status = rec.status_message(self.device_id, self._clock()).to_payload()
        return Outgoing(
            key=rec.job_id,
            topic=self.topics.result(rec.job_id),
            payload=rec.result_message(self.device_id).to_payload(),
            before=((self.topics.status(rec.job_id), status),),
        )

    def pending(self, limit: int) -> list[Outgoing]:
        return [self.item(rec) for rec in self.store.undelivered(limit=limit)]

    def delivered(self, keys: Sequence[str]) -> None:
        self.store.mark_delivered_many(keys)


__all__ = ["JobResults"]
