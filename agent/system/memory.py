"""Process and system memory readings, and the memory budget the engine plans against.

Owns: cheap readers of /proc/<pid>/status, /proc/<pid>/stat (fault counters), /proc/meminfo,
/proc/vmstat, the own memory cgroup (v1 and v2, with its memory.pressure) and memory PSI;
``resolve_budget`` (memory.budget_mb -> bytes, with where the number came from); and
``PeakSampler``, which follows RssAnon on a background thread during a run.

Everything here avoids /proc/<pid>/smaps: reading it walks every mapping under the target's mmap
lock and stalls it (psutil #2173), which matters when the target holds a 600 MB model mapping.
Raspberry Pi kernels ship without the memory cgroup controller and without PSI; the readers then
return a value with ``available = False`` and a ``reason`` that says which kernel option is missing,
instead of raising.

Every reader takes the file or the root it reads from, so tests run them on fixture trees of boards
this machine is not (tests/fixtures/system/).
"""

from __future__ import annotations

import os
import threading
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from agent.errors import ConfigError

if TYPE_CHECKING:
    from agent.config.sections import MemorySettings

MiB = 1024 * 1024

# cgroup v1 reports "no limit" as the largest page-aligned signed 64-bit value; anything at or
# above 2**60 is effectively unlimited on every board this runs on.
_V1_UNLIMITED = 1 << 60


# ---------------------------------------------------------------------------------------------
# /proc/<pid>/status
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcStatus:
    """Memory of one process, bytes. rss_anon is what the OOM killer and swap care about;
    rss_file is clean mapped file pages (the mmap'd model) that the kernel can drop and re-read."""

    rss_anon: int
    rss_file: int
    rss_shmem: int
    vm_swap: int
    vm_hwm: int  # peak total RSS (anon + file + shmem) since start or the last clear_refs reset

    @property
    def rss(self) -> int:
        return self.rss_anon + self.rss_file + self.rss_shmem

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


_STATUS_KEYS = {
    b"RssAnon:": "rss_anon",
    b"RssFile:": "rss_file",
    b"RssShmem:": "rss_shmem",
    b"VmSwap:": "vm_swap",
    b"VmHWM:": "vm_hwm",
}


def proc_status(pid: int | str = "self", *, proc_root: Path = Path("/proc")) -> ProcStatus:
    """Read RssAnon, RssFile, RssShmem, VmSwap and VmHWM of ``pid`` (bytes).

    /proc/<pid>/status is produced from counters the kernel already keeps, so this costs
    microseconds and does not stall the target.
    """
    values = dict.fromkeys(_STATUS_KEYS.values(), 0)
    with open(proc_root / str(pid) / "status", "rb") as f:
        for line in f:
            key = _STATUS_KEYS.get(line.split(None, 1)[0]) if line else None
            if key is not None:
                values[key] = int(line.split()[1]) * 1024  # the kernel prints kB
    return ProcStatus(**values)


@dataclass(frozen=True)
class ProcFaults:
    """Page-fault counters of one process since it started (/proc/<pid>/stat fields 10 and 12).
    A major fault read a page from disk: for the mmap'd model that is a weight page the kernel
    had dropped, so a rising rate is the model thrashing."""

    minor: int
    major: int


def proc_faults(pid: int | str = "self", *, proc_root: Path = Path("/proc")) -> ProcFaults:
    with open(proc_root / str(pid) / "stat", "rb") as f:
        text = f.read()
    # The command name (field 2) is in parentheses and may hold spaces and ')': split after the last one.
    fields = text[text.rindex(b")") + 2 :].split()
    # fields[0] is field 3 (state): minflt is field 10, majflt field 12.
    return ProcFaults(minor=int(fields[7]), major=int(fields[9]))


