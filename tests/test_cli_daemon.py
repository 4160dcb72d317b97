"""The daemon as users meet it: `edge-agent run` exit codes, `submit`, `jobs`, telemetry, SIGHUP."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli import main
from agent.errors import EXIT_CANNOT_START
from tests.broker import BrokerClient, MosquittoBroker
from tests.daemon_harness import ROOT, DaemonProcess, InProcessDaemon, wait_online, write_daemon_config

DEV = "dev-a"


@pytest.fixture
def cfg(tmp_path: Path, broker: MosquittoBroker, tiny_model: Path) -> Path:
    return write_daemon_config(tmp_path / "d", broker, tiny_model, device_id=DEV, telemetry={"interval_s": 1})


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_run_exits_78_when_the_model_will_not_fit(tmp_path, broker, tiny_model):
    cfg = write_daemon_config(tmp_path / "d", broker, tiny_model, memory={"budget_mb": 32})
    p = run_cli("run", "-c", str(cfg))
    assert p.returncode == EXIT_CANNOT_START, p.stderr
    assert "will_not_fit" in p.stderr and "budget" in p.stderr


def test_run_exits_78_on_a_model_outside_the_models_folder(tmp_path, broker, tiny_model):
    cfg = write_daemon_config(tmp_path / "d", broker, tiny_model, model={"path": str(tiny_model)})
    p = run_cli("run", "-c", str(cfg))
    assert p.returncode == EXIT_CANNOT_START
    assert "outside the models folder" in p.stderr


def test_run_exits_78_on_an_invalid_config(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[mqtt]\nport = 'x'\n")
    p = run_cli("run", "-c", str(bad))
    assert p.returncode == EXIT_CANNOT_START and "mqtt.port" in p.stderr


def test_submit_wait_and_jobs_commands(cfg, broker, capsys):
    with BrokerClient(broker) as peer:
        peer.subscribe(f"edge/{DEV}/status")
        with InProcessDaemon(cfg):
            wait_online(peer, DEV)
            rc = main(["submit", "-c", str(cfg), "Hello", "--job-id", "cli-1", "--max-tokens", "5", "--wait", "--json"])
            out, err = capsys.readouterr()
    assert rc == 0, err
    result = json.loads(out)
    assert result["job_id"] == "cli-1" and result["status"] == "SUCCEEDED"
    assert "[QUEUED]" in err and "[IN_PROGRESS]" in err and "[SUCCEEDED]" in err

    assert main(["jobs", "list", "-c", str(cfg)]) == 0
    out, err = capsys.readouterr()
    assert "cli-1" in out and "SUCCEEDED" in out and "SUCCEEDED 1" in err
    assert main(["jobs", "show", "-c", str(cfg), "cli-1"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["request"]["prompt"] == "Hello" and shown["result"]["text"] == result["text"]
    assert main(["jobs", "show", "-c", str(cfg), "nope"]) == 1


def test_submit_without_a_broker_says_so(tmp_path, tiny_model, broker, capsys):
    broker.stop()
    cfg = write_daemon_config(tmp_path / "d", broker, tiny_model)
    rc = main(["submit", "-c", str(cfg), "Hello", "--connect-timeout", "1"])
    err = capsys.readouterr().err
    assert rc == 1 and "could not connect to the broker" in err


def test_memory_telemetry_is_published(cfg, broker):
    with BrokerClient(broker) as peer:
        peer.subscribe(f"edge/{DEV}/#")
        with InProcessDaemon(cfg):
            msg = peer.expect(f"edge/{DEV}/telemetry", timeout=20)
    t = json.loads(msg.payload)
    assert t["device_id"] == DEV and t["rss_anon_bytes"] > 0 and t["mem_total_bytes"] > 0
    assert 0 <= t["model_resident_pct"] <= 100
    assert t["queue_depth"] == 0 and t["running_job"] is None


def test_sighup_reloads_a_running_service(cfg, broker):
    with BrokerClient(broker) as peer:
        peer.subscribe(f"edge/{DEV}/#")
        with DaemonProcess(cfg) as d:
            wait_online(peer, DEV)
            cfg.write_text(cfg.read_text().replace("[engine]\n", "[engine]\nmax_tokens_limit = 3\n", 1))
            d.signal(signal.SIGHUP)
            # The reload happens on the main loop; a job after it is judged by the new limit. Retry until
            # the reload has been applied: each attempt is a real round trip, not a sleep.
            for attempt in range(50):
                job_id = f"hup-{attempt}"
                peer.publish(
                    f"edge/{DEV}/jobs/submit",
                    json.dumps({"job_id": job_id, "kind": "generate", "prompt": "x", "max_tokens": 5}).encode(),
                )
                result = json.loads(peer.expect(f"edge/{DEV}/jobs/{job_id}/result", timeout=30).payload)
                if result["status"] == "REJECTED":
                    break
            assert result["error"]["code"] == "max_tokens_too_large", d.log_tail()
            assert d.terminate() == 0
    assert "reload: engine.max_tokens_limit = 3" in d.log_path.read_text()


def test_demo_starts_its_own_broker_and_model_and_serves(tmp_path, monkeypatch, capsys):
    """The README's main command, on a port where no broker runs: it must bring up everything itself."""
    import queue

    from agent.config import load_settings
    from agent.demo import DEV_PROFILE
    from agent.transport import MqttTransport
    from tests.broker import free_port

    env = {
        "EDGE_AGENT__MQTT__PORT": str(free_port()),
        "EDGE_AGENT__DEVICE__STATE_DIR": str(tmp_path / "var"),
        "EDGE_AGENT__DEVICE__MODELS_DIR": str(tmp_path / "models"),
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "run", "--demo"], cwd=ROOT, stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "demo.log", "wb"),
    )  # fmt: skip
    try:
        settings = load_settings(DEV_PROFILE)
        online: queue.Queue = queue.Queue()
        watcher = MqttTransport(
            settings.mqtt.model_copy(update={"client_id": "demo-watcher", "session_expiry_s": 0}),
            will=None,
            on_message=online.put,
            subscriptions=[("edge/dev/status", 1)],
            manual_ack=False,
        )
        watcher.start()  # retries until the demo's broker is up
        try:
            while json.loads(online.get(timeout=60).payload)["state"] != "online":
                pass
        finally:
            watcher.stop()
        assert (tmp_path / "models" / "demo-tiny.gguf").is_file()
        rc = main(["submit", "-c", str(DEV_PROFILE), "Hello", "--max-tokens", "4", "--wait", "--json"])
        out = capsys.readouterr().out
        assert rc == 0 and json.loads(out)["status"] == "SUCCEEDED"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (tmp_path / "demo.log").read_text()
    assert "started a private demo broker" in log and "stopped" in log


def test_jobs_cancel_cancels_a_queued_job_through_the_broker(cfg, broker, capsys):
    from tests.daemon_harness import GatedEngine

    gated: list[GatedEngine] = []
    with BrokerClient(broker) as peer:
        peer.subscribe(f"edge/{DEV}/#")
        with InProcessDaemon(cfg, engine_wrapper=lambda e: gated.append(GatedEngine(e)) or gated[0]):
            wait_online(peer, DEV)
            for job_id in ("hold", "victim"):
                payload = {"job_id": job_id, "kind": "generate", "prompt": "x", "max_tokens": 2}
                peer.publish(f"edge/{DEV}/jobs/submit", json.dumps(payload).encode())
            assert gated[0].started.wait(30)
            while json.loads(peer.expect(f"edge/{DEV}/jobs/victim/status").payload)["status"] != "QUEUED":
                pass
            assert main(["jobs", "cancel", "-c", str(cfg), "victim"]) == 0
            result = json.loads(peer.expect(f"edge/{DEV}/jobs/victim/result", timeout=30).payload)
            gated[0].gate.set()
    assert result["status"] == "CANCELED" and result["error"]["code"] == "canceled"
    assert "cancel sent for victim" in capsys.readouterr().err
