"""Several jobs at once (engine.max_parallel) through the daemon: real broker, real engine (tiny
model), real store.

Jobs are made to overlap without sleeps: ``Rendezvous`` wraps the real engine and holds the
scheduler at the first token until the expected number of jobs has reached the engine, so they
decode together for the rest of their run. The kill -9 soak with four slots is in
tests/test_daemon_faults.py.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from agent.codes import JobStatus
from agent.jobs.store import JobStore
from tests.broker import BrokerClient, MosquittoBroker
from tests.daemon_harness import InProcessDaemon, wait_online, write_daemon_config

DEV = "par"
ROOT = f"edge/{DEV}"


class Rendezvous:
    """The real engine; the first token of any job waits (on the scheduler thread, so every slot
    waits) until ``expected`` jobs have called generate, then until ``gate`` is open."""

    def __init__(self, engine: Any, expected: int) -> None:
        object.__setattr__(self, "_engine", engine)
        object.__setattr__(self, "expected", expected)
        object.__setattr__(self, "gate", threading.Event())
        object.__setattr__(self, "_cond", threading.Condition())
        object.__setattr__(self, "calls", 0)
        object.__setattr__(self, "cancels", [])  # each job's cancel event, as the runner passed it
        self.gate.set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def generate(self, req: Any, *, on_token: Any = None, **kw: Any) -> Any:
        with self._cond:
            object.__setattr__(self, "calls", self.calls + 1)
            self.cancels.append(kw.get("cancel"))
            self._cond.notify_all()
        first = [True]

        def held(index: int, text: str) -> None:
            if first[0]:
                first[0] = False
                with self._cond:
                    assert self._cond.wait_for(lambda: self.calls >= self.expected, 60), "jobs never arrived"
                assert self.gate.wait(60), "the test never opened the gate"
            if on_token is not None:
                on_token(index, text)

        return self._engine.generate(req, on_token=held, **kw)


def job(job_id: str, max_tokens: int, **kw: Any) -> bytes:
    prompt = kw.pop("prompt", f"Log line for {job_id}: the pump")
    return json.dumps(
        {"job_id": job_id, "kind": "generate", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, **kw}
    ).encode()


def parse(msg: Any) -> dict:
    """A message on the device's topics as JSON ({} for the empty cancel requests the peer sees too)."""
    return json.loads(msg.payload) if msg.payload else {}


@pytest.fixture
def peer(broker: MosquittoBroker):
    with BrokerClient(broker) as p:
        p.subscribe(f"{ROOT}/#")
        yield p


def start(tmp_path: Path, broker: MosquittoBroker, model: Path, peer: BrokerClient, slots: int, expected: int,
          **sections: Any) -> tuple[InProcessDaemon, list[Rendezvous]]:  # fmt: skip
    cfg = write_daemon_config(
        tmp_path / "d", broker, model, device_id=DEV,
        engine={"max_parallel": slots, "n_ctx": 2048, "max_tokens_limit": 2048}, **sections,
    )  # fmt: skip
    wrapped: list[Rendezvous] = []
    d = InProcessDaemon(cfg, engine_wrapper=lambda e: wrapped.append(Rendezvous(e, expected)) or wrapped[-1]).start()
    wait_online(peer, DEV)
    return d, wrapped


def test_four_jobs_at_once_streaming_one_canceled_mid_generation(tmp_path, broker, tiny_model, peer):
    d, _ = start(tmp_path, broker, tiny_model, peer, slots=4, expected=4)
    ids = ["s1", "s2", "plain", "victim"]
    results: dict[str, dict] = {}
    streams: dict[str, list[dict]] = {"s1": [], "s2": [], "victim": []}
    order: list[str] = []  # stream pieces as they arrived: (job) per piece
    with d:
        peer.publish(f"{ROOT}/jobs/submit", job("s1", 300, stream=True))
        peer.publish(f"{ROOT}/jobs/submit", job("s2", 300, stream=True))
        peer.publish(f"{ROOT}/jobs/submit", job("plain", 300))
        peer.publish(f"{ROOT}/jobs/submit", job("victim", 2000, stream=True))  # runs until canceled
        canceled = False
        while len(results) < 4:
            msg = peer.expect(timeout=60)
            data = parse(msg)
            if msg.topic.endswith("/stream"):
                streams[data["job_id"]].append(data)
                order.append(data["job_id"])
                if data["job_id"] == "victim" and data["index"] == 5 and not canceled:
                    peer.publish(f"{ROOT}/jobs/victim/cancel", b"")  # mid-generation
                    canceled = True
            elif msg.topic.endswith("/result"):
                results[data["job_id"]] = data
    assert sorted(results) == sorted(ids)
    v = results["victim"]
    assert v["status"] == "CANCELED" and v["finish_reason"] == "canceled"
    assert 5 < v["usage"]["completion_tokens"] < 2000
    for j in ("s1", "s2", "plain"):
        r = results[j]
        assert r["status"] == "SUCCEEDED" and r["usage"]["completion_tokens"] > 5, r
    for j, pieces in streams.items():
        assert [p["index"] for p in pieces] == list(range(len(pieces)))
        assert "".join(p["text"] for p in pieces) == results[j]["text"]
    # The two streams interleave: each had pieces out before the other's last one.
    assert order.index("s2") < len(order) - 1 - order[::-1].index("s1")
    assert order.index("s1") < len(order) - 1 - order[::-1].index("s2")
    # Results say how many slots were busy and how long each job waited for one.
    timings = [results[j]["timings"] for j in ids]
    assert max(t["slots_in_use"] for t in timings) == 4
    assert all(t["slot_wait_ms"] is not None and t["first_token_ms"] is not None for t in timings)


