"""Process priority: niceness (the daemon's threads and the inference threads), I/O class,
oom_score_adj and CPU affinity, applied to the agent's own threads and reported.

Linux keeps niceness, I/O priority and affinity per thread, and a new thread inherits its creator's.
So ``apply_process_priority`` runs on the main thread at start, before any other thread exists, and
every thread started later inherits it; ``apply_inference_priority`` runs on the thread that runs
jobs, before it calls into llama.cpp, whose worker threads inherit the inference niceness from it.
On a change at run time both are applied again, to the threads that exist (``tids``).

Raising niceness or the OOM score and narrowing affinity need no privilege; lowering niceness needs
CAP_SYS_NICE, lowering oom_score_adj CAP_SYS_RESOURCE. The shipped unit also filters the
@resources system calls (setpriority, ioprio_set, sched_setaffinity fail with EPERM there). Where
the kernel refuses, the result says why and what to set in the unit instead; nothing raises: a
board without the privilege still serves jobs.
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.config.sections import PrioritySettings

# ioprio_set(2) has no libc wrapper; its number differs per architecture.
_IOPRIO_SYSCALLS = {"x86_64": (251, 252), "aarch64": (30, 31), "arm64": (30, 31), "armv7l": (314, 315),
                    "armv6l": (314, 315), "i686": (289, 290), "riscv64": (30, 31)}  # fmt: skip
_IOPRIO_WHO_PROCESS = 1
_IOPRIO_CLASS_SHIFT = 13
_IOPRIO_CLASSES = {"none": 0, "realtime": 1, "best-effort": 2, "idle": 3}
_IOPRIO_NAMES = {v: k for k, v in _IOPRIO_CLASSES.items()}

# A setting's value: a niceness or oom_score_adj, an I/O class ("best-effort/4"), a CPU list.
PriorityValue = int | str | list[int]


@dataclass(frozen=True)
class Applied:
    """One setting on one target: what was wanted, what is in force now, and if it differs, why."""

    setting: str  # "nice", "inference_nice", "io", "oom_score_adj", "cpus"
    wanted: PriorityValue
    actual: PriorityValue | None  # None: it could not be read
    ok: bool
    note: str  # what happened; when not ok: why, and what to set in the unit

    def line(self) -> str:
        return f"{self.setting} {self.wanted}: {self.note}"


@dataclass(frozen=True)
class PriorityReport:
    results: tuple[Applied, ...]

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    def lines(self) -> list[str]:
        return [r.line() for r in self.results]

    def as_dict(self) -> dict[str, dict[str, PriorityValue | bool | None]]:
        """For the shadow's reported state: per setting, what is in force and any problem."""
        return {r.setting: {"wanted": r.wanted, "actual": r.actual, "ok": r.ok, "note": r.note} for r in self.results}


def _errno_hint(e: OSError, unit: str, privilege: str) -> str:
    if e.errno == 1:  # EPERM
        return (
            f"refused ({e.strerror}): {privilege}, or the unit's SystemCallFilter=~@resources blocks it; set {unit} "
            "in the unit instead"
        )
    if e.errno == 13:  # EACCES
        return f"refused ({e.strerror}): {privilege}; set {unit} in the unit instead"
    return f"failed ({e.strerror}); set {unit} in the unit instead"


# ---------------------------------------------------------------------------------------------
# niceness


def get_nice(tid: int = 0) -> int:
    return os.getpriority(os.PRIO_PROCESS, tid)


def set_nice(nice: int, tids: Iterable[int] = (0,), *, setting: str = "nice") -> Applied:
    """Set the niceness of each thread id (0: the calling thread; Linux keeps niceness per thread)."""
    tids = list(tids)
    was = get_nice(tids[0])
    try:
        for tid in tids:
            if get_nice(tid) != nice:
                os.setpriority(os.PRIO_PROCESS, tid, nice)
    except OSError as e:
        now = get_nice(tids[0])
        lowering = nice < was
        why = "lowering niceness needs CAP_SYS_NICE" if lowering else "raising niceness is normally allowed"
        return Applied(setting, nice, now, False, _errno_hint(e, "Nice=", why))
    return Applied(setting, nice, get_nice(tids[0]), True, f"in force (was {was})")


# ---------------------------------------------------------------------------------------------
# I/O priority


class _Ioprio:
    def __init__(self) -> None:
        self.numbers = _IOPRIO_SYSCALLS.get(platform.machine())
        try:
            self.libc: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
        except OSError:
            self.libc = None

    def get(self, tid: int = 0) -> tuple[str, int] | None:
        if self.numbers is None or self.libc is None:
            return None
        v = self.libc.syscall(self.numbers[1], _IOPRIO_WHO_PROCESS, tid)
        if v < 0:
            return None
        return _IOPRIO_NAMES.get(v >> _IOPRIO_CLASS_SHIFT, "none"), v & 0x7

    def set(self, cls: str, level: int, tid: int = 0) -> None:
        if self.numbers is None or self.libc is None:
            raise OSError(38, f"ioprio_set is not known for {platform.machine()}")
        value = (_IOPRIO_CLASSES[cls] << _IOPRIO_CLASS_SHIFT) | (level if cls == "best-effort" else 0)
        if self.libc.syscall(self.numbers[0], _IOPRIO_WHO_PROCESS, tid, value) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))


_IOPRIO = _Ioprio()


def get_io(tid: int = 0) -> tuple[str, int] | None:
    """(class, level) of a thread; None where ioprio_get is not available."""
    return _IOPRIO.get(tid)


