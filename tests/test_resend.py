"""Submitters recover lost jobs (issue 18, point 3): `edge-agent submit --wait` and JobClient send the same
job_id again when the device says nothing about it within a bound; a device never runs an id twice and
answers a duplicate with its current status."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from agent.config import load_settings
from agent.operator.jobs import JobClient
from tests.broker import BrokerClient, MosquittoBroker
from tests.daemon_harness import ROOT, GatedEngine, InProcessDaemon, wait_online, write_daemon_config
from tests.helpers import job_payload

T = 30.0


def test_a_duplicate_of_a_running_job_gets_its_status_again_and_does_not_run_twice(
    tmp_path: Path, tiny_model: Path, broker: MosquittoBroker
) -> None:
    cfg = write_daemon_config(tmp_path / "d", broker, tiny_model)
    gated: list[GatedEngine] = []
    with BrokerClient(broker) as peer:
        peer.subscribe("edge/dev-a/#")
        with InProcessDaemon(cfg, engine_wrapper=lambda e: gated.append(GatedEngine(e)) or gated[0]) as d:
            wait_online(peer, "dev-a")
            peer.publish("edge/dev-a/jobs/submit", job_payload("dup-1", max_tokens=3))
            assert gated[0].started.wait(T)
            peer.publish("edge/dev-a/jobs/submit", job_payload("dup-1", max_tokens=3))  # the resend
            statuses = [
                json.loads(peer.expect("edge/dev-a/jobs/dup-1/status", timeout=T).payload)["status"] for _ in range(3)
            ]
            assert statuses == ["QUEUED", "IN_PROGRESS", "IN_PROGRESS"]  # the duplicate is answered with its status
            gated[0].gate.set()
            result = json.loads(peer.expect("edge/dev-a/jobs/dup-1/result", timeout=T).payload)
            seen = [m.topic for m in peer.barrier()]
            rec = d.daemon.parts.store.get("dup-1")
    assert result["status"] == "SUCCEEDED" and result["attempt"] == 1
    assert rec is not None and rec.attempt == 1  # ran once
    assert "edge/dev-a/jobs/dup-1/result" not in seen  # one result, not two


def test_the_job_client_resends_a_job_lost_with_the_devices_session(
    tmp_path: Path, tiny_model: Path, broker_factory: Any
) -> None:
    """The broker restarts without keeping sessions while the device is away: a job published then has
    no subscriber and is dropped (PUBACKed all the same). The client sends it again, same id, once the
    bound passes, and the device, back, runs it once."""
    b: MosquittoBroker = broker_factory("volatile", persistence=False)
    cfg = write_daemon_config(tmp_path / "d", b, tiny_model)
    with BrokerClient(b) as peer:
        peer.subscribe("edge/dev-a/status")
        with InProcessDaemon(cfg):
            wait_online(peer, "dev-a")
    b.restart()  # the device's session is gone with it
    settings = load_settings(cfg, environ={})
    with JobClient(settings, device_id="dev-a") as client:
        job_id = client.submit({"prompt": "Hello", "max_tokens": 2}, job_id="lost-1")
        with BrokerClient(b) as peer:
            peer.subscribe("edge/dev-a/status")
            with InProcessDaemon(cfg) as d:
                wait_online(peer, "dev-a")
                resent: list[float] = []
                result = client.follow(job_id, timeout=60, resend_after_s=0.5, on_resend=resent.append)
                rec = d.daemon.parts.store.get("lost-1")
    assert result is not None and result["status"] == "SUCCEEDED"
    assert client.resends["lost-1"] >= 1 and resent
    assert rec is not None and rec.attempt == 1


def test_submit_wait_says_it_resent(tmp_path: Path, tiny_model: Path, broker_factory: Any) -> None:
    b: MosquittoBroker = broker_factory("volatile", persistence=False)
    cfg = write_daemon_config(tmp_path / "d", b, tiny_model)
    with BrokerClient(b) as peer:
        peer.subscribe("edge/dev-a/status")
        with InProcessDaemon(cfg):
            wait_online(peer, "dev-a")
        b.restart()
    # The device is away: nothing answers the first send; it comes back while submit waits.
    cmd = [sys.executable, "-m", "agent", "submit", "-c", str(cfg), "Hello", "--max-tokens", "2", "--wait",
           "--job-id", "cli-1", "--resend-after", "0.5", "--wait-timeout", "60"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with BrokerClient(b) as peer:
            peer.subscribe("edge/dev-a/jobs/cli-1/status")
            # Resent at least once before the device is back: wait for the first resend on the wire.
            peer.subscribe("edge/dev-a/jobs/submit")
            peer.expect("edge/dev-a/jobs/submit", timeout=T)
            peer.expect("edge/dev-a/jobs/submit", timeout=T)
            with InProcessDaemon(cfg):
                out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "sent again, same id" in err
