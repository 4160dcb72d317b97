"""Events on ``{root}/events``: a change the operator should see at once, with the readings that
caused it.

One ``Event`` model for every kind (governor level changes and actions, throttling changes, spool
drops, signals the board lacks); builders here make them from what the governor decided
(``decision_events``) and from two consecutive readings (``throttling_event``). Events go out
through the same ``Uplink`` as readings: published at once when online, spooled otherwise, and
spooled events outlive spooled readings when the spool is full.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from functools import partial
from typing import TYPE_CHECKING, Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_serializer

from agent.telemetry.fields import Telemetry
from agent.telemetry.heat import FREQ_CAPPED, NOW_MASK, SOFT_TEMP_LIMIT, THROTTLED, UNDER_VOLTAGE

if TYPE_CHECKING:
    # For annotations only: the governor sits above telemetry, and the engine beside it (independent layers),
    # so neither may be imported here at run time (import-linter's layers contract).
    from agent.engine.supervisor import ModelChange
    from agent.governor.policy import Decision


class EventKind(StrEnum):
    level_changed = "level_changed"  # the governor's level went up or down
    action = "action"  # the governor took or undid an action
    throttling_changed = "throttling_changed"  # the Raspberry Pi firmware's throttling flags changed
    spool_dropped = "spool_dropped"  # the full spool dropped readings or events
    signals_missing = "signals_missing"  # the governor works without some signals (no PSI, no memory cgroup)
    model_change = "model_change"  # a model change ended: applied, or rolled back (load or canary failed)
    update_refused = "update_refused"  # a shadow update refused for its operator signature or its model's
    session_lost = "session_lost"  # the broker started a new session where it should have resumed the board's


class Event(BaseModel):
    """Published on {root}/events (QoS 1) when it happens; spooled while offline."""

    model_config = ConfigDict(extra="forbid")

    device_id: str = Field(description="This device.")
    ts: AwareDatetime = Field(description="When it happened, RFC 3339 UTC.")
    kind: EventKind = Field(
        description="What happened (level_changed, action, throttling_changed, spool_dropped, signals_missing, "
        "model_change, session_lost, update_refused)."
    )
    level: str | None = Field(default=None, description="The governor's level after the event: ok, warn or critical.")
    previous_level: str | None = Field(default=None, description="level_changed: the level before.")
    action: str | None = Field(
        default=None,
        description="action: what was done (hold_unfit, shrink_context, preempt, unload) or undone (release_hold, "
        "restore_context, resume_jobs, reload).",
    )
    message: str = Field(description="One line for a human: what happened and why.")
    details: dict[str, Any] = Field(
        default_factory=dict, description="Kind-specific facts (the signals that crossed, counts)."
    )
    readings: Telemetry | None = Field(default=None, description="The readings that caused it (the Telemetry payload).")

    @field_serializer("ts")
    def _ser_ts(self, v: datetime) -> str:
        return v.isoformat(timespec="milliseconds").replace("+00:00", "Z")

    def to_payload(self) -> bytes:
        return self.model_dump_json().encode()


def _when(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)


def _event(
    kind: EventKind, message: str, details: dict[str, Any], *, device_id: str, ts: float, level: str | None = None
) -> Event:
    """An event of ``device_id`` at ``ts`` (epoch seconds) without readings: what most builders make."""
    return Event(device_id=device_id, ts=_when(ts), kind=kind, level=level, message=message, details=details)


def decision_events(decision: Decision, readings: Telemetry | None, *, device_id: str, ts: float) -> list[Event]:
    """The events a governor decision calls for: a level change, then each action taken or undone."""
    event = partial(Event, device_id=device_id, ts=_when(ts), level=decision.level.name, readings=readings)
    out: list[Event] = []
    if decision.level_changed:
        why = "; ".join(decision.reasons) or "all signals below their thresholds"
        out.append(
            event(
                kind=EventKind.level_changed,
                previous_level=decision.previous_level.name,
                message=f"memory level {decision.previous_level.name} -> {decision.level.name}: {why}",
                details={"reasons": list(decision.reasons), "missing": list(decision.missing)},
            )
        )
    for step in decision.actions:
        out.append(
            event(
                kind=EventKind.action,
                action=step.action.value,
                message=step.message,
                details={"undo": step.undo, "rung": decision.posture.rung},
            )
        )
    return out


def signals_missing_event(
    missing: dict[str, str], *, device_id: str, ts: float, level: str | None = None
) -> Event | None:
    """Once at start: the governor works without these signals, and how to enable them."""
    if not missing:
        return None
    return _event(
        EventKind.signals_missing,
        "memory governor works without: " + "; ".join(f"{k} ({v})" for k, v in sorted(missing.items())),
        {"missing": dict(sorted(missing.items()))},
        device_id=device_id,
        ts=ts,
        level=level,
    )


_FLAG_NAMES = ((UNDER_VOLTAGE, "under-voltage"), (FREQ_CAPPED, "frequency capped"), (THROTTLED, "throttled"),
               (SOFT_TEMP_LIMIT, "soft temperature limit"))  # fmt: skip


def _names(flags: int) -> list[str]:
    return [name for bit, name in _FLAG_NAMES if flags & bit]


def throttling_event(previous: Telemetry | None, current: Telemetry) -> Event | None:
    """An event when the firmware's 'now' throttling bits differ from the previous reading's; it
    carries the current readings, with the last job's tokens/s, so the cost is visible."""
    if current.throttled_flags is None:
        return None
    now = current.throttled_flags & NOW_MASK
    before = (
        (previous.throttled_flags & NOW_MASK) if previous is not None and previous.throttled_flags is not None else 0
    )
    if now == before:
        return None
    started, ended = _names(now & ~before), _names(before & ~now)
    parts = []
    if started:
        parts.append("now " + ", ".join(started))
    if ended:
        parts.append("no longer " + ", ".join(ended))
    context = []
    if current.soc_temp_c is not None:
        context.append(f"SoC {current.soc_temp_c} °C")
    if current.last_job_tokens_per_s is not None:
        context.append(f"last job {current.last_job_tokens_per_s} tokens/s")
    message = "; ".join(parts) + (f" ({', '.join(context)})" if context else "")
    return Event(
        device_id=current.device_id,
        ts=current.ts,
        kind=EventKind.throttling_changed,
        level=current.governor_level,
        message=message,
        details={
            "flags": now,
            "previous_flags": before,
            "started": started,
            "ended": ended,
            "since_boot": current.throttled_flags >> 16,
        },
        readings=current,
    )


