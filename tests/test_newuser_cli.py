"""What a new user meets first (issue 17, section 3), on real parts: the demo and the operator
commands without -c, `submit --wait` when no answer comes, a missing password file at install,
`config validate -c`, what SIGINT logs, and the small things `status`, `generate` and `--help` print.

Every test runs with its own XDG_STATE_HOME (where `run --demo` records itself) and without
/etc/edge-agent/config.toml, whatever the machine has.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import agent.config
from agent.app.demo import DEV_PROFILE, record_path
from agent.app.state import process_start_ticks
from agent.cli import build_parser, main
from agent.cli.config_cmd import resolve_config
from agent.config import load_settings
from tests.broker import BrokerClient, MosquittoBroker, free_port
from tests.daemon_harness import ROOT, DaemonProcess, GatedEngine, InProcessDaemon, wait_online, write_daemon_config

DEV = "dev-a"


@pytest.fixture(autouse=True)
def _fresh_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A user with no demo record yet, no system config and no EDGE_AGENT__ variables."""
    for name in [n for n in os.environ if n.startswith("EDGE_AGENT__")]:
        monkeypatch.delenv(name)
    xdg = tmp_path / "xdg"
    monkeypatch.setenv("XDG_STATE_HOME", str(xdg))
    monkeypatch.setattr(agent.config, "DEFAULT_CONFIG_PATHS", (tmp_path / "etc" / "config.toml",))
    return xdg


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def cfg(tmp_path: Path, broker: MosquittoBroker, tiny_model: Path) -> Path:
    return write_daemon_config(tmp_path / "d", broker, tiny_model, device_id=DEV)


# --------------------------------------------------------------------------------------------
# 1. The operator commands find the demo daemon


def test_readme_commands_after_the_demo_find_it_without_c(tmp_path, broker, capsys):
    """`run --demo` (started with its folders, broker and model moved by EDGE_AGENT__ variables, so it
    touches nothing of the checkout), then the README's commands as written, without those variables
    and without -c: each reads the demo's store, state file, shadow, broker and model."""
    log = tmp_path / "demo.log"
    demo_env = {
        **os.environ,
        "EDGE_AGENT__MQTT__PORT": str(broker.port),  # a broker listens there: the demo uses it
        "EDGE_AGENT__DEVICE__STATE_DIR": str(tmp_path / "var"),
        "EDGE_AGENT__DEVICE__MODELS_DIR": str(tmp_path / "models"),
        "EDGE_AGENT__MODEL__PATH": "demo-tiny.gguf",  # the synthetic model: written in a moment
        "EDGE_AGENT__MODEL__SHA256": "null",
    }
    device = load_settings(DEV_PROFILE, environ={}).device.id  # the host name, as the README says
    with BrokerClient(broker) as peer:
        peer.subscribe(f"edge/{device}/status")
        with open(log, "wb") as log_file:
            proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--demo"], cwd=ROOT, env=demo_env,
                                    stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT)  # fmt: skip
        try:
            wait_online(peer, device, timeout=60)
            rc, out, err = cli(capsys, "submit", "The capital of France is", "--wait")
            assert rc == 0, err
            assert "using the settings of the running demo" in err and str(record_path()) in err
            job_id = err.split("submitted ", 1)[1].split()[0]

            rc, out, err = cli(capsys, "status")
            assert rc == 0, err
            assert out.startswith("daemon     running since") and "demo-tiny.gguf" in out and job_id in out, out

            rc, out, err = cli(capsys, "jobs", "list")
            assert rc == 0 and job_id in out and "SUCCEEDED" in out, err

            rc, out, err = cli(capsys, "doctor", "--json")
            checks = {c["name"]: c for c in json.loads(out)["checks"]}
            for name in ("config", "model", "memory plan", "broker", "store"):
                assert checks[name]["status"] == "OK", checks[name]
            assert str(DEV_PROFILE) in checks["config"]["summary"]

            rc, out, err = cli(capsys, "shadow", "show")
            assert rc == 0 and f"device {device}" in out and str(tmp_path / "var") in out, out + err

            rc, out, err = cli(capsys, "telemetry", "--window", "0")
            assert rc == 0 and device in out, err

            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert "started a private demo broker" not in log.read_text()
    # Stopped, the demo's record no longer moves the commands to its folders: its profile alone counts
    # (a demo run by a test, in folders since deleted, must not send a person's commands there).
    shown, err = _shown(capsys)
    assert shown["device"]["state_dir"] == str(DEV_PROFILE.parent.parent / "var") and shown["mqtt"]["port"] == 1883
    assert f"using the demo's profile {DEV_PROFILE} (the demo of {record_path()} has stopped)" in err, err


