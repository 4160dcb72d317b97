"""The gate in front of the engine: whether new jobs may start, and which jobs run now.

Holds stop new starts (intake paused, a model change, the memory governor, an unwritable store);
each running job has a cancel event that stops it, with the reason it was stopped (a cancel, a
shutdown, a preemption). The runner starts and ends runs through the gate; the model supervisor, the
memory governor and the daemon hold, preempt and quiesce through it. Built before all of them, so
none needs another.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum


class StopReason(StrEnum):
    """Why a running job was asked to stop."""

    CANCEL = "cancel"  # a cancel request: the job ends CANCELED
    SHUTDOWN = "shutdown"  # the daemon stops: requeued, the run is not counted
    PREEMPT = "preempt"  # memory pressure or a model change: requeued (store.max_preemptions free ones)


@dataclass
class Slot:
    """A running job's place: its cancel event, and why it was stopped (None: it was not)."""

    job_id: str
    cancel: threading.Event = field(default_factory=threading.Event)
    stop: StopReason | None = None


class Gate:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._slots: dict[str, Slot] = {}
        self._cancel_requests: set[str] = set()
        self._holds: set[str] = set()
        self._on_release: list[Callable[[], None]] = []
        self._on_slots: list[Callable[[], None]] = []

    def on_release(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` whenever a hold is released (the runner looks at the queue again)."""
        self._on_release.append(callback)

    def on_slots(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` whenever a job takes a slot or leaves one (the board's load changed)."""
        self._on_slots.append(callback)

    def _slots_changed(self) -> None:
        for callback in self._on_slots:
            callback()

    # ------------------------------------------------------------------ holds

    def hold(self, reason: str) -> None:
        """Start no new job until ``release(reason)``; running jobs go on."""
        with self._lock:
            self._holds.add(reason)

    def release(self, reason: str) -> None:
        with self._lock:
            self._holds.discard(reason)
        for callback in self._on_release:
            callback()

    def set_hold(self, reason: str, on: bool) -> None:
        (self.hold if on else self.release)(reason)

    @property
    def holds(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._holds)

    # ------------------------------------------------------------------ running jobs

    @property
    def running(self) -> list[str]:
        with self._lock:
            return list(self._slots)

    def enter(self, job_id: str, *, stopping: bool) -> Slot | None:
        """A claimed job is about to run: its slot, or None when a stop (``stopping``) or a hold set
        just before the claim sends it back without running (unless a cancel for it is pending: that
        ends CANCELED at once)."""
        slot = Slot(job_id)
        with self._lock:
            if (stopping or self._holds) and job_id not in self._cancel_requests:
                return None
            self._slots[job_id] = slot
            if job_id in self._cancel_requests:
                slot.stop = StopReason.CANCEL
                slot.cancel.set()
        self._slots_changed()
        return slot

    def leave(self, job_id: str) -> None:
        """The run is settled: its slot is free."""
        with self._idle:
            self._slots.pop(job_id, None)
            self._cancel_requests.discard(job_id)
            self._idle.notify_all()
        self._slots_changed()

    def cancel(self, job_id: str) -> bool:
        """A cancel request for a job the store says is running: stop it (it ends CANCELED). The
        request is also kept for a job claimed but not yet started. True if it was running here."""
        with self._lock:
            self._cancel_requests.add(job_id)
            slot = self._slots.get(job_id)
            if slot is None:
                return False
            slot.stop = slot.stop or StopReason.CANCEL
            slot.cancel.set()
            return True

    def stop(self, why: StopReason, job_ids: list[str] | None = None) -> list[str]:
        """Stop running jobs (all, or these) for ``why``. Returns their ids."""
        with self._lock:
            hit = [s for s in self._slots.values() if job_ids is None or s.job_id in job_ids]
            for slot in hit:
                slot.stop = slot.stop or why
                slot.cancel.set()
            return [s.job_id for s in hit]

    def preempt(self, job_ids: list[str] | None = None) -> list[str]:
        """Stop running jobs (all, or these) and put them back in the queue. Returns their ids."""
        return self.stop(StopReason.PREEMPT, job_ids)

    def wait_idle(self, timeout: float | None) -> bool:
        """Wait until no job runs (None: as long as it takes). False at the timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._slots, timeout)

    def quiesce(self, grace_s: float, reason: str) -> list[str]:
        """Hold new starts (``reason``), let running jobs finish within ``grace_s``, then preempt
        what still runs and wait for it to be requeued. Returns the preempted ids. The caller
        releases the hold when done."""
        self.hold(reason)
        if self.wait_idle(grace_s):
            return []
        preempted = self.preempt()
        self.wait_idle(None)
        return preempted


__all__ = ["Gate", "Slot", "StopReason"]
