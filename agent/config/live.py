"""Which settings may change at run time, and what changed between two settings trees.

The declaration lives on the fields (``json_schema_extra=HOT`` or ``RELOAD`` in
``agent.config.sections``); this module only reads it. ``diff`` is pure: the daemon's one
diff-and-apply path (SIGHUP reload, the device shadow) decides with it what to set in place, what
to hand to the model supervisor, and what needs a restart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from typing import Any, Literal

from pydantic import BaseModel

# The key that pauses intake: also the name of the run gate's hold it sets (agent.jobs.gate).
INTAKE_PAUSED = "intake.paused"

LiveKind = Literal["hot", "reload"]


@dataclass(frozen=True)
class Change:
    """One setting that differs. ``kind`` None: it takes effect only after a restart."""

    key: str  # dotted: "engine.n_ctx"
    old: Any
    new: Any
    kind: LiveKind | None


@dataclass
class ApplyReport:
    """What one diff-and-apply pass did, per dotted key.

    applied  the new value is in force;
    failed   the value was valid but could not be applied (e.g. the model did not load): the old
             value stays in force, with this message;
    pending  accepted and kept, but nothing acts on it yet (the message says why);
    restart  takes effect only after a restart (never a desired key of the shadow).
    """

    applied: dict[str, Any] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    pending: dict[str, str] = field(default_factory=dict)
    restart: list[str] = field(default_factory=list)


def _walk(model: type[BaseModel], prefix: str = "") -> dict[str, LiveKind | None]:
    out: dict[str, LiveKind | None] = {}
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.update(_walk(ann, key + "."))
            continue
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        kind = extra.get("live")
        out[key] = "hot" if kind == "hot" else "reload" if kind == "reload" else None
    return out


@cache
def _all_keys(model: type[BaseModel]) -> dict[str, LiveKind | None]:
    return _walk(model)


def all_keys(model: type[BaseModel] | None = None) -> dict[str, LiveKind | None]:
    """Every leaf setting, dotted, with its live kind (None: restart only)."""
    if model is None:
        from agent.config import Settings  # the settings tree imports this module: a top-level import would be a cycle

        model = Settings
    return dict(_all_keys(model))


def live_keys(model: type[BaseModel] | None = None) -> dict[str, LiveKind]:
    """The settings that may change while running, dotted, with how they are applied."""
    return {k: v for k, v in all_keys(model).items() if v is not None}


def get(settings: BaseModel, key: str) -> Any:
    """The value of a dotted key."""
    node: Any = settings
    for part in key.split("."):
        node = getattr(node, part)
    return node


def diff(old: BaseModel, new: BaseModel) -> list[Change]:
    """Every leaf setting whose value differs, in declaration order."""
    kinds = all_keys(type(old))
    return [Change(k, get(old, k), get(new, k), kind) for k, kind in kinds.items() if get(old, k) != get(new, k)]


__all__ = ["INTAKE_PAUSED", "ApplyReport", "Change", "LiveKind", "all_keys", "diff", "get", "live_keys"]
