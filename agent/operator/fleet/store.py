"""The operator's record of rollouts: a local SQLite file, so a rollout survives Ctrl-C or a crash of
the operator's machine and continues with `edge-agent fleet rollout --resume ID`.

Every change is committed before the broker hears of it (a device is marked ``updating`` before its
update is published), so a resumed rollout never forgets a device it may have changed. WAL, a busy
timeout (two terminals may look at the same file), schema creation that is safe to re-run.
Default file: ``$XDG_STATE_HOME/edge-agent/rollouts.db`` (``~/.local/state/edge-agent/rollouts.db``).
"""

from __future__ import annotations

import json
import os
import sqlite3
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from agent.errors import EdgeAgentError
from agent.operator.fleet.plan import DeviceState, Policy, Row, Target, Threshold
from agent.sqlite import Schema, SqliteFile, open_schema

_TABLES = (
    """
CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    spec TEXT NOT NULL,              -- JSON: target, policy, selection, mqtt prefix
    state TEXT NOT NULL,             -- running | aborting | succeeded | aborted
    wave INTEGER NOT NULL DEFAULT -1, -- the current wave, 0-based; -1 before the first
    wave_started REAL,
    reason TEXT,
    finished_at REAL
)""",
    """
CREATE TABLE IF NOT EXISTS devices (
    rollout_id TEXT NOT NULL REFERENCES rollouts(id),
    device TEXT NOT NULL,
    position INTEGER NOT NULL,
    wave INTEGER NOT NULL,
    state TEXT NOT NULL,             -- see agent.operator.fleet.plan.DeviceState
    previous TEXT,                   -- JSON: the device's desired model section before the rollout
    version INTEGER,                 -- the shadow version our update got (NULL: not acknowledged yet)
    sent_at REAL,
    done_at REAL,
    message TEXT,
    restore_version INTEGER,
    PRIMARY KEY (rollout_id, device)
)""",
)
SCHEMA = Schema(1, _TABLES)


class RolloutStoreError(EdgeAgentError):
    code = "rollout_store"


