"""The memory governor: levels from memory signals, ordered actions on the agent's own work, and job
admission (policy: pure). The daemon feeds it readings and applies its decisions."""

from agent.governor.policy import (
    Action,
    Admission,
    Decision,
    Governor,
    GovernorState,
    Level,
    Posture,
    Signals,
    admit,
    available_to_agent,
    describe,
    step,
)

__all__ = [
    "Action", "Admission", "Decision", "Governor", "GovernorState", "Level", "Posture", "Signals", "admit",
    "available_to_agent", "describe", "step",
]  # fmt: skip
