"""The memory governor: levels from memory signals and ordered actions on the agent's own work (policy:
pure). The daemon feeds it readings and applies its decisions; job admission, which reads its posture,
is agent.jobs.admission."""

from agent.governor.policy import (
    Action,
    Decision,
    Governor,
    GovernorState,
    Level,
    Posture,
    Signals,
    available_to_agent,
    describe,
    step,
)

__all__ = [
    "Action", "Admission", "Decision", "Governor", "GovernorState", "Level", "Posture", "Signals",
    "available_to_agent", "describe", "step",
]  # fmt: skip
