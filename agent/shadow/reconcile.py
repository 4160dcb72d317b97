"""Reconcile, as pure functions: the settings wanted and the settings in force in, ordered actions out.

``plan`` compares the target (the board's config file overlaid by desired, every live key) with
what is in force and returns the actions that bring one to the other, in the order that keeps
jobs safe: pausing intake first (no job starts during the rest), the in-place (HOT) settings, one
model reload for every RELOAD key together (one unload and load, not one per key), resuming intake
last. ``settle`` folds what the daemon reported for an action into what the shadow remembers:
errors per key, "not applied yet" notes, and the failures that must not be retried in a loop (a key
whose last apply failed for the same target value is left alone until the value changes or the
daemon restarts). The daemon executes actions through one interface, ``Executor``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from agent.config import Settings
from agent.config.live import INTAKE_PAUSED, ApplyReport, LiveKind, live_keys
from agent.config.tree import same

ActionKind = Literal["pause_intake", "hot", "reload", "resume_intake"]


class Executor(Protocol):
    """What the daemon gives the shadow to act with (agent.app.applier.LiveSettings fits it)."""

    @property
    def settings(self) -> Settings:
        """The settings in force: only values that really are in force."""
        ...

    def apply(self, target: Settings, keys: Collection[str]) -> ApplyReport:
        """Bring the dotted ``keys`` of the settings in force to their value in ``target``; report
        per key what happened. Called on the daemon's main loop; may take as long as a model swap."""
        ...

    def set_trusted_keys(self, keys: Sequence[str]) -> None:
        """The operator keys in force (model.trusted_keys, the config file's alone, re-read on SIGHUP):
        every model load from now on is judged with them. Never from desired state."""
        ...


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    keys: tuple[str, ...]  # the dotted keys this action changes


@dataclass(frozen=True)
class Settled:
    """What the shadow remembers between reconcile passes (in memory: a restart retries everything)."""

    failed: Mapping[str, Any] = field(default_factory=dict)  # key -> the target value that failed
    errors: Mapping[str, str] = field(default_factory=dict)  # key -> why (reported)
    pending: Mapping[str, str] = field(default_factory=dict)  # key -> "not applied yet" note (reported)


def plan(
    target: Mapping[str, Any],
    in_force: Mapping[str, Any],
    *,
    failed: Mapping[str, Any] | None = None,
    kinds: Mapping[str, LiveKind] | None = None,
) -> list[Action]:
    """Ordered actions that bring ``in_force`` to ``target`` (both dotted key -> JSON value).

    Keys whose last apply failed for this same target value (``failed``) are left out.
    """
    kinds = live_keys() if kinds is None else kinds
    failed = failed or {}
    todo = [
        k
        for k in kinds
        if k in target and not same(target[k], in_force.get(k)) and not (k in failed and same(failed[k], target[k]))
    ]
    actions: list[Action] = []
    if INTAKE_PAUSED in todo and target[INTAKE_PAUSED] is True:
        actions.append(Action("pause_intake", (INTAKE_PAUSED,)))
    hot = tuple(k for k in todo if kinds[k] == "hot" and k != INTAKE_PAUSED)
    if hot:
        actions.append(Action("hot", hot))
    reload = tuple(k for k in todo if kinds[k] == "reload")
    if reload:
        actions.append(Action("reload", reload))
    if INTAKE_PAUSED in todo and target[INTAKE_PAUSED] is not True:
        actions.append(Action("resume_intake", (INTAKE_PAUSED,)))
    return actions


def settle(
    state: Settled,
    action: Action,
    report: ApplyReport,
    target: Mapping[str, Any],
    in_force_after: Mapping[str, Any],
) -> Settled:
    """Fold the daemon's report for one action into the shadow's memory.

    A key the report does not mention is judged by the settings in force afterwards: at its target
    value it counts as applied, otherwise as failed ("no report"), so nothing is ignored silently.
    """
    failed, errors, pending = dict(state.failed), dict(state.errors), dict(state.pending)

    def ok(k: str) -> None:
        failed.pop(k, None)
        errors.pop(k, None)

    def bad(k: str, why: str) -> None:
        failed[k] = target.get(k)
        errors[k] = why
        pending.pop(k, None)

    for k in action.keys:
        if k in report.failed:
            bad(k, report.failed[k])
        elif k in report.restart:
            bad(k, "takes effect only after a restart")
        elif k in report.pending:
            ok(k)
            pending[k] = report.pending[k]
        elif k in report.applied:
            ok(k)
            pending.pop(k, None)
        elif same(in_force_after.get(k), target.get(k)):
            ok(k)
        else:
            bad(k, "not applied: the daemon did not report on this key")
    return Settled(failed, errors, pending)


def tidy(state: Settled, target: Mapping[str, Any], in_force: Mapping[str, Any]) -> Settled:
    """After a pass: a key now at its target value has no error; a failure recorded for a value
    that is no longer the target is forgotten (the new value is tried); notes of keys that are no
    longer settings are dropped."""
    failed = {k: v for k, v in state.failed.items() if k in target and same(v, target[k])}
    errors = {
        k: m for k, m in state.errors.items() if k in target and not same(target[k], in_force.get(k)) and k in failed
    }
    pending = {k: m for k, m in state.pending.items() if k in target and k not in errors}
    return Settled(failed, errors, pending)


__all__ = ["Action", "ActionKind", "Executor", "Settled", "plan", "settle", "tidy"]
