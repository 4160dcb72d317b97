"""Loading the settings tree: TOML file, then EDGE_AGENT__SECTION__KEY environment overrides,
then systemd credentials for secrets. Every failure becomes a ConfigError naming source, key and fix.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agent.config.sections import (
    CanarySettings,
    DeviceSettings,
    DownloadSettings,
    EngineSettings,
    FleetSettings,
    GovernorSettings,
    HomeAssistantSettings,
    IntakeSettings,
    MemorySettings,
    ModelSettings,
    MQTTSettings,
    PrioritySettings,
    ServiceSettings,
    StoreSettings,
    SwapSettings,
    TelemetrySettings,
)
from agent.config.tree import overlay
from agent.errors import ConfigError
from agent.models.paths import resolve_model_path

ENV_PREFIX = "EDGE_AGENT__"
# systemd LoadCredential= names read from $CREDENTIALS_DIRECTORY, and where they go.
CREDENTIALS = {
    "mqtt_password": ("mqtt", "password"),
    "mqtt_username": ("mqtt", "username"),
    "model_download_token": ("download", "token"),
    "model_download_username": ("download", "username"),
    "model_download_password": ("download", "password"),
}
# Searched when no --config is given.
DEFAULT_CONFIG_PATHS = (Path("/etc/edge-agent/config.toml"),)


class Settings(BaseModel):
    """The whole configuration of one agent."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    device: DeviceSettings = Field(default_factory=DeviceSettings, description="This board.")
    mqtt: MQTTSettings = Field(default_factory=MQTTSettings, description="Broker connection and topics.")
    model: ModelSettings = Field(default_factory=ModelSettings, description="Which model to serve.")
    download: DownloadSettings = Field(default_factory=DownloadSettings, description="Model downloads (model.url).")
    canary: CanarySettings = Field(default_factory=CanarySettings, description="The check after every model change.")
    engine: EngineSettings = Field(default_factory=EngineSettings, description="llama.cpp engine.")
    memory: MemorySettings = Field(default_factory=MemorySettings, description="Memory budget.")
    swap: SwapSettings = Field(default_factory=SwapSettings, description="Swap policy.")
    priority: PrioritySettings = Field(default_factory=PrioritySettings, description="Process priority.")
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings, description="Telemetry.")
    governor: GovernorSettings = Field(default_factory=GovernorSettings, description="Memory governor.")
    intake: IntakeSettings = Field(default_factory=IntakeSettings, description="Job intake.")
    store: StoreSettings = Field(default_factory=StoreSettings, description="Durable job store.")
    service: ServiceSettings = Field(default_factory=ServiceSettings, description="Daemon life cycle.")
    fleet: FleetSettings = Field(default_factory=FleetSettings, description="Fleet membership (rollouts).")
    homeassistant: HomeAssistantSettings = Field(
        default_factory=HomeAssistantSettings, description="Home Assistant MQTT discovery (optional)."
    )

    @model_validator(mode="after")
    def _derive(self) -> Settings:
        if self.store.path is None:
            self.store.path = self.device.state_dir / "jobs.db"
        if self.mqtt.client_id is None:
            self.mqtt.client_id = f"edge-agent-{self.device.id}"[:64]
        return self

    def model_file(self) -> Path:
        """The configured model path, resolved and checked to lie inside device.models_dir."""

        return resolve_model_path(self.model.path, self.device.models_dir)


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """EDGE_AGENT__MQTT__TLS__ENABLED=true -> {"mqtt": {"tls": {"enabled": "true"}}}.

    Values that parse as JSON (numbers, booleans, lists, null) are taken as such, so lists can be set;
    everything else is a string and pydantic converts it.
    """
    out: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX) :].split("__") if p]
        if not path:
            continue
        try:
            value: Any = json.loads(raw)
            if isinstance(value, dict):
                value = raw
        except ValueError:
            value = raw
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"environment {name}: conflicts with another EDGE_AGENT__ variable")
        node[path[-1]] = value
    return out


def _credentials(environ: Mapping[str, str]) -> dict[str, Any]:
    folder = environ.get("CREDENTIALS_DIRECTORY")
    out: dict[str, Any] = {}
    if not folder:
        return out
    for cred, (section, key) in CREDENTIALS.items():
        f = Path(folder) / cred
        if f.is_file():
            out.setdefault(section, {})[key] = f.read_text().rstrip("\n")
    return out