def _record(xdg: Path, config: Path, *, pid: int | None = None, **settings: dict) -> None:
    """A record as `run --demo` writes it; by default of a demo that runs (this test's own process)."""
    path = xdg / "edge-agent" / "demo.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    pid_start = process_start_ticks() if pid is None else None
    path.write_text(json.dumps({"config": str(config), "settings": settings, "pid": pid or os.getpid(),
                                "pid_start": pid_start, "started_at": 0}))  # fmt: skip


def _shown(capsys) -> tuple[dict, str]:
    rc, out, err = cli(capsys, "config", "show")
    assert rc == 0, err
    return json.loads(out), err


def test_the_demo_record_gives_way_to_c_the_system_config_and_the_environment(tmp_path, _fresh_user, monkeypatch,
                                                                              capsys):  # fmt: skip
    _record(_fresh_user, DEV_PROFILE, device={"state_dir": str(tmp_path / "demo-var")}, mqtt={"port": 2883})
    shown, err = _shown(capsys)
    assert shown["device"]["state_dir"] == str(tmp_path / "demo-var") and shown["mqtt"]["port"] == 2883
    assert shown["engine"]["n_ctx"] == 512 and "using the settings of the running demo" in err  # the rest: its profile

    monkeypatch.setenv("EDGE_AGENT__MQTT__PORT", "3883")  # a command's own variable wins over the record
    shown, _ = _shown(capsys)
    assert shown["mqtt"]["port"] == 3883 and shown["device"]["state_dir"] == str(tmp_path / "demo-var")
    monkeypatch.delenv("EDGE_AGENT__MQTT__PORT")

    other = tmp_path / "other.toml"
    other.write_text("[mqtt]\nport = 4883\n")
    rc, out, err = cli(capsys, "config", "show", "-c", str(other))
    assert json.loads(out)["mqtt"]["port"] == 4883 and "demo" not in err

    system = tmp_path / "etc" / "config.toml"  # a board: its config wins
    system.parent.mkdir()
    system.write_text("[mqtt]\nport = 5883\n")
    shown, err = _shown(capsys)
    assert shown["mqtt"]["port"] == 5883 and "demo" not in err
    system.unlink()

    # `run` is what systemd starts: never a user's demo.
    args = build_parser().parse_args(["run"])
    resolve_config(args)
    assert args.config is None


def test_a_stopped_demo_leaves_its_profile_and_a_stale_or_broken_record_is_ignored(tmp_path, _fresh_user, capsys):
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()  # a pid that ran and is gone
    _record(_fresh_user, DEV_PROFILE, pid=proc.pid, device={"state_dir": str(tmp_path / "demo-var")})
    shown, err = _shown(capsys)
    assert shown["device"]["state_dir"] == str(DEV_PROFILE.parent.parent / "var") and "has stopped" in err

    defaults = load_settings(None, environ={})
    _record(_fresh_user, tmp_path / "moved-checkout" / "dev.toml", mqtt={"port": 2883})
    shown, err = _shown(capsys)
    assert shown["mqtt"]["port"] == defaults.mqtt.port and "demo" not in err
    (_fresh_user / "edge-agent" / "demo.json").write_text("{not json")
    shown, err = _shown(capsys)
    assert shown["device"]["state_dir"] == str(defaults.device.state_dir) and err == ""


# --------------------------------------------------------------------------------------------
# 2. submit --wait: the error, an honest summary, and what is known when nothing comes


def test_submit_wait_prints_a_rejection_as_its_code_and_message(cfg, broker, capsys):
    with BrokerClient(broker) as peer:
        peer.subscribe(f"edge/{DEV}/status")
        with InProcessDaemon(cfg):
            wait_online(peer, DEV)
            rc, out, err = cli(capsys, "submit", "-c", str(cfg), "Hi", "--max-tokens", "5000", "--wait")
            rc_ok, out_ok, err_ok = cli(capsys, "submit", "-c", str(cfg), "Hi", "--max-tokens", "3", "--wait")
    assert rc == 1 and out == "", out
    assert "REJECTED max_tokens_too_large: max_tokens 5000 exceeds the limit 1024" in err, err
    assert "None" not in err
    assert rc_ok == 0 and out_ok.strip() != "None"
    summary = err_ok.strip().splitlines()[-1]
    assert summary.startswith("SUCCEEDED finish=length prompt_tokens=") and "completion_tokens=3" in summary
    assert summary.count("prompt") == 2 and "prompt_eval=" in summary and "None" not in summary, summary


def test_submit_wait_names_a_device_that_never_connected(broker, tmp_path, tiny_model, capsys):
    cfg = write_daemon_config(tmp_path / "d", broker, tiny_model, device_id="ghost")
    rc, out, err = cli(capsys, "submit", "-c", str(cfg), "Hi", "--wait", "--wait-timeout", "0.5")
    assert rc == 1
    assert "no device 'ghost' has ever connected to this broker (no retained status on edge/ghost/status)" in err
    assert "the job stays on the device" not in err


