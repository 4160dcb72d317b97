"""The one diff-and-apply path for settings that change while the daemon runs.

SIGHUP (a re-read config file) and the device shadow both hand ``LiveSettings.apply`` the settings
tree they want in force. It diffs that tree against the one in force (``agent.config.live``), and
applies what the fields declare live: HOT keys in place (limits, priorities, intervals, paused
intake), RELOAD keys through the model supervisor as one model change, which rolls back if the new
model does not load. Everything else is reported as needing a restart. The report says, per key,
what happened; the settings object in force only ever holds values that really are in force.

Order within one pass: pausing intake first (no job starts during the rest), then the other HOT
keys, then the model change, then resuming intake last.

A model change whose file has a source (model.url) goes through the model delivery first: while
the file downloads (on its own thread), the RELOAD keys are reported pending and nothing else
happens; once it is there the change goes to the supervisor; a failed download fails the keys.
After a model change that took, the delivery removes downloaded models beyond model.keep_previous.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence

from agent.config import Settings
from agent.config.live import INTAKE_PAUSED, ApplyReport, Change, diff
from agent.engine.supervisor import Applied, EngineConfig, Supervisor
from agent.errors import ModelError
from agent.jobs.store import JobStore
from agent.models.library import ModelDelivery
from agent.system.priority import apply_inference_priority, apply_process_priority, process_threads
from agent.system.swap import write_desired as write_desired_swap
from agent.telemetry.spool import TelemetrySpool

log = logging.getLogger(__name__)

# Swap needs root: the daemon writes what it wants and the root unit applies it (docs/governor.md).
# What priority setting each result of agent.system.priority is about.
_PRIORITY_KEYS = {"nice": "priority.nice", "inference_nice": "priority.inference_nice", "io": "priority.io_class",
                  "oom_score_adj": "priority.oom_score_adj", "cpus": "priority.cpus"}  # fmt: skip
SWAP_NOTE = "handed to the root swap unit (edge-agent swap apply); `edge-agent swap status` shows what is in force"


class LiveSettings:
    def __init__(
        self,
        settings: Settings,
        *,
        supervisor: Supervisor,
        store: JobStore,
        hold_intake: Callable[[bool], None],
        spool: TelemetrySpool | None = None,
        inference_threads: Callable[[], list[int]] = lambda: [],
        delivery: ModelDelivery | None = None,
    ) -> None:
        """``settings`` is the tree in force, updated in place; ``hold_intake(True)`` stops new job
        starts (intake.paused), ``hold_intake(False)`` resumes them; ``delivery`` fetches model
        files that desired names with a model.url (None: such a change fails)."""
        self.settings = settings
        self._supervisor = supervisor
        self._store = store
        self._hold_intake = hold_intake
        self._spool = spool
        self._inference_threads = inference_threads
        self._delivery = delivery

    def apply(self, target: Settings, keys: Collection[str] | None = None) -> ApplyReport:
        """Bring the settings in force to ``target`` (only ``keys``, when given: dotted names)."""
        changes = [c for c in diff(self.settings, target) if keys is None or c.key in keys]
        report = ApplyReport()
        report.restart = [c.key for c in changes if c.kind is None]
        hot = [c for c in changes if c.kind == "hot"]
        pause = [c for c in hot if c.key == INTAKE_PAUSED and c.new]
        resume = [c for c in hot if c.key == INTAKE_PAUSED and not c.new]
        others = [c for c in hot if c.key != INTAKE_PAUSED]
        self._apply_hot(pause, report)
        self._apply_hot(others, report)
        self._apply_reload([c for c in changes if c.kind == "reload"], report)
        self._apply_hot(resume, report)
        return report

    def set_trusted_keys(self, keys: Sequence[str]) -> None:
        """The config file's model.trusted_keys, re-read on SIGHUP: in force at once, so the next model
        load (agent.engine.supervisor checks the signature) is judged with the keys the shadow uses."""
        self.settings.model.trusted_keys = list(keys)

    def reset_reload_keys(self, source: Settings) -> None:
        """Take every RELOAD key from ``source`` without applying anything (the daemon falls back
        to the config file's model when the desired one does not load at start)."""
        for c in diff(self.settings, source):
            if c.kind == "reload":
                _set(self.settings, c.key, c.new)

    # ------------------------------------------------------------------ hot keys

    def _apply_hot(self, changes: list[Change], report: ApplyReport) -> None:
        if not changes:
            return
        for c in changes:
            _set(self.settings, c.key, c.new)
            if c.key.startswith("swap."):
                report.pending[c.key] = SWAP_NOTE
            else:
                report.applied[c.key] = c.new
        sections = {c.key.split(".", 1)[0] for c in changes}
        s = self.settings
        if "store" in sections:
            self._store.configure(s.store)
        if "engine" in sections:
            self._supervisor.set_limits(s.engine)
        if "intake" in sections:
            self._hold_intake(s.intake.paused)
        if "priority" in sections:
            results = apply_process_priority(s.priority, tids=process_threads()).results
            results += apply_inference_priority(s.priority, tids=self._inference_threads()).results
            for a in results:
                key = _PRIORITY_KEYS[a.setting]
                if not a.ok and key in report.applied:
                    report.failed[key] = a.line()
                    del report.applied[key]
                log.info("priority: %s", a.line())
        if "swap" in sections:
            write_desired_swap(s.swap, s.device.state_dir)
        if "telemetry" in sections and self._spool is not None:
            self._spool.configure(
                max_rows=s.telemetry.spool_max_rows, max_bytes=int(s.telemetry.spool_max_mb * 1024 * 1024)
            )

    # ------------------------------------------------------------------ model reload

    def _apply_reload(self, changes: list[Change], report: ApplyReport) -> None:
        if not changes:
            return
        candidate = self.settings.model_copy(deep=True)
        for c in changes:
            _set(candidate, c.key, c.new)
        blocked = self._deliver(candidate)
        if blocked is not None:
            kind, why = blocked
            for c in changes:
                (report.pending if kind == "pending" else report.failed)[c.key] = why
            return
        outcome = self._supervisor.apply(EngineConfig.from_settings(candidate))
        if isinstance(outcome, Applied):
            for c in changes:
                _set(self.settings, c.key, c.new)
                report.applied[c.key] = c.new
            if self._delivery is not None and outcome.report is not None:
                self._delivery.after_change(candidate.model_file(), self.settings.model.keep_previous)
        else:
            for c in changes:
                report.failed[c.key] = outcome.message

    def _deliver(self, candidate: Settings) -> tuple[str, str] | None:
        """Whether the candidate's model file is there to load: None (go ahead), or ("pending" |
        "failed", why) while it downloads or when its download failed."""
        m = candidate.model
        if m.url is None:
            if self._delivery is not None:
                self._delivery.cancel()
            return None
        if self._delivery is None:
            return "failed", "model.url is set but this daemon has no model delivery"
        try:
            path = candidate.model_file()
        except ModelError as e:
            if e.code != "model_not_found":
                return "failed", str(e)
            path = (candidate.device.models_dir / m.path).resolve()
        try:
            in_use = self.settings.model_file()
        except ModelError:
            in_use = None
        if path == in_use:
            if self.settings.model.sha256 in (None, m.sha256):
                return None  # the file in force: the supervisor checks its sha256 if it must reload
            return "failed", (
                f"download_refused: {path.name} is the model in force with another sha256; give the new "
                "model another file name"
            )
        sha = m.sha256 or ""  # model.url requires model.sha256 (settings validation)
        status = self._delivery.ensure(path, url=m.url, sha256=sha, size=m.size)
        if status.state == "ready":
            return None
        return ("pending" if status.state == "fetching" else "failed"), status.message


def _set(settings: Settings, key: str, value: object) -> None:
    *path, name = key.split(".")
    node: object = settings  # Settings, then the section the dotted key names
    for part in path:
        node = getattr(node, part)
    setattr(node, name, value)


__all__ = ["LiveSettings"]
