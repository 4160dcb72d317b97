"""The runner against a real SQLite store, the fake engine and the fake publisher (both kept honest
by contract tests): outcomes, cancel, preemption, holds, quiescing, shutdown, and outcomes that
must wait for an unwritable store. ``work_once`` runs one job on the test's thread; tests that need
a job held mid-run use the engine's gate and the runner's own thread."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from agent.codes import ErrorCode, JobStatus
from agent.errors import StoreError
from agent.jobs.gate import Gate
from agent.jobs.health import StoreHealth
from agent.jobs.protocol import JobSubmit
from agent.jobs.results import JobResults
from agent.jobs.runner import Runner
from agent.jobs.store import JobStore
from agent.mqtt.outbox import Outbox
from agent.mqtt.topics import Topics
from tests.fakes import FakeEngine, FakePublisher
from tests.helpers import Clock


class Rig:
    def __init__(self, tmp_path: Path, *, max_attempts: int = 3, max_preemptions: int = 3) -> None:
        self.clock = Clock()
        self.store = JobStore(tmp_path / "jobs.db", max_attempts=max_attempts, max_preemptions=max_preemptions,
                              clock=self.clock)  # fmt: skip
        self.topics = Topics("edge", "pi-1")
        self.pub = FakePublisher()
        self.results = JobResults(self.store, self.topics)
        self.outbox = Outbox(self.pub)
        self.outbox.add_source(self.results)
        self.engine: FakeEngine | None = FakeEngine()
        self.engine.load()
        self.health = StoreHealth(self.store, recheck_s=lambda: 0.0, min_free_bytes=lambda: 0)
        self.gate = Gate()
        self.runner = self.make_runner()

    def make_runner(self) -> Runner:
        return Runner(
            self.store, self.results, self.gate, engine=lambda: self.engine, publish=self.pub.publish,
            send_outcome=lambda rec: self.outbox.send(self.results, self.results.item(rec)), health=self.health,
            clock=self.clock,
        )  # fmt: skip

    def submit(self, job_id: str, **kw: Any) -> None:
        fields = {"job_id": job_id, "kind": "generate", "prompt": "hello world", "max_tokens": 4, **kw}
        assert self.store.accept(JobSubmit(**fields)).outcome == "new"

    def result(self, job_id: str) -> dict:
        payloads = self.pub.on(self.topics.result(job_id))
        assert len(payloads) == 1, payloads
        return json.loads(payloads[0])

    def statuses(self, job_id: str) -> list[str]:
        return [json.loads(p)["status"] for p in self.pub.on(self.topics.status(job_id))]


@pytest.fixture
def rig(tmp_path: Path):
    r = Rig(tmp_path)
    yield r
    r.store.close()


def run_in_background(rig: Rig) -> threading.Event:
    """Start the runner's thread with the engine gated at the first token; returns the gate."""
    gate = threading.Event()
    rig.engine.gate = gate
    rig.runner.start()
    return gate


def test_a_job_runs_to_one_stored_and_published_outcome(rig: Rig) -> None:
    rig.submit("a", max_tokens=3)
    assert rig.runner.work_once() is True
    r = rig.result("a")
    assert (r["status"], r["finish_reason"], r["text"], r["attempt"]) == ("SUCCEEDED", "length", " w0 w1 w2", 1)
    assert r["usage"]["completion_tokens"] == 3 and r["timings"]["queue_ms"] >= 0
    assert rig.statuses("a") == ["IN_PROGRESS", "SUCCEEDED"]
    assert rig.store.get("a").delivered
    assert rig.runner.work_once() is False


def test_engine_errors_become_outcomes_with_their_code(rig: Rig) -> None:
    rig.submit("long", prompt="word " * 600, max_tokens=4)
    rig.runner.work_once()
    assert (rig.result("long")["status"], rig.result("long")["error"]["code"]) == ("REJECTED", "context_too_long")
    rig.engine.fail_with = RuntimeError("a bug")
    rig.submit("bug")
    rig.runner.work_once()
    err = rig.result("bug")["error"]
    assert rig.result("bug")["status"] == "FAILED" and err["code"] == "internal" and "a bug" in err["message"]


def test_no_job_starts_without_a_model_and_none_fails_for_it(rig: Rig) -> None:
    rig.submit("a")
    engine, rig.engine = rig.engine, None
    assert rig.runner.work_once() is False
    assert rig.store.get("a").status is JobStatus.QUEUED
    rig.engine = engine
    assert rig.runner.work_once() is True and rig.result("a")["status"] == "SUCCEEDED"


def test_holds_stop_new_starts_until_every_hold_is_released(rig: Rig) -> None:
    rig.submit("a")
    rig.gate.hold("intake.paused")
    rig.gate.hold("model change")
    assert rig.runner.work_once() is False
    rig.gate.release("intake.paused")
    assert rig.runner.work_once() is False
    rig.gate.release("model change")
    assert rig.runner.work_once() is True


def test_cancel_while_running_ends_canceled_with_the_partial_text(rig: Rig) -> None:
    rig.submit("a", max_tokens=100)
    gate = run_in_background(rig)
    assert rig.engine.started.wait(10)
    assert rig.gate.cancel("a") is True
    gate.set()
    rig.runner.stop(10)
    r = rig.result("a")
    assert (r["status"], r["error"]["code"], r["finish_reason"]) == ("CANCELED", "canceled", "canceled")
    assert r["text"] == " w0"


