"""The state file (schema, atomic writes, throttled writer, liveness) and `edge-agent status`, which
reads it and the job store with the broker down."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from agent.app.state import (
    StateSnapshot,
    StateWriter,
    liveness,
    process_start_ticks,
    read_state,
    write_state,
)
from agent.config import load_settings
from agent.jobs.protocol import parse_submit
from agent.jobs.store import JobStore
from tests.broker import free_port
from tests.daemon_harness import InProcessDaemon, write_daemon_config

EDGE_AGENT = [sys.executable, "-m", "agent"]


def snap(**kw) -> StateSnapshot:
    base = dict(pid=os.getpid(), pid_start=process_start_ticks(), device_id="d", state="ready", started_at=100.0,
                updated_at=200.0)  # fmt: skip
    base.update(kw)
    return StateSnapshot(**base)


def test_write_and_read_round_trip_atomically(tmp_path: Path):
    path = tmp_path / "state.json"
    s = snap(telemetry={"rss_anon_bytes": 123}, shadow_version=4)
    write_state(path, s)
    got, problem = read_state(path)
    assert problem is None and got == s
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary file left
    assert oct(path.stat().st_mode & 0o777) == "0o640"
    # A newer daemon's extra fields do not break an older reader.
    data = json.loads(path.read_text()) | {"future_field": 1}
    path.write_text(json.dumps(data))
    assert read_state(path)[0] is not None


def test_read_state_says_why_it_has_nothing(tmp_path: Path):
    assert "has not run" in read_state(tmp_path / "nope.json")[1]
    bad = tmp_path / "state.json"
    bad.write_text("{not json")
    assert "not a valid state file" in read_state(bad)[1]


def test_writer_writes_on_change_or_heartbeat_only(tmp_path: Path):
    now = [1000.0]
    w = StateWriter(tmp_path / "state.json", heartbeat_s=30, clock=lambda: now[0])
    assert w.update(snap()) == (None, False) and w.writes == 1
    now[0] += 5
    w.update(snap())  # same content, heartbeat not due
    assert w.writes == 1
    w.update(snap(queued=3))  # changed
    assert w.writes == 2
    now[0] += 31
    w.update(snap(queued=3))  # heartbeat
    assert w.writes == 3 and read_state(tmp_path / "state.json")[0].updated_at == now[0]


def test_writer_reports_a_failure_once_retries_later_and_reports_its_end(tmp_path: Path):
    now = [1000.0]
    folder = tmp_path / "missing-dir"
    broken = StateWriter(folder / "state.json", heartbeat_s=30, clock=lambda: now[0])
    err, changed = broken.update(snap())  # reported, not raised
    assert "cannot write" in err and changed
    assert broken.update(snap(queued=2)) == (err, False)  # the same failure: not news
    now[0] += StateWriter.RETRY_S
    assert broken.update(snap(queued=2)) == (err, False)  # tried again, failed the same way
    folder.mkdir()
    now[0] += StateWriter.RETRY_S
    assert broken.update(snap(queued=2)) == (None, True)  # its end is news once
    assert broken.writes == 1 and read_state(folder / "state.json")[0].queued == 2


def test_liveness_verdicts():
    s = snap(updated_at=1000.0, heartbeat_s=30)
    assert liveness(s, 1010.0)[0] == "running"
    assert liveness(s, 1000.0 + 3 * 30 + 6)[0] == "stale"
    assert liveness(snap(state="stopped"), 1e9)[0] == "stopped"
    gone = liveness(s, 1010.0, alive=lambda pid: False)
    assert gone[0] == "gone" and "killed, crashed" in gone[1]
    reused = liveness(s, 1010.0, start_ticks=lambda pid: (s.pid_start or 0) + 1)
    assert reused[0] == "gone" and "another process" in reused[1]


def test_status_with_no_daemon_and_no_store(tmp_path: Path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[device]\nid = "x"\nstate_dir = "{tmp_path / "state"}"\nmodels_dir = "{tmp_path}"\n')
    p = subprocess.run([*EDGE_AGENT, "status", "-c", str(cfg)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "not known to be running" in p.stdout and "no job store yet" in p.stdout


def test_status_of_a_daemon_that_died(tmp_path: Path):
    cfg = tmp_path / "c.toml"
    state = tmp_path / "state"
    state.mkdir()
    cfg.write_text(f'[device]\nid = "x"\nstate_dir = "{state}"\nmodels_dir = "{tmp_path}"\n')
    dead = subprocess.Popen(["true"])
    dead.wait()
    write_state(state / "state.json", snap(pid=dead.pid, pid_start=None, updated_at=time.time()))
    p = subprocess.run([*EDGE_AGENT, "status", "-c", str(cfg), "--json"], capture_output=True, text=True)
    doc = json.loads(p.stdout)
    assert p.returncode == 1 and doc["daemon"]["verdict"] == "gone" and not doc["daemon"]["running"]


def _job(job_id: str) -> bytes:
    return json.dumps(
        {"job_id": job_id, "kind": "generate", "prompt": "Hello", "max_tokens": 4, "temperature": 0}
    ).encode()


def test_status_with_the_broker_down(tmp_path: Path, tiny_model: Path):
    """A real daemon whose broker is down: it still serves its queue, and `status` (a separate
    process) reads the state file the daemon wrote and the store; no broker is asked anything."""

    class DownBroker:  # write_daemon_config needs host and port; nothing listens there
        host, port = "127.0.0.1", free_port()

    cfg = write_daemon_config(tmp_path / "dev", DownBroker(), tiny_model, device_id="st-a")  # type: ignore[arg-type]
    settings = load_settings(cfg, environ={})
    settings.device.state_dir.mkdir(parents=True, exist_ok=True)
    with JobStore.from_settings(settings.store) as store:  # two jobs waiting from before
        for i in range(2):
            raw = _job(f"job-{i}")
            store.accept(parse_submit(raw, max_prompt_bytes=4096, max_tokens_limit=64), raw)
    with InProcessDaemon(cfg) as d:
        daemon = d.daemon
        deadline = time.monotonic() + 60
        while daemon.parts.store.counts()["SUCCEEDED"] < 2:  # the runner takes them without a broker
            assert time.monotonic() < deadline, daemon.parts.store.counts()
            daemon.parts.tick.wait(0.05)
        daemon.parts.reporter.write_state("ready", force=True)  # what its main loop writes on change or heartbeat
        p = subprocess.run([*EDGE_AGENT, "status", "-c", str(cfg), "--json"], capture_output=True, text=True,
                           timeout=60)  # fmt: skip
        text = subprocess.run([*EDGE_AGENT, "status", "-c", str(cfg)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["daemon"]["verdict"] == "running" and doc["daemon"]["pid"] == os.getpid()
    assert doc["daemon"]["broker_connected"] is False and doc["daemon"]["store_writable"] is True
    assert doc["model"]["path"] == "model.gguf" and doc["model"]["mode"] == "fit" and doc["model"]["n_ctx"] == 512
    assert doc["model"]["slots"] == 1 and doc["model"]["n_threads"] == 1
    assert doc["store"]["counts"]["SUCCEEDED"] == 2 and doc["store"]["counts"]["QUEUED"] == 0
    jobs = doc["store"]["last_jobs"]
    assert [j["job_id"] for j in jobs] == ["job-1", "job-0"] and all(not j["delivered"] for j in jobs)
    assert text.returncode == 0
    out = text.stdout
    assert "running since" in out and "broker NOT connected" in out and "model.gguf: fit mode, n_ctx 512" in out
    assert "(result not delivered yet)" in out and "agent RssAnon " in out
