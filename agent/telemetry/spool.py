"""The offline spool: telemetry readings and events kept in SQLite while they cannot be published.

Owns ``{device.state_dir}/telemetry.db``, apart from the job store: telemetry is expendable and
jobs are not, so a full or damaged spool never touches a job.

* Bounded by rows and by bytes (payload + topic). To make room the oldest readings go first; events
  are dropped only once no reading is left, and a new reading that would need an event dropped is
  itself dropped. Every drop is counted (on disk, across restarts): ``stats()`` gives the totals
  and ``take_unreported_drops()`` what was dropped since it was last asked, for a spool_dropped event.
* It is an ``OutboxSource``: ``pending(limit)`` gives undelivered items oldest first (by the
  time they were taken, then by insertion), ``delivered(keys)`` deletes them. A key is the row id
  and the message's time, so a late acknowledgement cannot delete a newer row that reuses a freed id.
* Flash wear: the spool is written only when a message could not be published (offline, a publish
  refused or lost before its acknowledgement, or a backlog still draining: ``Uplink`` decides), so
  a board that stays online writes nothing here. When it is written, each reading is one commit of
  as few small pages as possible (1 KiB pages, one index, no AUTOINCREMENT table: about 6 KB reach
  the disk per reading instead of 21 KB with SQLite's defaults; docs/benchmarks.md). Commits use
  ``synchronous=NORMAL``: in WAL mode that fsyncs at checkpoints only; a power cut can lose the last
  readings, a process crash none.
* A damaged file is moved aside and a new one started (logged): losing spooled telemetry is better
  than an agent that cannot start.

Thread-safe (one lock): the main loop adds, the outbox's thread reads and acknowledges. SQLite
errors leave as ``StoreError``.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from agent.errors import StoreError
from agent.mqtt.outbox import Outgoing
from agent.sqlite import Schema, open_schema, store_error, write_transaction

if TYPE_CHECKING:
    from agent.config import Settings

log = logging.getLogger(__name__)

Kind = Literal["reading", "event"]
SCHEMA_VERSION = 1
MiB = 1024 * 1024
JOURNAL_SIZE_LIMIT = 1024 * 1024
# Small pages: a commit writes every page it dirtied to the WAL, so page size is write amplification.
PAGE_SIZE = 1024
_COUNTERS = ("dropped_readings", "dropped_events", "unreported_readings", "unreported_events")

_SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS spool (
    seq     INTEGER PRIMARY KEY,                -- with ts, the outbox key
    kind    TEXT NOT NULL CHECK (kind IN ('reading', 'event')),
    ts      REAL NOT NULL,                      -- when the reading or event was taken (send order)
    topic   TEXT NOT NULL,
    payload BLOB NOT NULL,
    size    INTEGER NOT NULL CHECK (size >= 0)  -- payload + topic bytes, what the byte bound counts
)""",
    # The one index: send order, and eviction order (readings are the bulk; events are only looked
    # for once no reading is left, so a second index on kind would cost a page per write for nothing).
    "CREATE INDEX IF NOT EXISTS spool_order ON spool (ts, seq)",
    "CREATE TABLE IF NOT EXISTS spool_counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
)
_SPOOL = Schema(
    SCHEMA_VERSION,
    _SCHEMA,
    seed=tuple(f"INSERT OR IGNORE INTO spool_counters (name, value) VALUES ('{n}', 0)" for n in _COUNTERS),
)


@dataclass(frozen=True)
class SpoolStats:
    rows: int
    readings: int
    events: int
    bytes: int
    dropped_readings: int  # since the file was created
    dropped_events: int

    @property
    def dropped(self) -> int:
        return self.dropped_readings + self.dropped_events


@dataclass(frozen=True)
class Added:
    """What one ``add`` did: stored it (or dropped it), and how many older rows it pushed out."""

    stored: bool
    dropped_readings: int
    dropped_events: int