def spool_dropped_event(
    readings: int, events: int, *, device_id: str, ts: float, level: str | None = None
) -> Event | None:
    """The spool ran full while offline: how many readings and events it dropped since the last report."""
    if readings <= 0 and events <= 0:
        return None
    return _event(
        EventKind.spool_dropped,
        f"offline spool full: dropped {readings} oldest readings and {events} events "
        "(telemetry.spool_max_rows / spool_max_mb)",
        {"readings": readings, "events": events},
        device_id=device_id,
        ts=ts,
        level=level,
    )


__all__ = [
    "Event",
    "EventKind",
    "RateLimit",
    "decision_events",
    "model_change_event",
    "signals_missing_event",
    "spool_dropped_event",
    "throttling_event",
    "update_refused_event",
    "updates_suppressed_event",
]


def model_change_event(change: ModelChange, *, device_id: str, ts: float, level: str | None = None) -> Event:
    """A model change ended (agent.engine.supervisor.ModelChange): applied, or rolled back."""
    if change.outcome == "applied":
        message = f"model {change.path} in force after {change.took_ms:.0f} ms ({change.preempted} job(s) preempted)"
    else:
        back = "the previous model serves again" if change.rolled_back else "no model is loaded"
        message = f"model change to {change.path} failed ({change.outcome}): {change.message}; {back}"
    return _event(EventKind.model_change, message, change.as_dict(), device_id=device_id, ts=ts, level=level)


class RateLimit:
    """At most ``burst`` events per ``window_s`` seconds; the ones over it are counted instead of sent, and
    the count is told once that window is over (``overflow``), so a flood cannot flood ``{root}/events``.
    Pure: the caller passes the time."""

    def __init__(self, *, burst: int = 3, window_s: float = 60.0) -> None:
        self.burst, self.window_s = burst, window_s
        self._start: float | None = None
        self._sent = 0
        self.suppressed = 0

    def allow(self, now: float) -> bool:
        if self._start is None or now - self._start >= self.window_s:
            if self.suppressed:
                return self._count()  # the count of the window that ended goes out first (overflow)
            self._start, self._sent = now, 0
        if self._sent < self.burst:
            self._sent += 1
            return True
        return self._count()

    def _count(self) -> bool:
        self.suppressed += 1
        return False

    def overflow(self, now: float) -> int:
        """Once the window is over: how many were held back in it (0: none, or not over yet); that count is
        then told, and a new window starts with its one event."""
        if not self.suppressed or self._start is None or now - self._start < self.window_s:
            return 0
        n, self.suppressed = self.suppressed, 0
        self._start, self._sent = now, 1
        return n


_REASON_MAX = 400


def update_refused_event(
    code: int, reason: str, keys: list[str], *, device_id: str, ts: float, key_id: str | None = None
) -> Event:
    """A shadow update refused for its operator signature (403: missing, bad, expired, another board's or
    version's, an untrusted key) or for its model's (400 under model.signature), or a signed update for a
    version that is gone (409: a replay, or two operators at once). Names the keys it tried to change,
    never their values (a URL may carry a token), and the signing key's id when it names one."""
    what = ", ".join(keys) if keys else "the desired state"
    return _event(
        EventKind.update_refused,
        f"shadow update of {what} refused {code}: {reason}"[:_REASON_MAX],
        {"code": code, "keys": keys, "key_id": key_id, "reason": reason[:_REASON_MAX]},
        device_id=device_id,
        ts=ts,
    )


def updates_suppressed_event(count: int, window_s: float, *, device_id: str, ts: float) -> Event:
    """The refusals held back by the rate limit in the window that ended."""
    return _event(
        EventKind.update_refused,
        f"{count} more shadow update(s) refused within {window_s:g} s, not reported one by one "
        "(a flood of bad updates: someone with broker credentials and no operator key?)",
        {"suppressed": count, "window_s": window_s},
        device_id=device_id,
        ts=ts,
    )