# ---------------------------------------------------------------------------------------------
# /proc/meminfo
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemInfo:
    """System memory, bytes (from /proc/meminfo)."""

    mem_total: int
    mem_available: int
    mem_free: int
    cached: int
    swap_total: int
    swap_free: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def meminfo(path: str | Path = "/proc/meminfo") -> MemInfo:
    raw: dict[str, int] = {}
    with open(path, "rb") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2:
                raw[parts[0].rstrip(b":").decode()] = int(parts[1]) * 1024
    return MemInfo(
        mem_total=raw["MemTotal"],
        # MemAvailable exists since Linux 3.14; fall back to the old approximation before that.
        mem_available=raw.get("MemAvailable", raw.get("MemFree", 0) + raw.get("Cached", 0)),
        mem_free=raw.get("MemFree", 0),
        cached=raw.get("Cached", 0),
        swap_total=raw.get("SwapTotal", 0),
        swap_free=raw.get("SwapFree", 0),
    )


@dataclass(frozen=True)
class VmStat:
    """System-wide counters since boot from /proc/vmstat: pages swapped in and out, major faults."""

    pswpin: int
    pswpout: int
    pgmajfault: int


def vmstat(path: str | Path = "/proc/vmstat") -> VmStat:
    raw: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line in f:
            name, _, value = line.partition(b" ")
            if name in (b"pswpin", b"pswpout", b"pgmajfault"):
                raw[name] = int(value)
    return VmStat(raw.get(b"pswpin", 0), raw.get(b"pswpout", 0), raw.get(b"pgmajfault", 0))


# ---------------------------------------------------------------------------------------------
# memory cgroup of a process
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CgroupMemory:
    """The memory cgroup a process is in. ``limit`` is the effective limit (the smallest over the
    cgroup and its ancestors), None when no limit is set. When the controller is missing,
    ``version`` is None and ``reason`` says why."""

    version: Literal[1, 2] | None
    path: str | None = None  # the cgroup's path inside its hierarchy, as /proc/<pid>/cgroup shows it
    directory: Path | None = None  # where its control files are, None if not reachable
    limit: int | None = None
    usage: int | None = None
    peak: int | None = None  # v1 memory.max_usage_in_bytes, v2 memory.peak (kernel >= 5.19)
    reason: str | None = None
    # v2 memory.high (the kernel throttles and reclaims above it); v1 memory.soft_limit_in_bytes, the
    # nearest v1 has (reclaimed down to it under global pressure). None when not set.
    high: int | None = None
    # usage less inactive file pages: what reclaim cannot simply drop (kubelet's working set). usage
    # counts the mmap'd model's page cache, which the kernel can evict, so usage near the limit is
    # normal in fit mode; the working set near the limit is not.
    working_set: int | None = None
    # memory.pressure of the process's cgroup in the v2 hierarchy (also on hybrid v1 systems), if any.
    pressure_file: Path | None = None
    mount_point: Path | None = None  # where the hierarchy is mounted (v2 limits are looked up to it)

    @property
    def available(self) -> bool:
        return self.version is not None

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["directory"] = str(self.directory) if self.directory else None
        d["pressure_file"] = str(self.pressure_file) if self.pressure_file else None
        d["mount_point"] = str(self.mount_point) if self.mount_point else None
        return d


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


@dataclass(frozen=True)
class _Mount:
    root: str  # the hierarchy path mounted here ("/" normally; a sub-path inside containers)
    point: Path
    fstype: str
    super_options: tuple[str, ...]


def _mounts(mountinfo: Path) -> list[_Mount]:
    out = []
    for line in mountinfo.read_text().splitlines():
        # "36 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory"
        left, _, right = line.partition(" - ")
        lf, rf = left.split(), right.split()
        if len(lf) < 5 or len(rf) < 3:
            continue
        out.append(_Mount(lf[3], Path(lf[4].replace("\\040", " ")), rf[0], tuple(rf[2].split(","))))
    return out


def _cgroup_dir(mount: _Mount, cg_path: str) -> Path | None:
    # Inside a container the mount's root is the container's own cgroup, and /proc/self/cgroup
    # may show the full host path: strip the mounted root so the path is relative to the mount.
    root = mount.root.rstrip("/")
    rel = cg_path
    if root and (cg_path == root or cg_path.startswith(root + "/")):
        rel = cg_path[len(root) :]
    d = mount.point / rel.lstrip("/")
    return d if d.is_dir() else None


