"""Swap the agent manages: zram first, a swap file as low-priority overflow, or none.

Owns: reading /proc/swaps; the record of what the agent created (a JSON file only root writes);
``plan`` (pure: desired swap + what exists -> steps, each with a reason or why it is refused);
``SwapManager.apply`` (the privileged part: hot-adds zram devices, creates swap files, swapon/off,
vm.swappiness); and the desired-swap file the unprivileged daemon writes for the root unit.

Rules it keeps:
* it never touches a swap device or file it did not create: only what its record names, and a file
  only while it still has the inode the record noted (a replaced file is not ours);
* it never switches a device off while memory is short: swapoff brings the device's contents back
  into RAM, so it is refused unless MemAvailable stays above swapoff_min_available_pct after it;
* a swap file is made safely: free space checked first (size + file_keep_free_mb), created under a
  temporary name with O_EXCL and mode 600, fallocate (dd where the filesystem has no fallocate, or
  where swapon refuses a fallocated file), mkswap, renamed into place, swapon with its priority;
* zram devices do not survive a reboot: records carry the boot id, and a record from another boot
  is forgotten, never acted on (the same number may be someone else's device now).

The daemon does not run as root. It writes the desired settings with ``write_desired``; the root
oneshot unit systemd/edge-agent-swap.service (started by edge-agent-swap.path when that file
changes, and at boot) runs ``edge-agent swap apply``, which takes the swap file's path from the
root-owned configuration only: the desired file may change sizes and priorities, never paths.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from agent.errors import EdgeAgentError
from agent.system.files import atomic_write, fsync_dir
from agent.system.memory import MemInfo, meminfo

if TYPE_CHECKING:
    from agent.config.sections import SwapSettings

log = logging.getLogger(__name__)

MiB = 1024 * 1024
DESIRED_NAME = "swap-desired.json"
# The keys the daemon may set through the desired-swap file: sizes, priorities, policy. Never a path.
DESIRED_KEYS = frozenset(
    {
        "policy",
        "zram_mb",
        "zram_algorithm",
        "zram_priority",
        "file_mb",
        "file_priority",
        "file_keep_free_mb",
        "swappiness",
        "swapoff_min_available_pct",
    }
)
MAX_DESIRED_BYTES = 16384


class SwapError(EdgeAgentError):
    """A swap change that failed or was refused; the message says why and what to do."""

    code = "swap_error"


# ---------------------------------------------------------------------------------------------
# what exists
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SwapDevice:
    """One line of /proc/swaps (sizes in bytes)."""

    path: str
    type: str  # partition or file
    size: int
    used: int
    priority: int


def _unescape(name: str) -> str:
    # /proc/swaps escapes blanks and backslashes in octal (\040).
    return name.encode().decode("unicode_escape") if "\\" in name else name


def swaps(path: str | Path = "/proc/swaps") -> list[SwapDevice]:
    """Every active swap device. A kernel without swap support has no file: none."""
    try:
        lines = Path(path).read_text().splitlines()[1:]
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 5:
            out.append(
                SwapDevice(_unescape(parts[0]), parts[1], int(parts[2]) * 1024, int(parts[3]) * 1024, int(parts[4]))
            )
    return out


@dataclass
class Created:
    """One swap device the agent created."""

    kind: Literal["zram", "file"]
    path: str  # /dev/zramN or the swap file
    size: int  # bytes
    priority: int
    created_at: float
    boot_id: str | None = None  # zram: the boot it exists in
    zram_index: int | None = None
    inode: int | None = None  # file: identity, so a file replaced by someone else is not taken for ours
    device: int | None = None


@dataclass
class Record:
    """What the agent created, kept by root at swap.record_path."""

    entries: list[Created] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> Record:
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return cls()
        except PermissionError:
            raise SwapError(f"{path}: only root may read the swap record") from None
        except (OSError, ValueError) as e:
            raise SwapError(
                f"{path}: cannot read the swap record ({e}); fix or remove it only after checking `swapon --show` "
                "(without it the agent treats no swap as its own)"
            ) from e
        try:
            return cls([Created(**e) for e in raw.get("entries", [])])
        except TypeError as e:
            raise SwapError(f"{path}: the swap record is not one this edge-agent wrote ({e})") from e

    def save(self, path: Path) -> None:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write(path, json.dumps({"entries": [asdict(e) for e in self.entries]}, indent=2), mode=0o600)

    def find(self, kind: str) -> list[Created]:
        return [e for e in self.entries if e.kind == kind]


# ---------------------------------------------------------------------------------------------
# what is wanted
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Desired:
    """The swap wanted, in bytes, from SwapSettings and MemTotal ('auto' sizes resolved)."""

    zram_bytes: int
    zram_priority: int
    zram_algorithm: str
    file_bytes: int
    file_path: Path
    file_priority: int
    file_keep_free: int
    swappiness: int | None
    swapoff_min_available_pct: int

    @classmethod
    def from_settings(cls, s: SwapSettings, mem_total: int) -> Desired:
        zram = file = 0
        if "zram" in s.policy:
            # zram-generator's rule: half of RAM, at most 4 GiB.
            zram = min(mem_total // 2, 4096 * MiB) if s.zram_mb == "auto" else int(s.zram_mb) * MiB
        if "file" in s.policy:
            # dphys-swapfile's rule: twice RAM, at most 2 GiB.
            file = min(2 * mem_total, 2048 * MiB) if s.file_mb == "auto" else int(s.file_mb) * MiB
        page = os.sysconf("SC_PAGE_SIZE")
        return cls(
            zram_bytes=zram // page * page,
            zram_priority=s.zram_priority,
            zram_algorithm=s.zram_algorithm,
            file_bytes=file // page * page,
            file_path=s.file_path,
            file_priority=s.file_priority,
            file_keep_free=s.file_keep_free_mb * MiB,
            swappiness=s.swappiness,
            swapoff_min_available_pct=s.swapoff_min_available_pct,
        )


def desired_path(state_dir: Path) -> Path:
    """Where the daemon writes the desired swap (the path unit watches it)."""
    return state_dir / DESIRED_NAME


def write_desired(swap: SwapSettings, state_dir: Path) -> Path:
    """The daemon's side: write the live swap settings for the root unit, atomically (the path unit
    fires on the rename). Only ``DESIRED_KEYS``; unchanged content is not rewritten."""
    path = desired_path(state_dir)
    data = (
        json.dumps(
            {k: v for k, v in swap.model_dump(mode="json").items() if k in DESIRED_KEYS}, indent=2, sort_keys=True
        ).encode()
        + b"\n"
    )
    try:
        if path.read_bytes() == data:
            return path
    except OSError:
        pass
    atomic_write(path, data, mode=0o640)
    return path


def load_desired(path: Path, base: SwapSettings) -> SwapSettings:
    """The root side: the root configuration's swap settings with the daemon's desired values on top.
    Refuses keys outside ``DESIRED_KEYS`` (a path chosen by the unprivileged daemon would let it aim
    root's file creation and deletion anywhere) and anything that does not validate."""
    from pydantic import ValidationError  # costly to import: only the root side reads this file

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return base
    except OSError as e:
        raise SwapError(f"{path}: cannot open the desired-swap file ({e.strerror}; a symlink is refused)") from e
    try:
        raw = os.read(fd, MAX_DESIRED_BYTES + 1)
    finally:
        os.close(fd)
    if len(raw) > MAX_DESIRED_BYTES:
        raise SwapError(f"{path}: larger than {MAX_DESIRED_BYTES} bytes; not a desired-swap file")
    try:
        wanted = json.loads(raw)
    except ValueError as e:
        raise SwapError(
            f"{path}: not JSON (line {getattr(e, 'lineno', '?')}); the daemon rewrites it on the next change"
        ) from None
    if not isinstance(wanted, dict):
        raise SwapError(f"{path}: must hold a JSON object")
    extra = sorted(set(wanted) - DESIRED_KEYS)
    if extra:
        raise SwapError(
            f"{path}: key(s) {', '.join(map(repr, extra))} may only be set in the root configuration; allowed here: "
            f"{', '.join(sorted(DESIRED_KEYS))}"
        )
    try:
        return type(base).model_validate({**base.model_dump(), **wanted})
    except ValidationError as e:
        errs = "; ".join(f"{'.'.join(map(str, x['loc'])) or 'swap'}: {x['msg']}" for x in e.errors())
        raise SwapError(f"{path}: invalid desired swap: {errs}") from None


# ---------------------------------------------------------------------------------------------
# the plan (pure)
# ---------------------------------------------------------------------------------------------

Op = Literal["forget", "remove_zram", "create_zram", "remove_file", "create_file", "activate_file", "set_swappiness"]


@dataclass(frozen=True)
class PlanStep:
    op: Op
    target: str
    size: int = 0
    priority: int = 0
    reason: str = ""
    refused: str | None = None  # set: the step will not run, and why


@dataclass(frozen=True)
class FileState:
    """What is at the swap file's path (and the free space there), as ``plan`` needs it."""

    exists: bool
    inode: int | None = None
    device: int | None = None
    regular: bool = False
    free_bytes: int = 0  # available to root on that filesystem


@dataclass(frozen=True)
class World:
    """Everything ``plan`` looks at, read by ``SwapManager.observe``."""

    active: tuple[SwapDevice, ...]
    mem: MemInfo
    boot_id: str
    swappiness: int | None
    zram_available: bool
    zram_reason: str
    files: dict[str, FileState]  # by path: the desired path and every recorded file


def _swapoff_refusal(dev: SwapDevice | None, world: World, min_pct: int) -> str | None:
    if dev is None:
        return None  # not active: nothing comes back into RAM
    after = world.mem.mem_available - dev.used
    floor = world.mem.mem_total * min_pct // 100
    if after < floor:
        return (
            f"memory is short: switching {dev.path} off brings {dev.used // MiB} MiB back into RAM and would leave "
            f"MemAvailable at {max(after, 0) // MiB} MiB, below {min_pct} % of MemTotal ({floor // MiB} MiB); "
            "retried on the next apply"
        )
    return None


def plan(desired: Desired, record: Record, world: World) -> list[PlanStep]:
    """The steps that take the agent's swap from ``record`` + ``world`` to ``desired``. Pure."""
    steps: list[PlanStep] = []
    active = {d.path: d for d in world.active}

    def removal(op: Op, e: Created, dev: SwapDevice | None, why: str) -> PlanStep:
        """Switching off and removing a recorded swap area: refused while memory is too short for it."""
        refused = _swapoff_refusal(dev, world, desired.swapoff_min_available_pct)
        return PlanStep(op, e.path, e.size, reason=why, refused=refused)

    # Records that no longer describe anything: a zram device of another boot, a file gone or replaced.
    zrams, files = [], []
    for e in record.entries:
        if e.kind == "zram":
            if e.boot_id != world.boot_id:
                steps.append(PlanStep("forget", e.path, reason="zram device of an earlier boot (gone with it)"))
            else:
                zrams.append(e)
        else:
            st = world.files.get(e.path, FileState(False))
            if not st.exists:
                steps.append(PlanStep("forget", e.path, reason="the swap file is gone"))
            elif (st.inode, st.device) != (e.inode, e.device) or not st.regular:
                steps.append(
                    PlanStep(
                        "forget",
                        e.path,
                        reason="the file at that path is no longer the one the agent created; left alone",
                    )
                )
            else:
                files.append(e)

    # zram
    want_zram = desired.zram_bytes > 0
    for e in zrams:
        dev = active.get(e.path)
        same = dev is not None and e.size == desired.zram_bytes and dev.priority == desired.zram_priority
        if want_zram and same:
            continue
        why = (
            "swap.policy has no zram"
            if not want_zram
            else (
                "not active"
                if dev is None
                else f"resize {e.size // MiB} -> {desired.zram_bytes // MiB} MiB, priority "
                f"{dev.priority} -> {desired.zram_priority}"
            )
        )
        steps.append(removal("remove_zram", e, dev, why))
    kept_zram = [
        e for e in zrams if not any(s.op == "remove_zram" and s.target == e.path and s.refused is None for s in steps)
    ]
    if want_zram and not any(active.get(e.path) and e.size == desired.zram_bytes for e in kept_zram):
        if any(s.op == "remove_zram" and s.refused for s in steps):
            refused = "the agent's current zram device could not be switched off (see above)"
        elif not world.zram_available:
            refused = world.zram_reason
        else:
            refused = None
        steps.append(
            PlanStep(
                "create_zram",
                "zram",
                desired.zram_bytes,
                desired.zram_priority,
                reason=f"swap.policy wants {desired.zram_bytes // MiB} MiB of zram",
                refused=refused,
            )
        )

    # swap file
    want_file = desired.file_bytes > 0
    target = str(desired.file_path)
    for e in files:
        dev = active.get(e.path)
        if want_file and e.path == target and e.size == desired.file_bytes:
            if dev is None:
                steps.append(
                    PlanStep(
                        "activate_file",
                        e.path,
                        e.size,
                        desired.file_priority,
                        reason="recorded swap file is not active (after a reboot)",
                    )
                )
            elif dev.priority != desired.file_priority:
                steps.append(removal("remove_file", e, dev, f"priority {dev.priority} -> {desired.file_priority}"))
            continue
        why = (
            "swap.policy has no swap file"
            if not want_file
            else (
                f"moved to {target}"
                if e.path != target
                else f"resize {e.size // MiB} -> {desired.file_bytes // MiB} MiB"
            )
        )
        steps.append(removal("remove_file", e, dev, why))
    removing = {s.target for s in steps if s.op == "remove_file" and s.refused is None}
    blocked = any(s.op == "remove_file" and s.refused for s in steps)
    have = any(e.path == target and e.size == desired.file_bytes and e.path not in removing for e in files)
    if want_file and not have:
        st = world.files.get(target, FileState(False))
        ours = any(e.path == target for e in files)
        need = desired.file_bytes + desired.file_keep_free
        # A recorded file being removed at the same path gives its space back first.
        free = st.free_bytes + sum(e.size for e in files if e.path in removing and e.path == target)
        refused = None
        if blocked:
            refused = "the agent's current swap file could not be switched off (see above)"
        elif st.exists and not ours:
            refused = f"{target} exists and was not created by edge-agent; move it away or set swap.file_path"
        elif free < need:
            refused = (
                f"not enough free space for {desired.file_bytes // MiB} MiB at {target}: {free // MiB} MiB free, "
                f"{need // MiB} MiB needed (swap.file_keep_free_mb {desired.file_keep_free // MiB} kept free)"
            )
        steps.append(
            PlanStep(
                "create_file",
                target,
                desired.file_bytes,
                desired.file_priority,
                reason=f"swap.policy wants a {desired.file_bytes // MiB} MiB swap file",
                refused=refused,
            )
        )

    if desired.swappiness is not None and world.swappiness is not None and world.swappiness != desired.swappiness:
        steps.append(
            PlanStep(
                "set_swappiness",
                "vm.swappiness",
                priority=desired.swappiness,
                reason=f"vm.swappiness {world.swappiness} -> {desired.swappiness}",
            )
        )
    return steps


# ---------------------------------------------------------------------------------------------
# applying it (root)
# ---------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    step: PlanStep
    done: bool
    message: str


@dataclass
class ApplyResult:
    outcomes: list[Outcome]

    @property
    def ok(self) -> bool:
        return all(o.done for o in self.outcomes)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "steps": [{**asdict(o.step), "done": o.done, "message": o.message} for o in self.outcomes],
        }


