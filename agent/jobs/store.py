"""The durable job store: every job's request, state and terminal outcome, in one SQLite file.

The store owns the job life cycle on disk and the rules that make delivery dependable:

* a job is stored before the submit message is acknowledged (``accept``), so a crash after
  the acknowledgement cannot lose it;
* a job has exactly one terminal outcome: every transition into a terminal status is a
  guarded UPDATE that only succeeds on a non-terminal row;
* a terminal outcome stays until it is delivered (``mark_delivered``); retention (``prune``)
  only ever deletes rows that are terminal *and* delivered;
* after a crash, ``recover`` puts interrupted jobs back in the queue, or fails them once they
  have been interrupted ``max_attempts`` times.

It knows nothing of MQTT or the engine. Every method takes ``now`` (epoch seconds; default:
the injected clock) so tests need no sleeps. One connection is shared by the MQTT callback
thread and the worker thread, serialised by a lock; every state change is one
``BEGIN IMMEDIATE`` transaction. SQLite errors leave this module only as ``StoreError``.

A terminal row holds its ``JobOutcome`` (agent.jobs.protocol): the status in its column, the rest of
the outcome as JSON. The result message's envelope (job_id, device_id, attempt, ts) comes from the
row; see ``JobRecord.result_message``.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import sqlite_utils

from agent.errors import StoreError
from agent.jobs.outcome import Requeued, RequeueReason, preempted_too_often, requeue_decision
from agent.jobs.protocol import (
    TERMINAL,
    ErrorCode,
    JobOutcome,
    JobStatus,
    JobSubmit,
    ResultMessage,
    StatusMessage,
    rfc3339,
)
from agent.mqtt.wire import SURROGATE_RE
from agent.sqlite import Schema, SqliteFile, open_schema

if TYPE_CHECKING:
    from agent.config.sections import StoreSettings

# What a column holds in SQLite: one of its storage classes (the meta table's value column has no type).
SqlValue = int | float | str | bytes | None

SCHEMA_VERSION = 5
# What each schema version adds to the one before, applied in order by _open (safe to re-run).
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    2: ("ALTER TABLE jobs ADD COLUMN preemptions INTEGER NOT NULL DEFAULT 0",),
    3: (
        "ALTER TABLE jobs ADD COLUMN prompt_tokens INTEGER",
        "ALTER TABLE jobs ADD COLUMN measured_for TEXT",
        "ALTER TABLE jobs ADD COLUMN waiting_for TEXT",
        "ALTER TABLE jobs ADD COLUMN waiting_since REAL",
        "ALTER TABLE jobs ADD COLUMN waiting_detail TEXT",
    ),
    5: ("ALTER TABLE jobs ADD COLUMN via TEXT",),
}
# Enough of a refused payload to see what the client sent, without letting junk fill the card.
RAW_KEEP_BYTES = 65536
# After a checkpoint SQLite truncates the WAL back to this size instead of leaving it at its peak.
JOURNAL_SIZE_LIMIT = 4 * 1024 * 1024

_TERMINAL_SQL = "(" + ", ".join(f"'{s.value}'" for s in sorted(TERMINAL)) + ")"
_ALL_STATUSES_SQL = "(" + ", ".join(f"'{s.value}'" for s in JobStatus) + ")"

_SCHEMA: tuple[str, ...] = (
    f"""
