"""The memory governor's policy: pure decisions, no I/O, the clock passed in.

``step(state, signals, now, settings) -> (state, Decision)`` turns one set of readings into a
level (ok, warn, critical) and the actions to take or undo; ``admit`` decides whether a job may
start now, must wait, or can never fit this board. The daemon applies decisions (job runner,
model supervisor) and publishes them as events; nothing here touches the engine, the store or
a file.

Levels. Each signal has its own latch with hysteresis: it rises past a threshold and falls only
``hysteresis_pct`` points past it the other way. PSI thresholds must hold for ``psi_hold_s``
before they count (avg10 is already a 10 s average; the hold filters one-off bursts, as
systemd-oomd and nohang do). The level is the highest latch. Signals the board lacks (no PSI, no
memory cgroup or no limit on it) are skipped and named in ``Decision.missing``: the governor then
works on MemAvailable alone, which every kernel has.

Actions form a ladder, taken one rung at a time, each at least ``cool_down_s`` after the previous
one: warn climbs to rung 2, critical to rung 4.

  1 hold_unfit      jobs whose estimate does not fit what is available (less the warn reserve) wait
  2 shrink_context  new jobs run only if prompt + max_tokens fit shrink_ctx_pct of the context,
                    and one at a time (engine.max_parallel lowered to 1)
  3 preempt         running jobs are stopped and requeued; none start
  4 unload          the model is unloaded

A rung is undone (reload, resume_jobs, restore_context, release_hold: the reverse order) once the
level has stayed below what that rung needs for ``recover_s``, again one rung per cool-down, so a
board that recovers does not reload into the pressure it just left.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.config.sections import GovernorSettings

MiB = 1024 * 1024


class Level(IntEnum):
    """Ordered, so the worst signal wins with max(); events and the shadow show ``.name``."""

    ok = 0
    warn = 1
    critical = 2


class Action(StrEnum):
    hold_unfit = "hold_unfit"
    shrink_context = "shrink_context"
    preempt = "preempt"
    unload = "unload"
    # their undoing, in the order they happen
    reload = "reload"
    resume_jobs = "resume_jobs"
    restore_context = "restore_context"
    release_hold = "release_hold"


# Rung n (1-4) is taken with LADDER[n - 1] and undone with UNDO[n - 1].
LADDER = (Action.hold_unfit, Action.shrink_context, Action.preempt, Action.unload)
UNDO = (Action.release_hold, Action.restore_context, Action.resume_jobs, Action.reload)
# The level a rung needs: while the level is below it, the rung is on its way to being undone.
RUNG_NEEDS = {1: Level.warn, 2: Level.warn, 3: Level.critical, 4: Level.critical}
# The highest rung a level climbs to.
TOP_RUNG = {Level.ok: 0, Level.warn: 2, Level.critical: 4}


@dataclass(frozen=True)
class Signals:
    """One reading of what the governor looks at. None: the board does not have it."""

    mem_total: int
    mem_available: int
    psi_some_avg10: float | None = None
    psi_full_avg10: float | None = None
    cgroup_working_set: int | None = None
    cgroup_limit: int | None = None
    cgroup_high: int | None = None
    weights_in_ram_pct: float | None = None

    @property
    def mem_available_pct(self) -> float:
        return 100.0 * self.mem_available / self.mem_total if self.mem_total else 100.0

    @property
    def cgroup_bound(self) -> int | None:
        """The smaller of the cgroup's limit and high mark (where the kernel starts to squeeze)."""
        bounds = [b for b in (self.cgroup_limit, self.cgroup_high) if b]
        return min(bounds) if bounds else None

    @property
    def cgroup_pct(self) -> float | None:
        bound = self.cgroup_bound
        if bound is None or self.cgroup_working_set is None:
            return None
        return 100.0 * self.cgroup_working_set / bound

    @classmethod
    def from_reading(cls, t: Any) -> Signals:
        """From a ``Telemetry`` reading. PSI: the worse of the system's and the agent's cgroup's,
        since a stall in either is one the agent's work feels."""

        def worst(*values: float | None) -> float | None:
            present = [v for v in values if v is not None]
            return max(present) if present else None

        return cls(
            mem_total=t.mem_total_bytes or 0,
            mem_available=t.mem_available_bytes or 0,
            psi_some_avg10=worst(t.psi_some_avg10, t.cgroup_psi_some_avg10),
            psi_full_avg10=worst(t.psi_full_avg10, t.cgroup_psi_full_avg10),
            cgroup_working_set=t.cgroup_working_set_bytes,
            cgroup_limit=t.cgroup_limit_bytes,
            cgroup_high=t.cgroup_high_bytes,
            weights_in_ram_pct=getattr(t, "weights_in_ram_pct", None),
        )


