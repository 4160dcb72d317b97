"""What the three SQLite files of the agent share (the job store, the shadow state, the telemetry
spool): one mapping of SQLite errors to ``StoreError`` codes with what to do about each, and the
write transaction they all use.

The codes are what the store's health (agent.health) and the CLI act on: store_full,
store_readonly, store_corrupt, store_cantopen, store_busy, store_io.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from agent.errors import StoreError


def store_error(e: sqlite3.Error, path: Path, doing: str, what: str) -> StoreError:
    """``e`` as a StoreError: ``doing`` says what was being done, ``what`` names the file's role
    ("the job store", "the shadow state", "the telemetry spool")."""
    name = getattr(e, "sqlite_errorname", "") or ""
    where = f"{path}: {doing}"
    if name.startswith("SQLITE_FULL"):
        return StoreError(f"{where}: the disk is full; free space on the filesystem holding {path.parent}",
                          code="store_full")  # fmt: skip
    if name.startswith(("SQLITE_READONLY", "SQLITE_PERM", "SQLITE_AUTH")):
        return StoreError(
            f"{where}: the file is read-only ({e}); check that it and {path.parent} are writable by this user and "
            "that the filesystem is not mounted read-only",
            code="store_readonly",
        )
    if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
        return StoreError(
            f"{where}: {what} is damaged or not a database ({e}); stop the agent, move {path.name} and its -wal and "
            "-shm files aside, and start again with an empty one",
            code="store_corrupt",
        )
    if name.startswith("SQLITE_CANTOPEN"):
        return StoreError(f"{where}: cannot open the file ({e}); check that {path.parent} exists and is writable",
                          code="store_cantopen")  # fmt: skip
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return StoreError(
            f"{where}: the file stayed locked by another process ({e}); is a second edge-agent using the same "
            "state folder?",
            code="store_busy",
        )
    if name.startswith("SQLITE_IOERR"):
        return StoreError(f"{where}: I/O error ({name}: {e}); the storage may be failing or was removed (check dmesg)",
                          code="store_io")  # fmt: skip
    return StoreError(f"{where}: SQLite error {name or type(e).__name__}: {e}")


@contextmanager
def write_transaction(
    conn: sqlite3.Connection, error: Callable[[sqlite3.Error], StoreError]
) -> Iterator[sqlite3.Connection]:
    """One state change: BEGIN IMMEDIATE, then COMMIT, or ROLLBACK on any exception; SQLite errors
    leave as ``error(e)``. IMMEDIATE takes the write lock up front, so a read-then-update inside the
    block cannot be interleaved with another writer (and never fails half-way with BUSY)."""
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    except sqlite3.Error as e:
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
        raise error(e) from e


__all__ = ["store_error", "write_transaction"]