@dataclass
class Spec:
    target: Target
    policy: Policy
    selection: str  # how the devices were chosen, for the record ("--group canary", "--devices edge-*")
    prefix: str
    key_id: str | None = None  # the operator key that signs its updates (the key itself is never recorded)

    def to_json(self) -> str:
        p = self.policy
        return json.dumps(
            {
                "target": vars(self.target),
                "selection": self.selection,
                "prefix": self.prefix,
                "key_id": self.key_id,
                "policy": {
                    "waves": list(p.waves),
                    "max_failures": str(p.max_failures),
                    "min_devices": p.min_devices,
                    "timeout_per_wave_s": p.timeout_per_wave_s,
                },
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Spec:
        d = json.loads(text)
        p = d["policy"]
        policy = Policy(
            tuple(p["waves"]), Threshold.parse(p["max_failures"]), p["min_devices"], p["timeout_per_wave_s"]
        )
        return cls(Target(**d["target"]), policy, d["selection"], d["prefix"], d.get("key_id"))


@dataclass
class Device:
    device: str
    position: int
    wave: int
    state: DeviceState
    previous: dict[str, Any] | None = None
    version: int | None = None
    sent_at: float | None = None
    done_at: float | None = None
    message: str | None = None
    restore_version: int | None = None

    def row(self) -> Row:
        return Row(self.device, self.wave, self.state, self.message)


@dataclass
class Rollout:
    id: str
    created_at: float
    spec: Spec
    state: str
    wave: int
    wave_started: float | None
    reason: str | None
    finished_at: float | None
    devices: list[Device] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for d in self.devices:
            out[d.state] = out.get(d.state, 0) + 1
        return out

    def waves(self) -> int:
        return max((d.wave for d in self.devices), default=-1) + 1

    def as_dict(self) -> dict[str, Any]:
        s = self.spec
        return {
            "id": self.id,
            "state": self.state,
            "reason": self.reason,
            "created_at": self.created_at,
            "finished_at": self.finished_at,
            "wave": self.wave + 1,
            "waves": self.waves(),
            "target": vars(s.target),
            "selection": s.selection,
            "key_id": s.key_id,
            "policy": json.loads(s.to_json())["policy"],
            "counts": self.counts(),
            "devices": [
                {
                    "device": d.device,
                    "wave": d.wave + 1,
                    "state": d.state,
                    "message": d.message,
                    "previous": d.previous,
                    "version": d.version,
                    "sent_at": d.sent_at,
                    "done_at": d.done_at,
                }
                for d in self.devices
            ],
        }


def default_path() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "edge-agent" / "rollouts.db"


class RolloutStore(SqliteFile):
    """The rollout record: one SQLite file (``agent.sqlite``: WAL, FULL sync, schema versioned)."""

    what = "the rollout record"
    opening = "opening the rollout record"
    no_folder = "it is created with the record; check the --db path"

    def __init__(self, path: Path) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RolloutStoreError(f"cannot open the rollout record {path}: {e.strerror or e}") from None
        fix = f"move {path.name} aside; the rollouts it holds can then no longer be resumed"
        prepare = partial(open_schema, path=path, schema=SCHEMA, what=self.what, fix=fix, busy_timeout_ms=10000)
        self._attach(path, False, 10000, "FULL", no_file="", prepare=prepare)
        self._db = self._connection()

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def create(self, spec: Spec, devices: list[tuple[str, int]], now: float) -> Rollout:
        """A new rollout over ``devices`` ((device id, wave) in rollout order)."""
        rid = uuid.uuid4().hex[:10]
        with self._write("writing the rollout record") as db:
            db.execute(
                "INSERT INTO rollouts (id, created_at, spec, state) VALUES (?, ?, ?, 'running')",
                (rid, now, spec.to_json()),
            )
            db.executemany(
                "INSERT INTO devices (rollout_id, device, position, wave, state) VALUES (?, ?, ?, ?, 'pending')",
                [(rid, dev, i, wave) for i, (dev, wave) in enumerate(devices)],
            )
        return self.load(rid)

    def load(self, rid: str) -> Rollout:
        with self._lock:
            try:
                r = self._db.execute(
                    "SELECT id, created_at, spec, state, wave, wave_started, reason, finished_at "
                    "FROM rollouts WHERE id = ?",
                    (rid,),
                ).fetchone()
                rows = self._db.execute(
                    "SELECT device, position, wave, state, previous, version, sent_at, done_at, message, "
                    "restore_version FROM devices WHERE rollout_id = ? ORDER BY position",
                    (rid,),
                ).fetchall()
            except sqlite3.Error as e:
                raise RolloutStoreError(f"cannot read the rollout record {self.path}: {e}") from None
        if r is None:
            raise RolloutStoreError(
                f"no rollout {rid!r} in {self.path} (`edge-agent fleet status` lists them)", code="rollout_unknown"
            )
        devices = [Device(d[0], d[1], d[2], d[3], json.loads(d[4]) if d[4] else None, *d[5:]) for d in rows]
        return Rollout(r[0], r[1], Spec.from_json(r[2]), r[3], r[4], r[5], r[6], r[7], devices)

    def list(self) -> list[tuple[str, float, str, str]]:
        """(id, created_at, state, target path) of every rollout, newest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, created_at, state, spec FROM rollouts ORDER BY created_at DESC"
            ).fetchall()
        return [(r[0], r[1], r[2], json.loads(r[3])["target"]["path"]) for r in rows]

    def set_rollout(self, rid: str, **fields: str | int | float | None) -> None:
        self._update("rollouts", "id = ?", (rid,), fields)

    def set_device(self, rid: str, device: str, **fields: Any) -> None:  # columns, and previous (JSON)
        if "previous" in fields:
            fields["previous"] = json.dumps(fields["previous"]) if fields["previous"] is not None else None
        self._update("devices", "rollout_id = ? AND device = ?", (rid, device), fields)

    def _update(self, table: str, where: str, key: tuple[str, ...], fields: Mapping[str, object]) -> None:
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self._write("writing the rollout record") as db:
            db.execute(f"UPDATE {table} SET {cols} WHERE {where}", (*fields.values(), *key))


__all__ = ["Device", "Rollout", "RolloutStore", "RolloutStoreError", "Spec", "default_path"]
