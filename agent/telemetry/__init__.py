"""Memory telemetry: the readings (fields), the sampler, events, and the offline spool.

``Telemetry`` (agent.telemetry.fields) is the one declaration of every reading; ``Sampler`` takes
readings; ``Event`` is what goes to {root}/events; ``TelemetrySpool`` keeps both while the broker is
unreachable and is an ``OutboxSource``; ``Uplink`` decides per message: publish now, or spool.
"""

from __future__ import annotations

from typing import Any

from agent.telemetry.fields import GROUPS, Telemetry, field_meta
from agent.telemetry.sampler import AgentState, Sampler, engine_residency


def collect(device_id: str, ts: float, *, engine: Any, queue_depth: int, running_job: str | None) -> Telemetry:
    """One reading with a throw-away sampler (so its rates are null).

    Kept for agent/daemon.py until it holds a ``Sampler`` of its own; new code makes one
    ``Sampler(device_id, agent_state=..., residency=engine_residency(engine))`` and calls ``sample()``.
    """
    state = AgentState(
        model_loaded=bool(getattr(engine, "loaded", False)),
        queue_depth=queue_depth,
        jobs_running=1 if running_job else 0,
        running_job=running_job,
    )
    return Sampler(device_id, agent_state=lambda: state, residency=engine_residency(engine)).sample(ts)


__all__ = ["GROUPS", "AgentState", "Sampler", "Telemetry", "collect", "engine_residency", "field_meta"]
