"""The daemon's job protocol against a real broker, the real engine (tiny model) and a real store.

Jobs are held IN_PROGRESS with GatedEngine (the real engine, paused at its first token until the
test opens the gate), so cancel, queue and expiry cases are deterministic without sleeps.
"""

from __future__ import annotations

import json
import re
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from agent.jobs.store import JobStore
from tests.broker import BrokerClient, MosquittoBroker
from tests.daemon_harness import GatedEngine, InProcessDaemon, wait_online, write_daemon_config
from tests.helpers import FakeClock, job_payload

DEV = "dev-a"
ROOT = f"edge/{DEV}"


def job(job_id: str, **kw: Any) -> bytes:
    return job_payload(job_id, **{"max_tokens": 8, **kw})


def statuses_until_terminal(peer: BrokerClient, job_id: str, timeout: float = 30.0) -> list[dict]:
    out = []
    while True:
        data = json.loads(peer.expect(f"{ROOT}/jobs/{job_id}/status", timeout=timeout).payload)
        out.append(data)
        if data["status"] not in ("QUEUED", "IN_PROGRESS"):
            return out


def result_of(peer: BrokerClient, job_id: str, timeout: float = 30.0) -> dict:
    return json.loads(peer.expect(f"{ROOT}/jobs/{job_id}/result", timeout=timeout).payload)


def collect_until_result(peer: BrokerClient, job_id: str, timeout: float = 30.0) -> tuple[list[Any], dict]:
    """Every message up to and including the job's result (expect() would skip the others)."""
    seen = []
    while True:
        msg = peer.expect(timeout=timeout)
        seen.append(msg)
        if msg.topic == f"{ROOT}/jobs/{job_id}/result":
            return seen, json.loads(msg.payload)


def expect_status(peer: BrokerClient, job_id: str, status: str, timeout: float = 30.0) -> dict:
    while True:
        data = json.loads(peer.expect(f"{ROOT}/jobs/{job_id}/status", timeout=timeout).payload)
        if data["status"] == status:
            return data


@pytest.fixture
def config(tmp_path: Path, broker: MosquittoBroker, tiny_model: Path):
    def make(**sections: Any) -> Path:
        return write_daemon_config(tmp_path / "daemon", broker, tiny_model, device_id=DEV, **sections)

    return make


@pytest.fixture
def peer(broker: MosquittoBroker):
    with BrokerClient(broker) as p:
        p.subscribe(f"{ROOT}/#")
        yield p


def run_daemon(config_path: Path, peer: BrokerClient, **kw: Any) -> InProcessDaemon:
    d = InProcessDaemon(config_path, **kw).start()
    wait_online(peer, DEV)
    return d


def test_round_trip_statuses_in_order_and_result_with_usage_and_timings(config, peer):
    with run_daemon(config(), peer):
        peer.publish(f"{ROOT}/jobs/submit", job("rt-1", max_tokens=6, temperature=0.0, seed=7))
        seen = statuses_until_terminal(peer, "rt-1")
        result = result_of(peer, "rt-1")
    assert [s["status"] for s in seen] == ["QUEUED", "IN_PROGRESS", "SUCCEEDED"]
    assert [s["attempt"] for s in seen] == [0, 1, 1]
    assert all(s["device_id"] == DEV and s["job_id"] == "rt-1" for s in seen)
    assert result["status"] == "SUCCEEDED" and result["error"] is None
    assert result["finish_reason"] in ("stop", "length")
    assert result["usage"]["prompt_tokens"] > 0
    assert 1 <= result["usage"]["completion_tokens"] <= 6
    t = result["timings"]
    assert t["queue_ms"] >= 0 and t["prompt_ms"] > 0 and t["generation_ms"] >= 0 and t["tokens_per_s"] >= 0
    assert datetime.fromisoformat(result["ts"].replace("Z", "+00:00")).tzinfo is not None


def test_device_status_online_then_stopping_retained(config, peer, broker):
    d = run_daemon(config(), peer)
    d.stop()
    with BrokerClient(broker) as late:  # a subscriber arriving later sees the retained state
        late.subscribe(f"{ROOT}/status")
        msg = late.expect(f"{ROOT}/status")
    assert msg.retain and json.loads(msg.payload)["state"] == "stopping"


