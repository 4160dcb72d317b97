"""Which unstarted fleet jobs a board hands to an idle peer: a pure decision (agent/jobs/fleet.py acts on it).

The broker deals a shared subscription's messages round-robin, whatever each member's speed or window
(measured: docs/mqtt-transport.md, "Fleet jobs by each board's speed"), so a burst leaves a slow board
with as many jobs as a fast one. Each board therefore looks at its own queue and at its peers' load
(their retained status): a fleet job that would end sooner on a peer than here, the peer's own queue
counted, is handed to that peer. Each hand-off adds to that peer's load in this board's view until
its next status says otherwise, so a burst is spread in one look, not one job per status.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Waiting:
    """A job in this board's queue, in the order it would start."""

    job_id: str
    tokens: int  # its max_tokens: the most it may generate
    movable: bool  # a fleet job taken from the fleet topic (not handed here by a peer, not sent to this board)


@dataclass(frozen=True)
class PeerLoad:
    """A peer of the group that may take jobs (online, fresh, same model): from its retained status."""

    device_id: str
    free: int  # slots free with nothing queued
    ms_per_token: float | None
    queued: int = 0  # jobs waiting in its queue


@dataclass(frozen=True)
class Handoff:
    job_id: str
    to: str
    here_s: float  # when it would end here, seconds from now
    there_s: float  # when it would end on the peer, seconds from now (the hop included)


def finish_times(
    queue: Sequence[Waiting], *, running_left: Sequence[int], slots: int, ms_per_token: float
) -> dict[str, float]:
    """When each queued job would end here, seconds from now: each of ``slots`` lanes runs one job at a
    time at ``ms_per_token``; running jobs have ``running_left`` tokens to go; queued jobs take the
    lane that frees first, in queue order."""
    lanes = sorted([left * ms_per_token / 1000 for left in running_left][: max(1, slots)])
    lanes += [0.0] * (max(1, slots) - len(lanes))
    out: dict[str, float] = {}
    for job in queue:
        lanes.sort()
        lanes[0] += job.tokens * ms_per_token / 1000
        out[job.job_id] = lanes[0]
    return out


def plan_handoffs(
    queue: Sequence[Waiting],
    *,
    running_left: Sequence[int],
    slots: int,
    ms_per_token: float | None,
    peers: Sequence[PeerLoad],
    hop_s: float,
    held: bool = False,
) -> list[Handoff]:
    """The hand-offs to make now: from the job that would end last here, each movable job goes to the
    peer where it would end first, if that is more than ``hop_s`` sooner than here (``hop_s``: the time
    a hand-off costs, the publish and the peer's store). On a peer with no free slot a job waits for its
    queue and its running job (taken as half done), each counted at the size of the job being placed.
    Nothing moves before this board has measured its speed (a job run): boards that know nothing of
    their speeds would only trade jobs on statuses a burst has already made stale. A peer that has not
    measured its own yet (new, or restarted) gets one job if it is idle, counted at this board's speed,
    and measures itself on it. ``held``: this board starts nothing now (intake paused, a model change,
    the governor, an unwritable store): its jobs end here at no known time, so each goes to a peer,
    measured or not."""
    if not ms_per_token and not held:
        return []
    mine = ms_per_token or max([p.ms_per_token or 0.0 for p in peers] + [1.0])
    ends = finish_times(queue, running_left=running_left, slots=slots, ms_per_token=mine)
    if held:
        ends = dict.fromkeys(ends, math.inf)
    takers = [p for p in peers if p.ms_per_token or p.free > 0]
    speed = {p.device_id: p.ms_per_token or mine for p in takers}
    probe = {p.device_id for p in takers if not p.ms_per_token}  # one job each, to learn their speed
    free = {p.device_id: p.free for p in takers}
    ahead = {p.device_id: 0.0 if p.free > 0 else p.queued + 0.5 for p in takers}  # jobs before a new one starts
    out: list[Handoff] = []
    for job in sorted((j for j in queue if j.movable), key=lambda j: ends[j.job_id], reverse=True):
        if not speed:
            break

        def there(d: str, tokens: int = job.tokens) -> float:
            return hop_s + (ahead[d] + 1) * tokens * speed[d] / 1000

        to = min(speed, key=lambda d: (there(d), d))
        if there(to) + hop_s >= ends[job.job_id]:
            continue  # no gain here; an earlier job ends sooner still
        out.append(Handoff(job.job_id, to, ends[job.job_id], there(to)))
        if to in probe:
            del speed[to]
        elif free[to] > 0:
            free[to] -= 1
            if free[to] == 0:
                ahead[to] = 1.0  # this job now runs there; the next waits for it
        else:
            ahead[to] += 1
    return out
