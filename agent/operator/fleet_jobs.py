"""Fleet jobs from the submitter's side: publish to a group's shared topic and follow each job to its
result on whichever board runs it, sending it again when the board holding it is gone.

The rule a submitter keeps (docs/protocol.md, "Fleet jobs"), which this client implements:

- The board that holds a job is the one whose status for it came last (``{prefix}/{device}/jobs/{id}/
  status``); a RELEASED status with ``handed_to`` moves it to that board.
- Send the job again (same ``job_id``, to the fleet topic) when:
  1. nothing at all was heard of it ``resend_after_s`` after it was sent (lost with a broker session);
  2. its holder announced RELEASED without ``handed_to`` (the holder gave it back);
  3. its holder's retained device status has said offline, stopping or stale (expired) for the holder's
     ``fleet.lease_s`` without a break (the board died, or lost the broker for good): a board away that
     long gives back its unstarted fleet jobs itself after half the lease, so the job is not run twice
     unless it was already running there.
- The first result of a job is its result; a second (a job that was running on a board that lost the
  broker, and ran again elsewhere) is counted in ``duplicates`` and otherwise ignored.
- A streamed job's pieces (``stream_of``) are taken from its holder only: pieces of a copy still running
  on a board that lost it are not mixed in.
"""

from __future__ import annotations

import json
import queue
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from agent.config import Settings
from agent.errors import TransportError
from agent.jobs.protocol import status_state
from agent.mqtt.topics import Topics
from agent.mqtt.transport import InboundMessage, MqttTransport

_LEASE_S = 120.0  # a holder's lease when its status names none (mqtt.fleet_lease_s's default)


@dataclass
class _Job:
    payload: bytes
    sent_at: float
    holder: str | None = None
    heard: bool = False
    sends: int = 1
    result: dict[str, Any] | None = None
    ran_on: str | None = None


@dataclass
class _Board:
    status: dict[str, Any] = field(default_factory=dict)
    away_since: float | None = None  # monotonic: since when its status is not 'online' (or it is stale)
    lease_s: float | None = None  # from its last 'online' status (an 'offline' one carries no load)


