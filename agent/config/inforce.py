"""The settings in force: the board's own (config file, environment, credentials) overlaid by the device
shadow's desired state, validated as one tree, and the SIGHUP re-read of the file.

The shadow owns the desired state (its document, store and MQTT exchange); this module owns the rule
that composes it with the file (``effective_settings``, ``settings_in_force``, ``boot_settings``) and
the re-read (``reread``), so the daemon, the shadow and the CLI compose settings one way.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from agent.config import Settings, load_settings
from agent.config.live import all_keys
from agent.config.tree import Tree, flatten, overlay, unflatten
from agent.errors import ModelError

log = logging.getLogger(__name__)

_MAX_LISTED = 5


def summarise(errors: Mapping[str, str]) -> str:
    items = list(errors.items())
    text = "; ".join(f"{k}: {m}" for k, m in items[:_MAX_LISTED])
    if len(items) > _MAX_LISTED:
        text += f"; and {len(items) - _MAX_LISTED} more"
    return text


class DesiredInvalid(Exception):
    """Desired keys that cannot be in force: ``errors`` maps each bad dotted key to what is wrong with it."""

    def __init__(self, errors: Mapping[str, str]) -> None:
        super().__init__(summarise(errors))
        self.errors = dict(errors)


def json_kind(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, (int, float)):
        return f"the number {v!r}"
    if isinstance(v, str):
        return f"the string {v[:40]!r}"
    return "an array" if isinstance(v, list) else type(v).__name__


def copy_tree(tree: Mapping[str, Any]) -> dict[str, Any]:
    return {k: copy_tree(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


def effective_settings(
    file_settings: Settings, desired: Mapping[str, Any], *, touched: frozenset[str] | set[str] | None = None
) -> Settings:
    """The board's config (file, environment, credentials: ``file_settings``) overlaid by desired.

    Validated by Settings itself. Raises DesiredInvalid naming the desired keys at fault: a field
    error under its key; a section rule (cross-field) under the section's keys in ``touched``,
    else under every desired key of that section.
    """
    data = overlay(file_settings.model_dump(), copy_tree(desired))
    try:
        return Settings.model_validate(data)
    except ValidationError as e:
        desired_keys = set(flatten(desired))
        touched = set(touched) if touched is not None else desired_keys
        errors: dict[str, str] = {}
        for err in e.errors(include_url=False):
            loc = tuple(str(p) for p in err["loc"])
            msg = str(err["msg"]).removeprefix("Value error, ")
            key = ".".join(loc[:2])
            if len(loc) >= 2 and key in all_keys():
                if "input" in err and not isinstance(err["input"], (dict, list)):
                    msg = f"{msg}, got {json_kind(err['input'])}"
                errors[key] = msg
                continue
            section = loc[0] if loc else ""
            owners = (
                sorted(k for k in touched if k.startswith(section + "."))
                or sorted(k for k in desired_keys if k.startswith(section + "."))
                or [section or "state.desired"]
            )
            for k in owners:
                errors[k] = msg
        raise DesiredInvalid(errors) from None


def boot_settings(file_settings: Settings, desired: Tree) -> Settings:
    """The settings to start the daemon with: the board's config overlaid by the last accepted
    desired state (keys that no longer fit the config file are left out; run_pending reports them).

    Starting with these loads the desired model at once instead of the file's model and then the
    desired one. If the model they name does not load at start, start with ``file_settings``
    instead (a remote change must never stop the daemon from starting): ``run_pending()`` then tries
    the desired model through the executor and reports the failure under its keys. A desired model
    with a model.url that is not downloaded yet is left to the reconcile the same way.
    """
    target, _ = settings_in_force(file_settings, desired)
    m = target.model
    if m.url is not None and m != file_settings.model:
        try:
            target.model_file()
        except ModelError:
            # Not downloaded yet: start with the file's model; the reconcile fetches the desired one.
            return target.model_copy(update={"model": file_settings.model.model_copy()})
    return target


def settings_in_force(base: Settings, desired: Tree) -> tuple[Settings, dict[str, str]]:
    """The settings wanted: base overlaid by desired. Desired keys that no longer fit the board's
    config (the file changed since they were accepted) are left out, with why; a rule between keys
    (a cross-field check) names them all, so each is tried back in and kept if it fits."""
    try:
        return effective_settings(base, desired), {}
    except DesiredInvalid as e:
        suspects = dict(e.errors)
    keep = {k: v for k, v in flatten(desired).items() if k not in suspects}
    try:
        target = effective_settings(base, unflatten(keep))
    except DesiredInvalid as e:  # should not happen: every key at fault was left out
        return base, {
            k: f"cannot be applied with the board's config file: {m}" for k, m in {**suspects, **e.errors}.items()
        }
    conflicts: dict[str, str] = {}
    for key, why in suspects.items():
        value = flatten(desired).get(key)
        if value is None:
            conflicts[key] = f"cannot be applied with the board's config file: {why}"
            continue
        try:
            target = effective_settings(base, unflatten({**keep, key: value}))
            keep[key] = value
        except DesiredInvalid:
            conflicts[key] = f"cannot be applied with the board's config file: {why}"
    return target, conflicts


def reread(path: Path | None) -> Settings | None:
    """SIGHUP: the board's config file read again; None (logged, nothing changes) when it does not load."""
    try:
        return load_settings(path)
    except Exception as e:  # a bad edit must not take a running board down
        log.error("reload refused, keeping the running configuration: %s", e)
        return None


__all__ = [
    "DesiredInvalid", "boot_settings", "copy_tree", "effective_settings", "json_kind", "reread",
    "settings_in_force", "summarise",
]  # fmt: skip
