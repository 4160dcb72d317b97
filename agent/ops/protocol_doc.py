"""Regenerate the generated parts of docs/protocol.md from agent/jobs/protocol.py.

The topic table, the field tables, the status and error-code tables and the JSON Schemas are
rendered from Topics, the pydantic models and the enums, so the document cannot drift from the
code. Hand-written text outside the ``<!-- BEGIN GENERATED: name -->`` / ``<!-- END GENERATED:
name -->`` markers is left alone. tests/test_protocol.py fails when the file is out of date.

    python -m agent.ops.protocol_doc           # rewrite docs/protocol.md (from a source checkout)
    python -m agent.ops.protocol_doc --check   # exit 1 if it is out of date
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from agent.codes import WaitReason
from agent.docgen import GeneratedDoc
from agent.docgen import cell as _cell
from agent.docgen import schema_type as _type
from agent.jobs.protocol import TERMINAL, ErrorCode, JobStatus, json_schemas
from agent.mqtt.topics import Topics
from agent.shadow import messages
from agent.shadow.desired import section_models
from agent.shadow.facts import BoardFacts, ServingModel
from agent.telemetry import Telemetry

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "protocol.md"


def _bounds(prop: dict[str, Any]) -> str:
    parts: list[str] = []
    for p in [prop, *prop.get("anyOf", []), prop.get("items", {})]:
        for key, label in (
            ("minimum", ">= {}"),
            ("exclusiveMinimum", "> {}"),
            ("maximum", "<= {}"),
            ("minLength", "length >= {}"),
            ("maxLength", "length <= {}"),
            ("maxItems", "at most {} items"),
            ("pattern", "`{}`"),
        ):
            if key in p:
                parts.append(label.format(p[key]))
        if p is not prop and "items" in p:
            parts.append(_bounds({"items": p["items"]}) or "")
    return ", ".join(x for x in parts if x)


def _fields_table(schema: dict[str, Any]) -> str:
    required = set(schema.get("required", []))
    rows = ["| field | type | required / default | bounds | meaning |", "|---|---|---|---|---|"]
    for name, prop in schema["properties"].items():
        if name in required:
            need = "required"
        elif "default" in prop:
            need = f"default `{json.dumps(prop['default'])}`"
        else:
            need = "optional"
        rows.append(
            f"| `{name}` | {_type(prop)} | {need} | {_cell(_bounds(prop))} | {_cell(prop.get('description', ''))} |"
        )
    return "\n".join(rows)


def _model_schema(name: str) -> dict[str, Any]:
    schemas = json_schemas()
    if name in schemas:
        return schemas[name]
    for s in schemas.values():
        defs: dict[str, dict[str, Any]] = s.get("$defs", {})
        if name in defs:
            return defs[name]
    raise KeyError(name)


def _statuses() -> str:
    rows = ["| status | terminal | meaning |", "|---|---|---|"]
    rows += [f"| `{s.value}` | {'yes' if s in TERMINAL else 'no'} | {_cell(s.doc)} |" for s in JobStatus]
    return "\n".join(rows)


def _error_codes() -> str:
    rows = ["| code | reported with status | meaning |", "|---|---|---|"]
    rows += [f"| `{c.value}` | {c.status.value} | {_cell(c.doc)} |" for c in ErrorCode]
    return "\n".join(rows)


def _wait_reasons() -> str:
    rows = ["| waiting_for | meaning |", "|---|---|"]
    rows += [f"| `{w.value}` | {_cell(w.doc)} |" for w in WaitReason]
    return "\n".join(rows)


def _schemas() -> str:
    out = []
    for name, schema in json_schemas().items():
        out.append(f"### {name}\n\n```json\n{json.dumps(schema, indent=2, ensure_ascii=False)}\n```")
    return "\n\n".join(out)


# The topic table: one row per topic, each cell ``<name>`` spelled by ``Topics.name`` (the one place
# topics are built), then (direction, QoS, retained, payload). Every topic Topics builds needs a row:
# one without is a render error, so the staleness test catches a topic added without its doc.
_TOPIC_ROWS: tuple[tuple[str, str, str, str, str], ...] = (
    ("<submit>", "client to device", "1", "no", "[JobSubmit](#submitting-a-job)"),
    ("<fleet_submit> (subscription; clients publish to <fleet_publish>)", "client to one device of the group", "1",
     "no", "JobSubmit"),
    ("<cancel>", "client to device", "1", "no", "anything, usually empty (ignored)"),
    ("<status>", "device to clients", "1", "no", "[StatusMessage](#status-messages)"),
    ("<result>", "device to clients", "1", "no", "[ResultMessage](#result-messages)"),
    ("<stream>", "device to clients", "0", "no",
     "[StreamChunk](#stream-chunks), only when the job asked for `\"stream\": true`"),
    ("<device_status>", "device to clients", "1", "yes",
     "[DeviceStatus](#device-status); `offline` is also the MQTT last will"),
    ("<telemetry>", "device to clients", "1", "no", "[Telemetry](#telemetry), every `telemetry.interval_s`"),
    ("<events>", "device to clients", "1", "no",
     "an event ([telemetry.md](telemetry.md#events)): memory governor levels and actions, throttling, spool drops, "
     "model changes; at once"),
    ("<shadow_update>", "operators to device", "1", "may be",
     "[ShadowUpdate](#device-shadow): a partial desired state; a retained one is applied once, then cleared"),
    ("<shadow_update_accepted>", "device to operators", "1", "no", "ShadowUpdateAccepted"),
    ("<shadow_update_rejected>", "device to operators", "1", "no", "ShadowRejected (400, 409, 413, 500)"),
    ("<shadow_get>", "operators to device", "1", "no", "empty, or ShadowGet"),
    ("<shadow_get_accepted>", "device to operators", "1", "no", "ShadowDocumentMessage with the get's client_token"),
    ("<shadow_get_rejected>", "device to operators", "1", "no", "ShadowRejected (400)"),
    ("<shadow>", "device to clients", "1", "yes", "ShadowDocumentMessage, republished whenever the document changes"),
    ("<shadow_delta>", "device to clients", "1", "no",
     "ShadowDelta, whenever the set of differing keys changes and is not empty"),
)  # fmt: skip
# What Topics builds that is not a topic of its own: subscription filters (named below the table) and parsers.
_NOT_TOPICS = {"cancel_filter", "status_filter", "result_filter", "stream_filter", "job_id_from_topic",
               "job_id_from_cancel_topic"}  # fmt: skip
_CELL_RE = re.compile(r"<(\w+)>")


def _topic(name: str) -> str:
    """``Topics.name`` with its parts as placeholders: {root}, {prefix}, {job_id}, {group}."""
    t = Topics("PREFIX", "DEVICE")
    member = getattr(t, name)
    if callable(member):  # the topics of one job, or of one fleet group
        member = member("GROUP" if name == "fleet_submit" else "JOB")
    out = str(member).replace("PREFIX/DEVICE", "{root}").replace("PREFIX", "{prefix}")
    return out.replace("JOB", "{job_id}").replace("GROUP", "{group}")


def _topics() -> str:
    named = {n for row in _TOPIC_ROWS for n in _CELL_RE.findall(row[0])}
    built = {n for n in dir(Topics) if not n.startswith("_")}
    if missing := sorted(built - named - _NOT_TOPICS):
        raise KeyError(
            f"docs/protocol.md: Topics builds {missing} but the topic table (agent/ops/protocol_doc.py "
            "_TOPIC_ROWS) has no row for it"
        )
    rows = ["| topic | direction | QoS | retained | payload |", "|---|---|---|---|---|"]
    for cell, direction, qos, retained, payload in _TOPIC_ROWS:
        topic = _CELL_RE.sub(lambda m: f"`{_topic(m.group(1))}`", cell)
        rows.append(f"| {topic} | {direction} | {qos} | {retained} | {payload} |")
    return "\n".join(rows)


def _named_fields(name: str) -> Callable[[], str]:
    return lambda: _fields_table(_model_schema(name))


def _model_fields(model: type[BaseModel]) -> Callable[[], str]:
    return lambda: _fields_table(model.model_json_schema())


def _renderers() -> dict[str, Callable[[], str]]:
    r: dict[str, Callable[[], str]] = {"statuses": _statuses, "error-codes": _error_codes, "schemas": _schemas,
                                        "wait-reasons": _wait_reasons,
                                        "topics": _topics}  # fmt: skip
    for model in (
        "JobSubmit",
        "ChatMessage",
        "ResponseFormat",
        "StatusMessage",
        "ResultMessage",
        "Usage",
        "Timings",
        "ErrorInfo",
        "StreamChunk",
        "DeviceStatus",
    ):
        r[f"fields-{model}"] = _named_fields(model)

    r["fields-Telemetry"] = lambda: _fields_table(Telemetry.model_json_schema())
    r.update(_shadow_renderers())
    return r


def _shadow_renderers() -> dict[str, Callable[[], str]]:
    """The device shadow's blocks: its payload models live in agent.shadow.messages."""

    r: dict[str, Callable[[], str]] = {}
    models: tuple[type[BaseModel], ...] = (*messages.INBOUND_MODELS, *messages.OUTBOUND_MODELS, messages.ReportedState,
                                           BoardFacts, ServingModel)  # fmt: skip
    for model in models:
        r[f"fields-{model.__name__}"] = _model_fields(model)
    r["shadow-desired-keys"] = _desired_keys
    r["shadow-schemas"] = lambda: f"```json\n{json.dumps(messages.json_schema(), indent=2, ensure_ascii=False)}\n```"
    return r


def _desired_keys() -> str:

    how = {"hot": "in place", "reload": "model reload"}
    rows = ["| key | type | bounds | applied | meaning |", "|---|---|---|---|---|"]
    for section, model in section_models().items():
        for name, prop in model.model_json_schema()["properties"].items():
            rows.append(
                f"| `{section}.{name}` | {_type(prop)} | {_cell(_bounds(prop))} | {how[prop['live']]} | "
                f"{_cell(prop.get('description', ''))} |"
            )
    return "\n".join(rows)


_GENERATED = GeneratedDoc(DOC, _renderers, "agent.ops.protocol_doc", __doc__.splitlines()[0])
render, main = _GENERATED.render, _GENERATED.main


if __name__ == "__main__":
    sys.exit(main())
