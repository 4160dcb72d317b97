"""The daemon: builds the parts, runs the main loop, handles signals. Wiring only.

One job's path (docs/architecture.md): the transport's network thread hands a submit to the
intake, which stores it and only then acknowledges it; the runner claims it, runs it on the engine
the supervisor keeps loaded, and settles its outcome in the store; the outbox publishes the result
until the broker acknowledges it, and again after every reconnect and restart.

The device shadow's service takes its messages on the network thread and reconciles on the main
loop through the same live-settings path as SIGHUP.

Threads: the transport's network thread (inbound messages, acknowledgements), the runner's worker
thread, and the main thread, which handles signals (the handlers only set flags), the systemd
watchdog, configuration reloads, the shadow's reconcile, the store's health, resends, retention and
telemetry.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent import __version__
from agent.applier import LiveSettings
from agent.config import Settings, load_settings
from agent.config.live import ApplyReport
from agent.delivery.models import ModelDelivery
from agent.delivery.outbox import Outbox
from agent.delivery.sources import JobResults
from agent.engine.supervisor import EngineConfig, Supervisor
from agent.engine.types import EngineLike
from agent.errors import EXIT_CANNOT_START, EdgeAgentError, StoreError
from agent.health import StoreHealth
from agent.jobs.intake import Intake
from agent.jobs.runner import Runner
from agent.governor.policy import Admission
from agent.ha import DiscoveryPublisher
from agent.ops.state import DaemonState, StateWriter, from_daemon, state_path
from agent.governor.watch import AgentActions, JobNeed, MemoryWatch
from agent.protocol import DeviceStatus, Topics
from agent.shadow.facts import FactsReader, ServingModel, reported_facts
from agent.shadow.service import ShadowService, boot_settings, log_report
from agent.shadow.store import ShadowStore
from agent.store import JobRecord, JobStore
from agent.system.priority import apply_inference_priority, apply_process_priority
from agent.system.sdnotify import Notifier
from agent.system.swap import write_desired as write_desired_swap
from agent.telemetry.events import model_change_event
from agent.telemetry.sampler import AgentState, Sampler, engine_residency
from agent.telemetry.spool import TelemetrySpool
from agent.telemetry.uplink import Uplink
from agent.transport import InboundMessage, MqttTransport

log = logging.getLogger(__name__)


def default_engine_factory(config: EngineConfig) -> EngineLike:
    from agent.engine import Engine

    return Engine(config.model_file(), engine=config.engine, memory=config.memory,
                  allow_non_4bit=config.model.allow_non_4bit, state_dir=config.state_dir)  # fmt: skip


class Daemon:
    def __init__(
        self,
        settings: Settings,
        *,
        engine_factory: Callable[[EngineConfig], EngineLike] = default_engine_factory,
        config_path: Path | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        notifier: Notifier | None = None,
    ) -> None:
        """``settings`` are the board's own (file, environment, credentials); the device shadow's last
        accepted desired state is overlaid on them. ``clock`` is wall time (job timestamps, expiry);
        ``monotonic`` must be the engine's clock, on which job deadlines are handed to it."""
        self.file_settings = settings
        self.config_path = config_path
        self.clock = clock
        self.notifier = notifier or Notifier()
        self.topics = Topics(settings.mqtt.prefix, settings.device.id)
        try:
            settings.device.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create device.state_dir {settings.device.state_dir}: {e.strerror}") from None
        self.shadow_store = ShadowStore.from_settings(settings)
        # The settings in force: the file's, overlaid by desired, so a board that restarts without its
        # broker applies what it last accepted before it connects.
        self.settings = s = boot_settings(settings, self.shadow_store)
        self.store = JobStore.from_settings(s.store, clock=clock)
        self.results = JobResults(self.store, self.topics, clock=clock)
        self._tick = threading.Event()  # the main loop: something to do now
        self._stop_requested = 0  # count of SIGTERM/SIGINT
        self._reload_requested = False
        self.health = StoreHealth(
            self.store, recheck_s=lambda: s.store.recheck_s, min_free_bytes=lambda: s.store.min_free_kb * 1024,
            on_change=self._store_changed,
        )  # fmt: skip
        subs = [(self.topics.submit, 1), (self.topics.cancel_filter, 1)]
        if s.mqtt.fleet_group:
            subs.append((self.topics.fleet_submit(s.mqtt.fleet_group), 1))
        self.transport = MqttTransport(
            s.mqtt, will=(self.topics.device_status, self._device_status("offline")),
            on_message=self._on_message, on_connect=self._on_connect, subscriptions=subs,
        )  # fmt: skip
        self.outbox = Outbox(
            self.transport, on_store_error=self.health.failed, wake=self._tick.set, keepalive=self.notifier.watchdog
        )
        self.outbox.add_source(self.results)
        self.spool = TelemetrySpool.from_settings(s, clock=clock)
        self.outbox.add_source(self.spool)  # readings and events kept while offline, sent in order after
        self.runner = Runner(
            self.store, self.results, engine=lambda: self.supervisor.engine, publish=self.transport.publish,
            send_outcome=self._send_outcome, health=self.health, admit=self._admit, clock=clock, monotonic=monotonic,
            capacity=self._parallel,
        )  # fmt: skip
        self.supervisor = Supervisor(engine_factory, self.runner, grace_s=lambda: s.service.shutdown_grace_s,
                                     canary=lambda: s.canary)  # fmt: skip
        self.delivery = ModelDelivery(
            models_dir=s.device.models_dir, state_dir=s.device.state_dir, settings=lambda: s.download,
            protected=lambda: self.shadow.protected_models(), on_done=lambda: self.shadow.reconcile_soon(),
            on_progress=self._tick.set,
        )  # fmt: skip
        self.intake = Intake(
            self.store, self.topics, limits=lambda: s.engine, ack=self.transport.ack, publish=self.transport.publish,
            send_outcome=self._send_outcome, cancel_running=self.runner.cancel, job_queued=self.runner.wake,
            health=self.health, clock=clock,
        )  # fmt: skip
        self.live = LiveSettings(s, supervisor=self.supervisor, store=self.store, hold_intake=self._hold_intake,
                                 spool=self.spool, inference_threads=lambda: self.runner.thread_ids,
                                 delivery=self.delivery)  # fmt: skip
        self._facts = FactsReader(board=s.device.board, models_dir=s.device.models_dir)
        self.shadow = ShadowService(
            topics=self.topics, store=self.shadow_store, file_settings=settings, executor=self.live,
            publish=lambda t, p, q, r: self.transport.publish(t, p, qos=q, retain=r), ack=self.transport.ack,
            facts=self._reported_facts, clock=clock, wake=self._tick.set,
        )  # fmt: skip
        self.transport.add_subscriptions(self.shadow.subscriptions())
        self.uplink = Uplink(self.spool, lambda t, p: self.transport.publish(t, p, qos=1), lambda: self.transport.connected)
        sampler = Sampler(
            s.device.id, agent_state=self._agent_state, residency=lambda: engine_residency(self.supervisor.engine)(),
            residency_interval_s=s.telemetry.residency_interval_s, clock=clock,
        )  # fmt: skip
        self.memory = MemoryWatch(s, sampler=sampler, uplink=self.uplink, topics=self.topics,
                                  actions=AgentActions(self.runner, self.supervisor),
                                  parked_need=self.supervisor.parked_need, clock=clock)  # fmt: skip
        # What `edge-agent status` reads without a broker, and Home Assistant's entities (optional).
        self.state_file = StateWriter(state_path(s), heartbeat_s=min(30.0, s.telemetry.interval_s))
        self.ha = DiscoveryPublisher(s, self.transport.publish)
        self._started_at, self._ready_at = clock(), None
        self._last_prune = self._last_facts = 0.0
        self._told_change: Any = None
        self._state_file_told = False

    # ----------------------------------------------------------------- life cycle

    def start(self) -> None:
        """Recover what a crash left, load the model, start the runner and the connection."""
        self._write_state("starting", force=True)
        # Before any other thread starts and before the engine counts usable cores (affinity).
        for line in apply_process_priority(self.settings.priority).lines():
            log.info("priority: %s", line)
        write_desired_swap(self.settings.swap, self.settings.device.state_dir)  # for the root swap unit
        for job_id, action in self.store.recover(self.clock()):
            log.warning("recovered job %s after an unclean stop: %s", job_id, action)
        desired = EngineConfig.from_settings(self.settings)
        if self.supervisor.start(desired, fallback=EngineConfig.from_settings(self.file_settings)) is not desired:
            self.live.reset_reload_keys(self.file_settings)  # the desired model failed: the file's serves
        self._hold_intake(self.settings.intake.paused)
        self.shadow.start()
        with self.notifier.keepalive():
            self.shadow.run_pending()  # desired keys the boot settings left out, before any broker
        self.runner.start(on_thread_start=lambda: apply_inference_priority(self.settings.priority))
        self.transport.start()
        self.notifier.ready(f"serving {self.settings.model.path}")
        self._ready_at = self.clock()
        self._write_state("ready", force=True)

    def serve(self, *, passes: int | None = None, install_signals: bool = True) -> int:
        """Start, run the main loop until stopped (or for ``passes`` passes), shut down; returns the exit code."""
        if install_signals:
            self._install_signals()
        try:
            self.start()
        except EdgeAgentError as e:
            # Model missing or will not fit, store unusable, a bad setting: a restart fails the same way.
            e.exit_code = EXIT_CANNOT_START  # type: ignore[attr-defined]
            self.transport.stop()
            self.store.close()
            self.shadow_store.close()
            raise
        try:
            n = 0
            while self._stop_requested == 0 and (passes is None or n < passes):
                try:
                    self.main_pass()
                except Exception:  # a bug in one pass (a resend, a prune) must not end the service
                    log.exception("main loop error; carrying on")
                    self._tick.wait(1.0)  # do not spin if the same error repeats every pass
                n += 1
        finally:
            self.shutdown()
        return 0

    def main_pass(self, *, wait_s: float | None = None) -> None:
        """One pass: watchdog, reload, store health, resends, retention, telemetry. Waits for a tick first."""
        s = self.settings
        interval = min(self.notifier.watchdog_interval_s or 5.0, s.telemetry.interval_s, s.governor.interval_s)
        if not self.health.writable:
            interval = min(interval, s.store.recheck_s)
        self._tick.wait(wait_s if wait_s is not None else interval)
        self._tick.clear()
        now = self.clock()
        self.notifier.watchdog()
        if self._reload_requested:
            self._reload_requested = False
            self.reload()
        if self.shadow.pending_work():
            with self.notifier.keepalive():
                self.shadow.run_pending()
        self._tell_model_change(now)
        if self.delivery.take_progress():
            self.shadow.refresh_facts()  # a model download's progress, at a bounded rate
        self.health.recheck()
        self.outbox.run_pass(should_stop=lambda: self._stop_requested > 0)
        self.uplink.poll()  # failed telemetry publishes go to the spool, before the outbox resends it
        level = self.memory.level
        if self.memory.tick() and self.memory.level != level:
            self.shadow.refresh_facts()  # the level in reported follows the governor at once
        if now - self._last_facts >= s.telemetry.interval_s:
            self._last_facts = now
            self.shadow.refresh_facts()  # free disk, swap devices, the cgroup limit
        self._write_state("ready")
        if self.health.writable and now - self._last_prune >= s.store.prune_interval_s:
            self._last_prune = now
            try:
                removed = self.store.prune(now)
            except StoreError as e:
                self.health.failed(e)
            else:
                if removed:
                    log.info("retention: removed %d finished jobs", removed)

    def request_stop(self) -> None:
        """What SIGTERM and SIGINT do: the first stops gracefully, a second forces running jobs to stop."""
        self._stop_requested += 1
        if self._stop_requested > 1:
            self.runner.force_stop()
        self._tick.set()

    def shutdown(self) -> None:
        """Take no more jobs, let running ones finish within the grace period (else requeue them),
        say goodbye to the broker, free the model, close the store."""
        self.notifier.stopping()
        self._write_state("stopping", force=True)
        self.runner.stop(self.settings.service.shutdown_grace_s, force=self._stop_requested > 1)
        self.transport.stop(publish=(self.topics.device_status, self._device_status("stopping")))
        self.delivery.stop()  # its partial file stays: the next start resumes it
        self.supervisor.unload()
        self.store.close()
        self.shadow_store.close()
        self.spool.close()
        self._write_state("stopped", force=True)
        log.info("stopped")

    def _install_signals(self) -> None:
        def on_stop(signum: int, _frame: Any) -> None:
            self.request_stop()

        def on_hup(signum: int, _frame: Any) -> None:
            self._reload_requested = True
            self._tick.set()

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_hup)

    def reload(self) -> None:
        """SIGHUP: re-read the configuration file and apply what may change while running."""
        try:
            new = load_settings(self.config_path)
        except Exception as e:  # a bad edit must not take a running board down
            log.error("reload refused, keeping the running configuration: %s", e)
            return
        with self.notifier.keepalive():
            report = self.shadow.reload(new)  # desired keys still win over the file; logs what it applied
        log_report(ApplyReport(restart=report.restart), "reload")

    # ----------------------------------------------------------------- wiring callbacks

    def _on_message(self, msg: InboundMessage) -> None:
        if self.shadow.handles(msg.topic):
            self.shadow.on_message(msg)
        else:
            self.intake.on_message(msg)

    def _on_connect(self) -> None:
        self.transport.publish(self.topics.device_status, self._device_status("online"), qos=1, retain=True)
        self.shadow.on_connect()
        self.ha.on_connect()
        self.outbox.request_resend()
        self._tick.set()

    def _reported_facts(self) -> dict[str, Any]:
        cfg, engine = self.supervisor.config, self.supervisor.engine
        serving = None
        if cfg is not None and engine is not None and engine.report is not None:
            r = engine.report
            serving = ServingModel(
                file=str(cfg.model.path), sha256=self.supervisor.sha256, load_mode=r.mode, n_ctx=r.n_ctx,
                load_ms=r.load_ms, loaded_at=self.supervisor.loaded_at, swap_ms=self.supervisor.last_swap_ms,
                preempted=self.supervisor.last_swap_preempted,
            )  # fmt: skip
        change = self.supervisor.last_change
        facts = reported_facts(self._facts.board_facts(), serving, download=self.delivery.progress(),
                               model_change=change.as_dict() if change else None)  # fmt: skip
        return {**facts, "pressure": self.memory.describe()}

    def _write_state(self, state: DaemonState, *, force: bool = False) -> None:
        """The state file `edge-agent status` reads (main thread; written on change or heartbeat)."""
        doc, last = self.shadow.document, self.memory.last
        snap = from_daemon(
            self, state, started_at=self._started_at, ready_at=self._ready_at,
            telemetry=last.model_dump(mode="json") if last else None, memory_level=self.memory.level,
            memory_action=self.memory.describe().get("action"), shadow_version=doc.version,
            shadow_applied_version=doc.reported.get("applied_version"),
        )  # fmt: skip
        err, changed = self.state_file.update(snap, force=force)
        # Once per failure and once when it ends, not every pass; not at all while the job store
        # is unwritable: the same full or read-only disk, already told once (agent.health).
        if changed and err and self.health.writable:
            self._state_file_told = True
            log.warning("state file: %s", err)
        elif changed and not err and self._state_file_told:
            self._state_file_told = False
            if self.health.writable:  # else the store's own "writable again" says it
                log.info("state file: written again")

    def _tell_model_change(self, now: float) -> None:
        """Every model change that ended (the shadow, SIGHUP) is an event, rolled back or not."""
        change = self.supervisor.last_change
        if change is not None and change is not self._told_change:
            self._told_change = change
            event = model_change_event(change, device_id=self.topics.device_id, ts=now, level=self.memory.level)
            self.uplink.send("event", self.topics.events, event.to_payload(), ts=now)

    def _agent_state(self) -> AgentState:
        engine, running = self.supervisor.engine, self.runner.running
        report = engine.report if engine is not None else None
        spool = self.spool.stats()
        # The weights are a working set only in fit mode, and only when the plan expected them to fit.
        in_ram = report is not None and report.mode == "fit" and not any("do not all fit" in n for n in report.notes)
        return AgentState(
            model_loaded=engine is not None, kv_cache_bytes=report.estimate.kv_cache if report else None,
            weights_bytes=report.estimate.file_bytes if in_ram else None,
            rss_file_before_load=report.before.rss_file if report else None,
            kv_cache_size_tokens=report.n_ctx * report.slots if report else None,
            kv_cache_used_tokens=engine.kv_tokens() if engine is not None and hasattr(engine, "kv_tokens") else None,
            slots=report.slots if report else None, queue_depth=self.store.queued_count(),
            jobs_running=len(running), running_job=running[0] if running else None,
            last_job_tokens_per_s=self.runner.last_tokens_per_s, last_job_slot_wait_ms=self.runner.last_slot_wait_ms,
            governor_level=self.memory.level,
            governor_action=self.memory.describe().get("action"), store_writable=self.health.writable,
            spool_rows=spool.rows, spool_dropped=spool.dropped,
        )  # fmt: skip

    def _parallel(self) -> int:
        """Jobs that may run at once: the loaded engine's slots, as the governor's posture allows."""
        engine = self.supervisor.engine
        return self.memory.governor.posture.parallel(engine.slots if engine is not None else 1)

    def _admit(self, rec: JobRecord) -> Admission:
        engine = self.supervisor.engine
        job = rec.job()
        if engine is None or engine.report is None or job is None:
            return Admission("run", "no plan to judge by")
        r = engine.report
        text = job.prompt if job.prompt is not None else "".join(m.content for m in job.messages or ())
        # Prompt tokens are estimated from its bytes (3 per token is an upper bound for most text):
        # counting them exactly would need the tokenizer the running generation holds.
        return self.memory.admit(JobNeed(
            tokens=len(text.encode()) // 3 + 1 + job.max_tokens,
            kv_bytes_per_token=r.estimate.kv_cache // max(1, r.n_ctx * r.slots),
            model_anon_bytes=r.estimate.anon_bytes - r.estimate.kv_cache, budget_bytes=r.budget.bytes, n_ctx=r.n_ctx,
        ))  # fmt: skip

    def _send_outcome(self, rec: JobRecord) -> Any:
        return self.outbox.send(self.results, self.results.item(rec))

    def _hold_intake(self, paused: bool) -> None:
        if paused:
            self.runner.hold("intake.paused")
        else:
            self.runner.release("intake.paused")

    def _store_changed(self, writable: bool) -> None:
        if writable:
            self.intake.resume()
            self.runner.release("store")
            self.outbox.request_resend()
            self.transport.reconnect("the job store takes writes again: the broker delivers what was left unacknowledged")
        else:
            self.intake.pause()
            self.runner.hold("store")
        self.transport.publish(self.topics.device_status, self._device_status("online"), qos=1, retain=True)
        self._tick.set()

    def _device_status(self, state: str) -> bytes:
        online = state == "online"
        return DeviceStatus(
            state=state, device_id=self.settings.device.id, agent_version=__version__,
            model=str(self.settings.model.path) if online else None,
            store=("writable" if self.health.writable else "unwritable") if online else None, ts=self.clock(),
        ).to_payload()  # fmt: skip
