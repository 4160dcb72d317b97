"""The daemon: builds the parts, runs the main loop, handles signals. Wiring only.

One job's path through the parts is in docs/architecture.md. Threads: the transport's network thread
(inbound messages, acknowledgements; the intake and the shadow's messages run on it), one runner
thread per slot, the engine's scheduler thread, and the main thread: signals (the handlers only set
flags), the systemd watchdog, reloads, the shadow's reconcile, the store's health, resends,
retention, telemetry and the governor.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.applier import LiveSettings
from agent.config import Settings
from agent.delivery.models import ModelDelivery
from agent.delivery.outbox import Outbox
from agent.delivery.sources import JobResults
from agent.engine.supervisor import EngineConfig, Supervisor
from agent.engine.types import EngineLike
from agent.errors import EXIT_CANNOT_START, EdgeAgentError, StoreError
from agent.governor.watch import AgentActions, MemoryWatch
from agent.ha import DiscoveryPublisher
from agent.health import StoreHealth
from agent.jobs.gate import Gate
from agent.jobs.intake import Intake
from agent.jobs.runner import Runner
from agent.ops.reporter import Reporter, device_status
from agent.protocol import Topics
from agent.shadow.service import ShadowService, boot_settings
from agent.shadow.store import ShadowStore
from agent.store import JobRecord, JobStore
from agent.system.priority import apply_inference_priority, apply_process_priority
from agent.system.sdnotify import Notifier
from agent.system.swap import write_desired as write_desired_swap
from agent.telemetry.sampler import Sampler, engine_residency
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
        self._last_prune = self._last_facts = 0.0
        self.health = StoreHealth(
            self.store, recheck_s=lambda: s.store.recheck_s, min_free_bytes=lambda: s.store.min_free_kb * 1024,
            on_change=self._store_changed,
        )  # fmt: skip
        subs = [(self.topics.submit, 1), (self.topics.cancel_filter, 1)]
        if s.mqtt.fleet_group:
            subs.append((self.topics.fleet_submit(s.mqtt.fleet_group), 1))
        self.transport = MqttTransport(
            s.mqtt, will=(self.topics.device_status, device_status(s, "offline", store_writable=False, ts=clock())),
            on_message=self._on_message, on_connect=self._on_connect, subscriptions=subs,
        )  # fmt: skip
        self.outbox = Outbox(
            self.transport, on_store_error=self.health.failed, wake=self._tick.set, keepalive=self.notifier.watchdog
        )
        self.outbox.add_source(self.results)
        self.spool = TelemetrySpool.from_settings(s, clock=clock)
        self.outbox.add_source(self.spool)  # readings and events kept while offline, sent in order after
        self.gate = Gate()
        self.supervisor = Supervisor(engine_factory, self.gate, grace_s=lambda: s.service.shutdown_grace_s,
                                     canary=lambda: s.canary)  # fmt: skip
        self.runner = Runner(
            self.store, self.results, self.gate, engine=lambda: self.supervisor.engine, publish=self.transport.publish,
            send_outcome=self._send_outcome, health=self.health, clock=clock, monotonic=monotonic,
            admit=lambda tokens: self.memory.admit_job(tokens, self.supervisor.report),
            capacity=lambda: self.memory.parallel(self.supervisor.slots), governor=lambda: s.governor,
        )  # fmt: skip
        self.delivery = ModelDelivery(
            models_dir=s.device.models_dir, state_dir=s.device.state_dir, settings=lambda: s.download,
            protected=lambda: self.shadow.protected_models(), on_done=lambda: self.shadow.reconcile_soon(),
            on_progress=self._tick.set,
        )  # fmt: skip
        self.intake = Intake(
            self.store, self.topics, limits=lambda: s.engine, ack=self.transport.ack, publish=self.transport.publish,
            send_outcome=self._send_outcome, cancel_running=self.gate.cancel, job_queued=self.runner.wake,
            health=self.health, clock=clock,
        )  # fmt: skip
        self.live = LiveSettings(s, supervisor=self.supervisor, store=self.store, hold_intake=lambda on: self.gate.set_hold("intake.paused", on),
                                 spool=self.spool, inference_threads=lambda: self.runner.thread_ids,
                                 delivery=self.delivery)  # fmt: skip
        self.uplink = Uplink(
            self.spool, lambda t, p: self.transport.publish(t, p, qos=1), lambda: self.transport.connected
        )
        sampler = Sampler(
            s.device.id, agent_state=lambda: self.reporter.agent_state(), clock=clock,
            residency=lambda: engine_residency(self.supervisor.engine)(),
            residency_interval_s=s.telemetry.residency_interval_s,
        )  # fmt: skip
        self.memory = MemoryWatch(s, sampler=sampler, uplink=self.uplink, topics=self.topics,
                                  actions=AgentActions(self.gate, self.supervisor),
                                  parked_need=self.supervisor.parked_need, clock=clock)  # fmt: skip
        self.reporter = Reporter(s, config_path=config_path, topics=self.topics, parts=self,
                                 shadow_document=lambda: self.shadow.document, clock=clock)  # fmt: skip
        self.shadow = ShadowService(
            topics=self.topics, store=self.shadow_store, file_settings=settings, executor=self.live,
            publish=lambda t, p, q, r: self.transport.publish(t, p, qos=q, retain=r), ack=self.transport.ack,
            facts=self.reporter.reported_facts, clock=clock, wake=self._tick.set,
        )  # fmt: skip
        self.transport.add_subscriptions(self.shadow.subscriptions())
        self.ha = DiscoveryPublisher(s, self.transport.publish)  # Home Assistant's entities (optional)

    # ----------------------------------------------------------------- life cycle

    def start(self) -> None:
        """Recover what a crash left, load the model, start the runner and the connection."""
        self.reporter.write_state("starting", force=True)
        # Before any other thread starts and before the engine counts usable cores (affinity).
        for line in apply_process_priority(self.settings.priority).lines():
            log.info("priority: %s", line)
        write_desired_swap(self.settings.swap, self.settings.device.state_dir)  # for the root swap unit
        for job_id, action in self.store.recover(self.clock()):
            log.warning("recovered job %s after an unclean stop: %s", job_id, action)
        desired = EngineConfig.from_settings(self.settings)
        if self.supervisor.start(desired, fallback=EngineConfig.from_settings(self.file_settings)) is not desired:
            self.live.reset_reload_keys(self.file_settings)  # the desired model failed: the file's serves
        self.gate.set_hold("intake.paused", self.settings.intake.paused)
        self.shadow.start()
        with self.notifier.keepalive():
            self.shadow.run_pending()  # desired keys the boot settings left out, before any broker
        self.runner.start(on_thread_start=lambda: apply_inference_priority(self.settings.priority))
        self.transport.start()
        self.notifier.ready(f"serving {self.settings.model.path}")
        self.reporter.ready_at = self.clock()
        self.reporter.write_state("ready", force=True)

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
        self.ha.refresh()  # the model select's options, before the reconcile reports a model they lack
        if self.shadow.pending_work():
            with self.notifier.keepalive():
                self.shadow.run_pending()
        self.reporter.tell_model_change(now)
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
        self.reporter.write_state("ready")
        if self.health.writable and now - self._last_prune >= s.store.prune_interval_s:
            self._last_prune = now
            if removed := self.health.run(lambda: self.store.prune(now)):
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
        self.reporter.write_state("stopping", force=True)
        if running := self.gate.running:  # say what the stop waits for, before it waits
            if self._stop_requested > 1:
                log.warning("stopping %d running job(s) now: %s; they are requeued", len(running), ", ".join(running))
            else:
                log.warning("waiting up to %g s (service.shutdown_grace_s) for %d running job(s) to finish: %s; "
                            "then they are stopped and requeued (a second SIGTERM or SIGINT stops them now)",
                            self.settings.service.shutdown_grace_s, len(running), ", ".join(running))  # fmt: skip
        self.runner.stop(self.settings.service.shutdown_grace_s, force=self._stop_requested > 1)
        self.transport.stop(publish=(self.topics.device_status, self.reporter.device_status("stopping")))
        self.delivery.stop()  # its partial file stays: the next start resumes it
        self.supervisor.unload()
        self.store.close()
        self.shadow_store.close()
        self.spool.close()
        self.reporter.write_state("stopped", force=True)
        log.info("stopped")

    def _install_signals(self) -> None:
        def on_stop(signum: int, _frame: Any) -> None:
            self.request_stop()
            # At once: the main loop may be busy (a model swap) before shutdown() says what it waits for.
            name = signal.Signals(signum).name
            if self._stop_requested == 1:
                log.info("%s: stopping: no new jobs; running ones get up to %g s (service.shutdown_grace_s)", name,
                         self.settings.service.shutdown_grace_s)  # fmt: skip
            else:
                log.warning("%s again: stopping the running jobs now; they are requeued", name)

        def on_hup(signum: int, _frame: Any) -> None:
            self._reload_requested = True
            self._tick.set()

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_hup)

    def reload(self) -> None:
        """SIGHUP: re-read the configuration file and apply what may change while running."""
        with self.notifier.keepalive():
            self.shadow.reload_file(self.config_path)

    # ----------------------------------------------------------------- wiring callbacks

    def _on_message(self, msg: InboundMessage) -> None:
        if self.shadow.handles(msg.topic):
            self.shadow.on_message(msg)
        else:
            self.intake.on_message(msg)

    def _on_connect(self) -> None:
        self.transport.publish(self.topics.device_status, self.reporter.device_status("online"), qos=1, retain=True)
        self.ha.on_connect()  # before the shadow document: Home Assistant checks its model against the options
        self.shadow.on_connect()
        self.outbox.request_resend()
        self._tick.set()

    def _send_outcome(self, rec: JobRecord) -> Any:
        return self.outbox.send(self.results, self.results.item(rec))

    def _store_changed(self, writable: bool) -> None:
        if writable:
            self.intake.resume()
            self.gate.release("store")
            self.outbox.request_resend()
            self.transport.reconnect(
                "the job store takes writes again: the broker delivers what was left unacknowledged"
            )
        else:
            self.intake.pause()
            self.gate.hold("store")
        self.transport.publish(self.topics.device_status, self.reporter.device_status("online"), qos=1, retain=True)
        self._tick.set()