CREATE TABLE IF NOT EXISTS jobs (
    seq         INTEGER PRIMARY KEY,  -- arrival order (rowid)
    job_id      TEXT NOT NULL UNIQUE,
    status      TEXT NOT NULL CHECK (status IN {_ALL_STATUSES_SQL}),
    attempt     INTEGER NOT NULL DEFAULT 0 CHECK (attempt >= 0),
    priority    INTEGER NOT NULL DEFAULT 0,
    created_at  REAL NOT NULL,
    started_at  REAL,
    finished_at REAL,
    expires_at  REAL,
    timeout_s   REAL,
    request     TEXT,                 -- JobSubmit as JSON; NULL when refused before it became a job
    raw         BLOB,                 -- payload as received, first {RAW_KEEP_BYTES} bytes, for diagnosis
    result      TEXT,                 -- result body as JSON once terminal
    delivered   INTEGER NOT NULL DEFAULT 0 CHECK (delivered IN (0, 1)),
    error_code  TEXT,
    preemptions INTEGER NOT NULL DEFAULT 0,  -- times the job was put back by a preemption
    prompt_tokens INTEGER,            -- the prompt measured with the loaded model's tokenizer ...
    measured_for  TEXT,               -- ... of this tokenizer and per-slot context (Engine.tokenizer_key)
    waiting_for   TEXT,               -- QUEUED: why it does not run yet (agent.codes.WaitReason)
    waiting_since REAL,               -- since when, for that reason
    waiting_detail TEXT,              -- the wait in words
    via         TEXT,                 -- 'fleet': taken from the fleet topic; 'handed': handed by a peer; NULL: own
    -- the invariant everything else relies on: terminal <=> has an outcome
    CHECK ((status IN {_TERMINAL_SQL}) = (result IS NOT NULL AND finished_at IS NOT NULL))
)""",
    # Small facts about the store itself (the last write probe).
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value)",
    # Cancels that came before their job (cancels may travel on a connection of their own and overtake
    # the submit): the job is CANCELED when it arrives. Forgotten after EARLY_CANCEL_KEEP_S.
    "CREATE TABLE IF NOT EXISTS early_cancels (job_id TEXT PRIMARY KEY, at REAL NOT NULL)",
    # Fleet jobs this board let go of without starting them (agent/jobs/fleet.py): handed to a peer
    # (to_device) or given back (NULL). Each is announced (RELEASED) and, to a peer, sent; sent = 1 once
    # the broker acknowledged all of it. A job id that comes back later is a new job here.
    "CREATE TABLE IF NOT EXISTS handoffs (job_id TEXT PRIMARY KEY, to_device TEXT, request TEXT NOT NULL, "
    "at REAL NOT NULL, sent INTEGER NOT NULL DEFAULT 0)",
    "CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (priority DESC, seq) WHERE status = 'QUEUED'",
    "CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status)",
    "CREATE INDEX IF NOT EXISTS jobs_undelivered ON jobs (finished_at, seq) WHERE delivered = 0 AND finished_at IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS jobs_delivered ON jobs (finished_at, seq) WHERE delivered = 1",
)

_JOBS = Schema(SCHEMA_VERSION, _SCHEMA, _MIGRATIONS)

Outcome = Literal[
    "new",
    "duplicate_pending",
    "duplicate_finished",
    "rejected_queue_full",
    "rejected_expired",
    "rejected",
    "canceled_before_arrival",
]
CancelOutcome = Literal["canceled_queued", "running", "finished", "unknown"]
# How long a cancel for a job not seen yet is remembered (the job is CANCELED if it arrives meanwhile).
EARLY_CANCEL_KEEP_S = 3600.0
EARLY_CANCEL_MAX = 10000
RecoverAction = Literal["requeued", "failed_interrupted", "undelivered"]
RequeueOutcome = Requeued | Literal["not_running"]


@dataclass(frozen=True)
class JobRecord:
    """One row of the store, decoded."""

    job_id: str
    status: JobStatus
    attempt: int
    priority: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    expires_at: float | None
    timeout_s: float | None
    request: dict[str, Any] | None
    outcome: JobOutcome | None
    delivered: bool
    error_code: str | None
    preemptions: int = 0
    prompt_tokens: int | None = None
    measured_for: str | None = None
    waiting_for: str | None = None
    waiting_since: float | None = None
    waiting_detail: str | None = None
    via: str | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def as_dict(self) -> dict[str, Any]:
        """The record as JSON data (`edge-agent jobs show`): the outcome under "result"."""
        out = {f: getattr(self, f) for f in self.__dataclass_fields__ if f != "outcome"}
        out["status"] = self.status.value
        out["result"] = self.outcome.model_dump(mode="json", exclude={"status"}) if self.outcome else None
        return out

    def job(self) -> JobSubmit | None:
        """The stored request as a JobSubmit (None for payloads refused before they became one)."""
        return None if self.request is None else JobSubmit.model_validate(self.request)

    def status_message(self, device_id: str, ts: float) -> StatusMessage:
        """The status message announcing this record's current state."""
        error = self.outcome.error if self.outcome is not None else None
        reason, message = (error.code, error.message) if error is not None else (None, None)
        waiting = self.waiting_for if self.status is JobStatus.QUEUED else None
        return StatusMessage(
            job_id=self.job_id,
            device_id=device_id,
            status=self.status,
            attempt=self.attempt,
            ts=ts,
            reason=reason,
            waiting_for=waiting,
            message=self.waiting_detail if waiting else message,
        )

    def result_message(self, device_id: str) -> ResultMessage:
        """The result message for a terminal record; ts is when it became terminal, so resends are identical."""
        if not self.terminal or self.outcome is None or self.finished_at is None:
            raise ValueError(f"job {self.job_id} is {self.status.value}: it has no result yet")
        return ResultMessage.of(
            self.outcome, job_id=self.job_id, device_id=device_id, attempt=self.attempt, ts=self.finished_at
        )


@dataclass(frozen=True)
class QueuedJob:
    """A queued job as the queue policy sees it (``JobStore.queue_view``)."""

    job_id: str
    max_tokens: int
    prompt_tokens: int | None
    measured_for: str | None
    waiting_for: str | None
    waiting_since: float | None
    via: str | None = None

    def memory_wait_s(self, now: float) -> float:
        """How long it has been waiting for memory without a break (0: it is not)."""
        if self.waiting_for != "memory" or self.waiting_since is None:
            return 0.0
        return max(0.0, now - self.waiting_since)