def test_streaming_pieces_add_up_to_the_result(config, peer):
    with run_daemon(config(), peer):
        peer.publish(f"{ROOT}/jobs/submit", job("st-1", max_tokens=12, stream=True, temperature=0.0))
        seen, result = collect_until_result(peer, "st-1")
    # One publisher, one connection: the pieces (published before the result) arrive before it.
    pieces = [json.loads(m.payload) for m in seen if m.topic == f"{ROOT}/jobs/st-1/stream"]
    assert result["status"] == "SUCCEEDED" and pieces
    assert [p["index"] for p in pieces] == list(range(len(pieces)))
    assert "".join(p["text"] for p in pieces) == (result["text"] or "")


def test_no_stream_messages_unless_asked(config, peer):
    with run_daemon(config(), peer):
        peer.publish(f"{ROOT}/jobs/submit", job("ns-1", max_tokens=8))
        seen, result = collect_until_result(peer, "ns-1")
    assert result["status"] == "SUCCEEDED" and result["usage"]["completion_tokens"] > 0
    assert not [m for m in seen if m.topic.endswith("/stream")]


def test_cancel_while_running(config, peer):
    gated: list[GatedEngine] = []
    with run_daemon(config(), peer, engine_wrapper=lambda e: gated.append(GatedEngine(e)) or gated[0]):
        peer.publish(f"{ROOT}/jobs/submit", job("cr-1", max_tokens=200))
        assert gated[0].started.wait(30)
        peer.publish(f"{ROOT}/jobs/cr-1/cancel", b"")
        assert gated[0].cancel.wait(30)  # the daemon handled the cancel and signalled the engine
        gated[0].gate.set()
        seen = statuses_until_terminal(peer, "cr-1")
        result = result_of(peer, "cr-1")
    assert seen[-1]["status"] == "CANCELED" and seen[-1]["reason"] == "canceled"
    assert result["status"] == "CANCELED" and result["finish_reason"] == "canceled"
    assert result["usage"]["completion_tokens"] < 200


def test_a_cancel_published_before_its_job_cancels_it_when_it_arrives(config, peer):
    """Cancels travel on the control session: one sent right after a submit can overtake it. Here the
    cancel is handled first; the job must still end CANCELED, never run."""
    with run_daemon(config(), peer) as d:
        peer.publish(f"{ROOT}/jobs/early-1/cancel", b"")
        store = d.daemon.parts.store
        deadline = time.monotonic() + 30
        while not store.canceled_early("early-1"):  # the cancel was handled before the job exists
            assert time.monotonic() < deadline
            threading.Event().wait(0.01)  # poll pacing; the loop ends on the condition
        peer.publish(f"{ROOT}/jobs/submit", job("early-1", max_tokens=200))
        seen = statuses_until_terminal(peer, "early-1")
        result = result_of(peer, "early-1")
    assert [s["status"] for s in seen] == ["CANCELED"]
    assert result["status"] == "CANCELED" and result["error"]["code"] == "canceled" and result["attempt"] == 0


def test_cancel_while_queued_and_queue_order_by_priority(config, peer):
    gated: list[GatedEngine] = []
    with run_daemon(config(), peer, engine_wrapper=lambda e: gated.append(GatedEngine(e)) or gated[0]):
        peer.publish(f"{ROOT}/jobs/submit", job("hold", max_tokens=4))
        assert gated[0].started.wait(30)
        peer.publish(f"{ROOT}/jobs/submit", job("low", priority=-5))
        peer.publish(f"{ROOT}/jobs/submit", job("victim"))
        peer.publish(f"{ROOT}/jobs/submit", job("high", priority=5))
        for j in ("low", "victim", "high"):
            expect_status(peer, j, "QUEUED")
        peer.publish(f"{ROOT}/jobs/victim/cancel", b"")
        canceled = result_of(peer, "victim")
        gated[0].gate.set()
        order = []  # IN_PROGRESS order of the jobs that were queued behind "hold"
        while len(order) < 2:
            msg = peer.expect(timeout=30)
            data = json.loads(msg.payload)
            if msg.topic.endswith("/status") and data["status"] == "IN_PROGRESS":
                order.append(data["job_id"])
            if msg.topic.endswith("/result") and data["job_id"] == "low":
                break
    assert canceled["status"] == "CANCELED" and canceled["error"]["code"] == "canceled"
    assert canceled["attempt"] == 0 and canceled["usage"] is None  # it never ran
    assert order == ["high", "low"]