class FleetJobs:
    def __init__(
        self,
        settings: Settings,
        *,
        resend_after_s: float = 30.0,
        connect_timeout: float = 10.0,
        stream_of: Iterable[str] = (),
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        prefix = self._prefix = settings.mqtt.prefix
        self.topic = Topics(prefix, "fleet-client").fleet_publish
        self.resend_after_s = resend_after_s
        self._clock, self._monotonic = clock, monotonic
        mqtt = settings.mqtt.model_copy(
            update={"client_id": f"edge-fleet-{uuid.uuid4().hex[:12]}", "session_expiry_s": 0, "fleet_group": None}
        )
        self._inbox: queue.Queue[InboundMessage] = queue.Queue()
        self.transport = MqttTransport(
            mqtt,
            will=None,
            on_message=self._inbox.put,
            subscriptions=[
                (f"{prefix}/+/jobs/+/status", 1),
                (f"{prefix}/+/jobs/+/result", 1),
                (f"{prefix}/+/status", 1),
                # The pieces of the jobs to stream, from whichever board runs them (QoS 0, as published).
                *((f"{prefix}/+/jobs/{job_id}/stream", 0) for job_id in stream_of),
            ],
            manual_ack=False,
        )
        self._connect_timeout = connect_timeout
        self.jobs: dict[str, _Job] = {}
        self._boards: dict[str, _Board] = {}
        self.duplicates = 0  # results after a job's first
        self.handed: set[str] = set()  # jobs with a RELEASED status naming a peer (handed to a faster board)
        self.resends: list[tuple[str, str]] = []  # (job id, why), in order
        self._following: set[str] = set()
        self._early: list[str] = []  # first results taken by takers(), not told to wait()'s on_result yet
        self._on_status: Callable[[str, dict[str, Any]], None] | None = None
        self._on_resend: Callable[[str, str], None] | None = None
        self._on_piece: Callable[[str, dict[str, Any]], None] | None = None

    def __enter__(self) -> FleetJobs:
        self.transport.start()
        if not (
            self.transport.wait_connected(self._connect_timeout)
            and self.transport.wait_subscribed(self._connect_timeout)
        ):
            self.transport.stop()
            raise TransportError(f"could not connect to the broker within {self._connect_timeout:g} s")
        return self

    def __exit__(self, *exc: object) -> None:
        self.transport.stop()

    def submit(self, request: dict[str, Any], *, job_id: str | None = None) -> str:
        """Publish one job to the group's topic (QoS 1, the broker's PUBACK awaited). Returns its id."""
        job_id = job_id or uuid.uuid4().hex
        payload = json.dumps({"job_id": job_id, "kind": "generate", **request}).encode()
        self.jobs[job_id] = _Job(payload, self._monotonic())
        self._send(job_id, None)
        return job_id

    def cancel(self, job_id: str, timeout: float = 10.0) -> str | None:
        """Cancel a job on the board that holds it (a board that handed it on sends the cancel after it).
        Returns that board, or None when no board said it holds the job within ``timeout`` (nothing sent)."""
        end = self._monotonic() + timeout
        self.takers()  # what has arrived so far: the latest holder
        while (holder := self.jobs[job_id].holder) is None and (left := end - self._monotonic()) > 0:
            try:
                msg = self._inbox.get(timeout=left)
            except queue.Empty:
                break
            if (done := self._take(msg)) is not None:
                self._early.append(done)
        if holder is not None:
            topic = Topics(self._prefix, holder).cancel(job_id)
            if not self.transport.publish(topic, b"", qos=1).wait(self._connect_timeout):
                raise TransportError(f"the broker did not acknowledge the cancel on {topic}")
        return holder

    def wait(
        self,
        job_ids: Iterable[str],
        timeout: float,
        on_result: Callable[[str, dict[str, Any]], None] | None = None,
        on_status: Callable[[str, dict[str, Any]], None] | None = None,
        on_resend: Callable[[str, str], None] | None = None,
        on_piece: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> dict[str, dict[str, Any]]:
        """Follow the jobs until each has a result or ``timeout`` passed; returns the results by job id.
        ``on_status(device, status)`` sees each job status, ``on_result(job_id, result)`` each first result,
        ``on_resend(job_id, why)`` each time a job is sent again, ``on_piece(device, chunk)`` each stream
        piece from the board holding the job (jobs given in ``stream_of``)."""
        self._on_status, self._on_resend, self._on_piece = on_status, on_resend, on_piece
        want = self._following = set(job_ids)
        end = self._monotonic() + timeout
        for early in self._early:
            if on_result is not None and early in want:
                on_result(early, self.jobs[early].result or {})
        self._early.clear()
        while (left := end - self._monotonic()) > 0 and any(self.jobs[j].result is None for j in want):
            try:
                msg: InboundMessage | None = self._inbox.get(timeout=min(left, 0.5))
            except queue.Empty:
                msg = None  # look at the holders' leases again: a status goes stale without a message
            if msg is not None:
                done = self._take(msg)
                if done is not None and on_result is not None and done in want:
                    on_result(done, self.jobs[done].result or {})
            self._resend_due()
        return {j: r for j in want if (r := self.jobs[j].result) is not None}

    def takers(self) -> list[str]:
        """The boards whose retained status says they are online and in a fleet group, from what has
        arrived so far (the broker sends retained statuses before it acknowledges a later publish)."""
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                break
            if (done := self._take(msg)) is not None:
                self._early.append(done)  # wait() tells on_result about it
        now = self._clock()
        return sorted(
            d for d, b in self._boards.items() if b.status.get("fleet") and status_state(b.status, now) == "online"
        )

    # ------------------------------------------------------------------ what came in

    def _take(self, msg: InboundMessage) -> str | None:
        parts = msg.topic.split("/")
        try:
            data = json.loads(msg.payload) if msg.payload else None
        except ValueError:
            return None
        if len(parts) == 3 and parts[2] == "status":
            self._board_status(parts[1], data if isinstance(data, dict) else {})
            return None
        if len(parts) != 5 or not isinstance(data, dict) or (job := self.jobs.get(parts[3])) is None:
            return None
        device, job_id = parts[1], parts[3]
        job.heard = True
        if parts[4] == "result":
            if job.result is not None:
                self.duplicates += 1
                return None
            job.result, job.ran_on = data, device
            return job_id
        if parts[4] == "stream":
            if job.result is None and device == job.holder and job_id in self._following and self._on_piece:
                self._on_piece(device, data)
            return None
        if parts[4] == "status" and job.result is None:
            if self._on_status is not None and job_id in self._following:
                self._on_status(device, data)
            if data.get("status") == "RELEASED":
                if (to := data.get("handed_to")) is None:
                    self._send(job_id, f"{device} gave it back")
                else:
                    job.holder = to
                    self.handed.add(job_id)
            else:
                job.holder = device
        return None

    def _board_status(self, device: str, status: dict[str, Any]) -> None:
        board = self._boards.setdefault(device, _Board())
        board.status = status
        lease = (status.get("fleet") or {}).get("lease_s")
        if isinstance(lease, int | float) and lease > 0:
            board.lease_s = float(lease)
        self._judge(board)

    def _judge(self, board: _Board) -> None:
        if status_state(board.status, self._clock()) == "online":
            board.away_since = None
        elif board.away_since is None:
            board.away_since = self._monotonic()

    # ------------------------------------------------------------------ sending again

    def _resend_due(self) -> None:
        now = self._monotonic()
        for each in self._boards.values():
            self._judge(each)
        for job_id, job in self.jobs.items():
            if job.result is not None:
                continue
            if not job.heard and now - job.sent_at >= self._unheard_after() * job.sends:
                self._send(job_id, f"nothing heard of it for {now - job.sent_at:.0f} s")
            elif job.holder is not None and (holder := self._boards.get(job.holder)) is not None:
                lease = holder.lease_s or _LEASE_S
                if holder.away_since is not None and now - holder.away_since >= lease:
                    self._send(
                        job_id, f"{job.holder} has been away for {now - holder.away_since:.0f} s (lease {lease:g} s)"
                    )

    def _unheard_after(self) -> float:
        """How long a job may go unheard of before it is sent again: ``resend_after_s``, and at least the
        longest lease of the boards seen (a copy dealt to a dead board's fleet session, which lasts half
        its lease, must be gone before another is sent, or both could run)."""
        return max([self.resend_after_s, *(b.lease_s for b in self._boards.values() if b.lease_s is not None)])

    def _send(self, job_id: str, why: str | None) -> None:
        job = self.jobs[job_id]
        if why is not None:
            self.resends.append((job_id, why))
            if self._on_resend is not None:
                self._on_resend(job_id, why)
            job.sends += 1
            job.holder, job.heard = None, False
        job.sent_at = self._monotonic()
        handle = self.transport.publish(self.topic, job.payload, qos=1)
        if not handle.wait(self._connect_timeout):
            raise TransportError(f"the broker did not acknowledge the publish to {self.topic}")
