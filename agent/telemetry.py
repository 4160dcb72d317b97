"""Memory telemetry: what the device reports on ``{root}/telemetry`` every ``telemetry.interval_s``.

Each field is declared once here, with its unit and description; the same declaration gives the
payload, the JSON Schema and the table in docs/protocol.md. Readings are cheap (/proc/self/status,
/proc/meminfo, cgroup files, /proc/pressure, mincore over the model file): no smaps.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_serializer

from agent.system.memory import cgroup_memory, meminfo, proc_status, psi_memory


class Telemetry(BaseModel):
    """Published on {root}/telemetry (QoS 0, not retained) every telemetry.interval_s."""

    model_config = ConfigDict(extra="forbid")

    device_id: str = Field(description="This device.")
    ts: AwareDatetime = Field(description="When the readings were taken, RFC 3339 UTC.")
    rss_anon_bytes: int = Field(description="Agent anonymous memory (RssAnon), bytes: what the OOM killer counts.")
    rss_file_bytes: int = Field(description="Agent file-backed resident memory (RssFile), bytes: mmap'd weights.")
    swap_bytes: int = Field(description="Agent memory in swap (VmSwap), bytes.")
    mem_available_bytes: int = Field(description="System MemAvailable, bytes.")
    mem_total_bytes: int = Field(description="System MemTotal, bytes.")
    swap_free_bytes: int = Field(description="System SwapFree, bytes.")
    swap_total_bytes: int = Field(description="System SwapTotal, bytes.")
    cgroup_usage_bytes: int | None = Field(description="The agent's memory cgroup usage, bytes; null without the controller.")
    cgroup_limit_bytes: int | None = Field(description="The agent's memory cgroup limit, bytes; null when unlimited or absent.")
    psi_some_avg10: float | None = Field(description="PSI memory 'some' over 10 s, percent; null without PSI.")
    psi_full_avg10: float | None = Field(description="PSI memory 'full' over 10 s, percent; null without PSI.")
    model_resident_pct: float | None = Field(
        description="Share of the model's layer weights resident in RAM, percent (mincore); null with no model."
    )
    queue_depth: int = Field(description="Jobs waiting (QUEUED).")
    running_job: str | None = Field(description="The job IN_PROGRESS, if any.")

    @field_serializer("ts")
    def _ser_ts(self, v: datetime) -> str:
        return v.isoformat(timespec="milliseconds").replace("+00:00", "Z")

    def to_payload(self) -> bytes:
        return self.model_dump_json().encode()


def collect(device_id: str, ts: float, *, engine: Any, queue_depth: int, running_job: str | None) -> Telemetry:
    proc, mem, cg, psi = proc_status(), meminfo(), cgroup_memory(), psi_memory()
    resident = None
    if getattr(engine, "loaded", False):
        layers = engine.residency()
        total = sum(layer.nbytes for layer in layers)
        if total:
            resident = round(100.0 * sum(layer.resident_bytes for layer in layers) / total, 1)
    return Telemetry(
        device_id=device_id,
        ts=datetime.fromtimestamp(ts, tz=timezone.utc),
        rss_anon_bytes=proc.rss_anon,
        rss_file_bytes=proc.rss_file,
        swap_bytes=proc.vm_swap,
        mem_available_bytes=mem.mem_available,
        mem_total_bytes=mem.mem_total,
        swap_free_bytes=mem.swap_free,
        swap_total_bytes=mem.swap_total,
        cgroup_usage_bytes=cg.usage,
        cgroup_limit_bytes=cg.limit,
        psi_some_avg10=psi.some_avg10 if psi.available else None,
        psi_full_avg10=psi.full_avg10 if psi.available else None,
        model_resident_pct=resident,
        queue_depth=queue_depth,
        running_job=running_job,
    )