@dataclass(frozen=True)
class Posture:
    """What is in force after a decision: the rung and what it means for the job runner."""

    rung: int = 0

    @property
    def hold_unfit(self) -> bool:
        return self.rung >= 1

    @property
    def shrink_context(self) -> bool:
        return self.rung >= 2

    @property
    def start_jobs(self) -> bool:
        return self.rung < 3

    @property
    def model_wanted(self) -> bool:
        return self.rung < 4

    @property
    def action(self) -> Action | None:
        """The strongest action in force (for telemetry and the shadow), None at rung 0."""
        return LADDER[self.rung - 1] if self.rung else None

    def parallel(self, slots: int) -> int:
        """Jobs that may run at once: the engine's slots, one from shrink_context on (each running
        job's KV pages grow as it generates; fewer at once is the other half of a smaller context)."""
        return 1 if self.shrink_context else max(1, slots)

    def context_tokens(self, n_ctx: int, shrink_ctx_pct: int) -> int:
        """Largest prompt + max_tokens a new job may have now."""
        return max(1, n_ctx * shrink_ctx_pct // 100) if self.shrink_context else n_ctx


@dataclass(frozen=True)
class Step:
    action: Action
    undo: bool
    message: str


@dataclass(frozen=True)
class GovernorState:
    """Everything the policy remembers between readings. Start with ``GovernorState()``."""

    level: Level = Level.ok
    rung: int = 0
    last_action_at: float | None = None
    below_since: float | None = None  # since when the level has been below what the rung needs
    # per-signal latches (hysteresis) and since when a PSI threshold has been exceeded
    latches: tuple[tuple[str, Level], ...] = ()
    over_since: tuple[tuple[str, float], ...] = ()

    def latch(self, name: str) -> Level:
        return dict(self.latches).get(name, Level.ok)

    @property
    def posture(self) -> Posture:
        return Posture(self.rung)


@dataclass(frozen=True)
class Decision:
    level: Level
    previous_level: Level
    posture: Posture
    actions: tuple[Step, ...] = ()
    reasons: tuple[str, ...] = ()  # which signals hold the level above ok, with their values
    missing: tuple[str, ...] = ()  # signals the board lacks

    @property
    def level_changed(self) -> bool:
        return self.level != self.previous_level


# ------------------------------------------------------------------------------------ levels


def _latch_low(prev: Level, value: float, warn: float, act: float, hyst: float) -> Level:
    """A signal that is bad when low (MemAvailable %)."""
    if value < act:
        return Level.critical
    if prev == Level.critical and value < act + hyst:
        return Level.critical
    if value < warn:
        return Level.warn
    if prev >= Level.warn and value < warn + hyst:
        return Level.warn
    return Level.ok


def _latch_high(prev: Level, value: float, warn: float | None, act: float, hyst: float) -> Level:
    """A signal that is bad when high (cgroup %, PSI). ``warn`` None: it only has a critical threshold."""
    if value >= act:
        return Level.critical
    if prev == Level.critical and value > act - hyst:
        return Level.critical
    if warn is not None:
        if value >= warn:
            return Level.warn
        if prev >= Level.warn and value > warn - hyst:
            return Level.warn
    return Level.ok


def _held(name: str, exceeded: bool, now: float, over: dict[str, float], hold: float) -> bool:
    """Whether ``name`` has been exceeded continuously for ``hold`` seconds; keeps ``over`` current."""
    if not exceeded:
        over.pop(name, None)
        return False
    since = over.setdefault(name, now)
    return now - since >= hold


def _levels(
    state: GovernorState, sig: Signals, now: float, s: GovernorSettings
) -> tuple[dict[str, Level], dict[str, float], list[str], list[str]]:
    latches: dict[str, Level] = {}
    over = dict(state.over_since)
    reasons: list[str] = []
    missing: list[str] = []
    hyst = s.hysteresis_pct

    def latch(name: str, level: Level, reason: str) -> None:
        """Keep ``name``'s level for the next reading; a level above ok gives ``reason``."""
        latches[name] = level
        if level > Level.ok:
            reasons.append(reason)

    pct = sig.mem_available_pct
    latch(
        "mem_available",
        _latch_low(state.latch("mem_available"), pct, s.mem_available_warn_pct, s.mem_available_act_pct, hyst),
        f"MemAvailable {pct:.1f} % (warn below {s.mem_available_warn_pct:g}, act below {s.mem_available_act_pct:g})",
    )

    if sig.psi_some_avg10 is None and sig.psi_full_avg10 is None:
        missing.append("psi")
        for name in ("psi_some_warn", "psi_some_act", "psi_full_act"):
            over.pop(name, None)
    else:
        some = sig.psi_some_avg10 or 0.0
        full = sig.psi_full_avg10 or 0.0
        prev = state.latch("psi")
        # Rising needs the threshold held; falling follows the hysteresis at once (avg10 is smooth).
        some_warn = _held("psi_some_warn", some >= s.psi_some_warn_pct, now, over, s.psi_hold_s)
        some_act = _held("psi_some_act", some >= s.psi_some_act_pct, now, over, s.psi_hold_s)
        full_act = _held("psi_full_act", full >= s.psi_full_act_pct, now, over, s.psi_hold_s)
        level = Level.ok
        if (
            some_act
            or full_act
            or (prev == Level.critical and (some > s.psi_some_act_pct - hyst or full > s.psi_full_act_pct - hyst))
        ):
            level = Level.critical
        elif some_warn or (prev >= Level.warn and some > s.psi_some_warn_pct - hyst):
            level = Level.warn
        latch(
            "psi",
            level,
            f"PSI memory some {some:g} / full {full:g} % avg10 (warn: some {s.psi_some_warn_pct:g}; act: some "
            f"{s.psi_some_act_pct:g} or full {s.psi_full_act_pct:g}, held {s.psi_hold_s:g} s)",
        )

    w = sig.weights_in_ram_pct
    if w is not None:
        # Weights the plan keeps in RAM being evicted: every token reads them back (thrashing). The
        # one signal that sees it on a kernel without PSI, or when PSI is diluted by other work.
        warn_low = _held("weights_warn", w < s.weights_warn_pct, now, over, s.psi_hold_s)
        act_low = _held("weights_act", w < s.weights_act_pct, now, over, s.psi_hold_s)
        prev = state.latch("weights")
        level = Level.ok
        if act_low or (prev == Level.critical and w < s.weights_act_pct + hyst):
            level = Level.critical
        elif warn_low or (prev >= Level.warn and w < s.weights_warn_pct + hyst):
            level = Level.warn
        latch(
            "weights",
            level,
            f"weights in RAM {w:.0f} % (warn below {s.weights_warn_pct:g}, act below {s.weights_act_pct:g}, "
            f"held {s.psi_hold_s:g} s)",
        )
    else:
        for name in ("weights_warn", "weights_act"):
            over.pop(name, None)

    cg = sig.cgroup_pct
    if cg is None:
        missing.append("cgroup_memory" if sig.cgroup_working_set is None else "cgroup_limit")
    else:
        latch(
            "cgroup",
            _latch_high(state.latch("cgroup"), cg, s.cgroup_warn_pct, s.cgroup_act_pct, hyst),
            f"cgroup working set {cg:.1f} % of its {'limit' if sig.cgroup_bound == sig.cgroup_limit else 'high mark'} "
            f"{(sig.cgroup_bound or 0) // MiB} MiB (warn {s.cgroup_warn_pct:g}, act {s.cgroup_act_pct:g})",
        )
    return latches, over, reasons, missing


# ------------------------------------------------------------------------------------ the step


def _message(action: Action, level: Level, s: GovernorSettings) -> str:
    return {
        Action.hold_unfit: "holding jobs whose memory estimate does not fit what is available; they stay queued",
        Action.shrink_context: f"new jobs run only within {s.shrink_ctx_pct} % of the context, one at a time",
        Action.preempt: "preempting running jobs (requeued, no attempt lost); no job starts",
        Action.unload: "unloading the model",
        Action.reload: f"reloading the model: memory level {level.name} for {s.recover_s:g} s",
        Action.resume_jobs: "jobs may start again",
        Action.restore_context: "new jobs use the whole context again",
        Action.release_hold: "no longer holding jobs for memory",
    }[action] + f" (level {level.name})"


def step(
    state: GovernorState, signals: Signals, now: float, settings: GovernorSettings
) -> tuple[GovernorState, Decision]:
    """One reading in, the new state and what to do out. Pure: the same inputs give the same result."""
    previous = state.level
    if not settings.enabled:
        # Disabled: undo everything at once (the operator asked for it), report ok.
        undone = tuple(
            Step(UNDO[r - 1], True, _message(UNDO[r - 1], Level.ok, settings) + "; governor disabled")
            for r in range(state.rung, 0, -1)
        )
        new = GovernorState(last_action_at=now if undone else state.last_action_at)
        return new, Decision(Level.ok, previous, new.posture, undone)

    latches, over, reasons, missing = _levels(state, signals, now, settings)
    level = max(latches.values(), default=Level.ok)
    rung, last, below = state.rung, state.last_action_at, state.below_since
    cooled = last is None or now - last >= settings.cool_down_s
    actions: list[Step] = []

    if rung < TOP_RUNG[level]:
        below = None
        if cooled:
            rung += 1
            last = now
            actions.append(Step(LADDER[rung - 1], False, _message(LADDER[rung - 1], level, settings)))
    elif rung > 0 and level < RUNG_NEEDS[rung]:
        below = now if below is None else below
        if now - below >= settings.recover_s and cooled:
            actions.append(Step(UNDO[rung - 1], True, _message(UNDO[rung - 1], level, settings)))
            rung -= 1
            last = now
            if rung == 0 or level >= RUNG_NEEDS[rung]:
                below = None
    else:
        below = None

    new = GovernorState(
        level=level,
        rung=rung,
        last_action_at=last,
        below_since=below,
        latches=tuple(sorted(latches.items())),
        over_since=tuple(sorted(over.items())),
    )
    return new, Decision(level, previous, new.posture, tuple(actions), tuple(reasons), tuple(missing))


class Governor:
    """The policy with its state kept: ``observe`` per reading. Not thread-safe: one owner thread
    (the daemon's governor loop); read ``posture`` from elsewhere only as a whole value."""

    def __init__(self, settings: GovernorSettings, state: GovernorState | None = None) -> None:
        self.settings = settings
        self.state = state or GovernorState()

    def observe(self, signals: Signals, now: float) -> Decision:
        self.state, decision = step(self.state, signals, now, self.settings)
        return decision

    def configure(self, settings: GovernorSettings) -> None:
        """New thresholds (live settings); latches and timers carry over."""
        self.settings = settings

    @property
    def posture(self) -> Posture:
        return self.state.posture

    @property
    def level(self) -> Level:
        return self.state.level


# ------------------------------------------------------------------------------------ admission


def available_to_agent(t: Any) -> int:
    """Bytes the agent could hold now, from a ``Telemetry`` reading: what it already holds (RssAnon
    + RssFile) plus MemAvailable, and no more than its cgroup's bound leaves it."""
    held = (t.rss_anon_bytes or 0) + (t.rss_file_bytes or 0)
    avail = (t.mem_available_bytes or 0) + held
    bounds = [b for b in (t.cgroup_limit_bytes, t.cgroup_high_bytes) if b]
    if bounds and t.cgroup_working_set_bytes is not None:
        # Others in the cgroup (a helper, page cache that is not the model) keep what they hold.
        others = max(0, t.cgroup_working_set_bytes - held)
        avail = min(avail, min(bounds) - others)
    return max(0, avail)


def describe(decision: Decision) -> dict[str, Any]:
    """The governor's part of the shadow's reported state."""
    return {
        "level": decision.level.name,
        "action": decision.posture.action.value if decision.posture.action else None,
        "rung": decision.posture.rung,
        "reasons": list(decision.reasons),
        "missing": list(decision.missing),
    }


__all__ = [
    "Action", "Decision", "Governor", "GovernorState", "LADDER", "Level", "Posture", "Signals",
    "Step", "UNDO", "available_to_agent", "describe", "step",
]  # fmt: skip