def test_priority_decides_which_queued_job_gets_the_next_free_slot(tmp_path, broker, tiny_model, peer):
    d, wrapped = start(tmp_path, broker, tiny_model, peer, slots=2, expected=2)
    wrapped[0].gate.clear()  # the two first jobs hold both slots until the gate opens
    with d:
        peer.publish(f"{ROOT}/jobs/submit", job("short", 4))
        peer.publish(f"{ROOT}/jobs/submit", job("long", 400))
        running: set[str] = set()
        while running != {"short", "long"}:
            data = parse(peer.expect(timeout=60))
            if data.get("status") == "IN_PROGRESS":
                running.add(data["job_id"])
        peer.publish(f"{ROOT}/jobs/submit", job("low", 4, priority=-5))
        peer.publish(f"{ROOT}/jobs/submit", job("normal", 4))
        peer.publish(f"{ROOT}/jobs/submit", job("high", 4, priority=5))
        queued: set[str] = set()
        while queued != {"low", "normal", "high"}:
            msg = peer.expect(timeout=60)
            data = parse(msg)
            assert not (data.get("status") == "IN_PROGRESS" and data["job_id"] in ("low", "normal", "high")), data
            if data.get("status") == "QUEUED":
                queued.add(data["job_id"])
        wrapped[0].gate.set()
        started: list[str] = []
        done: set[str] = set()
        while done != {"short", "long", "low", "normal", "high"}:
            msg = peer.expect(timeout=60)
            data = parse(msg)
            if msg.topic.endswith("/status") and data["status"] == "IN_PROGRESS":
                started.append(data["job_id"])
            if msg.topic.endswith("/result"):
                assert data["status"] == "SUCCEEDED", data
                done.add(data["job_id"])
    assert started == ["high", "normal", "low"]


def test_a_stop_requeues_every_running_job_and_each_completes_once_after_restart(tmp_path, broker, tiny_model, peer):
    """A stop with no grace left (service.shutdown_grace_s 0) stops the three running jobs; they go
    back to the queue without the run counting and each completes once after the restart."""
    d, wrapped = start(tmp_path, broker, tiny_model, peer, slots=3, expected=3, service={"shutdown_grace_s": 0})
    wrapped[0].gate.clear()
    results: dict[str, list[dict]] = {}

    def note(msg: Any) -> None:
        if msg.topic.endswith("/result"):
            data = parse(msg)
            results.setdefault(data["job_id"], []).append(data)

    with d:
        for j in ("a", "b", "c"):
            peer.publish(f"{ROOT}/jobs/submit", job(j, 50))
        running: set[str] = set()
        while running != {"a", "b", "c"}:
            msg = peer.expect(timeout=60)
            note(msg)
            data = parse(msg)
            if data.get("status") == "IN_PROGRESS":
                running.add(data["job_id"])
        stopper = threading.Thread(target=d.stop)
        stopper.start()
        for cancel in wrapped[0].cancels:  # the runner stopped all three (they are held at a token)
            assert cancel.wait(60)
        wrapped[0].gate.set()
        stopper.join(60)
        assert not stopper.is_alive()
    assert results == {}  # none finished in the first run
    with JobStore(tmp_path / "d" / "state" / "jobs.db") as store:  # and the store says so, not only the broker
        assert {j: store.get(j).status for j in "abc"} == dict.fromkeys("abc", JobStatus.QUEUED)
    with InProcessDaemon(tmp_path / "d" / "config.toml"):
        while len(results) < 3:
            note(peer.expect(timeout=60))
    assert sorted(results) == ["a", "b", "c"]
    for j, copies in results.items():
        # One run, one outcome. Delivery is at least once: a copy sent again (the same stored message, its
        # ts included) is the same outcome, which clients drop by job_id (docs/protocol.md).
        assert all(c == copies[0] for c in copies) and copies[0]["status"] == "SUCCEEDED", (j, copies)
        assert copies[0]["attempt"] == 1  # the stopped run did not count
