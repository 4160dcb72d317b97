"""The daemon's state file: what `edge-agent status` shows without a broker.

Owns ``StateSnapshot`` (the schema: a pydantic model), ``write_state`` (atomic: a temporary file
renamed over ``{device.state_dir}/state.json``), ``StateWriter`` (writes when something changed, or
once per heartbeat, so an idle board does not wear its SD card) and ``read_state``.

The daemon writes it from its main loop: at start (``starting``), once the model is loaded
(``ready``), on every main pass (only written when it changed or a heartbeat passed), and at shutdown
(``stopping``, then ``stopped``). A reader judges liveness from the pid (with its start time, so a
reused pid is not mistaken for the daemon) and from the heartbeat: a file not rewritten for three
heartbeats belongs to a daemon that is hung or was killed.

No fsync: the file is advisory and rewritten at every start; losing the last write to a power cut
costs nothing, while an fsync per write would cost flash wear.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypedDict, Unpack

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent import __version__
from agent.config import Settings
from agent.config.live import INTAKE_PAUSED
from agent.engine.types import LoadReport
from agent.system.files import atomic_write

if TYPE_CHECKING:
    # agent.app.reporter imports this module: a run-time import would be a cycle.
    from agent.app.reporter import Reporter

STATE_FILE_NAME = "state.json"
SCHEMA = 1

DaemonState = Literal["starting", "ready", "stopping", "stopped"]


class _Part(BaseModel):
    # Readers ignore fields they do not know: a newer daemon's file stays readable by an older CLI.
    model_config = ConfigDict(extra="ignore")


class ModelState(_Part):
    path: str = Field(description="Model file, relative to device.models_dir.")
    mode: Literal["fit", "fast"] = Field(description="How the weights are held.")
    n_ctx: int = Field(ge=1, description="Context in force, tokens.")
    n_threads: int | None = Field(default=None, ge=1, description="Generation threads.")
    slots: int = Field(
        default=1, ge=1, description="Jobs decoded together: the loaded plan's slots (engine.max_parallel)."
    )
    load_ms: float | None = Field(default=None, ge=0, description="How long the load took, ms.")
    loaded_at: float | None = Field(default=None, description="When it was loaded, epoch seconds.")
    anon_estimate_bytes: int | None = Field(default=None, ge=0, description="The plan's anonymous memory, bytes.")
    budget_bytes: int | None = Field(default=None, ge=0, description="The memory budget it was planned against, bytes.")


class StateSnapshot(_Part):
    """{device.state_dir}/state.json, written by the daemon."""

    schema_version: int = Field(default=SCHEMA, description="Layout of this file.")
    pid: int = Field(ge=1, description="The daemon's process id.")
    pid_start: int | None = Field(
        default=None,
        description="The process's start time (/proc/PID/stat field 22, clock ticks after boot): "
        "tells the daemon from a later process that got the same pid.",
    )
    agent_version: str = Field(default=__version__, description="edge-agent version.")
    device_id: str = Field(description="This device.")
    config_path: str | None = Field(default=None, description="The config file it runs with.")
    state: DaemonState = Field(description="starting (loading), ready (serving), stopping, stopped.")
    started_at: float = Field(description="Process start, epoch seconds.")
    ready_at: float | None = Field(
        default=None, description="When it became ready (READY=1 to systemd), epoch seconds."
    )
    updated_at: float = Field(description="When this file was written, epoch seconds.")
    heartbeat_s: float = Field(default=30.0, gt=0, description="The daemon rewrites the file at least this often.")
    model: ModelState | None = Field(default=None, description="The model in force; null while none is loaded.")
    queued: int | None = Field(default=None, ge=0, description="Jobs QUEUED.")
    running: list[str] = Field(default_factory=list, description="Jobs IN_PROGRESS now.")
    intake_paused: bool = Field(default=False, description="intake.paused is in force (no new job starts).")
    store_writable: bool = Field(default=True, description="The job store takes writes.")
    broker_connected: bool = Field(default=False, description="Connected to the MQTT broker.")
    memory_level: str | None = Field(
        default=None, description="Memory governor level (ok, warn, critical); null without a governor."
    )
    memory_action: str | None = Field(default=None, description="The governor's strongest action in force, if any.")
    telemetry: dict[str, Any] | None = Field(default=None, description="The last telemetry reading, as published.")
    shadow_version: int | None = Field(
        default=None, description="The device shadow's version (accepted desired updates)."
    )
    shadow_applied_version: int | None = Field(default=None, description="The shadow version last fully applied.")


def state_path(settings: Settings) -> Path:
    return Path(settings.device.state_dir) / STATE_FILE_NAME


def process_start_ticks(pid: int | str = "self") -> int | None:
    """Field 22 of /proc/PID/stat (after the parenthesised command, which may hold spaces)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        return int(text[text.rindex(")") + 2 :].split()[19])
    except (ValueError, IndexError):
        return None


def write_state(path: Path, snapshot: StateSnapshot) -> None:
    """Replace ``path`` with ``snapshot`` atomically (readers see the old or the new file, never half)."""
    # Not durable: it is rewritten every few seconds and only describes the running daemon.
    atomic_write(Path(path), snapshot.model_dump_json(indent=1).encode() + b"\n", mode=0o640, durable=False)


