"""The device shadow end to end: real daemons (in process, and `edge-agent run` as a child process),
a real Mosquitto, real synthetic models of two shapes, real SQLite state (issue 8's acceptance).

Operators are plain paho peers (tests.shadow_harness.ShadowPeer) or the `edge-agent shadow` CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent.models.synth import synth_model
from agent.mqtt.topics import Topics
from agent.shadow.store import ShadowStore
from tests.broker import BrokerClient, MosquittoBroker
from tests.daemon_harness import ROOT, DaemonProcess, GatedEngine, InProcessDaemon, wait_online, write_daemon_config
from tests.shadow_harness import ShadowPeer
from tests.test_shadow_desired import write_q8_model

# What the daemon logs at ERROR when a model change fails and it goes back to the model it had.
BAD_MODEL = ("model change to .* failed", "not applied: ", "the desired model did not load at start")

DEV = "dev-sh"
T = Topics("edge", DEV)


def unknown_architecture(src: Path, out: Path) -> Path:
    """A copy whose architecture this llama.cpp build does not know (as a file from a newer
    llama.cpp would be): every "llama" string renamed to "zzzzz". Its header still reads."""
    out.write_bytes(src.read_bytes().replace(b"llama", b"zzzzz"))
    return out


@pytest.fixture
def board(tmp_path: Path, broker: MosquittoBroker, tiny_model: Path) -> Path:
    """A daemon config with a models folder holding: model.gguf (tiny), other.gguf (another shape),
    unknown-arch.gguf, q8.gguf; and a file outside the folder with a symlink to it."""
    cfg = write_daemon_config(tmp_path / "d", broker, tiny_model, device_id=DEV)
    models = tmp_path / "d" / "models"
    synth_model("tiny", models / "other.gguf", seed=3, overrides={"n_layer": 3, "n_embd": 128})
    unknown_architecture(models / "other.gguf", models / "unknown-arch.gguf")
    write_q8_model(models / "q8.gguf")
    shutil.copyfile(tiny_model, tmp_path / "outside.gguf")
    (models / "escape.gguf").symlink_to(tmp_path / "outside.gguf")
    return cfg


@pytest.fixture
def op(broker: MosquittoBroker):
    peer = ShadowPeer(broker, T)
    yield peer
    peer.close()


@pytest.fixture
def jobs(broker: MosquittoBroker):
    with BrokerClient(broker) as p:
        p.subscribe(f"{T.root}/#")
        yield p


def update(op: ShadowPeer, desired: dict, token: str, **extra: Any) -> tuple[str, dict]:
    op.send({"state": {"desired": desired}, "client_token": token, **extra})
    return op.reply(token, timeout=60)


def applied(op: ShadowPeer, version: int, timeout: float = 60) -> dict:
    """The document once the board reports it has reconciled ``version``."""
    return op.doc(lambda d: d["state"]["reported"].get("applied_version", -1) >= version, timeout)


def job_status(peer: BrokerClient, job_id: str, status: str) -> dict:
    while True:
        data = json.loads(peer.expect(T.status(job_id), timeout=60).payload)
        if data["status"] == status:
            return data


def submit(peer: BrokerClient, job_id: str, **kw: Any) -> None:
    body = {"job_id": job_id, "kind": "generate", "prompt": "Hello there", "max_tokens": 4, **kw}
    peer.publish(T.submit, json.dumps(body).encode())


def test_live_keys_are_applied_and_reported_and_paused_jobs_wait(board: Path, op: ShadowPeer, jobs) -> None:
    with InProcessDaemon(board) as d:
        wait_online(jobs, DEV)
        kind, reply = update(op, {"engine": {"n_ctx": 1024, "max_parallel": 3}, "telemetry": {"interval_s": 7},
                                  "intake": {"paused": True}}, "t1")  # fmt: skip
        assert kind == "accepted" and reply["version"] == 1
        doc = applied(op, 1)
        rep = doc["state"]["reported"]
        assert (rep["engine"]["n_ctx"], rep["engine"]["max_parallel"], rep["telemetry"]["interval_s"],
                rep["intake"]["paused"]) == (1024, 3, 7, True)  # fmt: skip
        assert not doc["state"].get("delta")
        assert (d.daemon.parts.supervisor.engine.report.n_ctx, d.daemon.parts.supervisor.engine.slots) == (1024, 3)
        submit(jobs, "waits")
        job_status(jobs, "waits", "QUEUED")
        assert d.daemon.parts.store.get("waits").status.value == "QUEUED"
        kind, reply = update(op, {"intake": {"paused": False}}, "t2")
        assert kind == "accepted" and reply["version"] == 2
        assert job_status(jobs, "waits", "SUCCEEDED")["attempt"] == 1


@pytest.mark.parametrize("grace", [30, 0], ids=["finishes", "requeued"])
def test_a_model_change_while_a_job_runs(board: Path, op: ShadowPeer, jobs, grace: int) -> None:
    gated: list[GatedEngine] = []

    def wrap(e: Any) -> GatedEngine:
        gated.append(GatedEngine(e))
        return gated[-1]

    with InProcessDaemon(write_daemon_config(board.parent, op.client.broker, board.parent / "models" / "model.gguf",
                                             device_id=DEV, service={"shutdown_grace_s": grace}),
                         engine_wrapper=wrap) as d:  # fmt: skip
        wait_online(jobs, DEV)
        submit(jobs, "during", max_tokens=8)
        assert gated[0].started.wait(30)
        kind, reply = update(op, {"model": {"path": "other.gguf"}}, "swap")
        assert kind == "accepted"
        if grace:
            gated[0].gate.set()  # the running job finishes, then the model changes
        else:
            assert gated[0].cancel.wait(30)  # preempted at once
            gated[0].gate.set()
        doc = applied(op, 1)
        serving = doc["state"]["reported"]["serving"]
        assert serving["file"] == "other.gguf" and serving["preempted"] == (0 if grace else 1)
        assert serving["swap_ms"] > 0
        from datetime import datetime

        accepted_at = datetime.fromisoformat(reply["ts"].replace("Z", "+00:00")).timestamp()
        print(f"model change ({'job finishes first' if grace else 'job preempted'}): accepted to serving "
              f"{(serving['loaded_at'] - accepted_at) * 1000:.0f} ms, swap {serving['swap_ms']:.0f} ms, "
              f"{serving['preempted']} job(s) preempted")  # fmt: skip
        assert d.daemon.parts.supervisor.engine.report.model.endswith("other.gguf")
        if not grace:
            gated[1].gate.set()  # the requeued job runs on the new model
        final = job_status(jobs, "during", "SUCCEEDED")
        assert final["attempt"] == 1
        results = [m for m in jobs.barrier() if m.topic == T.result("during")]
    store = d.settings.store.path
    from agent.jobs.store import JobStore

    with JobStore(store, readonly=True) as s:
        r = s.get("during")
        assert r.status.value == "SUCCEEDED" and r.attempt == 1 and r.preemptions == (0 if grace else 1)
    assert len({m.payload for m in results}) <= 1


@pytest.mark.parametrize("desired,key", [
    ({"model": {"path": "unknown-arch.gguf"}}, "model.path"),
    ({"model": {"path": "other.gguf", "sha256": "0" * 64}}, "model.sha256"),
], ids=["unknown-architecture", "sha256-mismatch"])  # fmt: skip
def test_a_model_that_cannot_load_is_refused_or_rolled_back(
    board: Path, op: ShadowPeer, jobs, desired, key, broker: MosquittoBroker
) -> None:
    events = BrokerClient(broker).connect()
    events.subscribe(T.events)
    with InProcessDaemon(board, expect_errors=BAD_MODEL) as d:
        wait_online(jobs, DEV)
        kind, reply = update(op, desired, "bad-model")
        if kind == "rejected":
            assert reply["code"] == 400 and "model.path" in reply["errors"]
            return
        doc = applied(op, reply["version"])
        rep = doc["state"]["reported"]
        assert key in rep["errors"] or "model.path" in rep["errors"], rep["errors"]
        assert rep["model"]["path"] == "model.gguf" and rep["serving"]["file"] == "model.gguf"
        assert "model" in doc["state"]["delta"]
        submit(jobs, "old-model-serves")
        assert job_status(jobs, "old-model-serves", "SUCCEEDED")
        assert d.daemon.parts.supervisor.engine.report.model.endswith("model.gguf")
        while True:  # the rollback is an event too
            event = json.loads(events.expect(T.events, timeout=30).payload)
            if event["kind"] == "model_change":
                break
        events.close()
        assert event["details"]["outcome"] == "load_failed" and event["details"]["rolled_back"] is True


@pytest.mark.parametrize("desired,key", [
    ({"engine": {"n_ctx": -1}}, "engine.n_ctx"),
    ({"model": {"path": "../outside.gguf"}}, "model.path"),
    ({"model": {"path": "escape.gguf"}}, "model.path"),
    ({"model": {"path": "q8.gguf"}}, "model.path"),
    ({"engine": {"n_ctxx": 512}}, "engine.n_ctxx"),
    ({"telemetry": {"interval_s": "often"}}, "telemetry.interval_s"),
], ids=["negative-n_ctx", "dotdot", "symlink-escape", "q8_0", "unknown-key", "wrong-type"])  # fmt: skip
def test_bad_updates_are_refused_whole_with_one_message_per_key(
    board: Path, op: ShadowPeer, jobs, desired, key
) -> None:
    with InProcessDaemon(board) as d:
        wait_online(jobs, DEV)
        before = op.doc()
        kind, reply = update(op, {**desired, "telemetry": {**desired.get("telemetry", {}),
                                                           **({} if "telemetry" in desired else {"interval_s": 9})}},
                             "bad")  # fmt: skip
        assert kind == "rejected" and reply["code"] == 400, reply
        assert key in reply["errors"] and reply["errors"][key], reply
        assert reply["version"] == before["version"] == 0
        assert d.daemon.parts.shadow.document.version == 0 and d.settings.telemetry.interval_s != 9


def test_version_conflicts_409_and_oversized_states_413(board: Path, op: ShadowPeer, jobs) -> None:
    with InProcessDaemon(board):
        wait_online(jobs, DEV)
        assert update(op, {"telemetry": {"interval_s": 8}}, "v1")[0] == "accepted"
        kind, reply = update(op, {"telemetry": {"interval_s": 9}}, "stale", version=0)
        assert (kind, reply["code"], reply["version"]) == ("rejected", 409, 1)
        kind, reply = update(op, {"telemetry": {"interval_s": 9}}, "fresh", version=1)
        assert (kind, reply["version"]) == ("accepted", 2)
        big = {"model": {"path": "x" * 9000 + ".gguf"}}
        kind, reply = update(op, big, "big")
        assert (kind, reply["code"]) == ("rejected", 413)


def test_two_operators_updating_different_keys_both_survive(board: Path, broker: MosquittoBroker, jobs) -> None:
    a, b = ShadowPeer(broker, T), ShadowPeer(broker, T)
    try:
        with InProcessDaemon(board) as d:
            wait_online(jobs, DEV)
            a.send({"state": {"desired": {"telemetry": {"interval_s": 11}}}, "client_token": "a"})
            b.send({"state": {"desired": {"store": {"queue_max": 7}}}, "client_token": "b"})
            assert a.reply("a", 60)[0] == "accepted" and b.reply("b", 60)[0] == "accepted"
            doc = applied(a, 2)
            assert doc["state"]["desired"] == {"telemetry": {"interval_s": 11}, "store": {"queue_max": 7}}
            assert (d.settings.telemetry.interval_s, d.settings.store.queue_max) == (11, 7)
    finally:
        a.close()
        b.close()


def test_a_retained_update_before_the_first_connect_is_applied_once_and_cleared(
    board: Path, op: ShadowPeer, jobs
) -> None:
    op.send({"state": {"desired": {"engine": {"n_ctx": 768}}}, "client_token": "first-config"}, retain=True)
    with InProcessDaemon(board) as d:
        wait_online(jobs, DEV)
        assert op.reply("first-config", 60)[0] == "accepted"
        applied(op, 1)
        assert d.daemon.parts.supervisor.engine.report.n_ctx == 768
        assert op.retained(T.shadow_update) is None  # cleared: a later board start does not re-apply it


def test_killed_after_accepting_then_restarted_without_a_broker_applies_desired_at_start(
    board: Path, op: ShadowPeer, jobs, broker: MosquittoBroker
) -> None:
    """The swap waits for a long running job (grace 60 s), so the update is accepted and stored but
    not applied when the daemon is killed; it then starts with the broker down."""
    cfg = write_daemon_config(board.parent, broker, board.parent / "models" / "model.gguf", device_id=DEV,
                              service={"shutdown_grace_s": 60}, engine={"n_ctx": 4096, "max_tokens_limit": 4096})  # fmt: skip
    daemon = DaemonProcess(cfg)
    try:
        daemon.start()
        wait_online(jobs, DEV)
        submit(jobs, "long", max_tokens=4000)
        job_status(jobs, "long", "IN_PROGRESS")
        assert update(op, {"model": {"path": "other.gguf"}}, "then-kill")[0] == "accepted"
        daemon.kill()
        with ShadowStore(board.parent / "state" / "shadow.db") as s:  # accepted: on disk
            assert s.load().desired == {"model": {"path": "other.gguf"}}
        broker.stop()
        daemon.start()
        log = daemon.log_path

        def loaded_other() -> bool:
            return "loaded other.gguf" in log.read_text().split("===== start 2 =====")[-1]

        import time

        deadline = time.monotonic() + 60
        while not loaded_other():
            assert daemon.alive(), daemon.log_tail()
            assert time.monotonic() < deadline, daemon.log_tail()
            time.sleep(0.05)  # poll pacing: the loop ends on the log line
        assert daemon.terminate() == 0
    finally:
        if daemon.alive():
            daemon.kill()
    with ShadowStore(board.parent / "state" / "shadow.db") as s:
        rep = s.load().reported
        assert rep["model"]["path"] == "other.gguf" and rep["serving"]["file"] == "other.gguf"


def _cli(cfg: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT__")}
    return subprocess.run([sys.executable, "-m", "agent", "shadow", "set", "-c", str(cfg), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip


def test_cli_set_wait_exit_codes(board: Path, jobs) -> None:
    with InProcessDaemon(board, expect_errors=BAD_MODEL):
        wait_online(jobs, DEV)
        ok = _cli(board, "engine.n_ctx=768", "--wait")
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert "applied" in ok.stdout
        refused = _cli(board, "engine.n_ctx=-5", "--wait")
        assert refused.returncode != 0 and "engine.n_ctx" in refused.stdout + refused.stderr
        failed = _cli(board, "model.path=unknown-arch.gguf", "--wait")
        assert failed.returncode != 0 and "model.path" in failed.stdout + failed.stderr


def test_the_daemons_live_settings_path_keeps_the_executor_contract(board: Path, jobs) -> None:
    """The contract the shadow's fake executor is held to (tests/shadow_harness.py), on the real one."""
    from tests.shadow_harness import check_executor_contract

    with InProcessDaemon(board, expect_errors=BAD_MODEL) as d:
        wait_online(jobs, DEV)
        check_executor_contract(lambda: d.daemon.parts.live, d.settings.model_copy(deep=True), "other.gguf",
                                "unknown-arch.gguf")  # fmt: skip


def test_a_desired_model_that_fails_at_start_does_not_keep_the_board_from_starting(
    board: Path, op: ShadowPeer, jobs
) -> None:
    with InProcessDaemon(board, expect_errors=BAD_MODEL):
        wait_online(jobs, DEV)
        assert update(op, {"model": {"path": "unknown-arch.gguf"}}, "bad")[0] == "accepted"
        applied(op, 1)
    with InProcessDaemon(
        board, expect_errors=BAD_MODEL
    ) as d:  # boots with desired overlaid: that model fails, the file's serves
        wait_online(jobs, DEV)
        doc = op.doc(lambda x: "model.path" in x["state"]["reported"].get("errors", {}))
        assert doc["state"]["reported"]["serving"]["file"] == "model.gguf"
        assert str(d.settings.model.path) == "model.gguf"
        submit(jobs, "serves")
        assert job_status(jobs, "serves", "SUCCEEDED")
