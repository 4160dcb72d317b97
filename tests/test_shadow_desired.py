"""Desired keys and their checks (agent.shadow.desired), on real model files; no broker."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize

from agent.config import Settings
from agent.config.inforce import DesiredInvalid, effective_settings
from agent.config.live import live_keys
from agent.config.tree import flatten
from agent.shadow.desired import desired_model, section_models, validate_desired
from agent.shadow.document import Accepted, Rejected, ShadowDocument, handle_update


def write_q8_model(path: Path) -> Path:
    """A small llama-architecture GGUF whose weights are all Q8_0 (8-bit): readable, not 4-bit."""
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_embedding_length(64)
    w.add_head_count(2)
    w.add_context_length(128)
    w.add_feed_forward_length(128)
    rows = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    for name in ("token_embd.weight", "blk.0.attn_q.weight", "output.weight"):
        w.add_tensor(name, quantize(rows, GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def board(tmp_path: Path, models_dir: Path) -> Settings:
    shutil.copyfile(models_dir / "demo-tiny.gguf", models_dir / "other.gguf")
    write_q8_model(models_dir / "q8.gguf")
    state = tmp_path / "state"
    state.mkdir()
    return Settings.model_validate({"device": {"id": "dev-a", "models_dir": str(models_dir), "state_dir": str(state)}})


def check(board: Settings, desired: dict) -> dict:
    return validate_desired(desired, frozenset(flatten(desired)), board)


def errors_of(board: Settings, desired: dict) -> dict[str, str]:
    with pytest.raises(DesiredInvalid) as e:
        check(board, desired)
    return e.value.errors


def test_the_desired_model_is_the_live_settings_with_their_definitions():
    schema = desired_model().model_json_schema()
    keys = {f"{s}.{k}" for s, m in section_models().items() for k in m.model_fields}
    assert keys == set(live_keys())
    for key in live_keys():
        section, name = key.split(".")
        info = Settings.model_fields[section].annotation.model_fields[name]
        assert section_models()[section].model_fields[name].description == info.description
    engine = schema["$defs"]["DesiredEngine"]["properties"]["n_batch"]
    assert engine["minimum"] == 8 and engine["maximum"] == 2048 and engine["live"] == "reload"
    patch = desired_model(nullable=True).model_json_schema()["$defs"]["DesiredEnginePatch"]["properties"]["n_batch"]
    assert {"type": "null"} in patch["anyOf"]


def test_negative_n_ctx(board):
    # The settings' own rule for n_ctx (a validator, not a schema bound) applies, with its message.
    assert errors_of(board, {"engine": {"n_ctx": -5}}) == {
        "engine.n_ctx": "n_ctx must be 'auto' or an integer from 16 to 131072, got the number -5"
    }


@pytest.mark.parametrize(
    "value, text",
    [
        ("512", "must be an integer or 'auto', got the string '512'"),
        (512.0, "must be an integer or 'auto', got the number 512.0"),
        (True, "must be an integer or 'auto', got true"),
    ],
)
def test_wrong_types_are_refused_not_converted(board, value, text):
    assert errors_of(board, {"engine": {"n_ctx": value}})["engine.n_ctx"].startswith(text)


def test_one_message_per_bad_key(board):
    errors = errors_of(board, {
        "engine": {"n_batch": 4, "load_mode": "turbo", "nope": 1},
        "intake": {"paused": "yes"},
        "telemetry": {"interval_s": 0.5},
        "device": {"id": "x"},
        "mqtt": {"port": 1},
        "colour": {"x": 1},
        "engine.n_ctx": 5,
        "store": {"path": "/tmp/x.db"},
        "swap": 3,
    })  # fmt: skip
    assert errors == {
        "engine.n_batch": "4 is below the minimum 8",
        "engine.load_mode": "must be one of 'auto', 'fit' or 'fast', got the string 'turbo'",
        "engine.nope": errors["engine.nope"],
        "intake.paused": "must be true or false, got the string 'yes'",
        "telemetry.interval_s": "0.5 is below the minimum 1",
        "device": "no setting of this section can change at run time; change it in the config file",
        "mqtt": "no setting of this section can change at run time; change it in the config file",
        "colour": errors["colour"],
        "engine.n_ctx": 'write nested objects: {"engine": {"n_ctx": ...}}',
        "store.path": "takes effect only at a restart: change it in the board's config file",
        "swap": "must be an object of settings, got the number 3",
    }
    assert errors["engine.nope"].startswith("unknown key; the run-time settings of engine are: load_mode, n_ctx")
    assert errors["colour"].startswith("unknown section; run-time settings are in: ")
    assert all(f" {name}" in errors["colour"] for name in ("engine", "intake", "model", "store", "swap", "telemetry"))


def test_a_cross_field_rule_of_the_settings_applies(board):
    assert errors_of(board, {"engine": {"type_v": "q8_0"}}) == {
        "engine.type_v": "engine.type_v other than f16 needs engine.flash_attn = true (llama.cpp requirement)"
    }
    assert check(board, {"engine": {"type_v": "q8_0", "flash_attn": True}})


def test_values_are_normalised_as_the_settings_hold_them(board):
    out = check(board, {"model": {"path": "./other.gguf"}, "telemetry": {"interval_s": 5}, "intake": {"paused": True}})
    assert out == {"model": {"path": "other.gguf"}, "telemetry": {"interval_s": 5.0}, "intake": {"paused": True}}
    assert json.dumps(out)  # plain JSON values


def test_keys_that_nothing_applies_yet_are_accepted(board):
    assert check(board, {"swap": {"policy": "zram", "zram_mb": 256}, "priority": {"nice": 10}})


def test_model_path_outside_the_models_folder(board, tmp_path):
    outside = tmp_path / "outside.gguf"
    shutil.copyfile(board.device.models_dir / "demo-tiny.gguf", outside)
    for path in (str(outside), "../outside.gguf", "sub/../../outside.gguf"):
        msg = errors_of(board, {"model": {"path": path}})["model.path"]
        assert "outside the models folder" in msg, path


def test_model_path_symlink_that_escapes(board, tmp_path):
    outside = tmp_path / "outside.gguf"
    shutil.copyfile(board.device.models_dir / "demo-tiny.gguf", outside)
    os.symlink(outside, board.device.models_dir / "link.gguf")
    assert "outside the models folder" in errors_of(board, {"model": {"path": "link.gguf"}})["model.path"]
    os.symlink(board.device.models_dir / "other.gguf", board.device.models_dir / "inside-link.gguf")
    assert check(board, {"model": {"path": "inside-link.gguf"}})


def test_model_file_missing_unreadable_or_not_4bit(board):
    assert "does not exist" in errors_of(board, {"model": {"path": "gone.gguf"}})["model.path"]
    (board.device.models_dir / "junk.gguf").write_bytes(b"not a model at all, but long enough")
    assert "does not start with the GGUF magic" in errors_of(board, {"model": {"path": "junk.gguf"}})["model.path"]
    msg = errors_of(board, {"model": {"path": "q8.gguf"}})["model.path"]
    assert "not 4-bit" in msg and "Q8_0" in msg
    # A name the filesystem cannot hold is refused with a message, not an exception.
    assert errors_of(board, {"model": {"path": "x" * 5000 + ".gguf"}})["model.path"] == (
        "cannot check the model file: File name too long"
    )


def test_the_4bit_rule_follows_the_boards_allow_non_4bit(board):
    lenient = board.model_copy(update={"model": board.model.model_copy(update={"allow_non_4bit": True})})
    assert validate_desired({"model": {"path": "q8.gguf"}}, frozenset({"model.path"}), lenient)


def test_board_checks_run_only_for_a_model_path_the_update_sets(board):
    # The stored desired model.path stays as it was accepted; an unrelated update does not re-judge it.
    merged = {"model": {"path": "gone.gguf"}, "engine": {"n_ctx": 512}}
    assert validate_desired(merged, frozenset({"engine.n_ctx"}), board)


def test_effective_settings_overlay_the_config_file(board):
    s = effective_settings(board, {"engine": {"n_ctx": 512}, "intake": {"paused": True}})
    assert s.engine.n_ctx == 512 and s.intake.paused is True
    assert s.device.id == "dev-a" and s.engine.n_batch == board.engine.n_batch
    assert effective_settings(board, {}) == board


def test_an_update_with_bad_keys_changes_nothing(board):
    validate = lambda merged, touched: validate_desired(merged, touched, board)  # noqa: E731
    doc = ShadowDocument(version=2, desired={"engine": {"n_ctx": 512}})
    payload = json.dumps({"state": {"desired": {"engine": {"n_ctx": 1024}, "model": {"path": "q8.gguf"}}}}).encode()
    r = handle_update(doc, payload, validate, 1.0)
    assert isinstance(r, Rejected) and r.code == 400 and list(r.errors) == ["model.path"]
    assert doc.desired == {"engine": {"n_ctx": 512}} and doc.version == 2
    good = json.dumps({"state": {"desired": {"model": {"path": "other.gguf"}}}}).encode()
    r = handle_update(doc, good, validate, 1.0)
    assert isinstance(r, Accepted) and r.document.desired == {"engine": {"n_ctx": 512}, "model": {"path": "other.gguf"}}


def test_every_stage_reports_its_keys_in_one_refusal(board):
    # A type error, a settings-validator error and a board check, all in one update: three messages.
    errors = errors_of(board, {"engine": {"n_batch": "x", "n_ctx": -3}, "model": {"path": "q8.gguf"}})
    assert set(errors) == {"engine.n_batch", "engine.n_ctx", "model.path"}
    assert "not 4-bit" in errors["model.path"] and "from 16 to 131072" in errors["engine.n_ctx"]
