"""The fleet part: this board's load for its peers, hand-offs to idle peers, and the fleet lease.

With ``mqtt.fleet_group`` set the board takes jobs from the group's shared subscription, which the
broker deals round-robin. This part evens that out and keeps the group's promise:

- **Load.** ``load()`` goes into the board's retained status (``fleet``): free slots, queue length,
  measured run time per token, the lease. The status is published again when the load changes.
- **Hand-offs.** It reads the peers' statuses (``{prefix}/+/status``) and, with ``mqtt.fleet_share``,
  hands fleet jobs it has not started to a free peer where they would end sooner
  (``agent.jobs.share.plan_handoffs``). A hand-off leaves the queue and is recorded in one store
  transaction (``JobStore.release``), then goes to the peer's own submit topic (same ``job_id``,
  ``handed_from`` set) and is announced with a RELEASED status naming the peer; both are sent again
  until the broker acknowledged them, and the peer never runs an id twice.
- **Lease.** A board away from the broker for ``mqtt.fleet_lease_s / 2`` (counted across restarts
  from the last contact it recorded) gives back its unstarted fleet jobs (from the fleet topic or
  handed to it): they leave the queue, are not run here, and are announced RELEASED (no
  ``handed_to``) once it is back. Submitters send a fleet job again when its board has been offline
  or stale for the whole lease (``agent.operator.fleet_jobs.FleetJobs``), so a job held by a board
  that died runs elsewhere within the broker's notice of the death (at most 1.5 x keepalive) +
  ``fleet_lease_s``, and a board that comes back after half the lease does not run what may have
  been sent again.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

from agent.codes import JobStatus
from agent.config.sections import MQTTSettings
from agent.errors import StoreError
from agent.jobs.protocol import FleetLoad, JobSubmit, StatusMessage, status_state
from agent.jobs.share import PeerLoad, Waiting, plan_handoffs
from agent.jobs.store import Handoff, JobRecord, JobStore
from agent.mqtt.topics import Topics
from agent.mqtt.transport import PublishHandle

log = logging.getLogger(__name__)

CONTACT_KEY = "fleet_contact"  # store meta: the last time this board was in touch with its broker (epoch s)
SPEED_KEY = "fleet_ms_per_token"  # store meta: the measured run time per token, kept across restarts
HOP_S = 0.05  # what a hand-off costs (two publishes and the peer's store), seconds, for plan_handoffs
_EWMA = 0.3  # weight of the newest job in the run time per token
# The status goes to every board of the prefix: a load change is published at most this often (the
# next pass, within a second, publishes the latest), so a busy fleet does not flood its broker.
LOAD_EVERY_S = 0.2


@dataclass(frozen=True)
class _Peer:
    load: FleetLoad
    model: str | None
    status: dict[str, Any]


class FleetShare:
    def __init__(
        self,
        store: JobStore,
        topics: Topics,
        *,
        settings: Callable[[], MQTTSettings],
        model: Callable[[], str],
        publish: Callable[..., PublishHandle],
        connected: Callable[[], bool],
        capacity: Callable[[], int],
        running: Callable[[], list[str]],
        holds: Callable[[], frozenset[str]] = frozenset,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store, self._topics = store, topics
        self._settings, self._model, self._publish, self._connected = settings, model, publish, connected
        self._capacity, self._running, self._clock, self._monotonic = capacity, running, clock, monotonic
        self._holds = holds
        self.group = settings().fleet_group  # fixed for the life of the connection's subscriptions
        self._peers: dict[str, _Peer] = {}
        self._lock = threading.Lock()  # the peers' view and the measured speed
        self._acting = threading.Lock()  # one hand-off pass at a time (the fleet thread, or the intake's)
        self._ms_per_token: float | None = None
        self._contact = monotonic()  # the last moment in touch with the broker (monotonic)
        self._contact_saved = 0.0
        self._inflight: dict[str, list[PublishHandle]] = {}  # job id -> publish handles of its hand-off
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._told: FleetLoad | None = None
        self._told_at = -LOAD_EVERY_S
        self._load_held = False  # a load change not published yet (LOAD_EVERY_S)
        self._store_told = False  # a store error was logged; cleared by a pass that succeeds
        self._on_load: Callable[[], None] = lambda: None

    @property
    def active(self) -> bool:
        return self.group is not None

    @property
    def subscriptions(self) -> list[tuple[str, int]]:
        """The peers' statuses (retained): their load."""
        return [(f"{self._topics.prefix}/+/status", 1)] if self.active else []

    def follow(self, on_load: Callable[[], None]) -> None:
        """``on_load()``: publish the board's status again (its load changed)."""
        self._on_load = on_load

    # ------------------------------------------------------------------ life cycle

    def start(self) -> None:
        """Before the runner starts: give back what the lease no longer covers, then follow the load."""
        if not self.active:
            return
        self.recover()
        self._thread = threading.Thread(target=self._loop, name="fleet", daemon=True)
        self._thread.start()

    def recover(self) -> None:
        """The time away counts from the last contact recorded before a stop or a crash; past half the
        lease, the unstarted fleet jobs are given back. The speed measured before is taken up again."""
        last = self._store.meta(CONTACT_KEY)
        if isinstance(last, int | float):
            self._contact = self._monotonic() - max(0.0, self._clock() - float(last))
        speed = self._store.meta(SPEED_KEY)  # what this board measured before the restart, until a job runs
        if isinstance(speed, int | float) and speed > 0 and self._ms_per_token is None:
            self._ms_per_token = float(speed)
        self._check_lease()

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout=10)
        if self._connected():
            self._save_contact(force=True)

    def poke(self) -> None:
        """Something changed (a job started or ended, a peer's load): look again soon."""
        self._wake.set()

    def place(self) -> None:
        """A job was just stored: hand it on now if a peer would end it sooner, before the runner (woken
        after this) starts it in a free slot here; a job started here can no longer move. Called on the
        intake's thread; the runner may still win the race, and the job then runs here."""
        if self.active and self._connected() and self._settings().fleet_share:
            try:
                with self._acting:
                    self._hand_off()
            except StoreError as e:  # the job is stored: it stays here, and the intake acknowledges it
                self._store_failed(e)
        self.poke()

    # ------------------------------------------------------------------ inputs

    def handles(self, topic: str) -> bool:
        parts = topic.split("/")
        return self.active and len(parts) == 3 and parts[0] == self._topics.prefix and parts[2] == "status"

    def on_peer_status(self, topic: str, payload: bytes) -> None:
        device = topic.split("/")[1]
        if device == self._topics.device_id:
            return
        try:
            status = json.loads(payload) if payload else None
            fleet = (
                FleetLoad.model_validate(status["fleet"]) if isinstance(status, dict) and status.get("fleet") else None
            )
        except (ValueError, TypeError, KeyError):
            fleet = None
        with self._lock:
            if fleet is None or fleet.group != self.group or not isinstance(status, dict):
                self._peers.pop(device, None)
            else:
                model = status.get("model")
                self._peers[device] = _Peer(fleet, PurePath(model).name if isinstance(model, str) else None, status)
        self.poke()

    def job_ended(self, rec: JobRecord) -> None:
        """A job ended here: its run time per generated token feeds this board's measured speed."""
        out = rec.outcome
        if out is not None and out.usage and out.timings:
            self.measured(
                (out.timings.prompt_ms or 0.0) + (out.timings.generation_ms or 0.0), out.usage.completion_tokens
            )
        self.poke()

    def measured(self, run_ms: float, tokens: int) -> None:
        """A job ran ``run_ms`` (its prompt and generation) for ``tokens`` generated tokens."""
        if run_ms > 0 and tokens > 0:
            per = run_ms / tokens
            with self._lock:
                old = self._ms_per_token
                self._ms_per_token = per if old is None else old + _EWMA * (per - old)

    # ------------------------------------------------------------------ outputs

    def load(self) -> FleetLoad | None:
        """This board's load for its status (None without a fleet group)."""
        if self.group is None:
            return None
        queued = self._store.queued_count()
        held = bool(self._holds())
        return FleetLoad(
            group=self.group,
            free=0 if held else max(0, max(1, self._capacity()) - len(self._running()) - queued),
            held=held,
            queued=queued,
            ms_per_token=round(self._ms_per_token, 3) if self._ms_per_token else None,
            lease_s=self._settings().fleet_lease_s,
        )

    def peers(self) -> dict[str, FleetLoad]:
        with self._lock:
            return {d: p.load for d, p in self._peers.items()}

    # ------------------------------------------------------------------ the pass

    def _loop(self) -> None:
        while not self._stopping.is_set():
            timeout = min(1.0, self._settings().fleet_lease_s / 8)
            if self._load_held:  # a load change waits for LOAD_EVERY_S: look again then
                timeout = min(timeout, max(0.0, self._told_at + LOAD_EVERY_S - self._monotonic()))
            self._wake.wait(timeout=timeout)
            self._wake.clear()
            if self._stopping.is_set():
                return
            try:
                self.run_pass()
            except StoreError as e:
                self._store_failed(e)
            except Exception:  # a bug in one pass must not end the fleet part: the next pass tries again
                log.exception("fleet pass failed; trying again")
            else:
                self._store_told = False

    def _store_failed(self, e: StoreError) -> None:
        """The store takes no writes (a full disk): once in the log; the store's health part says the rest."""
        if not self._store_told:
            self._store_told = True
            log.warning("fleet: %s; hand-offs, the lease and the load wait until the store takes writes again", e)

    def run_pass(self) -> None:
        """One look: the lease, hand-offs not yet acknowledged, new hand-offs, the load in the status."""
        if self._connected():
            self._contact = self._monotonic()
            self._save_contact()
            with self._acting:
                self._send_unsent()
                if self._settings().fleet_share:
                    self._hand_off()
        else:
            self._check_lease()
        load = self.load()
        mono = self._monotonic()
        self._load_held = load != self._told and self._connected()
        if self._load_held and mono - self._told_at >= LOAD_EVERY_S:
            self._told, self._told_at, self._load_held = load, mono, False
            self._on_load()

    def _save_contact(self, force: bool = False) -> None:
        now = self._clock()
        if force or now - self._contact_saved >= self._settings().fleet_lease_s / 8:
            self._contact_saved = now
            self._store.set_meta(CONTACT_KEY, now)
            if (ms := self._ms_per_token) is not None:
                self._store.set_meta(SPEED_KEY, ms)

    def _check_lease(self) -> None:
        """Away for half the lease: every unstarted fleet job is given back (announced once connected)."""
        away = self._monotonic() - self._contact
        half = self._settings().fleet_lease_s / 2
        if away < half:
            return
        view = self._store.queue_view()
        given = [h for q in view if q.via in ("fleet", "handed") if (h := self._store.release(q.job_id, None))]
        if given:
            log.warning(
                "fleet: away from the broker for %.0f s (mqtt.fleet_lease_s / 2 = %g s): gave back %d fleet job(s) "
                "not running here (%s); they are announced RELEASED when the broker is back, and submitters send "
                "them again",
                away,
                half,
                len(given),
                ", ".join(h.job_id for h in given),
            )

    def _hand_off(self) -> None:
        now = self._clock()
        mine = PurePath(self._model()).name
        with self._lock:
            peers = [
                PeerLoad(d, p.load.free, p.load.ms_per_token, p.load.queued)
                for d, p in self._peers.items()
                if p.model == mine and not p.load.held and status_state(p.status, now) == "online"
            ]
            ms = self._ms_per_token
        if not peers:
            return
        view = self._store.queue_view()
        if not any(q.via == "fleet" for q in view):
            return
        running = self._running()
        records = [self._store.get(j) for j in running]
        # about half-way on average; the stored request's max_tokens, without decoding it again
        running_left = [int((r.request or {}).get("max_tokens", 0)) // 2 if r is not None else 0 for r in records]
        plan = plan_handoffs(
            [Waiting(q.job_id, q.max_tokens, q.via == "fleet") for q in view],
            running_left=running_left,
            slots=self._capacity(),
            ms_per_token=ms,
            peers=peers,
            hop_s=HOP_S,
            held=bool(self._holds()),
        )
        for step in plan:
            handoff = self._store.release(step.job_id, step.to, now)
            if handoff is None:
                continue  # started or ended meanwhile
            log.info(
                "fleet: job %s handed to %s (would end in %.1f s there, %.1f s here)",
                step.job_id,
                step.to,
                step.there_s,
                step.here_s,
            )
            with self._lock:
                if (peer := self._peers.get(step.to)) is not None:  # more load there until its next status
                    free, queued = peer.load.free, peer.load.queued
                    load = peer.load.model_copy(update={"free": max(0, free - 1), "queued": queued + (free == 0)})
                    self._peers[step.to] = _Peer(load, peer.model, peer.status)
            self._send(handoff)

    def _send_unsent(self) -> None:
        for handoff in self._store.unsent_handoffs():
            handles = self._inflight.get(handoff.job_id)
            if handles is None or any(h.done and h.error for h in handles):
                self._send(handoff)
            elif all(h.done for h in handles):
                self._store.handoff_sent(handoff.job_id)
                del self._inflight[handoff.job_id]

    def _send(self, handoff: Handoff) -> None:
        """The job to its new board (if any) and its RELEASED status, both QoS 1 (sent again until acknowledged)."""
        handles = []
        if handoff.to is not None:
            job = JobSubmit.model_validate(handoff.request).model_copy(update={"handed_from": self._topics.device_id})
            handles.append(self._publish(Topics(self._topics.prefix, handoff.to).submit, job.to_payload(), qos=1))
            why = f"handed to {handoff.to}, where it would end sooner"
        else:
            why = "given back: this board was away from the broker for mqtt.fleet_lease_s / 2; send it again"
        status = StatusMessage(
            job_id=handoff.job_id,
            device_id=self._topics.device_id,
            status=JobStatus.RELEASED,
            attempt=0,
            ts=self._clock(),
            handed_to=handoff.to,
            message=why,
        )
        handles.append(self._publish(self._topics.status(handoff.job_id), status.to_payload(), qos=1))
        self._inflight[handoff.job_id] = handles
        self.poke()  # mark it sent once acknowledged
