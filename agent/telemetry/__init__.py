"""Memory telemetry: the readings (fields), the sampler, events, and the offline spool.

``Telemetry`` (agent.telemetry.fields) is the one declaration of every reading; ``Sampler`` takes
readings; ``Event`` is what goes to {root}/events; ``TelemetrySpool`` keeps both while the broker is
unreachable and is an ``OutboxSource``; ``Uplink`` decides per message: publish now, or spool.
"""

from __future__ import annotations

from agent.telemetry.fields import GROUPS, Telemetry, field_meta
from agent.telemetry.sampler import AgentState, Sampler, engine_residency

__all__ = ["GROUPS", "AgentState", "Sampler", "Telemetry", "engine_residency", "field_meta"]
