"""The memory governor at the daemon's edge: readings in, decisions carried out, readings and
events out.

``MemoryWatch.tick()`` runs on the daemon's main loop: every ``governor.interval_s`` it takes a
reading (agent.telemetry.Sampler), feeds the pure policy (agent.governor.policy), carries out what
it decided through ``GovernorActions`` (the runner and the model supervisor), and sends the events
the decision calls for; every ``telemetry.interval_s`` it sends the reading. Both go through the
``Uplink``: published at once while the broker is reachable, spooled otherwise.

``admit()`` is asked by the runner before a job starts: whether its memory fits what is available
now, under the posture the governor is in.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from agent.codes import ErrorCode
from agent.config import Settings
from agent.engine.supervisor import Applied
from agent.engine.types import LoadReport
from agent.governor.policy import Action, Decision, Governor, Signals, available_to_agent, describe
from agent.jobs.admission import Admission, admit
from agent.mqtt.topics import Topics
from agent.telemetry.events import Event, decision_events, signals_missing_event, spool_dropped_event, throttling_event
from agent.telemetry.fields import Telemetry
from agent.telemetry.sampler import Sampler
from agent.telemetry.uplink import Uplink

log = logging.getLogger(__name__)

MiB = 1024 * 1024


class GovernorActions(Protocol):
    """What the governor can do to the agent's own work (the daemon wires the runner and supervisor)."""

    def hold_jobs(self, hold: bool) -> None: ...

    def preempt_jobs(self) -> list[str]: ...

    def unload_model(self) -> list[str]: ...

    def reload_model(self) -> bool: ...


@dataclass(frozen=True)
class JobNeed:
    """What a job needs, for admission: tokens (prompt + max_tokens) and the KV bytes per token of
    the model in force, the model's own anonymous working set, and the plan's budget."""

    tokens: int
    kv_bytes_per_token: int
    model_anon_bytes: int
    budget_bytes: int
    n_ctx: int

    @classmethod
    def of(cls, tokens: int, report: LoadReport) -> JobNeed:
        """The need of a job whose KV cache will hold ``tokens`` (its prompt measured with the loaded
        tokenizer, plus what it may generate, within one slot's context) under the loaded engine's
        plan (its ``LoadReport``)."""
        return cls(
            tokens=tokens,
            kv_bytes_per_token=report.estimate.kv_cache // max(1, report.n_ctx * report.slots),
            model_anon_bytes=report.estimate.anon_bytes - report.estimate.kv_cache,
            budget_bytes=report.budget.bytes,
            n_ctx=report.n_ctx,
        )