def _rebase(mounts: list[_Mount], root: Path) -> list[_Mount]:
    """Mount points as seen under ``root`` (a fixture tree standing for /)."""
    if root == Path("/"):
        return mounts
    return [_Mount(m.root, root / m.point.relative_to("/"), m.fstype, m.super_options) for m in mounts]


def _stat_value(d: Path, *names: str) -> int | None:
    """The first of ``names`` found in ``d``/memory.stat."""
    try:
        text = (d / "memory.stat").read_text()
    except OSError:
        return None
    found: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key in names:
            try:
                found[key] = int(value)
            except ValueError:
                continue
    return next((found[n] for n in names if n in found), None)


def _working_set(usage: int | None, inactive_file: int | None) -> int | None:
    if usage is None:
        return None
    return max(0, usage - (inactive_file or 0))


def _v2_pressure_file(mounts: list[_Mount], v2_path: str | None) -> Path | None:
    if v2_path is None:
        return None
    mount = next((m for m in mounts if m.fstype == "cgroup2"), None)
    if mount is None:
        return None
    d = _cgroup_dir(mount, v2_path)
    if d is None or not (d / "memory.pressure").is_file():
        return None
    return d / "memory.pressure"


def _in_mount(version: Literal[1, 2], cg_path: str, mount: _Mount, pressure_file: Path | None) -> CgroupMemory:
    """The cgroup ``cg_path`` of a hierarchy mounted at ``mount``, or why its directory is not there."""
    d = _cgroup_dir(mount, cg_path)
    if d is None:
        return CgroupMemory(
            version,
            path=cg_path,
            reason=f"cgroup directory for {cg_path} not found under {mount.point}",
            pressure_file=pressure_file,
        )
    return CgroupMemory(version, path=cg_path, directory=d, pressure_file=pressure_file, mount_point=mount.point)


def locate_cgroup(
    pid: int | str = "self",
    *,
    proc_root: Path | None = None,
    root: Path = Path("/"),
) -> CgroupMemory:
    """Find the memory cgroup of ``pid`` (v1 ``memory`` controller, or v2 unified) without reading its
    numbers: version, path, directory, memory.pressure file, or why there is none. Parsing
    mountinfo is most of the cost of a cgroup reading, and a service does not change cgroup, so a
    sampler locates once and calls ``read_cgroup`` per reading. ``root`` stands for / (a fixture
    tree): mount points are looked up under it."""
    if proc_root is None:
        proc_root = root / "proc"
    try:
        lines = (proc_root / str(pid) / "cgroup").read_text().splitlines()
        mounts = _rebase(_mounts(proc_root / str(pid) / "mountinfo"), root)
    except OSError as e:
        return CgroupMemory(None, reason=f"cannot read /proc/{pid}/cgroup: {e.strerror}")

    v1_path = v2_path = None
    for line in lines:
        hid, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hid == "0" and controllers == "":
            v2_path = path
        elif "memory" in controllers.split(","):
            v1_path = path

    pressure_file = _v2_pressure_file(mounts, v2_path)

    # Hybrid systems mount both; the memory controller lives in exactly one of them.
    if v1_path is not None:
        mount = next((m for m in mounts if m.fstype == "cgroup" and "memory" in m.super_options), None)
        if mount is None:
            return CgroupMemory(
                None, path=v1_path, reason="cgroup v1 memory controller is not mounted", pressure_file=pressure_file
            )
        return _in_mount(1, v1_path, mount, pressure_file)

    if v2_path is not None:
        mount = next((m for m in mounts if m.fstype == "cgroup2"), None)
        if mount is None:
            return CgroupMemory(None, path=v2_path, reason="cgroup2 is not mounted")
        enabled: list[str]
        try:
            enabled = (mount.point / "cgroup.controllers").read_text().split()
        except OSError:
            enabled = []
        if "memory" not in enabled:
            return CgroupMemory(
                None,
                path=v2_path,
                reason="the kernel has no memory cgroup controller (on Raspberry Pi OS add "
                "'cgroup_enable=memory' to /boot/firmware/cmdline.txt)",
                pressure_file=pressure_file,
            )
        return _in_mount(2, v2_path, mount, pressure_file)

    return CgroupMemory(
        None,
        reason="no memory cgroup controller (on Raspberry Pi OS add 'cgroup_enable=memory' to "
        "/boot/firmware/cmdline.txt)",
        pressure_file=pressure_file,
    )


