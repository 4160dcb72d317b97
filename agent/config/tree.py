"""Settings trees: nested JSON objects as the config file, the environment and the shadow's desired state
write them, and the dotted keys ("engine.n_ctx") that the live diff and the shadow speak. Pure."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

Tree = dict[str, Any]


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"engine": {"n_ctx": 512}} -> {"engine.n_ctx": 512}. Non-objects are leaves; {} vanishes."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def unflatten(flat: Mapping[str, Any]) -> Tree:
    out: Tree = {}
    for key, value in flat.items():
        *path, leaf = key.split(".")
        node = out
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def same(a: Any, b: Any) -> bool:
    """JSON equality: 30 == 30.0, but true is not 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return bool(a == b)


def overlay(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Lays ``over`` onto ``base`` in place, object by object (a later source wins per leaf); returns base."""
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(base.get(k), dict):
            overlay(base[k], v)
        else:
            base[k] = v
    return base
