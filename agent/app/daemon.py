"""The daemon: flags, the main pass, start and shutdown; ``agent.app.wiring`` builds the parts.

Threads (docs/architecture.md): the transport's network thread (intake, the shadow's messages), one runner
thread per slot, the engine's scheduler, and the main thread: signals (the handlers only set flags), the
watchdog, reloads, the shadow's reconcile, the store's health, resends, retention, telemetry, the governor.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.app.wiring import EngineFactory, Parts, build
from agent.config import Settings
from agent.config.live import INTAKE_PAUSED
from agent.engine.supervisor import EngineConfig, load_engine
from agent.errors import EXIT_CANNOT_START, EdgeAgentError
from agent.system.priority import apply_inference_priority, apply_process_priority
from agent.system.sdnotify import Notifier
from agent.system.swap import write_desired as write_desired_swap

log = logging.getLogger(__name__)
_STOPPING = "%s: stopping: no new jobs; running ones get up to %g s (service.shutdown_grace_s)"
_WAITING = ("waiting up to %g s (service.shutdown_grace_s) for %d running job(s) to finish: %s; then they are "
            "stopped and requeued (a second SIGTERM or SIGINT stops them now)")  # fmt: skip


class Daemon:
    def __init__(
        self,
        settings: Settings,
        *,
        engine_factory: EngineFactory = load_engine,
        config_path: Path | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        notifier: Notifier | None = None,
    ) -> None:
        """``settings`` are the board's own (file, environment, credentials); the device shadow's last
        accepted desired state is overlaid on them. ``clock`` is wall time (job timestamps, expiry);
        ``monotonic`` must be the engine's clock, on which job deadlines are handed to it."""
        self.config_path, self.clock, self.notifier = config_path, clock, notifier or Notifier()
        self.parts: Parts = build(
            settings,
            engine_factory=engine_factory,
            notifier=self.notifier,
            config_path=config_path,
            clock=clock,
            monotonic=monotonic,
        )
        self.settings = self.parts.settings  # in force (live: the parts read it)
        self._stop_requested = 0  # count of SIGTERM/SIGINT
        self._reload_requested = False
        self._last_prune = self._last_facts = 0.0

    # ----------------------------------------------------------------- life cycle

    def start(self) -> None:
        """Recover what a crash left, load the model, start the runner and the connection."""
        p = self.parts
        p.reporter.write_state("starting", force=True)
        # Before any other thread starts and before the engine counts usable cores (affinity).
        for line in apply_process_priority(self.settings.priority).lines():
            log.info("priority: %s", line)
        write_desired_swap(self.settings.swap, self.settings.device.state_dir)  # for the root swap unit
        for job_id, action in p.store.recover(self.clock()):
            log.warning("recovered job %s after an unclean stop: %s", job_id, action)
        p.fleet.start()  # fleet jobs the lease no longer covers are given back before the runner starts
        desired = EngineConfig.from_settings(self.settings)
        if p.supervisor.start(desired, fallback=EngineConfig.from_settings(p.file_settings)) is not desired:
            p.live.reset_reload_keys(p.file_settings)  # the desired model failed: the file's serves
        p.gate.set_hold(INTAKE_PAUSED, self.settings.intake.paused)
        p.shadow.start()
        with self.notifier.keepalive():
            p.shadow.run_pending()  # desired keys the boot settings left out, before any broker
        p.runner.start(on_thread_start=lambda: apply_inference_priority(self.settings.priority))
        p.start_connections()
        self.notifier.ready(f"serving {self.settings.model.path}")
        p.reporter.ready_at = self.clock()
        p.reporter.write_state("ready", force=True)

    def serve(self, *, passes: int | None = None, install_signals: bool = True) -> int:
        """Start, run the main loop until stopped (or for ``passes`` passes), shut down; returns the exit code."""
        p = self.parts
        if install_signals:
            self._install_signals()
        try:
            self.start()
        except EdgeAgentError as e:
            # Model missing or will not fit, store unusable, a bad setting: a restart fails the same way.
            e.exit_code = EXIT_CANNOT_START
            p.stop_connections()
            p.close_stores()
            raise
        try:
            n = 0
            while self._stop_requested == 0 and (passes is None or n < passes):
                if (fatal := p.transport.fatal) is not None:
                    raise fatal  # a broker that does not speak MQTT 5 (confirmed by a 3.1.1 probe): exit 78
                try:
                    self.main_pass()
                except Exception:  # a bug in one pass (a resend, a prune) must not end the service
                    log.exception("main loop error; carrying on")
                    p.tick.wait(1.0)  # do not spin if the same error repeats every pass
                n += 1
        finally:
            self.shutdown()
        return 0

    def main_pass(self, *, wait_s: float | None = None) -> None:
        """One pass: watchdog, reload, store health, resends, retention, telemetry. Waits for a tick first."""
        p, s = self.parts, self.settings
        interval = min(self.notifier.watchdog_interval_s or 5.0, s.telemetry.interval_s, s.governor.interval_s)
        if not p.health.writable:
            interval = min(interval, s.store.recheck_s)
        p.tick.wait(wait_s if wait_s is not None else interval)
        p.tick.clear()
        now = self.clock()
        self.notifier.watchdog()
        if self._reload_requested:
            self._reload_requested = False
            self.reload()
        p.ha.refresh()  # the model select's options, before the reconcile reports a model they lack
        if p.shadow.pending_work():
            with self.notifier.keepalive():
                p.shadow.run_pending()
        p.reporter.tell_model_change(now)
        p.reporter.tell_broker(now)
        p.reporter.heartbeat(now)
        if p.delivery.take_progress():
            p.shadow.refresh_facts()  # a model download's progress, at a bounded rate
        p.health.recheck()
        p.outbox.run_pass(should_stop=lambda: self._stop_requested > 0)
        p.uplink.poll()  # failed telemetry publishes go to the spool, before the outbox resends it
        level = p.memory.level
        if p.memory.tick() and p.memory.level != level:
            p.shadow.refresh_facts()  # the level in reported follows the governor at once
        if now - self._last_facts >= s.telemetry.interval_s:
            self._last_facts = now
            p.shadow.refresh_facts()  # free disk, swap devices, the cgroup limit
        p.reporter.write_state("ready")
        if p.health.writable and now - self._last_prune >= s.store.prune_interval_s:
            self._last_prune = now
            if removed := p.health.run(lambda: p.store.prune(now)):
                log.info("retention: removed %d finished jobs", removed)

    def request_stop(self) -> None:
        """What SIGTERM and SIGINT do: the first stops gracefully, a second forces running jobs to stop."""
        self._stop_requested += 1
        if self._stop_requested > 1:
            self.parts.runner.force_stop()
        self.parts.tick.set()

    def shutdown(self) -> None:
        """Take no more jobs, let running ones finish within the grace period (else requeue them),
        say goodbye to the broker, free the model, close the store."""
        p, grace, force = self.parts, self.settings.service.shutdown_grace_s, self._stop_requested > 1
        self.notifier.stopping()
        p.reporter.write_state("stopping", force=True)
        if jobs := p.gate.running:  # say what the stop waits for, before it waits
            if force:
                log.warning("stopping %d running job(s) now: %s; they are requeued", len(jobs), ", ".join(jobs))
            else:
                log.warning(_WAITING, grace, len(jobs), ", ".join(jobs))
        p.runner.stop(grace, force=force)
        p.stop_connections(goodbye=(p.topics.device_status, p.reporter.device_status("stopping")))
        p.delivery.stop()  # its partial file stays: the next start resumes it
        p.supervisor.unload()
        p.close_stores()
        p.reporter.write_state("stopped", force=True)
        log.info("stopped")

    def _install_signals(self) -> None:
        def on_stop(signum: int, _frame: Any) -> None:
            self.request_stop()
            # At once: the main loop may be busy (a model swap) before shutdown() says what it waits for.
            name = signal.Signals(signum).name
            if self._stop_requested == 1:
                log.info(_STOPPING, name, self.settings.service.shutdown_grace_s)
            else:
                log.warning("%s again: stopping the running jobs now; they are requeued", name)

        def on_hup(signum: int, _frame: Any) -> None:
            self._reload_requested = True
            self.parts.tick.set()

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_hup)

    def reload(self) -> None:
        """SIGHUP: re-read the configuration file and apply what may change while running."""
        with self.notifier.keepalive():
            self.parts.shadow.reload_file(self.config_path)