class MemoryWatch:
    def __init__(
        self,
        settings: Settings,
        *,
        sampler: Sampler,
        uplink: Uplink,
        topics: Topics,
        actions: GovernorActions,
        parked_need: Callable[[], tuple[int, int] | None] = lambda: None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """``settings`` is the settings tree in force (read at each tick: live changes apply).
        ``parked_need()``: while the model is unloaded for memory, the anonymous bytes and the weights
        (file pages) loading it again would need; None while it is loaded."""
        self._s = settings
        self.governor = Governor(settings.governor)
        self._sampler = sampler
        self._uplink = uplink
        self._topics = topics
        self._actions = actions
        self._parked_need = parked_need
        self._clock = clock
        self._mono = monotonic
        self.last: Telemetry | None = None
        self.last_decision: Decision | None = None
        self._last_sample = float("-inf")
        self._last_sent = float("-inf")
        self._told_missing = False

    @property
    def level(self) -> str:
        return self.governor.level.name

    def describe(self) -> dict[str, Any]:
        """The governor's part of the shadow's reported state."""
        return describe(self.last_decision) if self.last_decision else {"level": self.level, "action": None}

    def tick(self, *, force: bool = False) -> bool:
        """Main loop: a reading when one is due; returns whether one was taken."""
        mono = self._mono()
        s = self._s
        interval = min(s.governor.interval_s, s.telemetry.interval_s)
        if not force and mono - self._last_sample < interval:
            return False
        self._last_sample = mono
        now = self._clock()
        t = self._sampler.sample(now)
        self.governor.configure(s.governor)
        decision = self.governor.observe(self._signals(t), mono)
        self.last_decision = decision
        for step in decision.actions:
            self._carry_out(step.action)
        events: list[Event | None] = []
        if not self._told_missing:
            self._told_missing = True
            events.append(
                signals_missing_event(
                    self._sampler.unavailable, device_id=t.device_id, ts=now, level=decision.level.name
                )
            )
        events.extend(decision_events(decision, t, device_id=t.device_id, ts=now))
        events.append(throttling_event(self.last, t))
        dropped = self._uplink.spool.take_unreported_drops()
        events.append(spool_dropped_event(*dropped, device_id=t.device_id, ts=now, level=decision.level.name))
        for e in events:
            if e is not None:
                log.log(
                    logging.WARNING if e.kind.value in ("action", "level_changed") else logging.INFO,
                    "event %s: %s",
                    e.kind.value,
                    e.message,
                )
                self._uplink.send("event", self._topics.events, e.to_payload(), ts=now)
        self.last = t
        if mono - self._last_sent >= s.telemetry.interval_s:
            self._last_sent = mono
            self._uplink.send("reading", self._topics.telemetry, t.to_payload(), ts=now)
        return True

    def _signals(self, t: Telemetry) -> Signals:
        sig = Signals.from_reading(t)
        need = self._parked_need()
        if need is None:
            return sig
        # Unloaded for memory, the weights cannot be measured: what counts is how much of them would
        # stay in RAM if the model came back now. So the level stays up while the pressure lasts,
        # instead of falling because the signal vanished and reloading into the same pressure.
        anon, weights = need
        room = available_to_agent(t) - anon
        projected = 100.0 if weights <= 0 else max(0.0, min(100.0, 100.0 * room / weights))
        return replace(sig, weights_in_ram_pct=projected)

    def _carry_out(self, action: Action) -> None:
        a = self._actions
        if action is Action.preempt:
            a.hold_jobs(True)
            a.preempt_jobs()
        elif action is Action.resume_jobs:
            a.hold_jobs(False)
        elif action is Action.unload:
            a.unload_model()
        elif action is Action.reload:
            a.reload_model()
        # hold_unfit, shrink_context and their undoing change only the posture, which admit() reads.

    def parallel(self, slots: int) -> int:
        """Jobs that may run at once: the engine's ``slots``, as the governor's posture allows."""
        return self.governor.posture.parallel(slots)

    def admit_job(self, tokens: int, report: LoadReport | None) -> Admission:
        """``admit()`` for a job whose KV cache will hold ``tokens``, under the loaded engine's plan
        (None: unloaded, nothing to judge)."""
        if report is None:
            return Admission("run", "no plan to judge by")
        return self.admit(JobNeed.of(tokens, report))

    def admit(self, need: JobNeed) -> Admission:
        """May a job start now? ``run``, ``wait`` (it stays queued and is asked again), or ``reject``
        (it can never fit this board: REJECTED insufficient_memory)."""
        kv = need.tokens * need.kv_bytes_per_token
        if need.model_anon_bytes + kv > need.budget_bytes:
            return Admission(
                "reject",
                f"needs {(need.model_anon_bytes + kv) // MiB} MiB (model {need.model_anon_bytes // MiB} + KV "
                f"{kv // MiB} for {need.tokens} tokens), more than this board's memory budget "
                f"{need.budget_bytes // MiB} MiB; lower max_tokens or the prompt",
                ErrorCode.insufficient_memory,
            )
        t = self.last
        if t is None or not self._s.governor.enabled:
            return Admission("run", "no reading yet" if t is None else "the governor is off")
        held = (t.rss_anon_bytes or 0) + (t.rss_file_bytes or 0)
        # The model's memory is already held: what the job adds is its KV cache pages.
        return admit(
            kv_bytes=kv,
            model_bytes=held,
            tokens=need.tokens,
            available_bytes=available_to_agent(t),
            capacity_bytes=max(need.budget_bytes, held + kv),
            posture=self.governor.posture,
            settings=self._s.governor,
            n_ctx=need.n_ctx,
            mem_total=t.mem_total_bytes or 0,
        )


class AgentActions:
    """GovernorActions over the run gate and the model supervisor."""

    HOLD = "memory"

    def __init__(self, gate: Any, supervisor: Any) -> None:
        self._gate = gate
        self._supervisor = supervisor

    def hold_jobs(self, hold: bool) -> None:
        (self._gate.hold if hold else self._gate.release)(self.HOLD)

    def preempt_jobs(self) -> list[str]:
        return list(self._gate.preempt())

    def unload_model(self) -> list[str]:
        return list(self._supervisor.park())

    def reload_model(self) -> bool:

        return isinstance(self._supervisor.resume(), Applied)


__all__ = ["AgentActions", "GovernorActions", "JobNeed", "MemoryWatch"]
