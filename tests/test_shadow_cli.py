"""`edge-agent shadow get|set|show` against a real Mosquitto and a board running the shadow service."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest

from agent.cli import main
from agent.cli.shadow_cmd import _assignment
from agent.config import load_settings
from tests.broker import MosquittoBroker
from tests.shadow_harness import FakeExecutor, ShadowBoard
from tests.test_shadow_desired import write_q8_model

DEV = "dev-a"


@pytest.fixture
def cfg(tmp_path: Path, broker: MosquittoBroker, models_dir: Path) -> Path:
    shutil.copyfile(models_dir / "demo-tiny.gguf", models_dir / "newer-arch.gguf")
    write_q8_model(models_dir / "q8.gguf")
    state = tmp_path / "state"
    state.mkdir()
    path = tmp_path / "config.toml"
    path.write_text(
        f'[device]\nid = "{DEV}"\nstate_dir = "{state}"\nmodels_dir = "{models_dir}"\n\n'
        f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\nreconnect_min_s = 0.1\nreconnect_max_s = 1.0\n'
    )
    return path


@pytest.fixture
def board(broker: MosquittoBroker, cfg: Path):
    settings = load_settings(cfg, environ={})
    b = ShadowBoard(broker, settings, executor=FakeExecutor(settings, unloadable={"newer-arch.gguf"}))
    b.start()
    yield b
    b.stop()


def cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["shadow", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_set_wait_exits_0_once_applied_and_get_shows_it(cfg, board, capsys):
    rc, out, err = cli(capsys, "set", "-c", str(cfg), "engine.n_ctx=512", "intake.paused=true",
                       "telemetry.interval_s=5", "--wait")  # fmt: skip
    assert rc == 0, err
    assert "accepted: version 1 (engine.n_ctx=512, intake.paused=true, telemetry.interval_s=5)" in out
    assert "applied: version 1" in out
    assert board.executor.settings.engine.n_ctx == 512 and board.executor.settings.intake.paused is True

    rc, out, err = cli(capsys, "get", "-c", str(cfg))
    assert rc == 0, err
    assert f"device {DEV}  version 1  applied 1" in out and "(from the device)" in out
    lines = {
        line.split()[0]: line for line in out.splitlines() if line.startswith(("engine.", "intake.", "telemetry."))
    }
    assert lines["engine.n_ctx"].split() == ["engine.n_ctx", "512", "512", "in", "sync"]
    assert lines["intake.paused"].split()[1:3] == ["true", "true"]
    assert "other run-time settings" in out

    rc, out, _ = cli(capsys, "get", "-c", str(cfg), "--json")
    doc = json.loads(out)
    assert doc["version"] == 1 and doc["state"]["reported"]["telemetry"]["interval_s"] == 5.0


def test_set_rejected_exits_1_with_the_message_per_key(cfg, board, capsys):
    rc, out, err = cli(capsys, "set", "-c", str(cfg), "model.path=q8.gguf", "engine.n_ctx=-3", "--wait")
    assert rc == 1 and out == ""
    assert "rejected 400" in err
    assert "model.path:" in err and "not 4-bit" in err and "engine.n_ctx:" in err


def test_set_failed_apply_exits_1_with_the_error(cfg, board, capsys):
    rc, out, err = cli(capsys, "set", "-c", str(cfg), "model.path=newer-arch.gguf", "--wait")
    assert rc == 1 and "accepted: version 1" in out
    assert "failed: model.path: llama.cpp could not load newer-arch.gguf" in err
    rc, out, _ = cli(capsys, "get", "-c", str(cfg))
    row = next(line for line in out.splitlines() if line.startswith("model.path"))
    assert "newer-arch.gguf" in row and "demo-tiny.gguf" in row and "FAILED: llama.cpp could not load" in row


def test_version_conflict_exits_1(cfg, board, capsys):
    assert cli(capsys, "set", "-c", str(cfg), "priority.nice=3")[0] == 0
    rc, _, err = cli(capsys, "set", "-c", str(cfg), "priority.nice=4", "--version", "0")
    assert rc == 1 and "rejected 409" in err
    assert cli(capsys, "set", "-c", str(cfg), "priority.nice=4", "--version", "1")[0] == 0


def test_pending_keys_are_applied_with_a_note(cfg, board, capsys):
    rc, out, err = cli(capsys, "set", "-c", str(cfg), "swap.policy=zram", "--wait")
    assert rc == 0, err
    assert "note: swap.policy: handed to the root swap unit" in out and "applied: version 1" in out


def test_null_removes_and_the_json_output(cfg, board, capsys):
    assert cli(capsys, "set", "-c", str(cfg), "telemetry.interval_s=5", "--wait")[0] == 0
    rc, out, err = cli(capsys, "set", "-c", str(cfg), "telemetry.interval_s=null", "--wait", "--json")
    assert rc == 0, err
    result = json.loads(out)
    assert result["applied"] is True and result["reply"]["state"]["desired"] == {}
    assert result["document"]["state"]["reported"]["telemetry"]["interval_s"] == 30.0


def test_get_falls_back_to_the_retained_document_and_show_needs_no_broker(cfg, board, broker, capsys):
    assert cli(capsys, "set", "-c", str(cfg), "engine.n_batch=64", "--wait")[0] == 0
    board.stop()
    rc, out, err = cli(capsys, "get", "-c", str(cfg), "--timeout", "1")
    assert rc == 0, err
    assert "the retained document: the device did not answer" in out and "engine.n_batch" in out
    broker.stop()
    rc, out, err = cli(capsys, "show", "-c", str(cfg))
    assert rc == 0, err
    assert "stored on this board" in out and f"device {DEV}  version 1  applied 1" in out
    row = next(line for line in out.splitlines() if line.startswith("engine.n_batch"))
    assert row.split() == ["engine.n_batch", "64", "64", "in", "sync"]
    rc, out, _ = cli(capsys, "show", "-c", str(cfg), "--json")
    assert json.loads(out)["state"]["desired"] == {"engine": {"n_batch": 64}}


def test_set_with_the_board_offline_says_so(cfg, broker, capsys):
    rc, _, err = cli(capsys, "set", "-c", str(cfg), "intake.paused=true", "--timeout", "1")
    assert rc == 1 and "did not answer within 1 s" in err
    rc, out, _ = cli(capsys, "set", "-c", str(cfg), "intake.paused=true", "--timeout", "1", "--retain")
    assert rc == 0 and "published retained" in out


def test_show_without_state_and_get_without_broker(cfg, broker, capsys):
    rc, _, err = cli(capsys, "show", "-c", str(cfg))
    assert rc == 1 and "no shadow state" in err
    broker.stop()
    rc, _, err = cli(capsys, "get", "-c", str(cfg), "--connect-timeout", "1")
    assert rc == 1 and "could not connect to the broker" in err


def test_usage_errors(cfg, capsys):
    rc, _, err = cli(capsys, "set", "-c", str(cfg), "engine.n_ctx=1", "engine.n_ctx=2")
    assert rc == 2 and "given twice" in err


@pytest.mark.parametrize(
    "text, value",
    [
        ("engine.n_ctx=512", ("engine.n_ctx", 512)),
        ("engine.n_ctx=auto", ("engine.n_ctx", "auto")),
        ('engine.n_ctx="512"', ("engine.n_ctx", "512")),
        ("intake.paused=true", ("intake.paused", True)),
        ("telemetry.interval_s=2.5", ("telemetry.interval_s", 2.5)),
        ("model.path=null", ("model.path", None)),
        ("model.path=123.gguf", ("model.path", "123.gguf")),
        ("model.sha256=" + "1" * 64, ("model.sha256", "1" * 64)),  # digits, but a text-only key
        ("model.path=a=b.gguf", ("model.path", "a=b.gguf")),
        ("nosuch.key=[1]", ("nosuch.key", [1])),
    ],
)
def test_values_are_json_when_they_parse_and_text_for_text_keys(text, value):
    assert _assignment(text) == value


@pytest.mark.parametrize("text", ["engine", "n_ctx=5", "=5", "engine.=5", ".x=1"])
def test_bad_assignments(text):
    with pytest.raises(argparse.ArgumentTypeError):
        _assignment(text)


def test_reset_goes_back_to_the_config_file(cfg, board, capsys):
    assert cli(capsys, "set", "-c", str(cfg), "engine.n_batch=64", "intake.paused=true", "--wait")[0] == 0
    rc, out, err = cli(capsys, "set", "-c", str(cfg), "--reset", "--wait")
    assert rc == 0, err
    assert "accepted: version 2 (reset to the config file)" in out and "applied: version 2" in out
    assert board.executor.settings.engine.n_batch == 128 and board.executor.settings.intake.paused is False
    assert cli(capsys, "set", "-c", str(cfg), "--reset", "intake.paused=true")[0] == 2
    assert cli(capsys, "set", "-c", str(cfg))[0] == 2