def read_cgroup(where: CgroupMemory) -> CgroupMemory:
    """The numbers of a located cgroup (``locate_cgroup``). A cgroup without a directory comes back
    as it is; a file that cannot be read gives None for its value."""
    d = where.directory
    if d is None or where.version is None:
        return where
    if where.version == 1:
        # hierarchical_memory_limit already is the minimum over the ancestors.
        limit = _stat_value(d, "hierarchical_memory_limit")
        if limit is None:
            limit = _read_int(d / "memory.limit_in_bytes")
        if limit is not None and limit >= _V1_UNLIMITED:
            limit = None
        high = _read_int(d / "memory.soft_limit_in_bytes")
        if high is not None and high >= _V1_UNLIMITED:
            high = None
        usage, peak = _read_int(d / "memory.usage_in_bytes"), _read_int(d / "memory.max_usage_in_bytes")
        inactive = _stat_value(d, "total_inactive_file", "inactive_file")
    else:
        limit = high = None
        node = d
        # memory.max and memory.high only bound the cgroup itself; an ancestor's smaller value wins.
        while True:
            lim = _read_int(node / "memory.max")
            if lim is not None:
                limit = lim if limit is None else min(limit, lim)
            hi = _read_int(node / "memory.high")
            if hi is not None:
                high = hi if high is None else min(high, hi)
            if node == where.mount_point or node.parent == node:
                break
            node = node.parent
        usage, peak = _read_int(d / "memory.current"), _read_int(d / "memory.peak")
        inactive = _stat_value(d, "inactive_file")
    return replace(where, limit=limit, usage=usage, peak=peak, high=high, working_set=_working_set(usage, inactive))


def cgroup_memory(
    pid: int | str = "self",
    *,
    proc_root: Path | None = None,
    root: Path = Path("/"),
) -> CgroupMemory:
    """Find the memory cgroup of ``pid`` and read its limit, high mark, usage, working set and peak.
    Never raises for a missing controller: returns ``version=None`` and the reason (Raspberry Pi OS
    kernels need ``cgroup_enable=memory`` on the command line)."""
    return read_cgroup(locate_cgroup(pid, proc_root=proc_root, root=root))


# ---------------------------------------------------------------------------------------------
# PSI
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PsiMemory:
    """/proc/pressure/memory: percent of wall time some / all tasks stalled on memory, over 10,
    60 and 300 s windows, and the total stall time in microseconds."""

    available: bool
    some_avg10: float = 0.0
    some_avg60: float = 0.0
    some_avg300: float = 0.0
    some_total_us: int = 0
    full_avg10: float = 0.0
    full_avg60: float = 0.0
    full_avg300: float = 0.0
    full_total_us: int = 0
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def psi_memory(path: str | Path = "/proc/pressure/memory") -> PsiMemory:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return PsiMemory(
            False,
            reason="no /proc/pressure: the kernel runs without PSI (Raspberry Pi OS: add 'psi=1' to "
            "/boot/firmware/cmdline.txt)",
        )
    except OSError as e:
        # A kernel built with PSI but booted with psi=0 returns EOPNOTSUPP on read.
        return PsiMemory(False, reason=f"cannot read {path}: {e.strerror} (kernel booted without psi=1?)")
    values: dict[str, Any] = {}
    for line in text.splitlines():
        kind, *fields = line.split()
        for f in fields:
            k, _, v = f.partition("=")
            if k == "total":
                values[f"{kind}_total_us"] = int(v)
            else:
                values[f"{kind}_{k}"] = float(v)
    return PsiMemory(True, **values)


