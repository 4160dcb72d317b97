"""Persistence of the device shadow: one SQLite file, ``{device.state_dir}/shadow.db``.

Holds the last accepted desired state with its version and metadata, and the last reported state,
so that after a restart the daemon applies what it accepted before it even connects (the broker may
be down), and ``edge-agent shadow show`` can read the state without a broker.

Same conventions as the job store (agent/jobs/store.py): WAL, a busy timeout, synchronous FULL (an
accepted update is acknowledged to the operator, so it must survive a power cut), schema creation
that is safe to re-run, one ``BEGIN IMMEDIATE`` transaction per write, SQLite errors leave only as
``StoreError``. A stale version never wins: desired is written only over an older version, so a
second writer (another process on the same file) cannot roll the state back.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from agent.errors import StoreError
from agent.shadow.document import ShadowDocument
from agent.sqlite import Schema, SqliteFile, open_schema

if TYPE_CHECKING:
    from agent.config import Settings

SCHEMA_VERSION = 1
FILE_NAME = "shadow.db"

_SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS shadow (
    id            INTEGER PRIMARY KEY CHECK (id = 1),  -- one document per board
    version       INTEGER NOT NULL CHECK (version >= 0),
    desired       TEXT NOT NULL,   -- nested JSON object
    desired_meta  TEXT NOT NULL,   -- {dotted key: epoch seconds last set}
    reported      TEXT NOT NULL,
    reported_meta TEXT NOT NULL,
    desired_at    REAL,            -- when desired was last written
    reported_at   REAL
)""",
)


class ShadowStore(SqliteFile):
    """The shadow's SQLite file. Thread-safe (one connection behind a lock); one per process and file."""

    what = "the shadow state"
    opening = "opening the shadow state"

    def __init__(
        self,
        path: Path | str,
        *,
        readonly: bool = False,
        busy_timeout_ms: int = 5000,
        synchronous: Literal["FULL", "NORMAL"] = "FULL",
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``readonly``: read an existing file only (the CLI, while the daemon runs)."""
        self.path = Path(path)
        self._clock = clock
        no_file = f"no shadow state at {self.path} (has the daemon run with this config, and received an update?)"
        prepare = partial(self._open, synchronous=synchronous, busy_timeout_ms=busy_timeout_ms)
        self._attach(self.path, readonly, busy_timeout_ms, synchronous, no_file=no_file, prepare=prepare)

    @classmethod
    def from_settings(cls, settings: Settings, *, readonly: bool = False) -> ShadowStore:
        """The one way the daemon and the CLI open it: ``{device.state_dir}/shadow.db``."""
        return cls(settings.device.state_dir / FILE_NAME, readonly=readonly)

    # ----------------------------------------------------------------------------------------

    def _open(self, conn: sqlite3.Connection, synchronous: str, busy_timeout_ms: int) -> None:
        open_schema(
            conn,
            self.path,
            Schema(SCHEMA_VERSION, _SCHEMA),
            what="the shadow state",
            fix=f"stop the agent and move {self.path.name} and its -wal and -shm files aside (the board then starts "
            "from its config file and takes the next update)",
            synchronous=synchronous,
            busy_timeout_ms=busy_timeout_ms,
            readonly=self.readonly,
        )

    # ----------------------------------------------------------------------------------------

    def load(self) -> ShadowDocument:
        """The stored document; an empty one (version 0) when nothing was ever stored."""
        with self._lock:
            c = self._connection()
            try:
                row = c.execute(
                    "SELECT version, desired, desired_meta, reported, reported_meta FROM shadow WHERE id = 1"
                ).fetchone()
            except sqlite3.Error as e:
                raise self._error(e, "reading the shadow state") from e
        if row is None:
            return ShadowDocument()
        try:
            return ShadowDocument(
                version=int(row[0]),
                desired=json.loads(row[1]),
                desired_meta=json.loads(row[2]),
                reported=json.loads(row[3]),
                reported_meta=json.loads(row[4]),
            )
        except (ValueError, TypeError) as e:
            raise StoreError(
                f"{self.path}: the stored shadow document is not valid JSON ({e})", code="store_corrupt"
            ) from None

    def save_desired(self, doc: ShadowDocument, now: float | None = None) -> bool:
        """Store desired, its metadata and version, if ``doc.version`` is newer than the stored one.

        Returns False (and changes nothing) when the stored version is the same or newer: a stale
        version never wins.
        """
        now = self._clock() if now is None else now
        with self._write("storing the desired state") as c:
            cur = c.execute(
                """
                INSERT INTO shadow (id, version, desired, desired_meta, reported, reported_meta, desired_at)
                VALUES (1, :version, :desired, :desired_meta, '{}', '{}', :now)
                ON CONFLICT (id) DO UPDATE SET
                    version = excluded.version, desired = excluded.desired,
                    desired_meta = excluded.desired_meta, desired_at = excluded.desired_at
                WHERE excluded.version > shadow.version
                """,
                {
                    "version": doc.version,
                    "desired": _dump(doc.desired),
                    "desired_meta": _dump(doc.desired_meta),
                    "now": now,
                },
            )
            return cur.rowcount == 1

    def save_reported(self, doc: ShadowDocument, now: float | None = None) -> None:
        """Store the reported state and its metadata (the board's own; not versioned)."""
        now = self._clock() if now is None else now
        with self._write("storing the reported state") as c:
            c.execute(
                """
                INSERT INTO shadow (id, version, desired, desired_meta, reported, reported_meta, reported_at)
                VALUES (1, 0, '{}', '{}', :reported, :reported_meta, :now)
                ON CONFLICT (id) DO UPDATE SET
                    reported = excluded.reported, reported_meta = excluded.reported_meta,
                    reported_at = excluded.reported_at
                """,
                {"reported": _dump(doc.reported), "reported_meta": _dump(doc.reported_meta), "now": now},
            )

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.close()
                finally:
                    self._conn = None

    def __enter__(self) -> ShadowStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _dump(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


__all__ = ["FILE_NAME", "ShadowStore"]
