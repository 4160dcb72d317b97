"""Regenerate the generated parts of docs/telemetry.md from the telemetry and event declarations.

The fields table comes from ``agent.telemetry.fields.Telemetry`` (name, unit, group, description),
the event table from ``agent.telemetry.events.Event``; text outside the
``<!-- BEGIN GENERATED: name -->`` / ``<!-- END GENERATED: name -->`` markers is left alone.
tests/test_telemetry.py fails when the file is out of date.

    python -m agent.telemetry.doc           # rewrite docs/telemetry.md (from a source checkout)
    python -m agent.telemetry.doc --check   # exit 1 if it is out of date
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from agent.docgen import GeneratedDoc, schema_type
from agent.docgen import cell as _cell
from agent.telemetry.events import Event, EventKind
from agent.telemetry.fields import GROUPS, Telemetry, field_meta

ROOT = Path(__file__).resolve().parent.parent.parent
DOC = ROOT / "docs" / "telemetry.md"
_SCHEMA = Telemetry.model_json_schema()

_KIND_DOCS = {
    EventKind.level_changed: "The governor's level went up or down; `reasons` name the signals and their values.",
    EventKind.action: "The governor took an action or undid one (`details.undo`).",
    EventKind.throttling_changed: "The Raspberry Pi firmware's throttling bits changed; the readings carry the "
    "temperature, the CPU frequency and the last job's tokens/s.",
    EventKind.spool_dropped: "The full offline spool dropped readings (or, once none were left, events); counts "
    "since the last such event.",
    EventKind.signals_missing: "At start: the governor works without these signals, and how to turn them on.",
    EventKind.model_change: "A model change (device shadow, SIGHUP) ended: applied, or rolled back after the new "
    "model failed to load or failed the canary; `details` as the shadow's `reported.model_change`.",
    EventKind.update_refused: "A shadow update refused for its operator signature (403: unsigned, altered, "
    "expired, for another board or version, an untrusted key), for its model's signature (400 under "
    "`model.signature`), or a signed update for a version that is gone (409: a replay, or two operators at once); "
    "`details.code`, `details.keys` (never their values), `details.key_id`, `details.reason`. At most 3 a minute: "
    "the rest are counted in one more such event with `details.suppressed`.",
    EventKind.session_lost: "The broker started a new session where it should have resumed the board's (a broker "
    "restarted without keeping sessions, or another cluster node that does not share them): jobs queued for the "
    "board while it was away are lost unless submitters resend them; `details.broker`, `details.fix`.",
}


def _type(name: str) -> str:
    return _cell(schema_type(_SCHEMA["properties"][name], " or "))


def fields_table() -> str:
    rows = field_meta()
    out = []
    for group, title in GROUPS.items():
        members = [r for r in rows if r[2] == group]
        if not members:
            continue
        out += [f"**{title}**", "", "| field | unit | type | meaning |", "|---|---|---|---|"]
        out += [f"| `{n}` | {u or ''} | {_type(n)} | {_cell(d)} |" for n, u, _, d in members]
        out.append("")
    return "\n".join(out).rstrip()


def event_table() -> str:
    out = ["| field | meaning |", "|---|---|"]
    for name, info in Event.model_fields.items():
        out.append(f"| `{name}` | {_cell(info.description or '')} |")
    return "\n".join(out)


def event_kinds() -> str:
    out = ["| kind | when |", "|---|---|"]
    out += [f"| `{k.value}` | {_cell(_KIND_DOCS[k])} |" for k in EventKind]
    return "\n".join(out)


def _renderers() -> dict[str, Callable[[], str]]:
    return {"telemetry-fields": fields_table, "event-fields": event_table, "event-kinds": event_kinds}


_GENERATED = GeneratedDoc(DOC, _renderers, "agent.telemetry.doc", __doc__.splitlines()[0])
render, main = _GENERATED.render, _GENERATED.main


if __name__ == "__main__":
    sys.exit(main())
