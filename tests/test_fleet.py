"""Staged rollouts end to end (issue 11's fleet acceptance): 8 real daemons (in process, the tiny
model, 1 thread each) on one real Mosquitto, a real HTTP server on the loopback address serving
the new model, and the `edge-agent fleet` command (in process, and as a child process for the
SIGINT test) with its real SQLite record."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from agent.cli import main
from agent.models.synth import synth_model
from agent.system.files import file_sha256
from tests.broker import BrokerClient, MosquittoBroker
from tests.daemon_harness import ROOT, InProcessDaemon, to_toml, write_daemon_config
from tests.model_server import ModelServer

N = 8
IDS = [f"edge-{i:02d}" for i in range(1, N + 1)]
DOWNLOAD = {"retry_min_s": 0.05, "retry_max_s": 0.5, "max_failures": 100, "free_margin_mb": 0,
            "progress_interval_s": 0.5}  # fmt: skip
NEVER = {"prompt": "Answer with OK.", "max_tokens": 4, "pattern": "^OK$"}  # random weights never answer that


@pytest.fixture(scope="module")
def new_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth_model("tiny", tmp_path_factory.mktemp("fleet") / "new.gguf", seed=21,
                       overrides={"n_layer": 3, "n_embd": 128})  # fmt: skip


@pytest.fixture
def server(tmp_path: Path, new_model: Path):
    root = tmp_path / "www"
    root.mkdir()
    with ModelServer(root) as s:
        s.add(new_model, "new.gguf")
        yield s


class Fleet:
    """N in-process daemons; ``canary`` maps device ids to their [canary] section."""

    def __init__(
        self, tmp_path: Path, broker: MosquittoBroker, tiny_model: Path, canary: dict[str, dict] | None = None,
        expect_errors: tuple[str, ...] = (),
    ):  # fmt: skip
        self.daemons: dict[str, InProcessDaemon] = {}
        with BrokerClient(broker) as peer:
            peer.subscribe("edge/+/status")
            peer.barrier()
            for i, dev in enumerate(IDS):
                extra: dict[str, Any] = {"fleet": {"groups": ["lab", "early"] if i < 2 else ["lab"]},
                                         "download": DOWNLOAD}  # fmt: skip
                if canary and dev in canary:
                    extra["canary"] = canary[dev]
                cfg = write_daemon_config(tmp_path / dev, broker, tiny_model, device_id=dev, **extra)
                self.daemons[dev] = InProcessDaemon(cfg, expect_errors=expect_errors).start()
            online: set[str] = set()
            deadline = time.monotonic() + 60
            while online != set(IDS):
                msg = peer.expect(None, timeout=max(0.01, deadline - time.monotonic()))
                data = json.loads(msg.payload)
                if not msg.retain and data.get("state") == "online":
                    online.add(data["device_id"])

    def serving(self) -> dict[str, str]:
        return {dev: Path(d.daemon.parts.supervisor.engine.report.model).name for dev, d in self.daemons.items()}

    def stop(self) -> None:
        for d in self.daemons.values():
            d.close()


@pytest.fixture
def operator(tmp_path: Path, broker: MosquittoBroker) -> Path:
    cfg = tmp_path / "operator.toml"
    cfg.write_text(to_toml({"mqtt": {"host": broker.host, "port": broker.port}}))
    return cfg


def fleet_cli(capsys, *args: str) -> tuple[int, Any, str]:
    rc = main(["fleet", *args])
    out, err = capsys.readouterr()
    try:
        data = json.loads(out) if out.strip().startswith(("{", "[")) else out
    except ValueError:
        data = out
    return rc, data, err


def rollout_args(operator: Path, db: Path, server: ModelServer, model: Path, *extra: str) -> list[str]:
    return ["rollout", "-c", str(operator), "--db", str(db), "--model", server.url("new.gguf"), "--sha256",
            file_sha256(model), "--size", str(model.stat().st_size), "--timeout-per-wave", "120", *extra]  # fmt: skip


def test_a_rollout_in_three_waves_succeeds_on_all_eight(
    tmp_path: Path,
    broker: MosquittoBroker,
    tiny_model: Path,
    new_model: Path,
    server: ModelServer,
    operator: Path,
    capsys,
) -> None:
    fleet = Fleet(tmp_path, broker, tiny_model)
    try:
        rc, listing, err = fleet_cli(capsys, "list", "-c", str(operator), "--json")
        assert rc == 0, err
        assert [d["device"] for d in listing] == IDS and {d["model"] for d in listing} == {"model.gguf"}
        assert all(d["state"] == "online" and "lab" in d["groups"] for d in listing)
        rc, early, _ = fleet_cli(capsys, "list", "-c", str(operator), "--group", "early", "--json")
        assert [d["device"] for d in early] == IDS[:2]

        t0 = time.monotonic()
        rc, r, err = fleet_cli(capsys, *rollout_args(operator, tmp_path / "r.db", server, new_model, "--group", "lab",
                                                     "--wait", "--json"))  # fmt: skip
        took = time.monotonic() - t0
        assert rc == 0, err
        assert r["state"] == "succeeded" and r["waves"] == 3 and r["counts"] == {"succeeded": 8}
        assert [d["wave"] for d in r["devices"]] == [1, 2, 3, 3, 3, 3, 3, 3]  # 5 %, 15 %, 80 % of 8
        assert fleet.serving() == {dev: "new.gguf" for dev in IDS}
        assert all(d["previous"] == {} for d in r["devices"])  # desired had no model before

        rc, listing, _ = fleet_cli(capsys, "list", "-c", str(operator), "--json")
        assert {d["model"] for d in listing} == {"new.gguf"} and {d["sha256"] for d in listing} == {
            file_sha256(new_model)
        }
        rc, status, _ = fleet_cli(capsys, "status", r["id"], "--db", str(tmp_path / "r.db"), "--json")
        assert status["state"] == "succeeded" and status["counts"] == {"succeeded": 8}
        rc, text, _ = fleet_cli(capsys, "status", r["id"], "--db", str(tmp_path / "r.db"))
        assert f"rollout {r['id']}: succeeded" in text and "edge-08" in text
        print(
            f"\nrollout to 8 devices in 3 waves (1+1+6), download {new_model.stat().st_size} bytes each: {took:.1f} s"
        )
    finally:
        fleet.stop()


def test_a_rollout_where_two_devices_fail_aborts_and_restores_every_device_it_changed(
    tmp_path: Path, broker: MosquittoBroker, tiny_model: Path, new_model: Path, server: ModelServer, operator: Path,
    capsys,
) -> None:  # fmt: skip
    # The two devices' canaries fail on purpose (their errors reach every daemon's log in this process).
    fleet = Fleet(tmp_path, broker, tiny_model, canary={"edge-03": NEVER, "edge-04": NEVER},
                  expect_errors=("model change to new.gguf failed: canary_failed", "not applied: canary_failed"))  # fmt: skip
    try:
        t0 = time.monotonic()
        rc, r, err = fleet_cli(capsys, *rollout_args(operator, tmp_path / "r.db", server, new_model, "--devices",
                                                     "edge-*", "--waves", "25%,25%,50%", "--max-failures", "20%",
                                                     "--min-devices", "3", "--wait", "--json"))  # fmt: skip
        took = time.monotonic() - t0
        assert rc == 1, err
        assert r["state"] == "aborted" and "more than --max-failures 20%" in r["reason"]
        states = {d["device"]: d["state"] for d in r["devices"]}
        assert states == {**{dev: "restored" for dev in IDS[:4]}, **{dev: "pending" for dev in IDS[4:]}}
        failed = [d for d in r["devices"] if d["device"] in ("edge-03", "edge-04") and "canary_failed" in d["message"]]
        assert failed, r["devices"]
        assert fleet.serving() == {dev: "model.gguf" for dev in IDS}
        for dev in IDS[:4]:  # desired is back as it was (no model keys): a restart would not try the new model
            doc = fleet.daemons[dev].daemon.parts.shadow.document
            assert "model" not in doc.desired and not doc.delta()
        print(
            f"\nrollout aborted after {took:.1f} s: {sum(1 for s in states.values() if s == 'restored')} devices "
            "restored to their previous model, 4 never touched"
        )
    finally:
        fleet.stop()


# `python -m agent`, with Ctrl-C restored: a test run started in the background by a shell (`cmd &`)
# ignores SIGINT, its children inherit that, and Python then installs no KeyboardInterrupt handler.
AGENT_WITH_CTRL_C = [
    sys.executable, "-c",
    "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "runpy.run_module('agent', run_name='__main__', alter_sys=True)",
]  # fmt: skip


def test_a_rollout_interrupted_with_sigint_resumes_and_finishes(
    tmp_path: Path,
    broker: MosquittoBroker,
    tiny_model: Path,
    new_model: Path,
    server: ModelServer,
    operator: Path,
    capsys,
) -> None:
    fleet = Fleet(tmp_path, broker, tiny_model)
    db = tmp_path / "r.db"
    try:
        with BrokerClient(broker) as peer:
            peer.subscribe("edge/+/shadow/update")
            peer.barrier()
            env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT__")}
            proc = subprocess.Popen(
                [*AGENT_WITH_CTRL_C, "fleet", *rollout_args(operator, db, server, new_model, "--devices",
                                                                         "edge-*", "--waves", "25%,25%,50%", "--wait")],
                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            try:
                # Interrupt once the second wave's updates go out (the first wave is done by then).
                while True:
                    msg = peer.expect(None, timeout=60)
                    if msg.topic == "edge/edge-03/shadow/update" and msg.payload:
                        break
                proc.send_signal(signal.SIGINT)
                out, err = proc.communicate(timeout=60)
            finally:
                if proc.poll() is None:
                    proc.kill()
        assert proc.returncode == 130, err
        assert "--resume" in err
        rc, listed, _ = fleet_cli(capsys, "status", "--db", str(db), "--json")
        (rid,) = [x["id"] for x in listed]
        rc, before, _ = fleet_cli(capsys, "status", rid, "--db", str(db), "--json")
        assert before["state"] == "running" and before["wave"] >= 2
        assert {d["state"] for d in before["devices"] if d["wave"] == 1} == {"succeeded"}
        rc, r, err = fleet_cli(capsys, "rollout", "-c", str(operator), "--db", str(db), "--resume", rid, "--wait",
                               "--json")  # fmt: skip
        assert rc == 0, err
        assert r["state"] == "succeeded" and r["counts"] == {"succeeded": 8}
        assert fleet.serving() == {dev: "new.gguf" for dev in IDS}
    finally:
        fleet.stop()


def test_rollout_options_are_checked_before_anything_is_sent(tmp_path: Path, operator: Path, capsys) -> None:
    base = ["rollout", "-c", str(operator), "--db", str(tmp_path / "r.db")]
    for extra, why in (
        (["--model", "m.gguf", "--devices", "*"], "--sha256"),
        (["--model", "m.gguf", "--sha256", "XYZ", "--devices", "*"], "64 lower-case hex"),
        (["--model", "m.gguf", "--sha256", "a" * 64], "--devices GLOB or --group"),
        (["--model", "m.gguf", "--sha256", "a" * 64, "--devices", "*", "--waves", "50%,40%"], "add up to 100"),
        (["--model", "m.gguf", "--sha256", "a" * 64, "--devices", "*", "--max-failures", "x"], "--max-failures"),
        (["--model", "https://u:p@h/m.gguf", "--sha256", "a" * 64, "--devices", "*"], "no credentials"),
        (["--resume", "abc", "--model", "m.gguf"], "--resume ID continues"),
    ):
        rc, _, err = fleet_cli(capsys, *base, *extra)
        assert rc == 2 and why in err, (extra, err)
    rc, _, err = fleet_cli(capsys, "status", "nope", "--db", str(tmp_path / "r.db"))
    assert rc == 1 and "no rollout 'nope'" in err


def test_a_device_offline_during_its_wave_is_pending_until_the_timeout_then_failed(
    tmp_path: Path, broker: MosquittoBroker, tiny_model: Path, new_model: Path, server: ModelServer, operator: Path,
    capsys,
) -> None:  # fmt: skip
    fleet = Fleet(tmp_path, broker, tiny_model)
    try:
        fleet.daemons["edge-08"].stop()  # its retained status now says it is gone
        t0 = time.monotonic()
        args = rollout_args(operator, tmp_path / "r.db", server, new_model, "--devices", "edge-*", "--waves",
                            "50%,50%", "--max-failures", "1", "--wait", "--json")  # fmt: skip
        args[args.index("--timeout-per-wave") + 1] = "4"
        rc, r, err = fleet_cli(capsys, *args)
        took = time.monotonic() - t0
        assert rc == 0, err  # one failure is within --max-failures 1
        states = {d["device"]: (d["state"], d["message"]) for d in r["devices"]}
        assert states["edge-08"][0] == "failed" and "timed out after --timeout-per-wave 4 s" in states["edge-08"][1]
        assert r["state"] == "succeeded" and r["counts"] == {"succeeded": 7, "failed": 1}
        assert took >= 4  # it waited for the offline device until the wave's time was up
        del fleet.daemons["edge-08"]
        assert set(fleet.serving().values()) == {"new.gguf"}
    finally:
        fleet.stop()
