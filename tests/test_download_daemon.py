"""Model delivery end to end (issue 11's acceptance on the board side): real daemons (in process), a
real Mosquitto, a real HTTP(S) server on the loopback address (tests/model_server.py) serving real
model files, real SQLite state. Operators are plain paho peers following the shadow."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from agent.models.synth import synth_model
from agent.mqtt.topics import Topics
from agent.system.files import file_sha256
from tests.broker import BrokerClient, MosquittoBroker
from tests.daemon_harness import InProcessDaemon, wait_online, write_daemon_config
from tests.model_server import ModelServer
from tests.shadow_harness import ShadowPeer

DEV = "dev-dl"
T = Topics("edge", DEV)
FAST = {"retry_min_s": 0.05, "retry_max_s": 0.2, "max_failures": 1000, "free_margin_mb": 0,
        "progress_interval_s": 0.2}  # fmt: skip


@pytest.fixture(scope="module")
def new_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real 4-bit GGUF of 2.3 MB, another shape than the tiny model the boards start with."""
    return synth_model("tiny", tmp_path_factory.mktemp("dl") / "new.gguf", seed=7,
                       overrides={"n_embd": 256, "n_ff": 1024, "n_layer": 4})  # fmt: skip


@pytest.fixture
def server(tmp_path: Path, new_model: Path):
    root = tmp_path / "www"
    root.mkdir()
    with ModelServer(root) as s:
        s.add(new_model, "new.gguf")
        yield s


@pytest.fixture
def op(broker: MosquittoBroker):
    peer = ShadowPeer(broker, T)
    yield peer
    peer.close()


@pytest.fixture
def status(broker: MosquittoBroker):
    with BrokerClient(broker) as p:
        p.subscribe(f"{T.root}/status")
        yield p


def board(tmp_path: Path, broker: MosquittoBroker, tiny_model: Path, **sections: Any) -> Path:
    return write_daemon_config(tmp_path / "d", broker, tiny_model, device_id=DEV,
                               download={**FAST, **sections.pop("download", {})}, **sections)  # fmt: skip


def update(op: ShadowPeer, desired: dict, token: str) -> dict:
    op.send({"state": {"desired": desired}, "client_token": token})
    kind, reply = op.reply(token, timeout=60)
    assert kind == "accepted", reply
    return reply


def source(server: ModelServer, model: Path, name: str = "new.gguf", **extra: Any) -> dict:
    return {"path": name, "url": server.url(name), "sha256": file_sha256(model), **extra}


def reported(doc: dict) -> dict:
    return doc["state"]["reported"]


