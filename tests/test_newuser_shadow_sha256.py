"""The model in force is reported with its sha256 (issue 17, section 3), not with null unless
model.sha256 is configured: computed once per file on a background thread, cached by the file's
identity (device, inode, size, mtime, ctime) in the state folder so a restart does not hash it
again, reported as pending (sha256 null, sha256_pending true) until known, and the shadow document
published again then. model.sha256, when set, is reported as it is (the load checked it).

Real files, real SQLite, a real Mosquitto, real daemons on the tiny synthetic model. The hash is
the real one; ``Held`` only holds its result back so a test can look while hashing runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest

from agent.config import Settings
from agent.engine.supervisor import file_sha256
from agent.models.synth import synth_model
from agent.mqtt.topics import Topics
from agent.operator.fleet.client import FleetClient
from agent.shadow.facts import ServingModel
from agent.shadow.hashes import CACHE_FILE, FileHashes
from tests.broker import BrokerClient, MosquittoBroker
from tests.daemon_harness import InProcessDaemon, wait_online, write_daemon_config
from tests.shadow_harness import ShadowBoard, ShadowPeer

DEV = "dev-sha"
T = Topics("edge", DEV)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Held:
    """The real hash, computed at once, its result held until ``release``: the file is read before a
    test changes it, as a long hash of a large file would have read it. Records each call's thread
    and niceness."""

    def __init__(self, *, released: bool = False) -> None:
        self.gate = threading.Event()
        if released:
            self.gate.set()
        self.entered = threading.Event()
        self.calls: list[tuple[Path, str, int]] = []

    def __call__(self, path: Path) -> str:
        digest = file_sha256(path)
        self.calls.append((Path(path), threading.current_thread().name,
                           os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))  # fmt: skip
        self.entered.set()
        assert self.gate.wait(30), "the test never released the hash"
        return digest


def never(path: Path) -> str:
    raise AssertionError(f"{path} was hashed again")


# ------------------------------------------------------------------------------------ the cache


def test_a_file_is_hashed_once_off_the_callers_thread_and_never_again_across_restarts(
    tmp_path: Path, tiny_model: Path
) -> None:
    model = tmp_path / "models" / "m.gguf"
    model.parent.mkdir()
    shutil.copyfile(tiny_model, model)
    cache = tmp_path / "state" / CACHE_FILE
    cache.parent.mkdir()
    held, ready = Held(), threading.Event()
    hashes = FileHashes(cache_file=cache, on_ready=ready.set, hash_file=held)

    assert hashes.get(model) == (None, True)  # answered at once: the hashing is held
    assert held.entered.wait(10)
    assert hashes.get(model) == (None, True)  # asked again while it runs: not queued twice
    path, thread, nice = held.calls[0]
    assert path == model and thread == "model-sha256" and thread != threading.current_thread().name
    assert nice == 19  # below every job thread: the lowest priority an unprivileged thread may take
    held.gate.set()
    assert ready.wait(10)
    assert hashes.get(model) == (sha(model), False)
    assert len(held.calls) == 1 and hashes.computed == 1

    # A restart: the digest comes from the cache file, the file is not read again.
    again = FileHashes(cache_file=cache, on_ready=lambda: pytest.fail("told again"), hash_file=never)
    assert again.get(model) == (sha(model), False)
    assert json.loads(cache.read_text())["files"][0]["sha256"] == sha(model)

    # Another file under the same name (a new inode) is hashed: its own digest, not the cached one.
    replacement = tmp_path / "models" / ".m.gguf.new"
    synth_model("tiny", replacement, seed=9)
    os.replace(replacement, model)
    ready.clear()
    assert hashes.get(model) == (None, True)
    assert ready.wait(10)
    assert hashes.get(model) == (sha(model), False) != (sha(tiny_model), False)
    assert len(held.calls) == 2


def test_a_file_that_changes_while_it_is_hashed_is_not_cached_under_either_identity(
    tmp_path: Path, tiny_model: Path
) -> None:
    model = tmp_path / "m.gguf"
    shutil.copyfile(tiny_model, model)
    held, ready = Held(), threading.Event()
    hashes = FileHashes(cache_file=tmp_path / CACHE_FILE, on_ready=ready.set, hash_file=held)
    old = sha(model)
    assert hashes.get(model) == (None, True)
    assert held.entered.wait(10)  # read, digest of the old content in hand
    with open(model, "ab") as f:  # the same inode, rewritten in place
        f.write(b"\0" * 4096)
    held.gate.set()
    # The digest of the old content must not be taken for the new file: asked again, it is hashed again.
    assert hashes.get(model) == (None, True)
    assert ready.wait(10)
    assert hashes.get(model) == (sha(model), False)
    assert sha(model) != old and len(held.calls) == 2 and hashes.computed == 1
    assert not (tmp_path / CACHE_FILE).read_text().count(old)


def test_an_unreadable_or_missing_file_is_not_pending_forever(tmp_path: Path) -> None:
    hashes = FileHashes(cache_file=None, hash_file=never)
    assert hashes.get(tmp_path / "gone.gguf") == (None, False)
    assert hashes.get(Path("bad\0name.gguf")) == (None, False)


# ------------------------------------------------------------------------------------ the shadow


def test_the_document_says_pending_then_is_published_again_with_the_sha256(
    tmp_path: Path, broker: MosquittoBroker, models_dir: Path
) -> None:
    model = models_dir / "demo-tiny.gguf"
    state = tmp_path / "state"
    state.mkdir()
    settings = Settings.model_validate({"device": {"id": DEV, "models_dir": str(models_dir), "state_dir": str(state)}})
    held = Held()
    box: dict[str, ShadowBoard] = {}
    hashes = FileHashes(cache_file=state / CACHE_FILE, hash_file=held,
                        on_ready=lambda: box["board"].service.refresh_facts_soon())  # fmt: skip

    def facts() -> dict[str, Any]:  # what the daemon's Reporter reports for the model in force
        digest, pending = hashes.get(model)
        serving = ServingModel(file=model.name, sha256=digest, sha256_pending=pending, load_mode="fit", n_ctx=512)
        return {"board": None, "serving": serving.model_dump(mode="json")}

    box["board"] = board = ShadowBoard(broker, settings, facts=facts)
    peer = ShadowPeer(broker, T)
    try:
        board.start()
        first = peer.doc()
        serving = first["state"]["reported"]["serving"]
        assert serving["sha256"] is None and serving["sha256_pending"] is True
        held.gate.set()
        doc = peer.doc(lambda d: d["state"]["reported"]["serving"]["sha256"] is not None)
        assert doc["state"]["reported"]["serving"]["sha256"] == sha(model)
        assert doc["state"]["reported"]["serving"]["sha256_pending"] is False
        assert doc["version"] == first["version"]  # a fact, not an operator's change
    finally:
        peer.close()
        board.stop()


# ------------------------------------------------------------------------------------ the daemon


@pytest.fixture
def config(tmp_path: Path, broker: MosquittoBroker, tiny_model: Path) -> Path:
    cfg = write_daemon_config(tmp_path / "d", broker, tiny_model, device_id=DEV)
    synth_model("tiny", tmp_path / "d" / "models" / "other.gguf", seed=3)
    return cfg


def _serving(d: InProcessDaemon) -> dict[str, Any]:
    return d.daemon.parts.reporter.reported_facts()["serving"]


def test_the_daemon_reports_the_sha256_of_the_file_that_runs_and_fleet_status_shows_it(
    config: Path, broker: MosquittoBroker
) -> None:
    models = config.parent / "models"
    model, other = models / "model.gguf", models / "other.gguf"
    op = ShadowPeer(broker, T)
    try:
        with BrokerClient(broker) as peer:
            peer.subscribe(T.device_status)
            with InProcessDaemon(config) as d:
                wait_online(peer, DEV)
                doc = op.doc(lambda x: (x["state"]["reported"].get("serving") or {}).get("sha256") is not None, 30)
                assert doc["state"]["reported"]["serving"]["sha256"] == sha(model)
                assert doc["state"]["reported"]["serving"]["sha256_pending"] is False
                with FleetClient(d.settings) as fleet:  # what `edge-agent fleet status` reads
                    fleet.sync()
                    assert fleet.info(DEV).sha256 == sha(model)

                # model.sha256 given: reported as it is (the load checked it), no hashing.
                computed = d.daemon.parts.reporter.hashes.computed
                op.send({"state": {"desired": {"model": {"path": "other.gguf", "sha256": sha(other)}}},
                         "client_token": "with-sha"})  # fmt: skip
                assert op.reply("with-sha")[0] == "accepted"
                doc = op.doc(lambda x: x["state"]["reported"]["serving"]["file"] == "other.gguf", 60)
                assert doc["state"]["reported"]["serving"]["sha256"] == sha(other)
                assert d.daemon.parts.reporter.hashes.computed == computed

                # Back to the first file, without model.sha256: hashed before, so known at once.
                op.send({"state": {"desired": {"model": None}}, "client_token": "back"})
                assert op.reply("back")[0] == "accepted"
                doc = op.doc(lambda x: x["state"]["reported"]["serving"]["file"] == "model.gguf", 60)
                assert doc["state"]["reported"]["serving"]["sha256"] == sha(model)
                assert d.daemon.parts.reporter.hashes.computed == computed

            # A restart: the cache in the state folder has it, the file is not read again. A new subscriber, so
            # a live 'online' still queued from the first daemon (it republishes it on a model change) is not
            # taken for the new one's.
            with BrokerClient(broker) as fresh:
                fresh.subscribe(T.device_status)  # before the daemon starts: its 'online' is not missed
                with InProcessDaemon(config) as d:
                    wait_online(fresh, DEV)
                    serving = _serving(d)
                    assert serving["sha256"] == sha(model) and serving["sha256_pending"] is False
                    assert d.daemon.parts.reporter.hashes.computed == 0
    finally:
        op.close()


def test_a_model_file_replaced_under_the_running_model_is_not_reported_as_running(
    config: Path, broker: MosquittoBroker
) -> None:
    """Same path, another file (a new inode): the loaded weights are still the old file's, so its
    digest is not reported as the one in force until the model is loaded again."""
    model = config.parent / "models" / "model.gguf"
    loaded = sha(model)
    with BrokerClient(broker) as peer:
        peer.subscribe(T.device_status)
        with InProcessDaemon(config) as d:
            wait_online(peer, DEV)
            op = ShadowPeer(broker, T)
            try:
                op.doc(lambda x: (x["state"]["reported"].get("serving") or {}).get("sha256") == loaded, 30)
            finally:
                op.close()
            tmp = model.with_name(".model.gguf.new")
            synth_model("tiny", tmp, seed=11)
            os.replace(tmp, model)
            serving = _serving(d)
            assert serving["sha256"] is None and serving["sha256_pending"] is False
