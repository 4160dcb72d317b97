"""The settings tree: files, environment, credentials, errors, profiles, generated docs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.cli import main
from agent.config import load_settings, masked_dump
from agent.config.reference import render_markdown
from agent.errors import ConfigError, ModelError
from agent.models.paths import resolve_model_path

ROOT = Path(__file__).resolve().parent.parent
PROFILES = sorted((ROOT / "firmware-config").glob("*.toml"))


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_defaults_are_valid_and_derived_fields_are_filled():
    s = load_settings(None, environ={})
    assert s.store.path == s.device.state_dir / "jobs.db"
    assert s.mqtt.client_id == f"edge-agent-{s.device.id}"
    assert s.engine.n_ctx == "auto"  # never the training context by default


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.stem)
def test_board_profiles_validate(profile: Path):
    s = load_settings(profile, environ={})
    assert s.device.board == profile.stem
    assert s.memory.budget_mb == "auto" or s.memory.budget_mb >= 256


def test_the_required_profiles_exist():
    assert {p.stem for p in PROFILES} >= {"pi-zero-2w", "pi-3b", "pi-4-2gb", "pi-5-4gb", "arm64-8gb", "dev"}


def test_relative_paths_resolve_against_the_file(tmp_path: Path):
    p = write(tmp_path, '[device]\nstate_dir = "state"\n')
    s = load_settings(p, environ={})
    assert s.device.state_dir == tmp_path / "state"
    assert s.store.path == tmp_path / "state" / "jobs.db"


def test_unknown_key_is_refused_with_file_and_key(tmp_path: Path):
    p = write(tmp_path, "[mqtt]\nhots = 'x'\n")
    with pytest.raises(ConfigError) as e:
        load_settings(p, environ={})
    msg = str(e.value)
    assert str(p) in msg and "mqtt.hots" in msg and "unknown key" in msg


def test_out_of_bounds_value_names_key_value_and_meaning(tmp_path: Path):
    p = write(tmp_path, "[mqtt]\nport = 70000\n")
    with pytest.raises(ConfigError) as e:
        load_settings(p, environ={})
    msg = str(e.value)
    assert "mqtt.port" in msg and "70000" in msg and "less than or equal to 65535" in msg and "Broker TCP port" in msg


def test_union_errors_are_one_line_per_key(tmp_path: Path):
    p = write(tmp_path, '[memory]\nbudget_mb = "lots"\n')
    with pytest.raises(ConfigError) as e:
        load_settings(p, environ={})
    lines = str(e.value).splitlines()
    assert lines[0].endswith("1 invalid setting(s)")
    assert lines[1].startswith("  memory.budget_mb:")


def test_cross_field_rules(tmp_path: Path):
    with pytest.raises(ConfigError, match="type_v other than f16 needs engine.flash_attn"):
        load_settings(write(tmp_path, '[engine]\ntype_v = "q8_0"\n'), environ={})
    with pytest.raises(ConfigError, match="cert_file and tls.key_file must be set together"):
        load_settings(write(tmp_path, '[mqtt.tls]\ncert_file = "c.pem"\n'), environ={})


def test_broken_toml_and_missing_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(write(tmp_path, "x = ["), environ={})
    with pytest.raises(ConfigError, match="no such file"):
        load_settings(tmp_path / "nope.toml", environ={})


def test_environment_overrides_file_and_names_the_variable(tmp_path: Path):
    p = write(tmp_path, "[mqtt]\nport = 1884\n")
    env = {"EDGE_AGENT__MQTT__PORT": "1999", "EDGE_AGENT__MQTT__TLS__ENABLED": "true", "UNRELATED": "1"}
    s = load_settings(p, environ=env)
    assert s.mqtt.port == 1999 and s.mqtt.tls.enabled is True
    with pytest.raises(ConfigError, match=r"mqtt.port \[from EDGE_AGENT__MQTT__PORT\]"):
        load_settings(p, environ={"EDGE_AGENT__MQTT__PORT": "abc"})
    with pytest.raises(ConfigError, match="unknown key"):
        load_settings(p, environ={"EDGE_AGENT__MQTT__PROT": "1"})


def test_password_from_credentials_directory_is_masked(tmp_path: Path):
    (tmp_path / "mqtt_password").write_text("s3cret-pw\n")
    s = load_settings(None, environ={"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert s.mqtt.password.get_secret_value() == "s3cret-pw"
    assert "s3cret-pw" not in json.dumps(masked_dump(s))
    assert "s3cret-pw" not in repr(s)


def test_bad_password_is_not_echoed(tmp_path: Path):
    with pytest.raises(ConfigError) as e:
        load_settings(write(tmp_path, "[mqtt]\npassword = 12345678\n"), environ={})
    assert "12345678" not in str(e.value)


def test_model_path_must_stay_inside_models_dir(tmp_path: Path):
    models = tmp_path / "models"
    models.mkdir()
    (models / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "outside.gguf").write_bytes(b"GGUF")
    (models / "link.gguf").symlink_to(tmp_path / "outside.gguf")
    assert resolve_model_path("m.gguf", models) == models / "m.gguf"
    for bad in ("../outside.gguf", str(tmp_path / "outside.gguf"), "link.gguf"):
        with pytest.raises(ModelError) as e:
            resolve_model_path(bad, models)
        assert e.value.code == "model_path_outside"
    with pytest.raises(ModelError) as e:
        resolve_model_path("missing.gguf", models)
    assert e.value.code == "model_not_found"


def test_cli_validate_reports_each_file(tmp_path: Path, capsys):
    bad = write(tmp_path, "[nope]\n")
    rc = main(["config", "validate", str(PROFILES[0]), str(bad)])
    out, err = capsys.readouterr()
    assert rc == 1
    assert f"ok      {PROFILES[0]}" in out
    assert "INVALID" in err and "nope" in err


def test_cli_show_masks_secrets(capsys, monkeypatch):
    monkeypatch.setenv("EDGE_AGENT__MQTT__PASSWORD", "hunter2-hunter2")
    assert main(["config", "show"]) == 0
    out = capsys.readouterr().out
    assert "hunter2" not in out
    assert json.loads(out)["mqtt"]["password"] == "********"


def test_cli_schema_is_json_schema(capsys):
    assert main(["config", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert set(schema["properties"]) >= {
        "device",
        "mqtt",
        "model",
        "engine",
        "memory",
        "swap",
        "priority",
        "telemetry",
        "store",
    }


def test_every_field_has_a_description():
    from agent.config import Settings

    def walk(model, path=""):
        for name, info in model.model_fields.items():
            assert info.description, f"{path}{name} has no description"
            ann = info.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann, f"{path}{name}.")

    walk(Settings)


def test_configuration_doc_is_generated_from_the_models():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    assert doc == render_markdown(), (
        "docs/configuration.md is stale: run `edge-agent config docs > docs/configuration.md`"
    )
