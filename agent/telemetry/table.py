"""Telemetry as text: values formatted by their declared unit, grouped as the declaration groups
them. Used by `edge-agent telemetry`; the rows come from ``field_meta``, so a new field shows up
here without a change."""

from __future__ import annotations

from typing import Any

from agent.telemetry.fields import GROUPS, Telemetry, field_meta

_SCALE = (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))


def _bytes(v: float) -> str:
    for name, size in _SCALE:
        if abs(v) >= size:
            return f"{v / size:.1f} {name}"
    return f"{v:.0f} B"


def format_value(value: Any, unit: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "none"
    if unit == "bytes":
        return _bytes(value)
    if unit == "bytes/s":
        return _bytes(value) + "/s"
    if isinstance(value, float):
        text = f"{value:.2f}".rstrip("0").rstrip(".")
    else:
        text = str(value)
    return f"{text} {unit}".rstrip() if unit else text


def render(t: Telemetry, *, describe: bool = False, unavailable: dict[str, str] | None = None) -> str:
    """The reading as a table, one group per block. ``unavailable``: reading -> why, listed last."""
    rows = field_meta()
    values = t.model_dump()
    width = max(len(name) for name, *_ in rows)
    lines = [f"{t.device_id}  {t.ts.isoformat(timespec='seconds').replace('+00:00', 'Z')}"]
    for group, title in GROUPS.items():
        members = [r for r in rows if r[2] == group and r[0] not in ("device_id", "ts")]
        if not members:
            continue
        lines += ["", title]
        for name, unit, _, desc in members:
            cell = format_value(values[name], unit)
            line = f"  {name:<{width}}  {cell}"
            if describe:
                line = f"{line:<{width + 24}}  {desc}"
            lines.append(line.rstrip())
    if unavailable:
        lines += ["", "Not available on this board"]
        lines += [f"  {name}: {why}" for name, why in sorted(unavailable.items())]
    return "\n".join(lines)


__all__ = ["format_value", "render"]
