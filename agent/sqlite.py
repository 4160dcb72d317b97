"""What the SQLite files of the agent share (the job store, the shadow state, the telemetry spool, the
operator's rollout record): one mapping of SQLite errors to ``StoreError`` codes with what to do about
each, the one way to open one (``open_schema``: checks, write-ahead log, schema and migrations in one
transaction), the write transaction they all use, and ``SqliteFile``: one connection behind a lock.

The codes are what the store's health (agent.jobs.health) and the CLI act on: store_full,
store_readonly, store_corrupt, store_cantopen, store_busy, store_io.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from agent.errors import StoreError

# What each SQLite error means for the agent, and what to do about it: (error name prefixes, code, message).
# The message is formatted with: where ("{path}: {doing}"), e, name, what, path, folder (path.parent).
_ERRORS: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (("SQLITE_FULL",), "store_full", "{where}: the disk is full; free space on the filesystem holding {folder}"),
    (("SQLITE_READONLY", "SQLITE_PERM", "SQLITE_AUTH"), "store_readonly",
     "{where}: the file is read-only ({e}); check that it and {folder} are writable by this user and that the "
     "filesystem is not mounted read-only"),
    (("SQLITE_CORRUPT", "SQLITE_NOTADB"), "store_corrupt",
     "{where}: {what} is damaged or not a database ({e}); stop the agent, move {path.name} and its -wal and -shm "
     "files aside, and start again with an empty one"),
    (("SQLITE_CANTOPEN",), "store_cantopen",
     "{where}: cannot open the file ({e}); check that {folder} exists and is writable"),
    (("SQLITE_BUSY", "SQLITE_LOCKED"), "store_busy",
     "{where}: the file stayed locked by another process ({e}); is a second edge-agent using the same state folder?"),
    (("SQLITE_IOERR",), "store_io",
     "{where}: I/O error ({name}: {e}); the storage may be failing or was removed (check dmesg)"),
)  # fmt: skip


def store_error(e: sqlite3.Error, path: Path, doing: str, what: str) -> StoreError:
    """``e`` as a StoreError: ``doing`` says what was being done, ``what`` names the file's role
    ("the job store", "the shadow state", "the telemetry spool")."""
    name = getattr(e, "sqlite_errorname", "") or ""
    where = f"{path}: {doing}"
    for prefixes, code, message in _ERRORS:
        if name.startswith(prefixes):
            text = message.format(where=where, e=e, name=name, what=what, path=path, folder=path.parent)
            return StoreError(text, code=code)
    return StoreError(f"{where}: SQLite error {name or type(e).__name__}: {e}")


@dataclass(frozen=True)
class Schema:
    """A SQLite file's schema: ``statements`` are safe to re-run (CREATE ... IF NOT EXISTS);
    ``migrations[v]`` bring a file at version v - 1 to v; ``seed`` runs after them, in the same
    transaction (rows every file must have)."""

    version: int
    statements: tuple[str, ...]
    migrations: Mapping[int, tuple[str, ...]] = field(default_factory=dict)
    seed: tuple[str, ...] = ()


def open_schema(
    conn: sqlite3.Connection,
    path: Path,
    schema: Schema,
    *,
    what: str,
    fix: str,
    synchronous: str = "FULL",
    busy_timeout_ms: int = 5000,
    journal_size_limit: int | None = None,
    new_file: Sequence[str] = (),
    readonly: bool = False,
) -> None:
    """Make ``conn`` ready: a busy timeout; refuse a file written by a newer edge-agent
    (store_version) or a damaged one (store_corrupt: ``fix`` says what to do); write-ahead logging;
    then the schema, its migrations and ``user_version`` in one transaction, so a crash leaves the
    old schema or the new one. ``new_file`` pragmas run only on a file without tables yet (page size,
    auto_vacuum). ``readonly``: only the version check."""
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > schema.version:
        raise StoreError(
            f"{path}: schema version {version} was written by a newer edge-agent (this one knows {schema.version}); "
            "upgrade the agent or move the file aside",
            code="store_version",
        )
    if readonly:
        return
    check = conn.execute("PRAGMA quick_check(1)").fetchone()
    if check is None or check[0] != "ok":
        raise StoreError(
            f"{path}: {what} is damaged ({check[0] if check else 'no answer'}); {fix}", code="store_corrupt"
        )
    if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0:
        for pragma in new_file:
            conn.execute(f"PRAGMA {pragma}")
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise StoreError(
            f"{path}: cannot use write-ahead logging (journal mode stayed {mode!r}); the filesystem must support "
            "shared memory (not a network share)",
            code="store_cantopen",
        )
    if synchronous not in ("FULL", "NORMAL"):
        raise ValueError("synchronous must be 'FULL' or 'NORMAL'")
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    if journal_size_limit is not None:
        conn.execute(f"PRAGMA journal_size_limit = {int(journal_size_limit)}")
    conn.execute("BEGIN IMMEDIATE")
    try:
        # Not executescript(): it commits first, and the schema must appear all at once or not at all.
        if 0 < version < schema.version:
            for v in range(version + 1, schema.version + 1):
                for stmt in schema.migrations.get(v, ()):
                    conn.execute(stmt)
        for stmt in (*schema.statements, *schema.seed):
            conn.execute(stmt)
        conn.execute(f"PRAGMA user_version = {schema.version}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


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


__all__ = ["Schema", "open_schema", "store_error", "write_transaction"]


class SqliteFile:
    """One SQLite file behind a lock: what the job store and the shadow state share. A subclass names
    the file's role (``what``: "the job store"), the step in errors (``opening``: "opening the store"),
    what to do when the folder is missing (``no_folder``), and calls ``_attach`` from its constructor."""

    what = "the file"
    opening = "opening the file"
    no_folder = "create it (under systemd, StateDirectory= creates device.state_dir)"

    def _attach(
        self, path: Path, readonly: bool, busy_timeout_ms: int, synchronous: str, *, no_file: str,
        prepare: Callable[[sqlite3.Connection], None],
    ) -> None:  # fmt: skip
        """Open ``path`` and ``prepare`` it (``open_schema``). ``no_file`` is the whole message for a
        missing file when ``readonly`` (the CLI reads an existing file only, with no write lock, while
        the daemon runs)."""
        opening, no_folder = self.opening, self.no_folder
        self.path, self.readonly = path, readonly
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError("synchronous must be 'FULL' or 'NORMAL'")
        if not path.parent.is_dir():
            raise StoreError(f"{path}: folder {path.parent} does not exist; {no_folder}", code="store_cantopen")
        if readonly and not path.is_file():
            raise StoreError(no_file, code="store_cantopen")
        try:
            # isolation_level=None: BEGIN IMMEDIATE is issued here (write_transaction); the sqlite3
            # module's implicit transactions would start a deferred one that could fail to upgrade.
            target = f"file:{path}?mode=ro" if readonly else str(path)
            conn = sqlite3.connect(
                target, timeout=busy_timeout_ms / 1000, isolation_level=None, check_same_thread=False, uri=readonly
            )
        except sqlite3.Error as e:
            raise self._error(e, opening) from e
        self._conn = conn
        try:
            prepare(conn)
        except sqlite3.Error as e:
            conn.close()
            self._conn = None
            raise self._error(e, opening) from e
        except BaseException:
            conn.close()
            self._conn = None
            raise

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"{self.path}: {self.what} is closed", code="store_closed")
        return self._conn

    def _error(self, e: sqlite3.Error, doing: str) -> StoreError:
        return store_error(e, self.path, doing, self.what)

    @contextmanager
    def _write(self, doing: str) -> Iterator[sqlite3.Connection]:
        """One state change: the lock, then one write transaction."""
        with self._lock, write_transaction(self._connection(), lambda e: self._error(e, doing)) as c:
            yield c

    @contextmanager
    def _read(self, doing: str) -> Iterator[sqlite3.Connection]:
        with self._lock:
            c = self._connection()
            try:
                yield c
            except sqlite3.Error as e:
                raise self._error(e, doing) from e