def test_a_download_cut_twice_resumes_is_verified_and_swapped(
    tmp_path: Path,
    broker: MosquittoBroker,
    tiny_model: Path,
    new_model: Path,
    server: ModelServer,
    op: ShadowPeer,
    status,
) -> None:
    size = new_model.stat().st_size
    server.cut_after(size // 3)
    with InProcessDaemon(board(tmp_path, broker, tiny_model)) as d:
        wait_online(status, DEV)
        update(op, {"model": source(server, new_model, size=size)}, "dl")
        doc = op.doc(lambda x: reported(x).get("pending", {}).get("model.path", "").startswith("downloading"), 60)
        assert reported(doc)["serving"]["file"] == "model.gguf"  # the old model serves meanwhile
        for cut in range(2):
            assert server.cut.wait(60), "the server was not cut"
            if cut == 0:
                server.cut_after(size // 3)
            server.start()
        doc = op.doc(lambda x: (reported(x).get("serving") or {}).get("file") == "new.gguf", 60)
        rep = reported(doc)
        assert rep["serving"]["sha256"] == file_sha256(new_model)
        assert rep["model"]["path"] == "new.gguf" and not rep.get("errors") and not doc["state"].get("delta")
        assert rep["download"]["state"] == "done" and rep["download"]["fetched"] == size
        assert rep["model_change"]["outcome"] == "applied"
        sent = server.sent("new.gguf")
        assert sent <= 1.1 * size
        models = tmp_path / "d" / "models"
        assert file_sha256(models / "new.gguf") == file_sha256(new_model)
        assert not [p for p in models.iterdir() if p.name.endswith(".partial")]
        assert d.daemon.parts.supervisor.engine.report.model.endswith("new.gguf")
        attempts = rep["download"]["attempts"]
    print(
        f"\ndaemon download cut twice: file {size} bytes, server sent {sent} ({sent / size:.3f}x), "
        f"{attempts} attempts; swapped in {rep['serving']['swap_ms']:.0f} ms"
    )


def test_a_wrong_checksum_is_refused_the_partial_removed_and_the_old_model_serves(
    tmp_path: Path, broker: MosquittoBroker, tiny_model: Path, new_model: Path, server: ModelServer, op: ShadowPeer,
    status,
) -> None:  # fmt: skip
    with InProcessDaemon(
        board(tmp_path, broker, tiny_model),
        expect_errors=("model delivery: new.gguf: .*sha256", "not applied: download_checksum_mismatch"),
    ) as d:
        wait_online(status, DEV)
        update(op, {"model": {**source(server, new_model), "sha256": "ab" * 32}}, "bad")
        doc = op.doc(lambda x: "model.path" in reported(x).get("errors", {}), 60)
        rep = reported(doc)
        assert rep["errors"]["model.path"].startswith("download_checksum_mismatch")
        assert rep["serving"]["file"] == "model.gguf" and rep["model"]["path"] == "model.gguf"
        assert rep["download"]["state"] == "failed"
        assert doc["state"]["delta"]["model"]["path"] == "new.gguf"  # wanted, not in force
        models = tmp_path / "d" / "models"
        assert sorted(p.name for p in models.iterdir()) == ["model.gguf"]
        assert d.daemon.parts.supervisor.engine is not None


def _mount_tmpfs(folder: Path, size: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True,
                   capture_output=True)  # fmt: skip


@pytest.mark.root
def test_too_little_disk_is_refused_before_downloading(
    tmp_path: Path,
    broker: MosquittoBroker,
    tiny_model: Path,
    new_model: Path,
    server: ModelServer,
    op: ShadowPeer,
    status,
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs as the models folder")
    models = tmp_path / "d" / "models"
    try:
        _mount_tmpfs(models, "1m")  # the tiny model (106 KB) fits, the new one (2.3 MB) does not
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        pytest.skip(f"cannot mount a tmpfs here: {e}")
    try:
        shutil.copyfile(tiny_model, models / "model.gguf")
        with InProcessDaemon(
            board(tmp_path, broker, tiny_model), expect_errors=("not enough space", "not applied: download_no_space")
        ):
            wait_online(status, DEV)
            # Without model.size the server's Content-Length is checked before a byte is written.
            update(op, {"model": source(server, new_model)}, "nosize")
            doc = op.doc(lambda x: "model.path" in reported(x).get("errors", {}), 60)
            assert reported(doc)["errors"]["model.path"].startswith("download_no_space")
            assert not [p for p in models.iterdir() if p.name != "model.gguf"]
            # With model.size, nothing is even requested.
            requests_before = len(server.requests())
            update(op, {"model": source(server, new_model, name="new2.gguf", size=new_model.stat().st_size)}, "size")
            doc = op.doc(lambda x: reported(x).get("errors", {}).get("model.path", "").startswith("download_no_space")
                         and reported(x).get("download", {}).get("path") == "new2.gguf", 60)  # fmt: skip
            assert len(server.requests()) == requests_before
            assert reported(doc)["serving"]["file"] == "model.gguf"
    finally:
        subprocess.run(["umount", str(models)], check=False)


def test_a_model_that_fails_the_canary_is_rolled_back_by_itself(
    tmp_path: Path,
    broker: MosquittoBroker,
    tiny_model: Path,
    new_model: Path,
    server: ModelServer,
    op: ShadowPeer,
    status,
) -> None:
    with InProcessDaemon(
        board(tmp_path, broker, tiny_model),
        expect_errors=("model change to new.gguf failed: canary_failed", "not applied: canary_failed"),
    ) as d:
        wait_online(status, DEV)
        # The canary asks for an exact answer a model of random weights never gives.
        update(op, {"canary": {"prompt": "Answer with OK.", "max_tokens": 8, "pattern": "^OK$"}}, "c")
        update(op, {"model": source(server, new_model)}, "m")
        doc = op.doc(lambda x: (reported(x).get("model_change") or {}).get("outcome") == "canary_failed", 60)
        rep = reported(doc)
        change = rep["model_change"]
        assert change["rolled_back"] and change["rollback_ms"] > 0 and change["canary"]["tokens"] == 8
        assert not change["canary"]["passed"] and "canary.pattern" in change["canary"]["reason"]
        assert rep["errors"]["model.path"].startswith("canary_failed: new.gguf")
        assert rep["serving"]["file"] == "model.gguf" and d.daemon.parts.supervisor.engine is not None
        from agent.shadow.document import MAX_STATE_BYTES, json_size

        size = json_size(doc["state"]["desired"]) + json_size(rep)
        assert size < MAX_STATE_BYTES - 1024, f"desired + reported take {size} bytes"  # room left for updates
        print(f"\nshadow state after a canary failure: {size} bytes of {MAX_STATE_BYTES}")
        # The downloaded file stays (named in desired), so putting it back in desired later costs no download.
        assert (tmp_path / "d" / "models" / "new.gguf").exists()
    print(
        f"\ncanary failed on new.gguf: rolled back to model.gguf in {change['rollback_ms']:.1f} ms "
        f"(whole change {change['took_ms']:.1f} ms, canary {change['canary']['took_ms']:.1f} ms)"
    )


def test_old_downloads_are_removed_beyond_keep_previous(
    tmp_path: Path, broker: MosquittoBroker, tiny_model: Path, server: ModelServer, op: ShadowPeer, status
) -> None:
    names = []
    for i in range(3):
        f = synth_model("tiny", tmp_path / f"v{i}.gguf", seed=10 + i)
        server.add(f, f"v{i}.gguf")
        names.append((f"v{i}.gguf", f))
    models = tmp_path / "d" / "models"
    with InProcessDaemon(board(tmp_path, broker, tiny_model, model={"path": "model.gguf", "keep_previous": 1})):
        wait_online(status, DEV)
        for i, (name, f) in enumerate(names):
            update(op, {"model": source(server, f, name=name)}, f"v{i}")
            op.doc(lambda x, n=name: (reported(x).get("serving") or {}).get("file") == n, 60)
            present = sorted(p.name for p in models.iterdir() if p.suffix == ".gguf")
            # model.gguf: the config file's model, never removed; then the one in force and one previous.
            assert present == sorted({"model.gguf", name, *([names[i - 1][0]] if i else [])}), present
        record = json.loads((tmp_path / "d" / "state" / "models.json").read_text())["files"]
        assert set(record) == {"v1.gguf", "v2.gguf"} and record["v2.gguf"]["downloaded"]