def test_a_preempted_job_is_requeued_without_losing_an_attempt_and_runs_again(rig: Rig) -> None:
    rig.submit("a", max_tokens=100)
    gate = run_in_background(rig)
    assert rig.engine.started.wait(10)
    rig.gate.hold("test")
    assert rig.gate.preempt() == ["a"]
    gate.set()
    assert rig.gate.wait_idle(10)
    rec = rig.store.get("a")
    assert (rec.status, rec.attempt, rec.preemptions) == (JobStatus.QUEUED, 0, 1)
    rig.runner.stop(10)  # idle and held: its thread ends without taking the job again
    rig.engine.gate = None
    rig.gate = Gate()  # a new daemon: none of the old one's holds
    assert rig.make_runner().work_once() is True
    r = rig.result("a")
    assert (r["status"], r["attempt"]) == ("SUCCEEDED", 1)


def test_a_job_preempted_again_and_again_ends(tmp_path: Path) -> None:
    rig = Rig(tmp_path, max_attempts=2, max_preemptions=1)
    rig.submit("a", max_tokens=100)
    rig.engine.gate = threading.Event()
    for _ in range(10):
        if rig.store.get("a").terminal:
            break
        t = threading.Thread(target=rig.runner.work_once)
        t.start()
        assert rig.engine.started.wait(10)
        rig.engine.started.clear()
        rig.gate.preempt()
        rig.engine.gate.set()
        t.join()
        rig.engine.gate.clear()
    r = rig.result("a")
    assert (r["status"], r["error"]["code"]) == ("FAILED", "preempted")
    assert len(rig.engine.runs) == 3  # one free preemption, then two counted runs (max_attempts 2)
    rig.store.close()


def test_quiesce_lets_a_job_finish_within_the_grace_then_holds(rig: Rig) -> None:
    rig.submit("a", max_tokens=5)
    gate = run_in_background(rig)
    assert rig.engine.started.wait(10)
    held = threading.Event()
    real_hold = rig.gate.hold
    rig.gate.hold = lambda reason: (real_hold(reason), held.set())  # type: ignore[method-assign]
    out: list[list[str]] = []
    q = threading.Thread(target=lambda: out.append(rig.gate.quiesce(30, "model change")))
    q.start()
    assert held.wait(10)
    gate.set()  # the job finishes on its own while quiesce waits
    q.join(30)
    assert out == [[]] and rig.result("a")["status"] == "SUCCEEDED"
    rig.submit("b")
    assert rig.runner.work_once() is False  # held: b does not start
    rig.gate.release("model change")
    rig.runner.stop(30)


def test_quiesce_preempts_what_does_not_finish_in_time(rig: Rig) -> None:
    rig.submit("a", max_tokens=50)
    run_in_background(rig)
    assert rig.engine.started.wait(10)

    def release_gate_once_stopped() -> None:
        # the engine sees the stop at its next token; the gate stands for a slow token
        rig.gate._slots["a"].cancel.wait(10)
        rig.engine.gate.set()

    threading.Thread(target=release_gate_once_stopped).start()
    assert rig.gate.quiesce(0, "model change") == ["a"]
    rec = rig.store.get("a")
    assert (rec.status, rec.attempt) == (JobStatus.QUEUED, 0)
    assert rig.pub.on(rig.topics.result("a")) == []
    rig.gate.release("model change")
    rig.runner.stop(0, force=True)


def test_shutdown_requeues_a_job_that_outlives_the_grace(rig: Rig) -> None:
    rig.submit("a", max_tokens=50)
    run_in_background(rig)
    assert rig.engine.started.wait(10)
    threading.Thread(target=lambda: (rig.gate._slots["a"].cancel.wait(10), rig.engine.gate.set())).start()
    rig.runner.stop(0)
    rec = rig.store.get("a")
    assert (rec.status, rec.attempt) == (JobStatus.QUEUED, 0)


def test_an_outcome_waits_for_the_store_and_is_written_once_it_recovers(rig: Rig, monkeypatch) -> None:
    rig.submit("a")
    real_finish = rig.store.finish
    failures = iter([True, True])

    def finish(job_id, outcome, now=None):
        if next(failures, False):
            raise StoreError("the disk is full", code="store_full")
        return real_finish(job_id, outcome, now)

    monkeypatch.setattr(rig.store, "finish", finish)
    stop = threading.Event()

    def main_loop() -> None:  # what the daemon's main loop does while the store is unwritable
        while not stop.is_set():
            rig.health.recheck(force=True)
            stop.wait(0.01)

    loop = threading.Thread(target=main_loop)
    loop.start()
    try:
        assert rig.runner.work_once() is True  # returns only once the outcome is stored
    finally:
        stop.set()
        loop.join()
    assert rig.result("a")["status"] == "SUCCEEDED" and rig.health.writable
    assert rig.store.get("a").status is JobStatus.SUCCEEDED


def test_expired_jobs_are_rejected_with_their_outcome_published(rig: Rig) -> None:
    rig.submit("gone", expires_at="2999-01-01T00:00:00Z")
    rig.clock.t = 32503680000.0 + 1  # past 2999-01-01
    assert rig.runner.work_once() is False
    r = rig.result("gone")
    assert (r["status"], r["error"]["code"]) == ("REJECTED", ErrorCode.expired.value)


def test_the_job_path_imports_without_llama_cpp() -> None:
    """Engine types, the runner, the daemon's wiring and the protocol load without libllama."""
    import subprocess
    import sys

    code = ("import sys, agent.app.daemon, agent.jobs.runner, agent.engine, agent.jobs.protocol, agent.jobs.store; "
            "from agent.engine import GenerationRequest, EngineLike; "
            "assert 'llama_cpp' not in sys.modules, 'llama_cpp was imported'")  # fmt: skip
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert p.returncode == 0, p.stderr