def set_io(io_class: str, io_priority: int, tids: Iterable[int] = (0,)) -> Applied:
    wanted = f"{io_class}/{io_priority}" if io_class == "best-effort" else io_class
    if io_class == "none":
        return Applied("io", wanted, _fmt_io(get_io()), True, "left to the kernel (priority.io_class = 'none')")
    tids = list(tids)
    try:
        for tid in tids:
            _IOPRIO.set(io_class, io_priority, tid)
    except OSError as e:
        unit = f"IOSchedulingClass={io_class}" + (
            f" IOSchedulingPriority={io_priority}" if io_class == "best-effort" else ""
        )
        return Applied(
            "io",
            wanted,
            _fmt_io(get_io(tids[0])),
            False,
            _errno_hint(e, unit, "a higher I/O priority needs CAP_SYS_ADMIN"),
        )
    return Applied("io", wanted, _fmt_io(get_io(tids[0])), True, "in force")


def _fmt_io(v: tuple[str, int] | None) -> str | None:
    if v is None:
        return None
    return f"{v[0]}/{v[1]}" if v[0] == "best-effort" else v[0]


# ---------------------------------------------------------------------------------------------
# oom_score_adj (per process)


def set_oom_score_adj(value: int, *, pid: int | str = "self", proc_root: Path = Path("/proc")) -> Applied:
    path = proc_root / str(pid) / "oom_score_adj"
    try:
        was = int(path.read_text().strip())
    except OSError as e:
        return Applied("oom_score_adj", value, None, False, f"cannot read {path}: {e.strerror}")
    if was == value:
        return Applied("oom_score_adj", value, was, True, "in force")
    try:
        path.write_text(str(value))
    except OSError as e:
        return Applied(
            "oom_score_adj",
            value,
            was,
            False,
            _errno_hint(e, f"OOMScoreAdjust={value}", "lowering it needs CAP_SYS_RESOURCE"),
        )
    return Applied("oom_score_adj", value, int(path.read_text().strip()), True, f"in force (was {was})")


# ---------------------------------------------------------------------------------------------
# CPU affinity


def online_cpus(sys_root: Path = Path("/sys")) -> list[int]:
    """CPUs the kernel has online (the set 'spare_one' and a CPU list are checked against)."""
    try:
        text = (sys_root / "devices/system/cpu/online").read_text().strip()
    except OSError:
        return list(range(os.cpu_count() or 1))
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def wanted_cpus(cpus: list[int] | str, online: list[int]) -> tuple[list[int], str]:
    """The CPU set for a ``priority.cpus`` value, and a note. Pure."""
    if cpus == "all":
        return sorted(online), "all online CPUs"
    if cpus == "spare_one":
        if len(online) < 4:
            return sorted(online), f"{len(online)} CPUs: fewer than 4, none kept free"
        keep = min(online)
        return sorted(c for c in online if c != keep), f"CPU {keep} kept free for the system"
    assert isinstance(cpus, list)
    chosen = sorted(c for c in cpus if c in online)
    missing = sorted(set(cpus) - set(online))
    if not chosen:
        return sorted(online), f"none of CPUs {cpus} is online; all online CPUs used"
    return chosen, f"CPUs {chosen}" + (f" (not online: {missing})" if missing else "")


def set_cpus(cpus: list[int] | str, tids: Iterable[int] = (0,), *, sys_root: Path = Path("/sys")) -> Applied:
    tids = list(tids)
    wanted, note = wanted_cpus(cpus, online_cpus(sys_root))
    try:
        for tid in tids:
            os.sched_setaffinity(tid, wanted)
    except OSError as e:
        unit = f"CPUAffinity={' '.join(map(str, wanted))}"
        return Applied(
            "cpus",
            wanted,
            sorted(os.sched_getaffinity(tids[0])),
            False,
            _errno_hint(e, unit, "the cpuset may not allow it"),
        )
    return Applied("cpus", wanted, sorted(os.sched_getaffinity(tids[0])), True, note)


# ---------------------------------------------------------------------------------------------
# the entry points


def process_threads(pid: int | str = "self", *, proc_root: Path = Path("/proc")) -> list[int]:
    """Thread ids of a process (for applying a change to threads that already exist)."""
    try:
        return sorted(int(t) for t in os.listdir(proc_root / str(pid) / "task"))
    except OSError:
        return [0]


def apply_process_priority(settings: PrioritySettings, *, tids: Iterable[int] | None = None) -> PriorityReport:
    """The daemon's niceness, I/O class, oom_score_adj and CPU affinity. At start: call on the main
    thread before starting any thread (``tids`` None: the calling thread, inherited by later ones).
    On a change: pass ``process_threads()`` (then also call ``apply_inference_priority`` with the
    inference threads, which this sets back to the daemon's niceness)."""
    targets = [0] if tids is None else list(tids) or [0]
    return PriorityReport(
        (
            set_nice(settings.nice, targets),
            set_io(settings.io_class, settings.io_priority, targets),
            set_oom_score_adj(settings.oom_score_adj),
            set_cpus(settings.cpus, targets),
        )
    )


def apply_inference_priority(settings: PrioritySettings, *, tids: Iterable[int] | None = None) -> PriorityReport:
    """The inference threads' niceness. Call on the thread that runs jobs before it first calls into
    llama.cpp (``tids`` None: the calling thread; the engine's worker threads inherit it), and again
    on a change with the threads that run inference."""
    nice = settings.nice if settings.inference_nice is None else settings.inference_nice
    targets = [0] if tids is None else list(tids) or [0]
    return PriorityReport((set_nice(nice, targets, setting="inference_nice"),))


def current_tid() -> int:
    return threading.get_native_id()


__all__ = [
    "Applied", "PriorityReport", "apply_inference_priority", "apply_process_priority",
    "current_tid", "get_io", "get_nice", "online_cpus", "process_threads", "set_cpus", "set_io", "set_nice",
    "set_oom_score_adj", "wanted_cpus",
]  # fmt: skip