@dataclass(frozen=True)
class Handoff:
    """A fleet job this board let go of (``JobStore.release``): to a peer, or given back (``to`` None)."""

    job_id: str
    to: str | None
    request: dict[str, Any]
    at: float


@dataclass(frozen=True)
class Accepted:
    """What ``accept`` (or ``reject``) did with a submission.

    outcome:
      new                 stored QUEUED: acknowledge, publish QUEUED.
      duplicate_pending   the id is queued or running: acknowledge, publish nothing new.
      duplicate_finished  the id already has an outcome: acknowledge, resend record.result_message().
      rejected_queue_full stored REJECTED queue_full: acknowledge, publish REJECTED + result.
      rejected_expired    stored REJECTED expired (expires_at already passed): same.
      rejected            (reject only) stored REJECTED with the given code: same.
    """

    record: JobRecord
    outcome: Outcome


def _finite(obj: Any) -> Any:
    # JSON has no NaN/Infinity and consumers choke on them: a rate over a zero duration
    # becomes null rather than an unpublishable result.
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _dump(obj: Any) -> str:
    text = json.dumps(_finite(obj), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    # A lone surrogate (half a character from a token boundary) cannot be stored as UTF-8.
    return SURROGATE_RE.sub("\ufffd", text)


class JobStore(SqliteFile):
    """The SQLite job store. Thread-safe; one instance per process and file."""

    what = "the job store"
    opening = "opening the store"
    no_folder = "create it or set store.path (under systemd, StateDirectory= creates device.state_dir)"

    def __init__(
        self,
        path: Path | str,
        *,
        queue_max: int = 64,
        max_attempts: int = 3,
        max_preemptions: int = 3,
        keep_finished: int = 1000,
        keep_finished_days: float = 7.0,
        clock: Callable[[], float] = time.time,
        synchronous: Literal["FULL", "NORMAL"] = "FULL",
        busy_timeout_ms: int = 5000,
        readonly: bool = False,
    ) -> None:
        """``readonly``: open an existing store for reading only (the CLI): no schema change, no
        write lock, works while the daemon runs."""
        self.path = Path(path)
        self.queue_max = queue_max
        self.max_attempts = max_attempts
        self.max_preemptions = max_preemptions
        self.keep_finished = keep_finished
        self.keep_finished_days = keep_finished_days
        self._clock = clock
        no_file = f"no job store at {self.path} (has the daemon run with this config?)"
        prepare = partial(self._open, synchronous=synchronous, busy_timeout_ms=busy_timeout_ms)
        self._attach(self.path, readonly, busy_timeout_ms, synchronous, no_file=no_file, prepare=prepare)

    def configure(self, settings: StoreSettings) -> None:
        """Take the live limits from the settings (a reload or the device shadow).

        Lowering queue_max never drops queued jobs: it only refuses new ones until the queue drains.
        """
        with self._lock:
            self.queue_max = settings.queue_max
            self.max_attempts = settings.max_attempts
            self.max_preemptions = settings.max_preemptions
            self.keep_finished = settings.keep_finished
            self.keep_finished_days = settings.keep_finished_days

    @classmethod
    def from_settings(
        cls, settings: StoreSettings, *, clock: Callable[[], float] = time.time, readonly: bool = False
    ) -> JobStore:
        """The one way the daemon and the CLI open the store."""
        if settings.path is None:
            raise StoreError("store.path is not set (Settings derives it from device.state_dir)", code="store_cantopen")
        return cls(
            settings.path,
            queue_max=settings.queue_max,
            max_attempts=settings.max_attempts,
            max_preemptions=settings.max_preemptions,
            keep_finished=settings.keep_finished,
            keep_finished_days=settings.keep_finished_days,
            synchronous=settings.synchronous,
            clock=clock,
            readonly=readonly,
        )

    # ----------------------------------------------------------------------------------------
    # Opening, schema, errors

    def _open(self, conn: sqlite3.Connection, synchronous: str, busy_timeout_ms: int) -> None:
        self._db = sqlite_utils.Database(conn, execute_plugins=False)
        open_schema(
            conn,
            self.path,
            _JOBS,
            what="the job store",
            fix=f"stop the agent, move {self.path.name} and its -wal and -shm files aside, and start again with an "
            "empty store",
            synchronous=synchronous,
            busy_timeout_ms=busy_timeout_ms,
            journal_size_limit=JOURNAL_SIZE_LIMIT,
            # Only possible before the first table exists: lets prune() hand freed pages back to the
            # filesystem instead of keeping the file at its high-water mark.
            new_file=("auto_vacuum = INCREMENTAL",),
            readonly=self.readonly,
        )

    def _now(self, now: float | None) -> float:
        return self._clock() if now is None else now

    # ----------------------------------------------------------------------------------------
    # Rows

    def _rows(self, sql: str, params: dict[str, SqlValue] | tuple[SqlValue, ...] = ()) -> list[JobRecord]:
        return [_record(r) for r in self._db.query(sql, params)]

    def _get(self, job_id: str) -> JobRecord | None:
        rows = self._rows("SELECT * FROM jobs WHERE job_id = ?", (job_id,))
        return rows[0] if rows else None

    def _insert(self, **row: SqlValue) -> None:
        self._db.table("jobs").insert(row)

    def _terminate(self, job_id: str, outcome: JobOutcome, now: float) -> bool:
        """The only way a row becomes terminal: guarded, so a job gets one outcome, ever."""
        cur = self._db.execute(
            f"UPDATE jobs SET status = :status, result = :result, finished_at = :now, delivered = 0, "
            f"error_code = :code WHERE job_id = :job_id AND status NOT IN {_TERMINAL_SQL}",
            {
                "status": outcome.status.value,
                "result": _dump(outcome.body()),
                "now": now,
                "code": _code(outcome),
                "job_id": job_id,
            },
        )
        return cur.rowcount == 1

    # ----------------------------------------------------------------------------------------
    # Transitions

    def accept(
        self, job: JobSubmit, raw: bytes | None = None, now: float | None = None, *, via: str | None = None
    ) -> Accepted:
        """Store a submitted job durably (or find it already stored). Acknowledge the message only after this returns.
        ``via``: 'fleet' for a job taken from the fleet topic, 'handed' for one a peer handed over."""
        now = self._now(now)
        request = _dump(job.model_dump(mode="json"))
        with self._write(f"accepting job {job.job_id}"):
            existing = self._get(job.job_id)
            if existing is not None:
                return Accepted(existing, "duplicate_finished" if existing.terminal else "duplicate_pending")
            row: dict[str, SqlValue] = dict(
                job_id=job.job_id,
                priority=job.priority,
                created_at=now,
                expires_at=job.expires_epoch(),
                timeout_s=job.timeout_s,
                request=request,
                raw=_raw(raw),
                attempt=0,
                delivered=0,
                via=via,
            )
            # A fleet job this board let go of comes back (its new holder died): a new job here. A hand-off
            # not yet sent is called off: the job stays here instead.
            self._db.execute("DELETE FROM handoffs WHERE job_id = ? AND sent = 0", (job.job_id,))
            outcome: Outcome = "new"
            refused: JobOutcome | None = None
            expires = job.expires_epoch()
            if expires is not None and expires <= now:
                outcome = "rejected_expired"
                refused = JobOutcome.refused(
                    ErrorCode.expired, f"expires_at {rfc3339(expires)} had passed when the job arrived"
                )
            elif self._db.execute(
                "DELETE FROM early_cancels WHERE job_id = ? AND at >= ?", (job.job_id, now - EARLY_CANCEL_KEEP_S)
            ).rowcount:
                outcome = "canceled_before_arrival"
                refused = JobOutcome.refused(ErrorCode.canceled, "canceled before it arrived (the cancel came first)")
            elif self._queued_count() >= self.queue_max:
                outcome = "rejected_queue_full"
                refused = JobOutcome.refused(
                    ErrorCode.queue_full, f"{self.queue_max} jobs are already waiting (store.queue_max); try later"
                )
            if refused is None:
                self._insert(status=JobStatus.QUEUED.value, **row)
            else:
                self._insert(
                    status=refused.status.value,
                    result=_dump(refused.body()),
                    finished_at=now,
                    error_code=_code(refused),
                    **row,
                )
            record = self._get(job.job_id)
            assert record is not None
            return Accepted(record, outcome)

    def reject(
        self, job_id: str, code: ErrorCode, message: str, now: float | None = None, raw: bytes | None = None
    ) -> Accepted:
        """Store a REJECTED outcome for a payload that could not become a job but whose id was readable.

        An existing job with that id is never overwritten (it would give the id a second
        outcome): the result then says duplicate_pending or duplicate_finished, and the caller
        must not publish a rejection for it.
        """
        now = self._now(now)
        refused = JobOutcome.refused(code, message)
        with self._write(f"rejecting job {job_id}"):
            existing = self._get(job_id)
            if existing is not None:
                return Accepted(existing, "duplicate_finished" if existing.terminal else "duplicate_pending")
            self._insert(
                job_id=job_id,
                status=refused.status.value,
                priority=0,
                created_at=now,
                finished_at=now,
                request=None,
                raw=_raw(raw),
                result=_dump(refused.body()),
                attempt=0,
                delivered=0,
                error_code=_code(refused),
            )
            record = self._get(job_id)
            assert record is not None
            return Accepted(record, "rejected")

    def claim_next(self, now: float | None = None) -> JobRecord | None:
        """Start the next job: highest priority first, then arrival order. Expired jobs are skipped (see expire_queued)."""
        now = self._now(now)
        with self._write("claiming the next job"):
            row = self._db.execute(
                "SELECT seq FROM jobs WHERE status = 'QUEUED' AND (expires_at IS NULL OR expires_at > ?) "
                "ORDER BY priority DESC, seq LIMIT 1",
                (now,),
            ).fetchone()
            if row is None:
                return None
            self._db.execute(
                "UPDATE jobs SET status = 'IN_PROGRESS', attempt = attempt + 1, started_at = ?, waiting_for = NULL, "
                "waiting_since = NULL, waiting_detail = NULL WHERE seq = ?",
                (now, row[0]),
            )
            return self._rows("SELECT * FROM jobs WHERE seq = ?", (row[0],))[0]

    def queued(self, now: float | None = None, limit: int = 1000) -> list[JobRecord]:
        """The queued jobs in the order they start in (priority, then arrival), expired ones left out."""
        now = self._now(now)
        with self._read("reading the queue"):
            return self._rows(
                "SELECT * FROM jobs WHERE status = 'QUEUED' AND (expires_at IS NULL OR expires_at > ?) "
                "ORDER BY priority DESC, seq LIMIT ?",
                (now, limit),
            )

    def queue_view(self, now: float | None = None, limit: int = 1000) -> list[QueuedJob]:
        """What the queue policy needs of each queued job, in start order, without decoding requests
        (the runner looks at the whole queue before every claim)."""
        now = self._now(now)
        with self._read("reading the queue"):
            rows = self._db.execute(
                "SELECT job_id, json_extract(request, '$.max_tokens'), prompt_tokens, measured_for, waiting_for, "
                "waiting_since, via FROM jobs WHERE status = 'QUEUED' AND (expires_at IS NULL OR expires_at > ?) "
                "ORDER BY priority DESC, seq LIMIT ?",
                (now, limit),
            ).fetchall()
        return [QueuedJob(*r) for r in rows]

    def measured(self, job_id: str, prompt_tokens: int, key: str) -> None:
        """Record a queued job's prompt tokens, counted with the tokenizer ``key`` names."""
        with self._write(f"recording job {job_id}'s prompt tokens"):
            self._db.execute(
                "UPDATE jobs SET prompt_tokens = ?, measured_for = ? WHERE job_id = ? AND status = 'QUEUED'",
                (prompt_tokens, key, job_id),
            )

    def waiting(self, job_id: str, reason: str | None, detail: str | None, now: float | None = None) -> bool:
        """Record why a queued job waits (None: for nothing in particular). Written, and True returned
        (the caller announces it), only when the reason changes: the detail is the one from then."""
        now = self._now(now)
        with self._write(f"recording why job {job_id} waits"):
            cur = self._db.execute(
                "UPDATE jobs SET waiting_for = :r, waiting_since = :now, waiting_detail = :d "
                "WHERE job_id = :job_id AND status = 'QUEUED' AND waiting_for IS NOT :r",
                {"r": reason, "d": detail, "now": now, "job_id": job_id},
            )
            return cur.rowcount == 1

    def claim(self, job_id: str, now: float | None = None) -> JobRecord | None:
        """Start this queued job (IN_PROGRESS, attempt + 1). None if it is not queued any more."""
        now = self._now(now)
        with self._write(f"claiming job {job_id}"):
            cur = self._db.execute(
                "UPDATE jobs SET status = 'IN_PROGRESS', attempt = attempt + 1, started_at = ?, waiting_for = NULL, "
                "waiting_since = NULL, waiting_detail = NULL WHERE job_id = ? AND status = 'QUEUED'",
                (now, job_id),
            )
            return self._get(job_id) if cur.rowcount == 1 else None

    def finish(self, job_id: str, outcome: JobOutcome, now: float | None = None) -> bool:
        """Record a job's terminal outcome. False (and nothing changed) if it already had one or is unknown."""
        if not isinstance(outcome, JobOutcome):
            raise TypeError(f"finish() needs a JobOutcome, got {type(outcome).__name__}")
        now = self._now(now)
        with self._write(f"finishing job {job_id}"):
            return self._terminate(job_id, outcome, now)

    def requeue(self, job_id: str, reason: RequeueReason, now: float | None = None) -> RequeueOutcome:
        """Put a running job back in the queue, as ``agent.jobs.outcome.requeue_decision`` decides
        (failed_preempted: publish its outcome); not_running: nothing changed."""
        now = self._now(now)
        with self._write(f"requeueing job {job_id}"):
            rec = self._get(job_id)
            if rec is None or rec.status is not JobStatus.IN_PROGRESS:
                return "not_running"
            preemptions = rec.preemptions + (reason == "preempt")
            decision = requeue_decision(
                reason,
                preemptions=preemptions,
                attempt=rec.attempt,
                max_preemptions=self.max_preemptions,
                max_attempts=self.max_attempts,
            )
            free = decision == "requeued"
            if decision == "failed_preempted":
                self._db.execute("UPDATE jobs SET preemptions = ? WHERE job_id = ?", (preemptions, job_id))
                self._terminate(job_id, preempted_too_often(preemptions, rec.attempt), now)
                return "failed_preempted"
            self._db.execute(
                "UPDATE jobs SET status = 'QUEUED', attempt = CASE WHEN :free THEN max(attempt - 1, 0) "
                "ELSE attempt END, started_at = NULL, preemptions = :p WHERE job_id = :job_id",
                {"free": free, "p": preemptions, "job_id": job_id},
            )
            return "requeued" if free else "requeued_counted"

    def cancel(self, job_id: str, now: float | None = None) -> CancelOutcome:
        """Cancel a job.

        canceled_queued: it was waiting and is now CANCELED (publish status and result).
        running:         the caller must stop the engine, then finish(job_id, CANCELED, ...).
        finished:        it already had an outcome; nothing changed.
        unknown:         no such job yet: the cancel is remembered for EARLY_CANCEL_KEEP_S, and the job
                         is CANCELED if it arrives meanwhile (the newest EARLY_CANCEL_MAX are kept).
        """
        now = self._now(now)
        with self._write(f"canceling job {job_id}"):
            rec = self._get(job_id)
            if rec is None:
                self._db.execute("INSERT OR REPLACE INTO early_cancels (job_id, at) VALUES (?, ?)", (job_id, now))
                self._db.execute(
                    "DELETE FROM early_cancels WHERE job_id IN "
                    "(SELECT job_id FROM early_cancels ORDER BY at DESC LIMIT -1 OFFSET ?)",
                    (EARLY_CANCEL_MAX,),
                )
                return "unknown"
            if rec.terminal:
                return "finished"
            if rec.status is JobStatus.IN_PROGRESS:
                return "running"
            self._terminate(job_id, JobOutcome.refused(ErrorCode.canceled, "canceled while queued"), now)
            return "canceled_queued"

    def canceled_early(self, job_id: str) -> bool:
        """Whether a cancel for ``job_id`` came before the job and is remembered (``cancel`` -> unknown)."""
        with self._read(f"reading the early cancel of {job_id}") as c:
            return c.execute("SELECT 1 FROM early_cancels WHERE job_id = ?", (job_id,)).fetchone() is not None

    def expire_queued(self, now: float | None = None) -> list[JobRecord]:
        """Reject (code expired) every queued job whose expires_at has passed; returns them, now terminal."""
        now = self._now(now)
        with self._write("expiring queued jobs"):
            due = self._rows(
                "SELECT * FROM jobs WHERE status = 'QUEUED' AND expires_at IS NOT NULL AND expires_at <= ? ORDER BY seq",
                (now,),
            )
            for rec in due:
                assert rec.expires_at is not None
                msg = f"expires_at {rfc3339(rec.expires_at)} passed while the job waited in the queue"
                self._terminate(rec.job_id, JobOutcome.refused(ErrorCode.expired, msg), now)
            return [r for r in (self._get(rec.job_id) for rec in due) if r is not None]

    def recover(self, now: float | None = None) -> list[tuple[str, RecoverAction]]:
        """Repair what a crash left behind; call once at start-up, before taking jobs.

        Each job appears once:
          requeued            was IN_PROGRESS, runs again (attempt < max_attempts); its next IN_PROGRESS
                              status carries the new attempt.
          failed_interrupted  was IN_PROGRESS for the max_attempts-th time: now FAILED 'interrupted',
                              undelivered, so the daemon publishes it with the other undelivered results.
          undelivered         already terminal, result never confirmed delivered: resent after connect.
        """
        now = self._now(now)
        actions: list[tuple[str, RecoverAction]] = []
        with self._write("recovering after start-up"):
            for rec in self._rows("SELECT * FROM jobs WHERE status = 'IN_PROGRESS' ORDER BY seq"):
                if rec.attempt < self.max_attempts:
                    self._db.execute(
                        "UPDATE jobs SET status = 'QUEUED', started_at = NULL WHERE job_id = ? AND status = 'IN_PROGRESS'",
                        (rec.job_id,),
                    )
                    actions.append((rec.job_id, "requeued"))
                else:
                    msg = (
                        f"the agent stopped while running this job {rec.attempt} time(s) (store.max_attempts "
                        f"{self.max_attempts}); it may not fit this board"
                    )
                    self._terminate(rec.job_id, JobOutcome.refused(ErrorCode.interrupted, msg), now)
                    actions.append((rec.job_id, "failed_interrupted"))
            failed = {job_id for job_id, action in actions if action == "failed_interrupted"}
            for rec in self._undelivered(None):
                if rec.job_id not in failed:
                    actions.append((rec.job_id, "undelivered"))
        return actions

    def mark_delivered_many(self, job_ids: Sequence[str]) -> int:
        """mark_delivered for several jobs in one transaction; returns how many rows changed."""
        with self._write(f"marking {len(job_ids)} job(s) delivered"):
            n = 0
            for job_id in job_ids:
                cur = self._db.execute(
                    f"UPDATE jobs SET delivered = 1 WHERE job_id = ? AND status IN {_TERMINAL_SQL}", (job_id,)
                )
                n += cur.rowcount
            return n

    def mark_delivered(self, job_id: str) -> bool:
        """The result was acknowledged by the broker; it may now be pruned. False if not terminal or unknown."""
        with self._write(f"marking job {job_id} delivered"):
            cur = self._db.execute(
                f"UPDATE jobs SET delivered = 1 WHERE job_id = ? AND status IN {_TERMINAL_SQL}", (job_id,)
            )
            return cur.rowcount == 1

    def probe(self, min_free_bytes: int = 0, now: float | None = None) -> None:
        """Check that the store takes writes now: the filesystem has ``min_free_bytes`` free and a
        small write commits. Raises StoreError otherwise. The daemon calls it while the store is
        unwritable, to know when to take jobs again; the margin keeps a disk that is still almost
        full from being declared writable by one lucky write."""
        try:
            st = os.statvfs(self.path.parent)
        except OSError as e:
            raise StoreError(
                f"{self.path.parent}: cannot read filesystem usage: {e.strerror}", code="store_io"
            ) from None
        free = st.f_bavail * st.f_frsize
        if free < min_free_bytes:
            raise StoreError(
                f"{self.path}: {free // 1024} KiB free on its filesystem, less than store.min_free_kb "
                f"{min_free_bytes // 1024}; free space on the filesystem holding {self.path.parent}",
                code="store_full",
            )
        with self._write("checking that the store takes writes"):
            self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('probe', ?)", (self._now(now),))

    # ----------------------------------------------------------------------------------------
    # Queries

    def get(self, job_id: str) -> JobRecord | None:
        with self._read(f"reading job {job_id}"):
            return self._get(job_id)

    def undelivered(self, limit: int | None = None) -> list[JobRecord]:
        """Terminal jobs whose result is not yet confirmed delivered, oldest outcome first."""
        with self._read("listing undelivered results"):
            return self._undelivered(limit)

    def _undelivered(self, limit: int | None) -> list[JobRecord]:
        return self._rows(
            "SELECT * FROM jobs WHERE delivered = 0 AND finished_at IS NOT NULL ORDER BY finished_at, seq LIMIT ?",
            (-1 if limit is None else limit,),
        )

    def list_jobs(self, status: JobStatus | str | None = None, limit: int = 50) -> list[JobRecord]:
        """Most recent jobs first, optionally of one status."""
        with self._read("listing jobs"):
            if status is None:
                return self._rows("SELECT * FROM jobs ORDER BY seq DESC LIMIT ?", (limit,))
            return self._rows(
                "SELECT * FROM jobs WHERE status = ? ORDER BY seq DESC LIMIT ?", (JobStatus(status).value, limit)
            )

    def counts(self) -> dict[str, int]:
        """Jobs per status, every status present (zero included); RELEASED counts the fleet jobs let go of."""
        with self._read("counting jobs"):
            out = {s.value: 0 for s in JobStatus}
            for row in self._db.query("SELECT status, count(*) AS n FROM jobs GROUP BY status"):
                out[row["status"]] = row["n"]
            out[JobStatus.RELEASED.value] = int(self._db.execute("SELECT count(*) FROM handoffs").fetchone()[0])
            return out

    def queued_count(self) -> int:
        with self._read("counting queued jobs"):
            return self._queued_count()

    def _queued_count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM jobs WHERE status = 'QUEUED'").fetchone()[0])

    # ----------------------------------------------------------------------------------------
    # Fleet jobs let go of (agent/jobs/fleet.py)

    def release(self, job_id: str, to: str | None, now: float | None = None) -> Handoff | None:
        """Let go of a queued fleet job that is not running: out of the queue and into ``handoffs`` in one
        transaction, so that it is never both run here and announced as let go of. ``to``: the peer it is
        handed to (only a job taken from the fleet topic, ``via`` 'fleet': a handed job is not handed on);
        None: given back (a job from the fleet topic or handed here: its submitter may send either again).
        None when it is no such queued job (the runner started it, a cancel ended it)."""
        now = self._now(now)
        with self._write(f"releasing fleet job {job_id}"):
            rec = self._get(job_id)
            movable = ("fleet",) if to is not None else ("fleet", "handed")
            if rec is None or rec.status is not JobStatus.QUEUED or rec.via not in movable or rec.request is None:
                return None
            self._db.execute("DELETE FROM jobs WHERE job_id = ? AND status = 'QUEUED'", (job_id,))
            request = _dump(rec.request)
            self._db.execute(
                "INSERT OR REPLACE INTO handoffs (job_id, to_device, request, at, sent) VALUES (?, ?, ?, ?, 0)",
                (job_id, to, request, now),
            )
            return Handoff(job_id, to, rec.request, now)

    def unsent_handoffs(self) -> list[Handoff]:
        """Fleet jobs let go of whose announcement (and hand-over) the broker has not acknowledged, oldest first."""
        with self._read("reading fleet hand-offs"):
            rows = self._db.execute(
                "SELECT job_id, to_device, request, at FROM handoffs WHERE sent = 0 ORDER BY at, rowid"
            ).fetchall()
        return [Handoff(r[0], r[1], json.loads(r[2]), r[3]) for r in rows]

    def handoff_sent(self, job_id: str) -> bool:
        with self._write(f"marking the hand-off of {job_id} sent"):
            return self._db.execute("UPDATE handoffs SET sent = 1 WHERE job_id = ?", (job_id,)).rowcount == 1

    def list_handoffs(self, limit: int = 50) -> list[Handoff]:
        """The fleet jobs this board let go of (RELEASED), most recent first."""
        with self._read("listing fleet hand-offs"):
            rows = self._db.execute(
                "SELECT job_id, to_device, request, at FROM handoffs ORDER BY at DESC, rowid DESC LIMIT ?", (limit,)
            ).fetchall()
        return [Handoff(r[0], r[1], json.loads(r[2]), r[3]) for r in rows]

    def get_handoff(self, job_id: str) -> Handoff | None:
        with self._read(f"reading the hand-off of {job_id}"):
            r = self._db.execute(
                "SELECT job_id, to_device, request, at FROM handoffs WHERE job_id = ?", (job_id,)
            ).fetchone()
        return None if r is None else Handoff(r[0], r[1], json.loads(r[2]), r[3])

    def meta(self, key: str) -> SqlValue:
        with self._read(f"reading {key}"):
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_meta(self, key: str, value: SqlValue) -> None:
        with self._write(f"writing {key}"):
            self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    # ----------------------------------------------------------------------------------------
    # Retention

    def prune(self, now: float | None = None) -> int:
        """Delete delivered outcomes beyond keep_finished (newest kept) or older than keep_finished_days.

        Never touches queued, running or undelivered jobs. Then hands freed pages back to the
        filesystem and truncates the WAL, so the file does not stay at its high-water mark.
        Returns the number of jobs deleted.
        """
        now = self._now(now)
        cutoff = now - self.keep_finished_days * 86400.0
        with self._write("pruning finished jobs"):
            cur = self._db.execute(
                f"""DELETE FROM jobs WHERE delivered = 1 AND status IN {_TERMINAL_SQL} AND (
                        finished_at < :cutoff OR seq IN (
                            SELECT seq FROM jobs WHERE delivered = 1 AND status IN {_TERMINAL_SQL}
                            ORDER BY finished_at DESC, seq DESC LIMIT -1 OFFSET :keep))""",
                {"cutoff": cutoff, "keep": self.keep_finished},
            )
            deleted = cur.rowcount
            self._db.execute("DELETE FROM early_cancels WHERE at < ?", (now - EARLY_CANCEL_KEEP_S,))
            self._db.execute("DELETE FROM handoffs WHERE sent = 1 AND at < ?", (cutoff,))
        with self._read("compacting the store"):
            c = self._connection()
            if deleted:
                # execute() steps a statement once, and each step of incremental_vacuum frees a
                # single page; executescript() steps it to the end in one transaction.
                c.executescript("PRAGMA incremental_vacuum")
            c.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        return deleted

    def close(self) -> None:
        """Checkpoint and close. Safe to call twice."""
        with self._lock:
            if self._conn is None:
                return
            conn, self._conn = self._conn, None
            try:
                conn.execute("PRAGMA optimize")
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass  # closing must not fail; the WAL is replayed on the next open
            finally:
                conn.close()

    def __enter__(self) -> JobStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _record(row: dict[str, Any]) -> JobRecord:
    return JobRecord(
        job_id=row["job_id"],
        status=JobStatus(row["status"]),
        attempt=row["attempt"],
        priority=row["priority"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        expires_at=row["expires_at"],
        timeout_s=row["timeout_s"],
        request=None if row["request"] is None else json.loads(row["request"]),
        outcome=None
        if row["result"] is None
        else JobOutcome.model_validate({**json.loads(row["result"]), "status": row["status"]}),
        delivered=bool(row["delivered"]),
        error_code=row["error_code"],
        preemptions=row.get("preemptions") or 0,
        prompt_tokens=row.get("prompt_tokens"),
        measured_for=row.get("measured_for"),
        waiting_for=row.get("waiting_for"),
        waiting_since=row.get("waiting_since"),
        waiting_detail=row.get("waiting_detail"),
        via=row.get("via"),
    )


def _code(outcome: JobOutcome) -> str | None:
    return outcome.error.code.value if outcome.error is not None else None


def _raw(raw: bytes | None) -> bytes | None:
    return None if raw is None else bytes(raw[:RAW_KEEP_BYTES])


__all__ = ["EARLY_CANCEL_KEEP_S", "Accepted", "JobRecord", "JobStore", "QueuedJob", "SCHEMA_VERSION"]
