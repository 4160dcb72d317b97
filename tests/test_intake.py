"""Intake against a real SQLite store and the fake publisher: a message is acknowledged only once
what it asks for is stored; a store that fails leaves it (and, while paused, every later one)
unacknowledged; refusals are stored outcomes, published once."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.config.sections import EngineSettings
from agent.errors import StoreError
from agent.jobs.health import StoreHealth
from agent.jobs.intake import Intake
from agent.jobs.protocol import JobStatus
from agent.jobs.results import JobResults
from agent.jobs.store import JobStore
from agent.mqtt.outbox import Outbox
from agent.mqtt.topics import Topics
from tests.fakes import FakePublisher


@dataclass
class Msg:
    topic: str
    payload: bytes
    mid: int = 1


class Rig:
    def __init__(self, tmp_path: Path) -> None:
        self.store = JobStore(tmp_path / "jobs.db", queue_max=3)
        self.topics = Topics("edge", "pi-1")
        self.pub = FakePublisher()
        self.results = JobResults(self.store, self.topics)
        self.outbox = Outbox(self.pub)
        self.outbox.add_source(self.results)
        self.acked: list[int] = []
        self.canceled: list[str] = []
        self.wakes = 0
        self.health = StoreHealth(self.store, recheck_s=lambda: 0.0, min_free_bytes=lambda: 0,
                                  on_change=lambda ok: (self.intake.resume() if ok else self.intake.pause()))  # fmt: skip
        self.intake = Intake(
            self.store, self.topics, limits=lambda: EngineSettings(max_tokens_limit=16, max_prompt_bytes=64),
            ack=lambda m: self.acked.append(m.mid) or True, publish=self.pub.publish,
            send_outcome=lambda rec: self.outbox.send(self.results, self.results.item(rec)),
            cancel_running=lambda j: self.canceled.append(j) or True, job_queued=self._woken, health=self.health,
        )  # fmt: skip

    def _woken(self) -> None:
        self.wakes += 1

    def submit(self, mid: int, **fields) -> None:
        payload = {"job_id": f"j{mid}", "kind": "generate", "prompt": "hi", "max_tokens": 4, **fields}
        self.intake.on_message(Msg(self.topics.submit, json.dumps(payload).encode(), mid))

    def result(self, job_id: str) -> dict:
        [payload] = self.pub.on(self.topics.result(job_id))
        return json.loads(payload)


@pytest.fixture
def rig(tmp_path: Path):
    r = Rig(tmp_path)
    yield r
    r.store.close()


def test_a_job_is_stored_before_it_is_acknowledged_and_announced(rig: Rig, monkeypatch) -> None:
    order: list[str] = []
    real_accept = rig.store.accept
    monkeypatch.setattr(rig.store, "accept", lambda *a, **k: (order.append("stored"), real_accept(*a, **k))[1])
    real_ack = rig.intake._ack
    rig.intake._ack = lambda m: (order.append("acked"), real_ack(m))[1]
    rig.submit(1)
    assert order == ["stored", "acked"] and rig.acked == [1] and rig.wakes == 1
    assert rig.store.get("j1").status is JobStatus.QUEUED
    assert [json.loads(p)["status"] for p in rig.pub.on(rig.topics.status("j1"))] == ["QUEUED"]


def test_refusals_are_stored_outcomes_published_once_and_acknowledged(rig: Rig) -> None:
    rig.submit(1, max_tokens=17)  # above the live limit
    r = rig.result("j1")
    assert (r["status"], r["error"]["code"]) == ("REJECTED", "max_tokens_too_large") and rig.acked == [1]
    rig.intake.on_message(Msg(rig.topics.submit, b"not json", 2))  # no readable id: logged, acknowledged
    assert rig.acked == [1, 2] and rig.store.counts()["REJECTED"] == 1
    for mid in (3, 4, 5):
        rig.submit(mid)
    rig.submit(6)  # queue_max 3
    assert rig.result("j6")["error"]["code"] == "queue_full"


def test_a_duplicate_gets_the_stored_outcome_again_and_never_a_second_job(rig: Rig) -> None:
    rig.submit(1, max_tokens=99)
    rig.submit(1, max_tokens=99)
    first, again = rig.pub.on(rig.topics.result("j1"))  # the client asked again: it gets the stored outcome
    assert first == again and rig.store.counts()["REJECTED"] == 1
    rig.submit(7)
    rig.submit(7)
    assert rig.store.counts()["QUEUED"] == 1 and rig.wakes == 1 and rig.acked == [1, 1, 7, 7]


def test_a_store_failure_leaves_the_message_and_every_later_one_unacknowledged(rig: Rig, monkeypatch) -> None:
    def full(*a, **k):
        raise StoreError("the disk is full", code="store_full")

    real_accept = rig.store.accept
    monkeypatch.setattr(rig.store, "accept", full)
    rig.submit(1)
    assert rig.acked == [] and not rig.health.writable and rig.intake.paused
    monkeypatch.setattr(rig.store, "accept", real_accept)
    rig.submit(2)  # paused: not even tried
    assert rig.acked == [] and rig.store.get("j2") is None
    assert rig.health.recheck(force=True) is True and not rig.intake.paused
    rig.submit(2)  # what the broker delivers again after the daemon's reconnect
    assert rig.acked == [2] and rig.store.get("j2").status is JobStatus.QUEUED


def test_cancels_end_queued_jobs_and_stop_running_ones(rig: Rig) -> None:
    rig.submit(1)
    rig.submit(2)
    rig.store.claim_next()  # j1 runs
    rig.intake.on_message(Msg(rig.topics.cancel("j2"), b"", 10))
    assert rig.result("j2")["status"] == "CANCELED" and 10 in rig.acked
    rig.intake.on_message(Msg(rig.topics.cancel("j1"), b"", 11))
    assert rig.canceled == ["j1"] and 11 in rig.acked
    rig.intake.on_message(Msg(rig.topics.cancel("nobody"), b"", 12))
    assert 12 in rig.acked