def read_state(path: Path) -> tuple[StateSnapshot | None, str | None]:
    """(snapshot, None), or (None, why): no file (the daemon never ran here), unreadable or invalid."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        return None, f"no state file {path}: the daemon has not run with this state folder"
    except OSError as e:
        return None, f"cannot read {path}: {e.strerror} (run as root or the edge-agent user)"
    try:
        return StateSnapshot.model_validate(json.loads(raw)), None
    except (ValueError, ValidationError) as e:
        return None, f"{path} is not a valid state file: {str(e).splitlines()[0]}"


class StateWriter:
    """Writes snapshots for the daemon's main loop: when anything but ``updated_at`` changed, or when
    ``heartbeat_s`` passed since the last write. Errors (a full disk) are returned, not raised: the
    state file must never take the daemon down."""

    RETRY_S = 5.0  # after a failed write (a full disk), the next try at the earliest

    def __init__(self, path: Path, *, heartbeat_s: float = 30.0, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.heartbeat_s = heartbeat_s
        self._clock = clock
        self._last_body: str | None = None
        self._last_write = float("-inf")
        self._failed_at: float | None = None
        self.error: str | None = None  # why the last write failed; None once one succeeds
        self.writes = 0

    def update(self, snapshot: StateSnapshot, *, force: bool = False) -> tuple[str | None, bool]:
        """Write if due. Returns (the error if the file is not being written, whether that changed
        with this call): the caller logs a failure once, and its end once, not every pass."""
        now = self._clock()
        before = self.error
        if self._failed_at is not None and now - self._failed_at < self.RETRY_S:
            return self.error, False
        snapshot = snapshot.model_copy(update={"updated_at": now, "heartbeat_s": self.heartbeat_s})
        body = snapshot.model_dump_json(exclude={"updated_at"})
        if self.error is None and not force and body == self._last_body and now - self._last_write < self.heartbeat_s:
            return None, False
        try:
            write_state(self.path, snapshot)
        except OSError as e:
            self.error, self._failed_at = f"cannot write {self.path}: {e.strerror or e}", now
            return self.error, self.error != before
        self._last_body, self._last_write, self.error, self._failed_at = body, now, None, None
        self.writes += 1
        return None, before is not None


# ------------------------------------------------------------------------------------ liveness

Liveness = Literal["running", "stale", "stopped", "gone"]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


def liveness(
    snap: StateSnapshot,
    now: float,
    *,
    alive: Callable[[int], bool] = pid_alive,
    start_ticks: Callable[[int], int | None] = process_start_ticks,
) -> tuple[Liveness, str]:
    """Is the daemon that wrote ``snap`` running? (verdict, one line of explanation). Pure given the readers.

    stopped: it said so on its way out. gone: its pid is not running (or is another process now):
    killed, crashed or the board rebooted. stale: the process exists but has not rewritten the file
    for three heartbeats (a hung main loop; systemd's watchdog restarts it). running: otherwise."""
    if snap.state == "stopped":
        return "stopped", "stopped cleanly"
    if not alive(snap.pid):
        return "gone", f"pid {snap.pid} is not running: the daemon was killed, crashed, or the board rebooted"
    if snap.pid_start is not None:
        ticks = start_ticks(snap.pid)
        if ticks is not None and ticks != snap.pid_start:
            return "gone", f"pid {snap.pid} now belongs to another process: the daemon is not running"
    age = now - snap.updated_at
    if age > 3 * snap.heartbeat_s + 5:
        return "stale", f"pid {snap.pid} is alive but has not updated its state for {age:.0f} s (hung?)"
    return "running", f"pid {snap.pid}"


# ------------------------------------------------------------------------------------ building


def model_state(report: LoadReport, models_dir: Path | None = None, *, loaded_at: float | None = None) -> ModelState:
    """The model part from the engine's LoadReport."""
    path = Path(report.model)
    if models_dir is not None:
        try:
            path = path.resolve().relative_to(Path(models_dir).resolve())
        except ValueError:
            pass
    return ModelState(
        path=str(path),
        mode=report.mode,
        n_ctx=report.n_ctx,
        n_threads=report.n_threads,
        slots=report.slots,
        load_ms=round(report.load_ms, 1),
        loaded_at=loaded_at,
        anon_estimate_bytes=report.estimate.anon_bytes,
        budget_bytes=report.budget.bytes,
    )


class SnapshotExtras(TypedDict, total=False):
    """The fields of a snapshot that ``from_daemon`` does not read from the daemon's parts."""

    telemetry: dict[str, Any] | None
    memory_level: str | None
    memory_action: str | None
    shadow_version: int | None
    shadow_applied_version: int | None


def from_daemon(
    daemon: Reporter,
    state: DaemonState,
    *,
    started_at: float,
    ready_at: float | None = None,
    pid_start: int | None = None,
    **extra: Unpack[SnapshotExtras],
) -> StateSnapshot:
    """A snapshot of a running ``agent.app.daemon.Daemon`` from its parts, as its ``Reporter`` holds them (the
    settings, the supervisor's engine, the store, the run gate, the store's health, the transport). ``extra`` sets
    the other fields
    (telemetry, memory_level, memory_action, shadow_version, shadow_applied_version)."""
    s = daemon.settings
    engine = daemon.supervisor.engine
    report = getattr(engine, "report", None) if engine is not None else None
    try:
        queued: int | None = daemon.store.queued_count()
    except Exception:  # an unreadable store is reported by store_writable; the snapshot must still be written
        queued = None
    return StateSnapshot(
        pid=os.getpid(),
        pid_start=pid_start if pid_start is not None else process_start_ticks(),
        device_id=s.device.id,
        config_path=str(daemon.config_path) if daemon.config_path else None,
        state=state,
        started_at=started_at,
        ready_at=ready_at,
        updated_at=time.time(),
        model=model_state(report, s.device.models_dir) if report is not None else None,
        queued=queued,
        running=daemon.gate.running,
        intake_paused=INTAKE_PAUSED in daemon.gate.holds,
        store_writable=daemon.health.writable,
        broker_connected=daemon.transport.connected,
        **extra,
    )
