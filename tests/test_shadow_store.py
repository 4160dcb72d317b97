"""The shadow's SQLite file (agent.shadow.store) on real files."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from agent.config import Settings
from agent.errors import StoreError
from agent.shadow.document import ShadowDocument
from agent.shadow.store import ShadowStore


def doc(version: int, **desired: dict) -> ShadowDocument:
    return ShadowDocument(version=version, desired=desired, desired_meta={f"{s}.{k}": 1.5 for s, v in desired.items()
                                                                          for k in v})  # fmt: skip


def test_empty_then_round_trip(tmp_path: Path):
    with ShadowStore(tmp_path / "shadow.db") as store:
        assert store.load() == ShadowDocument()
        d = doc(1, engine={"n_ctx": 512})
        assert store.save_desired(d, now=10.0)
        reported = ShadowDocument(
            reported={"engine": {"n_ctx": 2048}, "errors": {"x": "é"}}, reported_meta={"engine.n_ctx": 2.0}
        )
        store.save_reported(reported, now=11.0)
    with ShadowStore(tmp_path / "shadow.db") as store:  # re-open: schema creation is safe to re-run
        got = store.load()
    assert got.version == 1 and got.desired == {"engine": {"n_ctx": 512}}
    assert got.desired_meta == {"engine.n_ctx": 1.5}
    assert got.reported == {"engine": {"n_ctx": 2048}, "errors": {"x": "é"}} and got.reported_meta == {
        "engine.n_ctx": 2.0
    }


def test_reported_can_be_stored_before_any_desired(tmp_path: Path):
    with ShadowStore(tmp_path / "shadow.db") as store:
        store.save_reported(ShadowDocument(reported={"intake": {"paused": False}}))
        assert store.save_desired(doc(1, intake={"paused": True}))
        got = store.load()
    assert got.version == 1 and got.reported == {"intake": {"paused": False}}


def test_a_stale_version_never_wins(tmp_path: Path):
    path = tmp_path / "shadow.db"
    with ShadowStore(path) as a, ShadowStore(path) as b:  # two writers on one file (two processes)
        assert a.save_desired(doc(3, engine={"n_ctx": 512}))
        assert not b.save_desired(doc(2, engine={"n_ctx": 1024}))
        assert not b.save_desired(doc(3, engine={"n_ctx": 4096}))
        assert b.load().desired == {"engine": {"n_ctx": 512}}
        assert b.save_desired(doc(4, engine={"n_ctx": 64}))
        assert a.load().version == 4


def test_from_settings_uses_the_state_dir(tmp_path: Path):
    s = Settings.model_validate({"device": {"state_dir": str(tmp_path)}})
    with ShadowStore.from_settings(s) as store:
        assert store.path == tmp_path / "shadow.db"
    assert (tmp_path / "shadow.db").is_file()


def test_read_only_opening_for_the_cli(tmp_path: Path):
    path = tmp_path / "shadow.db"
    with pytest.raises(StoreError) as e:
        ShadowStore(path, readonly=True)
    assert e.value.code == "store_cantopen" and "no shadow state" in str(e.value)
    with ShadowStore(path) as writer:
        writer.save_desired(doc(1, intake={"paused": True}))
        with ShadowStore(path, readonly=True) as reader:  # while the daemon holds it open
            assert reader.load().desired == {"intake": {"paused": True}}
            with pytest.raises(StoreError) as e:
                reader.save_desired(doc(2))
            assert e.value.code == "store_readonly"
    with ShadowStore(path, readonly=True) as reader:  # and after it closed
        assert reader.load().version == 1


def test_missing_folder_corrupt_file_and_newer_schema(tmp_path: Path):
    with pytest.raises(StoreError) as e:
        ShadowStore(tmp_path / "nope" / "shadow.db")
    assert e.value.code == "store_cantopen"

    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database file at all" * 200)
    with pytest.raises(StoreError) as e:
        ShadowStore(junk)
    assert e.value.code == "store_corrupt" and "move" in str(e.value)

    newer = tmp_path / "newer.db"
    c = sqlite3.connect(newer)
    c.execute("PRAGMA user_version = 99")
    c.close()
    with pytest.raises(StoreError) as e:
        ShadowStore(newer)
    assert e.value.code == "store_version"


def test_a_closed_store_raises_store_error(tmp_path: Path):
    path = tmp_path / "shadow.db"
    store = ShadowStore(path)
    store.close()
    with pytest.raises(StoreError) as e:
        store.save_desired(doc(1))
    assert e.value.code == "store_closed"
