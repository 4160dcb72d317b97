"""The requeue decision (agent.jobs.outcome.requeue_decision), pure: the table the store applies."""

from __future__ import annotations

import pytest

from agent.jobs.outcome import requeue_decision


@pytest.mark.parametrize(
    ("reason", "preemptions", "attempt", "expected"),
    [
        # a shutdown never counts, however often the job was preempted or started
        ("shutdown", 0, 1, "requeued"),
        ("shutdown", 9, 9, "requeued"),
        # the first max_preemptions (2 here) preemptions are free
        ("preempt", 1, 1, "requeued"),
        ("preempt", 2, 3, "requeued"),
        # later ones count as an attempt ...
        ("preempt", 3, 1, "requeued_counted"),
        ("preempt", 3, 2, "requeued_counted"),
        # ... until the attempts are used up (max_attempts 3): the job ends
        ("preempt", 3, 3, "failed_preempted"),
        ("preempt", 7, 4, "failed_preempted"),
    ],
)
def test_requeue_decision_table(reason: str, preemptions: int, attempt: int, expected: str) -> None:
    got = requeue_decision(
        reason,  # type: ignore[arg-type]
        preemptions=preemptions,
        attempt=attempt,
        max_preemptions=2,
        max_attempts=3,
    )
    assert got == expected