# ---------------------------------------------------------------------------------------------
# budget
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """How much memory the agent may plan for, and where that number came from."""

    bytes: int
    source: str
    notes: list[str] = field(default_factory=list)

    @property
    def mib(self) -> float:
        return self.bytes / MiB

    def as_dict(self) -> dict[str, Any]:
        return {"bytes": self.bytes, "source": self.source, "notes": list(self.notes)}


def resolve_budget(
    memory_settings: MemorySettings,
    *,
    cgroup: CgroupMemory | None = None,
    mem: MemInfo | None = None,
) -> Budget:
    """memory.budget_mb -> bytes.

    An explicit budget_mb wins. 'auto' takes the own cgroup's memory limit when one is set: that
    limit is the agent's whole allotment (systemd MemoryMax=, a container limit), so no reserve is
    subtracted. Without a limit it takes MemTotal - memory.reserve_mb, leaving the reserve to the
    OS and other services. ``cgroup`` and ``mem`` can be passed in so this stays a pure function
    in tests.
    """
    notes: list[str] = []
    if memory_settings.budget_mb != "auto":
        return Budget(int(memory_settings.budget_mb) * MiB, f"memory.budget_mb = {memory_settings.budget_mb}", notes)

    cg = cgroup_memory() if cgroup is None else cgroup
    mi = meminfo() if mem is None else mem
    reserve = int(memory_settings.reserve_mb) * MiB
    from_ram = mi.mem_total - reserve
    ram_source = f"MemTotal {mi.mem_total // MiB} MiB - memory.reserve_mb {memory_settings.reserve_mb}"

    if not cg.available:
        notes.append(f"no memory cgroup: {cg.reason}")
    elif cg.limit is not None:
        where = f"cgroup v{cg.version} {cg.path} memory limit {cg.limit // MiB} MiB"
        if cg.limit <= mi.mem_total:
            return Budget(cg.limit, where, notes)
        notes.append(f"{where} is above MemTotal; using RAM instead")
    if from_ram <= 0:
        raise ConfigError(
            f"memory.reserve_mb {memory_settings.reserve_mb} is not below MemTotal {mi.mem_total // MiB} MiB: lower "
            "memory.reserve_mb, or set memory.budget_mb"
        )
    return Budget(from_ram, ram_source, notes)


# ---------------------------------------------------------------------------------------------
# peak sampler
# ---------------------------------------------------------------------------------------------


class PeakSampler:
    """Samples RssAnon of this process on a background thread and keeps the peak.

    RssAnon has no kernel high-water mark (VmHWM includes the file-backed model pages), so a
    sampler is the cheap way to get a per-run peak. Use as a context manager; ``stop()`` joins the
    thread and takes a final sample, so a peak reached just before the end is not missed.
    """

    def __init__(self, interval_s: float = 0.02, pid: int | str = "self") -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        self._interval = interval_s
        self._pid = pid
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.peak_rss_anon = 0
        self.peak_rss_file = 0
        self.samples = 0

    def sample(self) -> ProcStatus:
        st = proc_status(self._pid)
        with self._lock:
            self.peak_rss_anon = max(self.peak_rss_anon, st.rss_anon)
            self.peak_rss_file = max(self.peak_rss_file, st.rss_file)
            self.samples += 1
        return st

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.sample()
            except OSError:
                return  # the process is gone (pid sampling) – nothing left to measure

    def start(self) -> PeakSampler:
        if self._thread is not None:
            raise RuntimeError("PeakSampler already started")
        self.sample()
        self._thread = threading.Thread(target=self._run, name="peak-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> int:
        """Stop sampling and return the peak RssAnon, bytes."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self.sample()
        except OSError:
            pass
        return self.peak_rss_anon

    def __enter__(self) -> PeakSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def process_cpu_count() -> int:
    """CPUs this process may run on (affinity, which honours cpusets and taskset), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)
