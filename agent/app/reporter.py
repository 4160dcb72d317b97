"""What the daemon says about itself, read from its parts and never changing them.

- ``agent_state()``: the agent's side of each telemetry reading (model, KV cache, slots, queue, spool);
- ``reported_facts()``: the device shadow's reported facts (board, the model serving and its sha256,
  computed in the background when model.sha256 does not give it, a download's progress, the last
  model change, the governor);
- ``device_status(state)``: the retained ``edge/{device}/status`` payload;
- ``write_state(state)``: the state file `edge-agent status` reads without a broker;
- ``tell_model_change(now)``: an event for every model change that ended.

The daemon's main thread calls all but ``agent_state`` (the sampler, on the main thread too) and
``reported_facts`` (the shadow service).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent import __version__
from agent.app.state import DaemonState, StateWriter, from_daemon, state_path
from agent.config import Settings
from agent.engine.supervisor import EngineConfig, Supervisor
from agent.errors import EdgeAgentError
from agent.governor.watch import MemoryWatch
from agent.jobs.fleet import FleetShare
from agent.jobs.gate import Gate
from agent.jobs.health import StoreHealth
from agent.jobs.protocol import DeviceStatus, FleetLoad
from agent.jobs.runner import Runner
from agent.jobs.store import JobStore
from agent.models.library import ModelDelivery
from agent.mqtt.grants import GrantProblem, broker_report
from agent.mqtt.topics import Topics
from agent.mqtt.transport import MqttTransport
from agent.shadow.facts import FactsReader, ServingModel, reported_facts
from agent.shadow.hashes import CACHE_FILE, FileHashes, Identity, identity
from agent.shadow.service import ShadowService
from agent.telemetry.events import Event, EventKind, model_change_event
from agent.telemetry.sampler import AgentState
from agent.telemetry.spool import TelemetrySpool
from agent.telemetry.uplink import Uplink

log = logging.getLogger(__name__)

_SESSION_LOST_FIX = (
    "keep sessions across broker restarts (Mosquitto: persistence true; ejabberd keeps them in RAM only), and have "
    "submitters resend jobs that get no QUEUED (edge-agent submit --wait does)"
)


def device_status(
    settings: Settings, state: str, *, store_writable: bool, ts: float, fleet: FleetLoad | None = None
) -> bytes:
    """The retained device status; only ``online`` names the model, the store's state and the fleet load."""
    online = state == "online"
    heartbeat_s = settings.mqtt.heartbeat_s
    return DeviceStatus(
        state=state,
        device_id=settings.device.id,
        agent_version=__version__,
        model=str(settings.model.path) if online else None,
        store=("writable" if store_writable else "unwritable") if online else None,
        heartbeat_s=heartbeat_s if online else None,
        expires=ts + 3 * heartbeat_s if online else None,
        fleet=fleet if online else None,
        ts=ts,
    ).to_payload()


@dataclass(frozen=True)
class ReporterParts:
    """The parts the reporter reads (never changes)."""

    supervisor: Supervisor
    runner: Runner
    gate: Gate
    store: JobStore
    health: StoreHealth
    transport: MqttTransport
    spool: TelemetrySpool
    memory: MemoryWatch
    delivery: ModelDelivery
    uplink: Uplink
    fleet: FleetShare


