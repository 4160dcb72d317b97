"""Process priority: niceness and the OOM killer's bias, applied to the agent's own process.

Raising niceness and the OOM score needs no privilege; lowering either does (CAP_SYS_NICE /
CAP_SYS_RESOURCE). Where the kernel refuses, the reason is returned for the log, never raised:
a board without the privilege still serves jobs.
"""

from __future__ import annotations

import os
from pathlib import Path


def apply_priority(nice: int, oom_score_adj: int, *, pid: int = 0) -> list[str]:
    """Set niceness and oom_score_adj; returns one line per setting saying what happened."""
    notes: list[str] = []
    try:
        current = os.getpriority(os.PRIO_PROCESS, pid)
        if current != nice:
            os.setpriority(os.PRIO_PROCESS, pid, nice)
        notes.append(f"nice {nice} (was {current})")
    except OSError as e:
        notes.append(f"nice {nice} not applied: {e.strerror} (needs CAP_SYS_NICE to lower; set Nice= in the unit)")
    path = Path(f"/proc/{pid or 'self'}/oom_score_adj")
    try:
        was = path.read_text().strip()
        if was != str(oom_score_adj):
            path.write_text(str(oom_score_adj))
        notes.append(f"oom_score_adj {oom_score_adj} (was {was})")
    except OSError as e:
        notes.append(
            f"oom_score_adj {oom_score_adj} not applied: {e.strerror} (lowering needs CAP_SYS_RESOURCE; "
            "set OOMScoreAdjust= in the unit)"
        )
    return notes
