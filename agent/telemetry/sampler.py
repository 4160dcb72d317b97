"""The telemetry sampler: one ``Telemetry`` reading from /proc, /sys and what the daemon knows.

Reads only what the kernel keeps as counters (/proc/self/status and /proc/self/stat, /proc/meminfo,
/proc/vmstat, /proc/pressure/memory, the own cgroup's files, /sys heat files); never smaps, which
stalls the process it reads. The model's resident share (mincore over the whole model file) is taken
at ``residency_interval_s`` and the latest value is repeated in between.

Rates (swap in/out, major faults) need two readings: the first reading of a sampler reports them as
null, and so does any reading whose counters went backwards. The sampler keeps the previous counters,
so it has one owner thread (the daemon's main loop); ``sample`` is not thread-safe.
"""

from __future__ import annotations

import logging
import mmap
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.system.memory import (
    CgroupMemory,
    locate_cgroup,
    meminfo,
    proc_faults,
    proc_status,
    psi_memory,
    read_cgroup,
    vmstat,
)
from agent.telemetry.fields import Telemetry
from agent.telemetry.heat import HeatReader, decode

log = logging.getLogger(__name__)

PAGE = mmap.PAGESIZE
# Where the agent's cgroup is, is looked up again this often (and whenever its files vanish).
RELOCATE_CGROUP_S = 60.0


@dataclass(frozen=True)
class AgentState:
    """What only the daemon knows, asked for once per reading. None: not known (the CLI knows none)."""

    model_loaded: bool | None = None
    weights_bytes: int | None = None  # weights the plan keeps in RAM as file pages (fit mode), when they fit
    rss_file_before_load: int | None = None  # RssFile before the model was mapped (libraries)
    kv_cache_bytes: int | None = None
    kv_cache_size_tokens: int | None = None
    kv_cache_used_tokens: int | None = None
    queue_depth: int | None = None
    jobs_running: int | None = None
    slots: int | None = None
    last_job_slot_wait_ms: float | None = None
    running_job: str | None = None
    last_job_tokens_per_s: float | None = None
    governor_level: str | None = None
    governor_action: str | None = None
    store_writable: bool | None = None
    spool_rows: int | None = None
    spool_dropped: int | None = None

    def readings(self) -> dict[str, Any]:
        """The fields a reading carries as they are, under the same names: all but weights_bytes and
        rss_file_before_load, which only go into weights_in_ram_pct."""
        skip = ("weights_bytes", "rss_file_before_load")
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}


def _pct(part: float | None, whole: float | None) -> float | None:
    if part is None or not whole:
        return None
    return round(100.0 * part / whole, 2)


def _rate(now: int | None, before: int | None, dt: float | None, scale: float = 1.0) -> float | None:
    if now is None or before is None or dt is None or dt <= 0 or now < before:
        return None
    return round((now - before) * scale / dt, 2)