def test_queue_full_is_rejected_and_resent_on_duplicate(config, peer):
    gated: list[GatedEngine] = []
    cfg = config(store={"queue_max": 2})
    with run_daemon(cfg, peer, engine_wrapper=lambda e: gated.append(GatedEngine(e)) or gated[0]):
        peer.publish(f"{ROOT}/jobs/submit", job("q-run"))
        assert gated[0].started.wait(30)
        for j in ("q-1", "q-2"):
            peer.publish(f"{ROOT}/jobs/submit", job(j))
            expect_status(peer, j, "QUEUED")
        peer.publish(f"{ROOT}/jobs/submit", job("q-3"))
        rejected = result_of(peer, "q-3")
        peer.publish(f"{ROOT}/jobs/submit", job("q-3"))  # a retry of the same id gets the same outcome
        again = result_of(peer, "q-3")
        gated[0].gate.set()
        for j in ("q-run", "q-1", "q-2"):
            assert result_of(peer, j)["status"] == "SUCCEEDED"
    assert rejected["status"] == "REJECTED" and rejected["error"]["code"] == "queue_full"
    assert again == rejected


def test_expired_on_arrival_and_while_queued(config, peer):
    clock = FakeClock(datetime(2030, 1, 1, tzinfo=UTC).timestamp())
    gated: list[GatedEngine] = []

    def rfc(dt_s: float) -> str:
        return datetime.fromtimestamp(dt_s, tz=UTC).isoformat()

    with run_daemon(config(), peer, clock=clock, engine_wrapper=lambda e: gated.append(GatedEngine(e)) or gated[0]):
        peer.publish(f"{ROOT}/jobs/submit", job("late", expires_at=rfc(clock.now - 1)))
        late = result_of(peer, "late")
        peer.publish(f"{ROOT}/jobs/submit", job("hold"))
        assert gated[0].started.wait(30)
        peer.publish(f"{ROOT}/jobs/submit", job("soon", expires_at=rfc(clock.now + 60)))
        expect_status(peer, "soon", "QUEUED")
        clock.advance(120)
        gated[0].gate.set()
        soon = result_of(peer, "soon")
    for r in (late, soon):
        assert r["status"] == "REJECTED" and r["error"]["code"] == "expired", r
        assert r["usage"] is None


def test_timeout_while_running_is_timed_out(config, peer):
    mono = FakeClock(1000.0)
    gated: list[GatedEngine] = []
    with run_daemon(config(), peer, monotonic=mono, engine_wrapper=lambda e: gated.append(GatedEngine(e)) or gated[0]):
        peer.publish(f"{ROOT}/jobs/submit", job("slow", max_tokens=200, timeout_s=5))
        assert gated[0].started.wait(30)
        mono.advance(10)
        gated[0].gate.set()
        seen = statuses_until_terminal(peer, "slow")
        result = result_of(peer, "slow")
    assert seen[-1]["status"] == "TIMED_OUT" and seen[-1]["reason"] == "timeout"
    assert result["finish_reason"] == "timeout" and "timeout_s=5" in result["error"]["message"]


def test_context_too_long_is_rejected_with_both_numbers(config, peer):
    with run_daemon(config(engine={"n_ctx": 64}), peer):
        peer.publish(f"{ROOT}/jobs/submit", job("ctx", prompt="word " * 100, max_tokens=32))
        result = result_of(peer, "ctx")
    assert result["status"] == "REJECTED" and result["error"]["code"] == "context_too_long"
    # llama.cpp pads n_ctx to a multiple of 256: the message names the context actually loaded.
    msg = result["error"]["message"]
    assert re.search(r"the prompt is \d+ tokens and the context holds 256 per job", msg), msg


@pytest.mark.parametrize(
    ("payload", "code", "words"),
    [
        (job("bad-type", max_tokens="8"), "invalid_payload", ["max_tokens"]),
        (job("bad-key", colour="blue"), "invalid_payload", ["colour"]),
        (job("too-many", max_tokens=100000), "max_tokens_too_large", ["100000", "engine.max_tokens_limit"]),
        (job("too-big", prompt="x" * 5000), "prompt_too_large", ["4096"]),
    ],
    ids=["wrong-type", "unknown-key", "max-tokens", "prompt-size"],
)
def test_refusals_have_code_and_precise_message(config, peer, payload, code, words):
    job_id = json.loads(payload)["job_id"]
    with run_daemon(config(engine={"max_prompt_bytes": 4096}), peer):
        peer.publish(f"{ROOT}/jobs/submit", payload)
        status = expect_status(peer, job_id, "REJECTED")
        result = result_of(peer, job_id)
    assert status["reason"] == code and result["error"]["code"] == code
    for w in words:
        assert w in result["error"]["message"], result["error"]["message"]


