"""Renders docs/configuration.md from the settings models, so the reference cannot drift from the code."""

from __future__ import annotations

import json

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from agent.config import ENV_PREFIX, Settings

_HEADER = """# Configuration reference

Generated from the pydantic models in `agent/config/` by `edge-agent config docs > docs/configuration.md`;
a test fails when this file and the code disagree. Do not edit by hand.

Settings come from, in order (later wins):
1. built-in defaults (below);
2. a TOML file: `--config PATH`, else `/etc/edge-agent/config.toml` if it exists. Board profiles live in
   `firmware-config/`; relative paths in a file are resolved against the file's folder;
3. environment variables `EDGE_AGENT__SECTION__KEY` (nested: `EDGE_AGENT__MQTT__TLS__ENABLED=true`;
   values that parse as JSON are taken as JSON, so lists and numbers work);
4. systemd credentials in `$CREDENTIALS_DIRECTORY`: `mqtt_password`, `mqtt_username`.

The **live** column says which settings change while the daemon runs (on SIGHUP, and through the device
shadow): "in place", or "model reload" (the model is reloaded with the new value, and the previous one
comes back if that fails). The others take effect at the next start.

Unknown keys are refused. `edge-agent config validate FILE...` checks files; `edge-agent config show` prints
the effective settings with secrets masked; `edge-agent config schema` prints the JSON Schema.
"""


def _type_name(info: FieldInfo) -> str:
    text = repr(info.annotation)
    for noise in ("typing.", "pathlib.", "pydantic.types.", "<class '", "'>"):
        text = text.replace(noise, "")
    return text.replace("NoneType", "None").replace("PosixPath", "Path").replace(" | ", " or ")


def _default(info: FieldInfo) -> str:
    if info.default_factory is not None:
        return "(derived)"
    if info.default is PydanticUndefined:
        return "(required)"
    value: object = info.default
    if isinstance(value, BaseModel):
        return "(section)"
    if value is not None and not isinstance(value, (int, float, str, bool)):
        value = str(value)
    return "`" + json.dumps(value) + "`"


def _bounds(info: FieldInfo) -> str:
    parts = []
    for m in info.metadata:
        for attr, sym in (
            ("ge", ">="),
            ("gt", ">"),
            ("le", "<="),
            ("lt", "<"),
            ("min_length", "len >="),
            ("max_length", "len <="),
            ("pattern", "matches"),
        ):
            v = getattr(m, attr, None)
            if v is not None:
                parts.append(f"{sym} `{v}`")
    return ", ".join(parts)


# The "live" column: how a change made while the daemon runs (SIGHUP, the device shadow) is applied.
_LIVE = {"hot": "in place", "reload": "model reload", None: ""}


def _section(name: str, model: type[BaseModel], path: tuple[str, ...]) -> list[str]:
    out = [f"## `[{'.'.join(path)}]`", ""]
    doc = (model.__doc__ or "").strip()
    if doc and not doc.startswith("!!!"):
        out += [doc, ""]
    out += ["| key | type | default | bounds | live | environment | description |", "|---|---|---|---|---|---|---|"]
    nested: list[tuple[str, type[BaseModel]]] = []
    for key, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            nested.append((key, ann))
            continue
        env = ENV_PREFIX + "__".join(p.upper() for p in path + (key,))
        desc = (info.description or "").replace("|", "\\|")
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        live = _LIVE.get(str(extra.get("live")), "")
        out.append(
            f"| `{key}` | `{_type_name(info)}` | {_default(info)} | {_bounds(info)} | {live} | `{env}` | {desc} |"
        )
    out.append("")
    for key, sub in nested:
        out += _section(key, sub, path + (key,))
    return out


def render_markdown() -> str:
    lines = [_HEADER]
    for name, info in Settings.model_fields.items():
        section = info.annotation
        assert isinstance(section, type) and issubclass(section, BaseModel), name
        lines += _section(name, section, (name,))
    return "\n".join(lines).rstrip() + "\n"