class Sampler:
    """Takes readings. ``root`` stands for / (tests point it at a fixture tree).

    ``agent_state`` is called once per reading (cheap: counters the daemon keeps). ``residency``
    returns the model's resident share in percent (or None with no model) and is called at most every
    ``residency_interval_s``, and at once when ``model_loaded`` changes.
    """

    def __init__(
        self,
        device_id: str,
        *,
        root: Path = Path("/"),
        agent_state: Callable[[], AgentState] | None = None,
        residency: Callable[[], float | None] | None = None,
        residency_interval_s: float = 60.0,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.device_id = device_id
        self.root = root
        self._proc = root / "proc"
        self._agent_state = agent_state or AgentState
        self._residency = residency
        self.residency_interval_s = residency_interval_s
        self._clock = clock
        self._mono = monotonic
        self._heat = HeatReader(root)
        # (monotonic, pswpin, pswpout, majflt) of the previous reading, for the rates
        self._prev: tuple[float, int | None, int | None, int] | None = None
        self._resident: float | None = None
        self._resident_at: float | None = None
        self._resident_loaded: bool | None = None
        self.unavailable: dict[str, str] = {}  # reading name -> why, as of the latest reading
        self._cg_where: CgroupMemory | None = None
        self._cg_located_at = 0.0

    def read_agent_state(self, agent_state: Callable[[], AgentState]) -> None:
        """Where each reading's agent state comes from, when that part (the reporter) is built after this one."""
        self._agent_state = agent_state

    def _cgroup(self, mono: float) -> CgroupMemory:
        if self._cg_where is None or mono - self._cg_located_at >= RELOCATE_CGROUP_S:
            self._cg_where, self._cg_located_at = locate_cgroup(proc_root=self._proc, root=self.root), mono
        cg = read_cgroup(self._cg_where)
        if cg.directory is not None and cg.usage is None:  # moved or removed: find it again
            self._cg_where, self._cg_located_at = locate_cgroup(proc_root=self._proc, root=self.root), mono
            cg = read_cgroup(self._cg_where)
        return cg

    def sample(self, now: float | None = None) -> Telemetry:
        """One reading. ``now``: wall-clock epoch seconds for ``ts`` (default: the clock)."""
        ts = self._clock() if now is None else now
        mono = self._mono()
        missing: dict[str, str] = {}

        mem = meminfo(self._proc / "meminfo")
        proc = proc_status(proc_root=self._proc)
        faults = proc_faults(proc_root=self._proc)
        pswpin: int | None
        pswpout: int | None
        try:
            vm = vmstat(self._proc / "vmstat")
            pswpin, pswpout = vm.pswpin, vm.pswpout
        except OSError:
            pswpin = pswpout = None
        psi = psi_memory(self._proc / "pressure" / "memory")
        if not psi.available:
            missing["psi"] = psi.reason or "no PSI"
        cg = self._cgroup(mono)
        if not cg.available:
            missing["cgroup_memory"] = cg.reason or "no memory cgroup"
        cg_psi = psi_memory(cg.pressure_file) if cg.pressure_file is not None else None
        if cg_psi is None or not cg_psi.available:
            missing["cgroup_psi"] = "no memory.pressure for the agent's cgroup (needs cgroup v2 and PSI)"
        if mem.swap_total == 0:
            missing["swap"] = "no swap is configured (swap.policy, `edge-agent swap status`)"
        heat = self._heat.read()
        missing.update(heat.reasons)

        prev = self._prev
        dt = None if prev is None else mono - prev[0]
        swap_in = _rate(pswpin, prev[1] if prev else None, dt, PAGE)
        swap_out = _rate(pswpout, prev[2] if prev else None, dt, PAGE)
        majors = _rate(faults.major, prev[3] if prev else None, dt)
        self._prev = (mono, pswpin, pswpout, faults.major)

        st = self._agent_state()
        resident = self._resident_pct(mono, st.model_loaded)
        kv_fill = _pct(st.kv_cache_used_tokens, st.kv_cache_size_tokens)
        weights_in_ram = None
        if st.weights_bytes and st.rss_file_before_load is not None:
            weights_in_ram = min(100.0, _pct(max(0, proc.rss_file - st.rss_file_before_load), st.weights_bytes) or 0.0)
        self.unavailable = missing

        return Telemetry(
            device_id=self.device_id,
            ts=datetime.fromtimestamp(ts, tz=UTC),
            mem_total_bytes=mem.mem_total,
            mem_available_bytes=mem.mem_available,
            mem_available_pct=_pct(mem.mem_available, mem.mem_total),
            swap_total_bytes=mem.swap_total,
            swap_used_bytes=max(0, mem.swap_total - mem.swap_free),
            swap_in_bytes_per_s=swap_in,
            swap_out_bytes_per_s=swap_out,
            psi_some_avg10=psi.some_avg10 if psi.available else None,
            psi_some_avg60=psi.some_avg60 if psi.available else None,
            psi_full_avg10=psi.full_avg10 if psi.available else None,
            psi_full_avg60=psi.full_avg60 if psi.available else None,
            cgroup_psi_some_avg10=cg_psi.some_avg10 if cg_psi and cg_psi.available else None,
            cgroup_psi_some_avg60=cg_psi.some_avg60 if cg_psi and cg_psi.available else None,
            cgroup_psi_full_avg10=cg_psi.full_avg10 if cg_psi and cg_psi.available else None,
            cgroup_psi_full_avg60=cg_psi.full_avg60 if cg_psi and cg_psi.available else None,
            cgroup_version=cg.version,
            cgroup_limit_bytes=cg.limit,
            cgroup_high_bytes=cg.high,
            cgroup_usage_bytes=cg.usage,
            cgroup_working_set_bytes=cg.working_set,
            cgroup_peak_bytes=cg.peak,
            rss_anon_bytes=proc.rss_anon,
            rss_file_bytes=proc.rss_file,
            vm_swap_bytes=proc.vm_swap,
            major_faults_per_s=majors,
            **st.readings(),
            model_resident_pct=resident,
            weights_in_ram_pct=weights_in_ram,
            kv_cache_fill_pct=kv_fill,
            unavailable=sorted(missing),
            soc_temp_c=heat.soc_temp_c,
            cpu_freq_mhz=heat.cpu_freq_mhz,
            throttled_flags=heat.throttled_flags,
            **decode(heat.throttled_flags),
        )

    def _resident_pct(self, mono: float, loaded: bool | None) -> float | None:
        if self._residency is None or loaded is False:
            self._resident, self._resident_at, self._resident_loaded = None, None, loaded
            return None
        due = (
            self._resident_at is None
            or loaded != self._resident_loaded
            or mono - self._resident_at >= self.residency_interval_s
        )
        if due:
            try:
                self._resident = self._residency()
            except Exception as e:  # a model swapped under the reading: report nothing, try next time
                log.debug("model residency reading failed: %s", e)
                self._resident = None
            self._resident_at, self._resident_loaded = mono, loaded
        return self._resident


def engine_residency(engine: object) -> Callable[[], float | None]:
    """A ``residency`` callback over an ``agent.engine.Engine``: the resident share of its layers."""

    def read() -> float | None:
        if not getattr(engine, "loaded", False):
            return None
        layers = engine.residency()  # type: ignore[attr-defined]
        total = sum(layer.nbytes for layer in layers)
        if not total:
            return None
        return round(100.0 * float(sum(layer.resident_bytes for layer in layers)) / float(total), 1)

    return read


__all__ = ["AgentState", "Sampler", "engine_residency"]