class TelemetrySpool:
    """The spool file. ``name`` is its outbox source name."""

    name = "telemetry"

    def __init__(
        self,
        path: Path | str,
        *,
        max_rows: int = 10000,
        max_bytes: int = 8 * MiB,
        clock: Callable[[], float] = time.time,
        busy_timeout_ms: int = 5000,
    ) -> None:
        if max_rows < 1 or max_bytes < 1:
            raise ValueError("max_rows and max_bytes must be >= 1")
        self.path = Path(path)
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self._clock = clock
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        if not self.path.parent.is_dir():
            raise StoreError(
                f"{self.path}: folder {self.path.parent} does not exist (device.state_dir)", code="store_cantopen"
            )
        try:
            self._connect(busy_timeout_ms)
        except StoreError as e:
            if e.code not in ("store_corrupt", "store_version"):  # expendable: moved aside, started again
                raise
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(self._clock())}")
            log.warning("%s; moved it to %s and started an empty spool (spooled telemetry is lost)", e, aside)
            for suffix in ("", "-wal", "-shm"):
                src = Path(str(self.path) + suffix)
                if src.exists():
                    src.rename(Path(str(aside) + suffix))
            self._connect(busy_timeout_ms)

    @classmethod
    def from_settings(cls, settings: Settings, *, clock: Callable[[], float] = time.time) -> TelemetrySpool:
        t = settings.telemetry
        return cls(
            settings.device.state_dir / "telemetry.db",
            max_rows=t.spool_max_rows,
            max_bytes=int(t.spool_max_mb * MiB),
            clock=clock,
        )

    # ------------------------------------------------------------------------------------ opening

    def _connect(self, busy_timeout_ms: int) -> None:
        try:
            conn = sqlite3.connect(
                str(self.path), timeout=busy_timeout_ms / 1000, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as e:
            raise self._error(e, "opening the spool") from e
        try:
            c = conn
            open_schema(
                c,
                self.path,
                _SPOOL,
                what="the spool",
                fix="it is moved aside (spooled telemetry is expendable)",
                synchronous="NORMAL",
                busy_timeout_ms=busy_timeout_ms,
                journal_size_limit=JOURNAL_SIZE_LIMIT,
                new_file=(f"page_size = {PAGE_SIZE}",),
            )
            per_kind = c.execute("SELECT kind, count(*), total(size) FROM spool GROUP BY kind").fetchall()
        except sqlite3.Error as e:
            conn.close()
            raise self._error(e, "opening the spool") from e
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        # Rows and bytes per kind, counted in memory (one owner per file): bounds need no scan.
        self._n: dict[str, int] = {"reading": 0, "event": 0}
        self._b: dict[str, int] = {"reading": 0, "event": 0}
        for kind, n, nbytes in per_kind:
            self._n[kind], self._b[kind] = int(n), int(nbytes)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> TelemetrySpool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _error(self, e: sqlite3.Error, doing: str) -> StoreError:
        return store_error(e, self.path, doing, "the telemetry spool")

    @contextmanager
    def _write(self, doing: str) -> Iterator[sqlite3.Connection]:
        with self._lock:
            c = self._conn
            if c is None:
                raise StoreError(f"{self.path}: the spool is closed", code="store_closed")
            saved = (dict(self._n), dict(self._b))
            try:
                with write_transaction(c, lambda e: self._error(e, doing)):
                    yield c
            except BaseException:
                self._n, self._b = saved  # the rows did not change either
                raise

    # ------------------------------------------------------------------------------------ writing

    def add(self, kind: Kind, topic: str, payload: bytes, *, ts: float | None = None) -> Added:
        """Keep one message. Makes room first (oldest readings, then oldest events); a reading that
        could only fit by dropping an event, or anything larger than the whole spool, is dropped
        and counted instead. Raises StoreError when the file cannot be written."""
        if kind not in ("reading", "event"):
            raise ValueError(f"kind must be 'reading' or 'event', not {kind!r}")
        ts = self._clock() if ts is None else ts
        size = len(payload) + len(topic.encode())
        with self._write("spooling a message") as c:
            # What must stay whatever is dropped: events always; for a new event, nothing else.
            kept_rows = self._n["event"] if kind == "reading" else 0
            kept_bytes = self._b["event"] if kind == "reading" else 0
            if kept_rows + 1 > self.max_rows or kept_bytes + size > self.max_bytes:
                self._count(c, readings=int(kind == "reading"), events=int(kind == "event"))
                return Added(False, int(kind == "reading"), int(kind == "event"))
            dropped_r = self._evict(c, "reading", rows=1, nbytes=size)
            dropped_e = self._evict(c, "event", rows=1, nbytes=size)
            c.execute(
                "INSERT INTO spool (kind, ts, topic, payload, size) VALUES (?, ?, ?, ?, ?)",
                (kind, ts, topic, sqlite3.Binary(payload), size),
            )
            self._n[kind] += 1
            self._b[kind] += size
            if dropped_r or dropped_e:
                self._count(c, readings=dropped_r, events=dropped_e)
            return Added(True, dropped_r, dropped_e)

    def _over(self, rows: int, nbytes: int) -> bool:
        return (
            self._n["reading"] + self._n["event"] + rows > self.max_rows
            or self._b["reading"] + self._b["event"] + nbytes > self.max_bytes
        )

    def _evict(self, c: sqlite3.Connection, kind: Kind, *, rows: int, nbytes: int) -> int:
        """Delete the oldest rows of ``kind`` until ``rows`` more rows and ``nbytes`` more bytes fit
        (or none of that kind is left). Returns how many were deleted."""
        if not self._over(rows, nbytes):
            return 0
        gone: list[int] = []
        cur = c.execute("SELECT seq, size FROM spool WHERE kind = ? ORDER BY ts, seq", (kind,))
        try:
            while self._over(rows, nbytes):
                batch = cur.fetchmany(256)
                if not batch:
                    break
                for seq, size in batch:
                    gone.append(seq)
                    self._n[kind] -= 1
                    self._b[kind] -= size
                    if not self._over(rows, nbytes):
                        break
        finally:
            cur.close()  # no open read statement while the rows are deleted
        for i in range(0, len(gone), 500):
            chunk = gone[i : i + 500]
            c.execute(f"DELETE FROM spool WHERE seq IN ({','.join('?' * len(chunk))})", chunk)
        return len(gone)

    def _count(self, c: sqlite3.Connection, *, readings: int, events: int) -> None:
        for name, n in (
            ("dropped_readings", readings),
            ("unreported_readings", readings),
            ("dropped_events", events),
            ("unreported_events", events),
        ):
            if n:
                c.execute("UPDATE spool_counters SET value = value + ? WHERE name = ?", (n, name))

    def configure(self, *, max_rows: int | None = None, max_bytes: int | None = None) -> Added:
        """New bounds (live settings); a spool now over them drops at once, by the same rules."""
        with self._write("applying new spool bounds") as c:
            if max_rows is not None:
                if max_rows < 1:
                    raise ValueError("max_rows must be >= 1")
                self.max_rows = max_rows
            if max_bytes is not None:
                if max_bytes < 1:
                    raise ValueError("max_bytes must be >= 1")
                self.max_bytes = max_bytes
            r = self._evict(c, "reading", rows=0, nbytes=0)
            e = self._evict(c, "event", rows=0, nbytes=0)
            if r or e:
                self._count(c, readings=r, events=e)
            return Added(True, r, e)

    # ------------------------------------------------------------------------------------ outbox

    def pending(self, limit: int) -> list[Outgoing]:
        """Undelivered messages, oldest first, at most ``limit``."""
        with self._lock:
            c = self._conn
            if c is None:
                raise StoreError(f"{self.path}: the spool is closed", code="store_closed")
            try:
                rows = c.execute(
                    "SELECT seq, ts, topic, payload FROM spool ORDER BY ts, seq LIMIT ?", (max(0, int(limit)),)
                ).fetchall()
            except sqlite3.Error as e:
                raise self._error(e, "reading the spool") from e
        return [
            Outgoing(key=f"{seq}@{ts!r}", topic=topic, payload=bytes(payload), qos=1)
            for seq, ts, topic, payload in rows
        ]

    def delivered(self, keys: Sequence[str]) -> None:
        """The broker acknowledged these: delete them. Unknown, malformed or repeated keys are ignored."""
        ids = sorted({k for k in map(_parse_key, keys) if k is not None})
        if not ids:
            return
        with self._write("recording delivery") as c:
            for seq, ts in ids:
                row = c.execute("SELECT kind, size FROM spool WHERE seq = ? AND ts = ?", (seq, ts)).fetchone()
                if row is not None:
                    c.execute("DELETE FROM spool WHERE seq = ?", (seq,))
                    self._n[row[0]] -= 1
                    self._b[row[0]] -= row[1]

    # ------------------------------------------------------------------------------------ state

    @property
    def rows(self) -> int:
        """Messages waiting (from memory: no query)."""
        return self._n["reading"] + self._n["event"]

    def stats(self) -> SpoolStats:
        with self._lock:
            c = self._conn
            if c is None:
                raise StoreError(f"{self.path}: the spool is closed", code="store_closed")
            try:
                counters = dict(c.execute("SELECT name, value FROM spool_counters").fetchall())
            except sqlite3.Error as e:
                raise self._error(e, "reading the spool counters") from e
            return SpoolStats(
                rows=self._n["reading"] + self._n["event"],
                readings=self._n["reading"],
                events=self._n["event"],
                bytes=self._b["reading"] + self._b["event"],
                dropped_readings=counters.get("dropped_readings", 0),
                dropped_events=counters.get("dropped_events", 0),
            )

    def take_unreported_drops(self) -> tuple[int, int]:
        """(readings, events) dropped since the last call, and reset: what a spool_dropped event reports."""
        with self._write("reading the drop counters") as c:
            counters = dict(c.execute("SELECT name, value FROM spool_counters").fetchall())
            r, e = counters.get("unreported_readings", 0), counters.get("unreported_events", 0)
            if r or e:
                c.execute(
                    "UPDATE spool_counters SET value = 0 WHERE name IN ('unreported_readings', 'unreported_events')"
                )
            return r, e


def _parse_key(key: str) -> tuple[int, float] | None:
    seq, sep, ts = str(key).partition("@")
    try:
        return (int(seq), float(ts)) if sep else None
    except ValueError:
        return None


__all__ = ["Added", "SpoolStats", "TelemetrySpool"]