_PATH_KEYS = (
    ("device", "state_dir"),
    ("device", "models_dir"),
    ("store", "path"),
    ("mqtt", "tls", "ca_file"),
    ("mqtt", "tls", "cert_file"),
    ("mqtt", "tls", "key_file"),
    ("download", "ca_file"),
    ("swap", "file_path"),
)


def _resolve_relative_paths(data: dict[str, Any], base: Path) -> None:
    # Relative paths in a file mean "next to this file", so a profile can be used from any cwd.
    for keys in _PATH_KEYS:
        node: Any = data
        for k in keys[:-1]:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(keys[-1]), str):
            p = Path(node[keys[-1]]).expanduser()
            if not p.is_absolute():
                node[keys[-1]] = str((base / p).resolve())


def _field_path(loc: tuple[str, ...]) -> tuple[tuple[str, ...], str | None]:
    """The part of an error location that names settings fields, and that field's description.

    Pydantic appends union member tags (``int``, ``literal['auto']``) to the location; they are
    not keys a user can write, so they are cut off here.
    """
    model: object = Settings  # a settings model, then a field's annotation: read by reflection
    path: list[str] = []
    info = None
    for part in loc:
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            if not path:
                path.append(str(part))
            break
        path.append(str(part))
        info = fields[part]
        model = info.annotation
    return tuple(path), (info.description if info is not None else None)


def _env_name(loc: tuple[str, ...]) -> str:
    return ENV_PREFIX + "__".join(p.upper() for p in loc)


def _format_validation(err: ValidationError, source: str, env_keys: set[tuple[str, ...]]) -> str:
    problems: dict[tuple[str, ...], list[str]] = {}
    hints: dict[tuple[str, ...], str | None] = {}
    for e in err.errors():
        raw_loc = tuple(str(p) for p in e["loc"])
        loc, hint = _field_path(raw_loc)
        if e["type"] == "extra_forbidden":
            loc, hint = raw_loc, None
            msg = "unknown key; check the spelling against `edge-agent config schema` or docs/configuration.md"
        else:
            msg = e["msg"].removeprefix("Value error, ")
            if "input" in e and not isinstance(e["input"], (dict, list)) and not {"password", "token"} & set(loc):
                msg = f"{msg} (got {e['input']!r})"
        problems.setdefault(loc, []).append(msg)
        hints[loc] = hint
    lines = [f"{source}: {len(problems)} invalid setting(s)"]
    for loc, msgs in problems.items():
        key = ".".join(loc) or "(top level)"
        where = next((f" [from {_env_name(k)}]" for k in env_keys if loc[: len(k)] == k), "")
        text = "; or ".join(dict.fromkeys(msgs))
        if hints.get(loc):
            text += f". This key is: {hints[loc]}"
        lines.append(f"  {key}{where}: {text}")
    return "\n".join(lines)


def _leaf_paths(data: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    out: set[tuple[str, ...]] = set()
    for k, v in data.items():
        if isinstance(v, Mapping):
            out |= _leaf_paths(v, prefix + (k,))
        else:
            out.add(prefix + (k,))
    return out


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file; pass --config PATH or create it from firmware-config/") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None


def load_settings(
    path: Path | str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Load the effective settings: file (or defaults), environment, credentials, explicit overrides."""
    environ = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    source = "defaults"
    if path is None:
        path = next((p for p in DEFAULT_CONFIG_PATHS if p.is_file()), None)
    if path is not None:
        path = Path(path)
        data = read_toml(path)
        _resolve_relative_paths(data, path.resolve().parent)
        source = str(path)
    env = _env_overrides(environ)
    if env:
        _resolve_relative_paths(env, Path.cwd())
        source += " + EDGE_AGENT__* environment"
    overlay(data, env)
    overlay(data, _credentials(environ))
    if overrides:
        overlay(data, overrides)
    try:
        return Settings.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation(e, source, _leaf_paths(env))) from None


def masked_dump(settings: Settings) -> dict[str, Any]:
    """The effective settings as plain data, with secrets masked (for `config show` and logs)."""
    data = settings.model_dump(mode="json")
    if settings.mqtt.password is not None:
        data["mqtt"]["password"] = "********"
    for key in ("token", "password"):
        if getattr(settings.download, key) is not None:
            data["download"][key] = "********"
    return data


__all__ = ["Settings", "load_settings", "masked_dump", "read_toml", "ENV_PREFIX"]