def test_unreadable_job_is_logged_and_daemon_keeps_serving(config, peer, caplog):
    with run_daemon(config(), peer, expect_errors=("refused a message .* with no readable job_id",)):
        with caplog.at_level("ERROR", logger="agent.app.daemon"):
            peer.publish(f"{ROOT}/jobs/submit", b"{not json")
            peer.publish(f"{ROOT}/jobs/submit", job("ok-after"))
            assert result_of(peer, "ok-after")["status"] == "SUCCEEDED"
    assert any("no readable job_id" in r.getMessage() for r in caplog.records)


def test_duplicate_job_id_never_runs_twice(config, peer, tmp_path):
    cfg = config()
    with run_daemon(cfg, peer) as d:
        peer.publish(f"{ROOT}/jobs/submit", job("dup", max_tokens=4))
        first = result_of(peer, "dup")
        peer.publish(f"{ROOT}/jobs/submit", job("dup", max_tokens=4))
        seen, second = collect_until_result(peer, "dup")
        statuses = [json.loads(m.payload)["status"] for m in seen if m.topic.endswith("dup/status")]
        store_path = d.settings.store.path
    assert first == second  # the stored outcome, sent again: same ts, same text
    assert "IN_PROGRESS" not in statuses  # the resend did not run it again
    store = JobStore(store_path)
    try:
        rec = store.get("dup")
        assert rec.attempt == 1 and rec.status.value == "SUCCEEDED"
    finally:
        store.close()


def test_sighup_reload_applies_limits_and_keeps_running_config_on_bad_edit(config, peer):
    cfg = config()
    with run_daemon(cfg, peer, expect_errors=("reload refused, keeping the running configuration",)) as d:
        text = cfg.read_text()
        cfg.write_text(text.replace("[engine]\n", "[engine]\nmax_tokens_limit = 16\n", 1))
        d.daemon.reload()
        peer.publish(f"{ROOT}/jobs/submit", job("after-reload", max_tokens=32))
        assert result_of(peer, "after-reload")["error"]["code"] == "max_tokens_too_large"
        cfg.write_text("[engine]\nmax_tokens_limit = 'lots'\n")
        d.daemon.reload()  # refused: the running configuration stays
        assert d.settings.engine.max_tokens_limit == 16
        peer.publish(f"{ROOT}/jobs/submit", job("still-serving", max_tokens=8))
        assert result_of(peer, "still-serving")["status"] == "SUCCEEDED"


def test_the_four_jobs_of_issue_17_on_the_tiny_model_all_end(config, peer):
    """n_ctx 512, the real engine on the tiny model, four jobs at once: a 600-token story, a small
    job, a prompt of about 300 tokens with 64 to generate, another small job. None waits on another:
    the story runs to the end of the context, the long prompt fits and runs."""
    ids = {"story": {"prompt": "Write a long story about a dragon:", "max_tokens": 600},
           "small-1": {"max_tokens": 4}, "long": {"prompt": "a" * 600, "max_tokens": 64},
           "small-2": {"max_tokens": 4}}  # fmt: skip
    with run_daemon(config(engine={"max_tokens_limit": 1024}), peer):
        for job_id, fields in ids.items():
            peer.publish(f"{ROOT}/jobs/submit", job(job_id, temperature=0.0, **fields))
        results = {}
        while len(results) < len(ids):
            msg = peer.expect(timeout=60)
            if msg.topic.endswith("/result"):
                results[msg.topic.split("/")[-2]] = json.loads(msg.payload)
    assert {r["status"] for r in results.values()} == {"SUCCEEDED"}, results
    story = results["story"]["usage"]
    assert story["max_tokens_allowed"] == 512 - story["prompt_tokens"]
    assert story["completion_tokens"] <= story["max_tokens_allowed"]
    long = results["long"]["usage"]
    assert long["prompt_tokens"] > 250 and long["max_tokens_allowed"] == 64
