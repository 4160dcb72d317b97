"""The telemetry reading: every field declared once, with its unit, group and description.

``Telemetry`` is the payload of ``{root}/telemetry``; the same declaration gives the JSON Schema,
the fields table in docs/telemetry.md and docs/protocol.md (generated) and the rows of
``edge-agent telemetry``. A reading the board cannot give is null, never a made-up zero; which
readings the board lacks is in ``unavailable`` (and, with the reason, in ``Sampler.unavailable``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_serializer

# Groups, in the order the CLI and the docs show them.
GROUPS: dict[str, str] = {
    "system": "System memory and swap",
    "pressure": "Memory pressure (PSI)",
    "cgroup": "The agent's memory cgroup",
    "process": "The agent process",
    "model": "Model and KV cache",
    "work": "Jobs",
    "agent": "Agent state",
    "heat": "Heat and throttling",
}


def _m(unit: str, group: str, description: str) -> Any:
    """A reading: null by default, so a board without it reports null rather than a guess."""
    return Field(default=None, description=description, json_schema_extra={"unit": unit, "group": group})


class Telemetry(BaseModel):
    """Published on {root}/telemetry (QoS 1) every telemetry.interval_s; spooled while offline."""

    model_config = ConfigDict(extra="forbid")

    device_id: str = Field(description="This device.", json_schema_extra={"unit": "", "group": "agent"})
    ts: AwareDatetime = Field(
        description="When the readings were taken, RFC 3339 UTC.", json_schema_extra={"unit": "", "group": "agent"}
    )

    # -- system
    mem_total_bytes: int | None = _m("bytes", "system", "System MemTotal, bytes.")
    mem_available_bytes: int | None = _m(
        "bytes", "system", "System MemAvailable, bytes: what can be allocated without swapping (free + reclaimable)."
    )
    mem_available_pct: float | None = _m("%", "system", "MemAvailable as a share of MemTotal, percent.")
    swap_total_bytes: int | None = _m("bytes", "system", "System SwapTotal, bytes (0: no swap).")
    swap_used_bytes: int | None = _m("bytes", "system", "System swap in use (SwapTotal - SwapFree), bytes.")
    swap_in_bytes_per_s: float | None = _m(
        "bytes/s",
        "system",
        "Swapped in since the previous reading, bytes per second (/proc/vmstat pswpin); null on the first.",
    )
    swap_out_bytes_per_s: float | None = _m(
        "bytes/s", "system", "Swapped out since the previous reading, bytes per second (pswpout); null on the first."
    )

    # -- pressure
    psi_some_avg10: float | None = _m(
        "%",
        "pressure",
        "System PSI memory 'some' over 10 s: share of time at least one task stalled on memory, percent; null without PSI.",
    )
    psi_some_avg60: float | None = _m("%", "pressure", "System PSI memory 'some' over 60 s, percent.")
    psi_full_avg10: float | None = _m(
        "%",
        "pressure",
        "System PSI memory 'full' over 10 s: share of time all non-idle tasks stalled on memory, percent.",
    )
    psi_full_avg60: float | None = _m("%", "pressure", "System PSI memory 'full' over 60 s, percent.")
    cgroup_psi_some_avg10: float | None = _m(
        "%",
        "pressure",
        "The agent's cgroup memory.pressure 'some' over 10 s, percent; null without a cgroup v2 memory.pressure.",
    )
    cgroup_psi_some_avg60: float | None = _m("%", "pressure", "The agent's cgroup 'some' over 60 s, percent.")
    cgroup_psi_full_avg10: float | None = _m("%", "pressure", "The agent's cgroup 'full' over 10 s, percent.")
    cgroup_psi_full_avg60: float | None = _m("%", "pressure", "The agent's cgroup 'full' over 60 s, percent.")

    # -- cgroup
    cgroup_version: int | None = _m("", "cgroup", "Memory cgroup version (1 or 2); null without the memory controller.")
    cgroup_limit_bytes: int | None = _m(
        "bytes",
        "cgroup",
        "Memory limit (v2 memory.max, v1 limit_in_bytes; smallest over the ancestors), bytes; null when unlimited.",
    )
    cgroup_high_bytes: int | None = _m(
        "bytes",
        "cgroup",
        "High mark (v2 memory.high, where the kernel starts throttling; v1 soft_limit_in_bytes), bytes; null when unset.",
    )
    cgroup_usage_bytes: int | None = _m(
        "bytes", "cgroup", "Memory charged to the cgroup, page cache included (v2 memory.current), bytes."
    )
    cgroup_working_set_bytes: int | None = _m(
        "bytes",
        "cgroup",
        "Usage less inactive file pages: what reclaim cannot simply drop, bytes. The governor compares this with the limit.",
    )
    cgroup_peak_bytes: int | None = _m(
        "bytes", "cgroup", "Highest usage seen (v2 memory.peak, v1 max_usage_in_bytes), bytes."
    )

    # -- process
    rss_anon_bytes: int | None = _m(
        "bytes", "process", "Agent anonymous memory (RssAnon), bytes: what the OOM killer counts and swap takes."
    )
    rss_file_bytes: int | None = _m(
        "bytes",
        "process",
        "Agent file-backed resident memory (RssFile), bytes: mostly the mmap'd weights, which the kernel can drop and re-read.",
    )
    vm_swap_bytes: int | None = _m("bytes", "process", "Agent memory in swap (VmSwap), bytes.")
    major_faults_per_s: float | None = _m(
        "faults/s",
        "process",
        "Agent major page faults per second (pages read back from disk: weights re-read under pressure); null on the first reading.",
    )

    # -- model
    model_loaded: bool | None = _m("", "model", "A model is loaded.")
    model_resident_pct: float | None = _m(
        "%",
        "model",
        "Share of the model's layer weights resident in RAM, percent (mincore; measured every telemetry.residency_interval_s).",
    )
    weights_in_ram_pct: float | None = _m(
        "%",
        "model",
        "Share of the weights the plan keeps in RAM as file pages that the agent has resident (RssFile beyond what "
        "it was before the load), percent; null in fast mode or when the plan expects them not to fit. It falls when "
        "the kernel evicts weights under memory pressure: every token then reads them again (thrashing).",
    )
    kv_cache_bytes: int | None = _m("bytes", "model", "KV cache size as allocated, bytes.")
    kv_cache_size_tokens: int | None = _m(
        "tokens", "model", "KV cache capacity over every slot (n_ctx x slots), tokens."
    )
    kv_cache_used_tokens: int | None = _m("tokens", "model", "KV cache cells in use, tokens.")
    kv_cache_fill_pct: float | None = _m("%", "model", "KV cache cells in use as a share of its capacity, percent.")

    # -- work
    queue_depth: int | None = _m("jobs", "work", "Jobs waiting (QUEUED).")
    jobs_running: int | None = _m("jobs", "work", "Jobs IN_PROGRESS: the slots in use.")
    slots: int | None = _m(
        "jobs",
        "work",
        "Jobs the loaded model decodes together (engine.max_parallel as planned); null when no model is loaded.",
    )
    last_job_slot_wait_ms: float | None = _m(
        "ms", "work", "How long the last finished job waited for a free slot after it was claimed, milliseconds."
    )
    running_job: str | None = _m("", "work", "The job IN_PROGRESS (the oldest when several run); null when none.")
    last_job_tokens_per_s: float | None = _m(
        "tokens/s",
        "work",
        "Generation speed of the last finished job, tokens per second (compare with the heat readings).",
    )

    # -- agent
    governor_level: str | None = _m("", "agent", "Memory governor level: ok, warn or critical.")
    governor_action: str | None = _m(
        "",
        "agent",
        "The governor's strongest action in force (hold_unfit, shrink_context, preempt, unload); null when none.",
    )
    store_writable: bool | None = _m("", "agent", "The job store accepts writes (false: disk full or read-only).")
    spool_rows: int | None = _m("rows", "agent", "Readings and events waiting in the offline spool.")
    spool_dropped: int | None = _m(
        "rows", "agent", "Readings and events the full spool has dropped since it was created."
    )
    unavailable: list[str] = Field(
        default_factory=list,
        description="Readings this board cannot give (psi, cgroup_memory, cgroup_psi, swap, thermal, cpufreq, "
        "throttling); `edge-agent telemetry` says why.",
        json_schema_extra={"unit": "", "group": "agent"},
    )

    # -- heat
    soc_temp_c: float | None = _m("°C", "heat", "SoC temperature (/sys/class/thermal), degrees Celsius.")
    cpu_freq_mhz: float | None = _m("MHz", "heat", "Current CPU frequency (highest over the cpufreq policies), MHz.")
    throttled_flags: int | None = _m(
        "",
        "heat",
        "Raspberry Pi firmware get_throttled bits (0 under-voltage, 1 frequency capped, 2 throttled, 3 soft temperature limit; +16 the same since boot); null where not exposed.",
    )
    under_voltage: bool | None = _m("", "heat", "Under-voltage now (Raspberry Pi).")
    freq_capped: bool | None = _m("", "heat", "ARM frequency capped now (Raspberry Pi).")
    throttled: bool | None = _m("", "heat", "Throttled now (Raspberry Pi).")
    soft_temp_limit: bool | None = _m("", "heat", "Soft temperature limit active now (Raspberry Pi).")

    @field_serializer("ts")
    def _ser_ts(self, v: datetime) -> str:
        return v.isoformat(timespec="milliseconds").replace("+00:00", "Z")

    def to_payload(self) -> bytes:
        return self.model_dump_json().encode()


def field_meta(model: type[BaseModel] = Telemetry) -> list[tuple[str, str, str, str]]:
    """(name, unit, group, description) per field, in declaration order: the one list the docs and
    the CLI are made from."""
    out = []
    for name, info in model.model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        out.append((name, str(extra.get("unit", "")), str(extra.get("group", "")), info.description or ""))
    return out


__all__ = ["GROUPS", "Telemetry", "field_meta"]