class Reporter:
    def __init__(
        self,
        settings: Settings,
        *,
        config_path: Path | None,
        topics: Topics,
        parts: ReporterParts,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``settings`` is the tree in force. The shadow, built from this reporter's facts, is followed
        once it exists (``follow_shadow``)."""
        self.settings, self.config_path, self.topics, self._parts = settings, config_path, topics, parts
        self.supervisor, self.runner, self.gate = parts.supervisor, parts.runner, parts.gate
        self.store, self.health, self.transport = parts.store, parts.health, parts.transport
        self._shadow: ShadowService | None = None
        self._clock = clock
        self._facts = FactsReader(board=settings.device.board, models_dir=settings.device.models_dir)
        # The model's sha256 when model.sha256 does not give it; once known, the shadow republishes.
        self.hashes = FileHashes(cache_file=Path(settings.device.state_dir) / CACHE_FILE, on_ready=self._hash_ready)
        self._loaded_file: tuple[float | None, Identity | None] = (None, None)  # (loaded_at, the file loaded)
        self.state_file = StateWriter(state_path(settings), heartbeat_s=min(30.0, settings.telemetry.interval_s))
        self.started_at: float = clock()
        self.ready_at: float | None = None
        self._told_change: Any = None
        self._losses: list[str] = []  # the latest session the broker lost, for the reported facts
        self._status_at = 0.0  # when the retained status was last published
        # The job connection is up but "online" waits (for the control and fleet connections' subscriptions):
        # the status is not published meanwhile, not even by the heartbeat. Guarded by _status_lock.
        self._status_lock = threading.Lock()
        self._status_waits = False
        self._links_ready: Callable[[], bool] = lambda: True  # wait_for_links
        self._state_file_told = False

    def follow_shadow(self, shadow: ShadowService) -> None:
        """The device shadow: its document's version goes into the state file, a computed sha256 into its facts."""
        self._shadow = shadow

    def _hash_ready(self) -> None:
        if self._shadow is not None:
            self._shadow.refresh_facts_soon()

    def device_status(self, state: str) -> bytes:
        return device_status(self.settings, state, store_writable=self.health.writable, ts=self._clock())

    def publish_status(self) -> None:
        """The retained device status (online, or how the store is), now: at each connect, on a store change,
        and every mqtt.heartbeat_s (``heartbeat``), so that its expiry keeps moving while the board lives.
        Nothing while "online" waits for the board's other connections (``status_after_connect``)."""
        with self._status_lock:
            if self._status_waits:
                return
        self._publish_status()

    def _publish_status(self) -> None:
        now = self._clock()
        self._status_at = now
        load = self._parts.fleet.load()
        self.transport.publish(
            self.topics.device_status,
            device_status(self.settings, "online", store_writable=self.health.writable, ts=now, fleet=load),
            qos=1,
            retain=True,
        )

    def wait_for_links(self, ready: Callable[[], bool]) -> None:
        """What "online" waits for besides the job connection: ``ready()`` is true once the board's other
        connections (control, fleet) have their subscriptions in place or have failed."""
        self._links_ready = ready

    def status_after_connect(self) -> bool:
        """The job connection is up: publish "online" now when the other connections are ready, else hold
        it until ``status_ready()``. True when it was published. Readiness is read under the lock that
        ``status_ready`` takes, so a connection that becomes ready meanwhile is never missed."""
        with self._status_lock:
            self._status_waits = not self._links_ready()
            if self._status_waits:
                return False
        self._publish_status()
        return True

    def status_ready(self) -> bool:
        """One of the other connections is subscribed, or it failed: publish the held "online" if the job
        connection is up and every other connection is ready too. True when it was published."""
        with self._status_lock:
            if not (self._status_waits and self.transport.connected and self._links_ready()):
                return False
            self._status_waits = False
        self._publish_status()
        return True

    @property
    def status_waits(self) -> bool:
        """The job connection is up and "online" waits for the board's other connections."""
        return self._status_waits

    def heartbeat(self, now: float) -> None:
        """The status again when mqtt.heartbeat_s passed since the last one (main loop); never the first one
        (the connect publishes it) nor one that waits for the board's other connections."""
        if self._status_at and self.transport.connected and now - self._status_at >= self.settings.mqtt.heartbeat_s:
            self.publish_status()

    def reported_facts(self) -> dict[str, Any]:
        sup, p = self.supervisor, self._parts
        cfg, engine = sup.config, sup.engine
        serving = None
        if cfg is not None and engine is not None and engine.report is not None:
            r = engine.report
            sha256, pending = (sup.sha256, False) if sup.sha256 is not None else self._model_sha256(cfg, sup.loaded_at)
            serving = ServingModel(
                file=str(cfg.model.path),
                sha256=sha256,
                sha256_pending=pending,
                load_mode=r.mode,
                n_ctx=r.n_ctx,
                load_ms=r.load_ms,
                loaded_at=sup.loaded_at,
                swap_ms=sup.last_swap_ms,
                preempted=sup.last_swap_preempted,
            )
        change = sup.last_change
        facts = reported_facts(
            self._facts.board_facts(),
            serving,
            download=p.delivery.progress(),
            model_change=change.as_dict() if change else None,
        )
        out = {**facts, "pressure": p.memory.describe()}
        if (grants := self.transport.grants) is not None:
            extra = [GrantProblem("session_lost", "warning", lost, _SESSION_LOST_FIX) for lost in self._losses[-1:]]
            report = broker_report(grants, self.settings.mqtt, self.transport.broker, extra)
            out["broker"] = report.model_dump(mode="json")
        return out

    def tell_broker(self, now: float) -> None:
        """A session the broker should have resumed but started anew is an event (the transport logged it)."""
        for lost in self.transport.take_session_losses():
            self._losses = [lost]
            event = Event(
                device_id=self.topics.device_id,
                ts=datetime.fromtimestamp(now, tz=UTC),
                kind=EventKind.session_lost,
                message=lost,
                details={"broker": self.transport.broker, "fix": _SESSION_LOST_FIX},
            )
            self._parts.uplink.send("event", self.topics.events, event.to_payload(), ts=now)
            if self._shadow is not None:
                self._shadow.refresh_facts_soon()

    def _model_sha256(self, cfg: EngineConfig, loaded_at: float | None) -> tuple[str | None, bool]:
        """(sha256, still computing) of the model file in force, from the background hashing. The file
        is the one found at the first reading after each load: one replaced since (same path, another
        file) is not the one that runs, so it is not reported."""
        try:
            path = cfg.model_file()
            now = identity(path)
        except (EdgeAgentError, OSError, ValueError):
            return None, False
        if self._loaded_file[0] != loaded_at or self._loaded_file[1] is None:
            self._loaded_file = (loaded_at, now)
        if now != self._loaded_file[1]:
            return None, False
        return self.hashes.get(path)

    def agent_state(self) -> AgentState:
        p = self._parts
        engine, running = self.supervisor.engine, self.gate.running
        report = engine.report if engine is not None else None
        spool = p.spool.stats()
        # The weights are a working set only in fit mode, and only when the plan expected them to fit.
        in_ram = report is not None and report.mode == "fit" and not any("do not all fit" in n for n in report.notes)
        return AgentState(
            model_loaded=engine is not None,
            kv_cache_bytes=report.estimate.kv_cache if report else None,
            weights_bytes=report.estimate.file_bytes if report is not None and in_ram else None,
            rss_file_before_load=report.before.rss_file if report else None,
            kv_cache_size_tokens=report.n_ctx * report.slots if report else None,
            kv_cache_used_tokens=engine.kv_tokens() if engine is not None and hasattr(engine, "kv_tokens") else None,
            slots=report.slots if report else None,
            queue_depth=self.store.queued_count(),
            jobs_running=len(running),
            running_job=running[0] if running else None,
            last_job_tokens_per_s=self.runner.last_tokens_per_s,
            last_job_slot_wait_ms=self.runner.last_slot_wait_ms,
            governor_level=p.memory.level,
            governor_action=p.memory.describe().get("action"),
            store_writable=self.health.writable,
            spool_rows=spool.rows,
            spool_dropped=spool.dropped,
        )

    def write_state(self, state: DaemonState, *, force: bool = False) -> None:
        """The state file (written on change or heartbeat)."""
        memory = self._parts.memory
        doc = self._shadow.document if self._shadow is not None else None
        snap = from_daemon(
            self,
            state,
            started_at=self.started_at,
            ready_at=self.ready_at,
            telemetry=memory.last.model_dump(mode="json") if memory.last else None,
            memory_level=memory.level,
            memory_action=memory.describe().get("action"),
            shadow_version=doc.version if doc else None,
            shadow_applied_version=doc.reported.get("applied_version") if doc else None,
        )
        err, changed = self.state_file.update(snap, force=force)
        # Once per failure and once when it ends, not every pass; not at all while the job store
        # is unwritable: the same full or read-only disk, already told once (agent.jobs.health).
        if changed and err and self.health.writable:
            self._state_file_told = True
            log.warning("state file: %s", err)
        elif changed and not err and self._state_file_told:
            self._state_file_told = False
            if self.health.writable:  # else the store's own "writable again" says it
                log.info("state file: written again")

    def tell_model_change(self, now: float) -> None:
        """Every model change that ended (the shadow, SIGHUP) is an event, rolled back or not."""
        change = self.supervisor.last_change
        if change is not None and change is not self._told_change:
            self._told_change = change
            memory = self._parts.memory
            event = model_change_event(change, device_id=self.topics.device_id, ts=now, level=memory.level)
            self._parts.uplink.send("event", self.topics.events, event.to_payload(), ts=now)