def test_submit_wait_says_the_device_is_offline_or_stopped(cfg, broker, capsys):
    with BrokerClient(broker) as peer:
        peer.subscribe(f"edge/{DEV}/status")
        with DaemonProcess(cfg) as d:
            wait_online(peer, DEV)
            d.kill()  # the broker publishes its last will: retained 'offline'
            while json.loads(peer.expect(f"edge/{DEV}/status", timeout=30).payload)["state"] != "offline":
                pass
        rc, out, err = cli(capsys, "submit", "-c", str(cfg), "Hi", "--wait", "--wait-timeout", "0.5")
        assert rc == 1 and f"device '{DEV}' is offline (its retained status says so since" in err, err
        with InProcessDaemon(cfg):  # it comes back, serves the job the broker kept, and stops cleanly
            wait_online(peer, DEV)
        rc, out, err = cli(capsys, "submit", "-c", str(cfg), "Hi", "--wait", "--wait-timeout", "0.5")
    assert rc == 1 and f"device '{DEV}' stopped (its retained status says 'stopping'" in err, err


def test_submit_wait_says_the_device_paused_its_intake(broker, tmp_path, tiny_model, capsys):
    cfg = write_daemon_config(tmp_path / "d", broker, tiny_model, device_id=DEV, intake={"paused": True})
    with BrokerClient(broker) as peer:
        peer.subscribe(f"edge/{DEV}/shadow")
        with InProcessDaemon(cfg):
            peer.expect(f"edge/{DEV}/shadow", timeout=30)  # its document is out (retained)
            rc, out, err = cli(capsys, "submit", "-c", str(cfg), "Hi", "--wait", "--wait-timeout", "0.5")
    assert rc == 1
    assert f"device '{DEV}' has paused its intake (its shadow reports intake.paused = true)" in err, err


def test_submit_wait_says_where_a_running_job_is(cfg, broker, capsys):
    gated: list[GatedEngine] = []
    with BrokerClient(broker) as peer:
        peer.subscribe(f"edge/{DEV}/status")
        with InProcessDaemon(cfg, engine_wrapper=lambda e: gated.append(GatedEngine(e)) or gated[0]):
            wait_online(peer, DEV)
            try:
                rc, out, err = cli(capsys, "submit", "-c", str(cfg), "Hi", "--job-id", "held", "--wait",
                                   "--wait-timeout", "1")  # fmt: skip
            finally:
                gated[0].gate.set()
    assert rc == 1 and "note:" not in err  # online and taking jobs: nothing to warn of up front
    assert f"device '{DEV}' is online; the job's last status was IN_PROGRESS" in err, err
    assert "`edge-agent jobs show held` on the device" in err