Runner = Callable[[list[str]], "subprocess.CompletedProcess[str]"]


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)


class SwapManager:
    """Reads and changes swap. Paths are injectable so tests use fixture trees and temporary folders;
    ``force_dd`` makes swap files with dd (the fallback path, tested on filesystems that have fallocate)."""

    def __init__(
        self,
        record_path: Path,
        *,
        proc_root: Path = Path("/proc"),
        sys_root: Path = Path("/sys"),
        dev_root: Path = Path("/dev"),
        run: Runner = _run,
        clock: Callable[[], float] = time.time,
        force_dd: bool = False,
    ) -> None:
        self.record_path = record_path
        self.proc = proc_root
        self.sys = sys_root
        self.dev = dev_root
        self._run = run
        self._clock = clock
        self.force_dd = force_dd

    # ------------------------------------------------------------------------------ reading

    def boot_id(self) -> str:
        try:
            return (self.proc / "sys/kernel/random/boot_id").read_text().strip()
        except OSError:
            return "unknown"

    def swappiness(self) -> int | None:
        try:
            return int((self.proc / "sys/vm/swappiness").read_text())
        except (OSError, ValueError):
            return None

    def zram_state(self) -> tuple[bool, str]:
        if (self.sys / "class/zram-control/hot_add").exists():
            return True, ""
        if shutil.which("modprobe"):
            p = self._run(["modprobe", "zram", "num_devices=0"])
            if p.returncode == 0 and (self.sys / "class/zram-control/hot_add").exists():
                return True, ""
        return False, "the zram module is not available (kernel without CONFIG_ZRAM, or modprobe zram failed)"

    def file_state(self, path: Path) -> FileState:
        free = 0
        try:
            vfs = os.statvfs(path.parent)
            free = vfs.f_bavail * vfs.f_frsize
        except OSError:
            pass
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return FileState(False, free_bytes=free)
        return FileState(True, st.st_ino, st.st_dev, stat.S_ISREG(st.st_mode), free)

    def observe(self, desired: Desired, record: Record, *, probe_zram: bool = True) -> World:
        paths = {str(desired.file_path)} | {e.path for e in record.find("file")}
        zram_ok, zram_reason = self.zram_state() if probe_zram and desired.zram_bytes else (False, "not probed")
        return World(
            active=tuple(swaps(self.proc / "swaps")),
            mem=meminfo(self.proc / "meminfo"),
            boot_id=self.boot_id(),
            swappiness=self.swappiness(),
            zram_available=zram_ok,
            zram_reason=zram_reason,
            files={p: self.file_state(Path(p)) for p in paths},
        )

    def status(self) -> dict[str, Any]:
        """Every active swap device, which are the agent's, and records of the agent's inactive ones."""
        note = None
        try:
            record = Record.load(self.record_path)
        except SwapError as e:
            record, note = Record(), f"{e}: devices are listed without marking the agent's"
        boot = self.boot_id()
        ours = {r.path: r for r in record.entries if r.kind == "file" or r.boot_id == boot}
        devices = []
        for d in swaps(self.proc / "swaps"):
            entry = ours.get(d.path)
            mine = entry is not None and (entry.kind == "zram" or self._same_file(entry))
            devices.append({**asdict(d), "agent": mine, "kind": "zram" if d.path.startswith("/dev/zram") else d.type})
        active = {d["path"] for d in devices}
        inactive = [asdict(e) for e in record.entries if e.path not in active]
        return {
            "devices": devices,
            "inactive_records": inactive,
            "swappiness": self.swappiness(),
            "record": str(self.record_path),
            "note": note,
        }

    def _same_file(self, e: Created) -> bool:
        st = self.file_state(Path(e.path))
        return st.exists and st.regular and (st.inode, st.device) == (e.inode, e.device)

    # ------------------------------------------------------------------------------ changing

    def apply(self, settings: SwapSettings, *, dry_run: bool = False) -> ApplyResult:
        """Plan and, unless ``dry_run``, carry out every step that is not refused. Each step is
        recorded as soon as it is done, so a crash half-way leaves a record that matches the system."""
        mem = meminfo(self.proc / "meminfo")
        desired = Desired.from_settings(settings, mem.mem_total)
        record = Record.load(self.record_path)
        world = self.observe(desired, record, probe_zram=not dry_run)
        if dry_run and desired.zram_bytes:
            ok = (self.sys / "class/zram-control/hot_add").exists()
            world = World(
                world.active,
                world.mem,
                world.boot_id,
                world.swappiness,
                ok,
                "" if ok else "the zram module is not loaded (apply would try modprobe zram)",
                world.files,
            )
        steps = plan(desired, record, world)
        outcomes: list[Outcome] = []
        for s in steps:
            if s.refused:
                outcomes.append(Outcome(s, False, s.refused))
                continue
            if dry_run:
                outcomes.append(Outcome(s, True, f"would {s.op.replace('_', ' ')} {s.target}: {s.reason}"))
                continue
            try:
                message = self._do(s, desired, record)
                outcomes.append(Outcome(s, True, message))
            except SwapError as e:
                outcomes.append(Outcome(s, False, str(e)))
            except OSError as e:
                outcomes.append(Outcome(s, False, f"{s.op} {s.target}: {e.strerror or e}"))
        return ApplyResult(outcomes)

    def _do(self, s: PlanStep, desired: Desired, record: Record) -> str:
        if s.op == "forget":
            boot = self.boot_id()

            def stale(e: Created) -> bool:
                if e.path != s.target:
                    return False
                return e.boot_id != boot if e.kind == "zram" else not self._same_file(e)

            record.entries = [e for e in record.entries if not stale(e)]
            record.save(self.record_path)
            return f"forgot {s.target}: {s.reason}"
        if s.op == "remove_zram":
            return self._remove_zram(s, desired, record)
        if s.op == "create_zram":
            return self._create_zram(s, desired, record)
        if s.op == "remove_file":
            return self._remove_file(s, desired, record)
        if s.op == "create_file":
            return self._create_file(s, desired, record)
        if s.op == "activate_file":
            return self._activate_file(s, record)
        if s.op == "set_swappiness":
            (self.proc / "sys/vm/swappiness").write_text(f"{s.priority}\n")
            return f"vm.swappiness set to {s.priority}"
        raise SwapError(f"unknown step {s.op}")

    def _cmd(self, cmd: list[str], what: str) -> None:
        try:
            p = self._run(cmd)
        except FileNotFoundError:
            raise SwapError(f"{what}: {cmd[0]} is not installed (util-linux)") from None
        except subprocess.TimeoutExpired:
            raise SwapError(f"{what}: {cmd[0]} did not finish in time") from None
        if p.returncode != 0:
            raise SwapError(f"{what}: {' '.join(cmd)} failed ({(p.stderr or p.stdout).strip()[:300]})")

    def _active(self, path: str) -> SwapDevice | None:
        return next((d for d in swaps(self.proc / "swaps") if d.path == path), None)

    def _swapoff(self, path: str, min_pct: int = 0) -> None:
        dev = self._active(path)
        if dev is None:
            return
        # Checked again right before: memory may have become short since the plan.
        mem = meminfo(self.proc / "meminfo")
        world = World((dev,), mem, "", None, False, "", {})
        refusal = _swapoff_refusal(dev, world, min_pct)
        if refusal:
            raise SwapError(refusal)
        self._cmd(["swapoff", path], f"switching {path} off")

    # -- zram

    def _create_zram(self, s: PlanStep, desired: Desired, record: Record) -> str:
        ctl = self.sys / "class/zram-control"
        idx = int((ctl / "hot_add").read_text().strip())
        block = self.sys / "block" / f"zram{idx}"
        dev = self.dev / f"zram{idx}"
        try:
            algos = (block / "comp_algorithm").read_text().replace("[", " ").replace("]", " ").split()
            algo = desired.zram_algorithm
            if algo == "auto":
                algo = "lz4" if "lz4" in algos else ""
            elif algo not in algos:
                raise SwapError(
                    f"zram algorithm {algo!r} is not in this kernel ({', '.join(algos)}); set swap.zram_algorithm"
                )
            if algo:
                (block / "comp_algorithm").write_text(algo)
            (block / "disksize").write_text(str(s.size))
            # devtmpfs creates the node with the device; wait briefly for it where udev does it instead.
            deadline = time.monotonic() + 5
            while not dev.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            self._cmd(["mkswap", str(dev)], f"formatting {dev}")
            self._cmd(["swapon", "-p", str(s.priority), str(dev)], f"enabling {dev}")
        except BaseException:
            self._zram_release(idx)
            raise
        record.entries.append(
            Created("zram", str(dev), s.size, s.priority, self._clock(), boot_id=self.boot_id(), zram_index=idx)
        )
        record.save(self.record_path)
        return f"zram{idx}: {s.size // MiB} MiB{f' ({algo})' if algo else ''} at priority {s.priority}"

    def _zram_release(self, idx: int) -> None:
        try:
            (self.sys / "block" / f"zram{idx}" / "reset").write_text("1")
        except OSError:
            pass
        try:
            (self.sys / "class/zram-control/hot_remove").write_text(str(idx))
        except OSError as e:
            log.warning("zram%d could not be removed: %s", idx, e)

    def _remove_zram(self, s: PlanStep, desired: Desired, record: Record) -> str:
        e = next(x for x in record.entries if x.kind == "zram" and x.path == s.target)
        self._swapoff(e.path, desired.swapoff_min_available_pct)
        if e.zram_index is not None:
            self._zram_release(e.zram_index)
        record.entries.remove(e)
        record.save(self.record_path)
        return f"removed {e.path}: {s.reason}"

    # -- swap file

    def _create_file(self, s: PlanStep, desired: Desired, record: Record) -> str:
        path = Path(s.target)
        if not path.parent.is_dir():
            raise SwapError(f"{path.parent} does not exist; create it or set swap.file_path")
        tmp = path.with_name(f".{path.name}.edge-agent-new")
        self._clear_stale_tmp(tmp)
        vfs = os.statvfs(path.parent)
        free = vfs.f_bavail * vfs.f_frsize
        if free < s.size + desired.file_keep_free:
            raise SwapError(
                f"not enough free space at {path.parent}: {free // MiB} MiB free, "
                f"{(s.size + desired.file_keep_free) // MiB} MiB needed"
            )
        method = self._fill(tmp, s.size, dd=self.force_dd)
        try:
            self._cmd(["mkswap", str(tmp)], f"formatting {tmp}")
            os.replace(tmp, path)
            fsync_dir(path.parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        st = os.lstat(path)
        entry = Created("file", str(path), s.size, s.priority, self._clock(), inode=st.st_ino, device=st.st_dev)
        record.entries.append(entry)
        record.save(self.record_path)  # recorded before swapon: a crash after leaves nothing unknown
        try:
            self._cmd(["swapon", "-p", str(s.priority), str(path)], f"enabling {path}")
        except SwapError as first:
            if method != "fallocate":
                raise
            # Some filesystems refuse fallocated (unwritten) extents for swap: write it out with dd.
            log.info("swapon refused the fallocated file (%s); writing it with dd", first)
            record.entries.remove(entry)
            path.unlink()
            method = self._fill(tmp, s.size, dd=True)
            self._cmd(["mkswap", str(tmp)], f"formatting {tmp}")
            os.replace(tmp, path)
            st = os.lstat(path)
            entry = Created("file", str(path), s.size, s.priority, self._clock(), inode=st.st_ino, device=st.st_dev)
            record.entries.append(entry)
            record.save(self.record_path)
            self._cmd(["swapon", "-p", str(s.priority), str(path)], f"enabling {path}")
        return f"swap file {path}: {s.size // MiB} MiB ({method}) at priority {s.priority}"

    def _clear_stale_tmp(self, tmp: Path) -> None:
        # Left by a crash between creating and renaming; ours by name, only removed when it is a
        # plain file that is not in use as swap.
        try:
            st = os.lstat(tmp)
        except FileNotFoundError:
            return
        if not stat.S_ISREG(st.st_mode) or self._active(str(tmp)) is not None:
            raise SwapError(f"{tmp} exists and is not a leftover edge-agent file; remove it by hand")
        tmp.unlink()

    def _fill(self, tmp: Path, size: int, *, dd: bool) -> str:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        os.fchmod(fd, 0o600)  # whatever the umask: swap holds other processes' memory
        try:
            if not dd:
                try:
                    self._cmd(["fallocate", "-l", str(size), str(tmp)], f"allocating {tmp}")
                    os.fsync(fd)
                    return "fallocate"
                except SwapError as e:
                    log.info("fallocate failed (%s); writing the swap file with dd", e)
                    os.ftruncate(fd, 0)
            count = size // MiB
            self._cmd(
                ["dd", "if=/dev/zero", f"of={tmp}", "bs=1M", f"count={count}", "conv=notrunc,fsync", "status=none"],
                f"writing {tmp}",
            )
            rest = size - count * MiB
            if rest:
                os.lseek(fd, count * MiB, os.SEEK_SET)
                os.write(fd, b"\0" * rest)
                os.fsync(fd)
            return "dd"
        except BaseException:
            os.close(fd)
            fd = -1
            tmp.unlink(missing_ok=True)
            raise
        finally:
            if fd >= 0:
                os.close(fd)

    def _remove_file(self, s: PlanStep, desired: Desired, record: Record) -> str:
        e = next(x for x in record.entries if x.kind == "file" and x.path == s.target)
        if not self._same_file(e):
            raise SwapError(f"{e.path} is no longer the file edge-agent created; left alone")
        self._swapoff(e.path, desired.swapoff_min_available_pct)
        Path(e.path).unlink()
        record.entries.remove(e)
        record.save(self.record_path)
        return f"removed {e.path}: {s.reason}"

    def _activate_file(self, s: PlanStep, record: Record) -> str:
        e = next(x for x in record.entries if x.kind == "file" and x.path == s.target)
        if not self._same_file(e):
            raise SwapError(f"{e.path} is no longer the file edge-agent created; left alone")
        try:
            self._cmd(["swapon", "-p", str(s.priority), e.path], f"enabling {e.path}")
        except SwapError:
            # Our own file without a valid signature (e.g. a crash between dd and mkswap): format it.
            self._cmd(["mkswap", e.path], f"formatting {e.path}")
            self._cmd(["swapon", "-p", str(s.priority), e.path], f"enabling {e.path}")
        e.priority = s.priority
        record.save(self.record_path)
        return f"enabled {e.path} at priority {s.priority}"


def is_root() -> bool:
    return os.geteuid() == 0


__all__ = [
    "ApplyResult", "Created", "Desired", "FileState", "PlanStep", "Record", "SwapDevice", "SwapError", "SwapManager",
    "World", "desired_path", "is_root", "load_desired", "plan", "swaps", "write_desired",
]  # fmt: skip