def test_submit_fails_fast_when_the_broker_port_refuses(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text(f"[mqtt]\nport = {free_port()}\n")  # nothing listens there
    t0 = time.monotonic()
    rc, out, err = cli(capsys, "submit", "-c", str(config), "Hi", "--wait", "--connect-timeout", "60")
    took = time.monotonic() - t0
    assert rc == 1 and took < 10, took  # the first refusal ends it, not the 60 s timeout
    assert "error [mqtt_unreachable]: could not connect to the broker at 127.0.0.1:" in err
    assert "connection refused" in err and "Traceback" not in err and "retrying" not in err, err


# --------------------------------------------------------------------------------------------
# 3. install with a missing password file


def test_install_dry_run_with_a_missing_password_file_says_so(tmp_path, capsys):
    missing = tmp_path / "nonexistent"
    rc, out, err = cli(capsys, "install", "--profile", "pi-4-2gb", "--mqtt-password-file", str(missing), "--dry-run")
    assert rc == 1
    assert f"error [install_failed]: --mqtt-password-file {missing}: cannot read it: No such file or directory" in err
    assert "Traceback" not in err


# --------------------------------------------------------------------------------------------
# 4. config validate -c, and a missing model file


def test_config_validate_takes_c_and_warns_of_a_missing_model(tmp_path, tiny_model, capsys):
    models = tmp_path / "models"
    models.mkdir()
    config = tmp_path / "c.toml"
    config.write_text(f'[device]\nmodels_dir = "{models}"\n[model]\npath = "m.gguf"\n')
    rc, out, err = cli(capsys, "config", "validate", "-c", str(config))
    assert rc == 0 and out == f"ok      {config}\n"
    assert f"warning {config}: model file missing: model file {models / 'm.gguf'} does not exist" in err, err

    (models / "m.gguf").write_bytes(tiny_model.read_bytes())
    rc, out, err = cli(capsys, "config", "validate", "-c", str(config))
    assert (rc, out, err) == (0, f"ok      {config}\n", "")

    bad = tmp_path / "bad.toml"
    bad.write_text("[mqtt]\nport = 'x'\n")
    rc, out, err = cli(capsys, "config", "validate", str(config), "-c", str(bad))
    assert rc == 1 and "INVALID" in err and "mqtt.port" in err and f"ok      {config}" in out

    rc, out, err = cli(capsys, "config", "validate")
    assert rc == 2 and "name the file" in err


# --------------------------------------------------------------------------------------------
# 5. SIGINT: what the daemon waits for, at once; the second one


def _wait_for_line(path: Path, text: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text(errors="replace"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{text!r} not in {path} within {timeout} s")
        time.sleep(0.02)  # polling the log for the line; the deadline is the bound


def test_sigint_says_at_once_what_the_daemon_waits_for_and_the_second_one_stops_the_job(broker, tmp_path,
                                                                                        tiny_model):  # fmt: skip
    cfg = write_daemon_config(tmp_path / "d", broker, tiny_model, device_id=DEV, service={"shutdown_grace_s": 600},
                              engine={"n_ctx": 4096, "max_tokens_limit": 4096})  # fmt: skip
    # Greedy: the tiny model then runs all 4000 tokens (about 1 s); sampled, it ended at an early end-of-text
    # in 9 of 20 seeds, sometimes before the second SIGINT, and there was no running job left to stop.
    job = {"job_id": "long", "kind": "generate", "prompt": "Tell a story.", "max_tokens": 4000, "stream": True,
           "temperature": 0}  # fmt: skip
    with BrokerClient(broker) as peer:
        peer.subscribe(f"edge/{DEV}/#")
        with DaemonProcess(cfg) as d:
            wait_online(peer, DEV)
            peer.publish(f"edge/{DEV}/jobs/submit", json.dumps(job).encode())
            peer.expect(f"edge/{DEV}/jobs/long/stream", timeout=30)  # it generates
            d.signal(signal.SIGINT)
            # Within moments, not after the 600 s grace: what it waits for, and for how long.
            _wait_for_line(d.log_path, "waiting up to 600 s (service.shutdown_grace_s) for 1 running job(s)")
            d.signal(signal.SIGINT)
            assert d.wait(timeout=60) == 0
    log = d.log_path.read_text()
    first, waits, second = (log.index(s) for s in (
        "SIGINT: stopping: no new jobs; running ones get up to 600 s (service.shutdown_grace_s)",
        "for 1 running job(s) to finish: long; then they are stopped and requeued (a second SIGTERM or SIGINT",
        "SIGINT again: stopping the running jobs now; they are requeued",
    ))  # fmt: skip
    assert first < waits < second < log.index("INFO agent.app.daemon: stopped")
    assert (
        "job long stopped (the daemon is stopping; it runs again after the restart): back in the queue, this run "
        "does not count as an attempt"
        in log
        and "requeued (requeued)" not in log
    )


# --------------------------------------------------------------------------------------------
# 6. Small things: --help, status, generate


def test_systemd_render_help_shows_a_percent_sign(capsys):
    with pytest.raises(SystemExit):
        main(["systemd", "render", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "margin = max(16 MiB, 5 % of the budget)" in out and "%%" not in out


def test_status_of_a_stopped_daemon_and_rounded_speeds(cfg, broker, capsys):
    from agent.ops.status import collect_status, render_status

    with BrokerClient(broker) as peer:
        peer.subscribe(f"edge/{DEV}/status")
        with InProcessDaemon(cfg):
            wait_online(peer, DEV)
    rc, out, err = cli(capsys, "status", "-c", str(cfg))
    first = out.splitlines()[0]
    assert first.startswith("daemon     stopped cleanly at 20") and first.count("stopped") == 1, out

    doc = collect_status(load_settings(cfg))
    doc["telemetry"] = {"ts": "2026-01-01T00:00:00Z", "queue_depth": 0, "last_job_tokens_per_s": 3.4054802337464523}
    assert "last job 3.4 tok/s" in render_status(doc)


def test_generate_plans_one_slot_for_its_one_prompt(tmp_path, broker, tiny_model, capsys):
    cfg = write_daemon_config(tmp_path / "d", broker, tiny_model, engine={"max_parallel": "auto"})
    assert load_settings(cfg).engine.max_parallel == "auto"  # the daemon would take up to 4 slots here
    rc, out, err = cli(capsys, "generate", "-c", str(cfg), "--prompt", "Hi", "--max-tokens", "2", "--json")
    assert rc == 0, err
    doc = json.loads(out)
    assert (doc["slots"], doc["slots_reason"]) == (1, "engine.max_parallel"), doc
