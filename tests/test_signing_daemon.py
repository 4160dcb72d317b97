"""Signed models and signed changes on a real daemon (in process), a real Mosquitto and a real HTTP
server: a client with full broker rights but no operator key tries every attack of issue 20; each is
refused with its reason and the board keeps serving its model. The honest path (sign, set, download,
canary, serve) works, and a board that trusts no key behaves as before."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from agent.models.synth import synth_model
from agent.mqtt.topics import Topics
from agent.signing import generate_key, iso, load_private_key, sign_model, sign_update
from agent.system.files import file_sha256
from tests.broker import MosquittoBroker
from tests.daemon_harness import InProcessDaemon, write_daemon_config
from tests.model_server import ModelServer
from tests.shadow_harness import ShadowPeer

DEV = "dev-signed"
T = Topics("edge", DEV)
FAST = {"retry_min_s": 0.05, "retry_max_s": 0.2, "max_failures": 1000, "free_margin_mb": 0}
CANARY = {"prompt": "hello", "max_tokens": 4, "min_tokens": 1}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("signed")
    shapes = {"n_embd": 256, "n_ff": 1024, "n_layer": 4}
    return {name: synth_model("tiny", folder / f"{name}.gguf", seed=seed, overrides=shapes)
            for name, seed in (("new", 7), ("evil", 8), ("old", 9))}  # fmt: skip


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("keys")
    out: dict[str, Any] = {}
    for name in ("op", "retired"):
        _, public = generate_key(folder / name)
        out[name] = (load_private_key(folder / name), public)
    return out


@pytest.fixture
def server(tmp_path: Path, models: dict[str, Path]):
    root = tmp_path / "www"
    root.mkdir()
    with ModelServer(root) as s:
        for name, path in models.items():
            s.add(path, f"{name}.gguf")
        yield s


@pytest.fixture
def op(broker: MosquittoBroker):
    peer = ShadowPeer(broker, T)
    yield peer
    peer.close()


def manifest(path: Path, key: Any, name: str | None = None, **kw: Any) -> str:
    """The manifest of ``path``'s bytes, signed as the file ``name`` (default: its own name)."""
    if name is None:
        return json.dumps(sign_model(path, key, sha256=file_sha256(path), **kw))
    src = path.parent / f"as-{name}" / name
    src.parent.mkdir(exist_ok=True)
    shutil.copyfile(path, src)
    return json.dumps(sign_model(src, key, sha256=file_sha256(src), **kw))


def board(tmp_path: Path, broker: MosquittoBroker, tiny_model: Path, keys: dict, trusted: list[str]) -> Path:
    """A board whose own model (model.gguf) is signed by the operator as version 2."""
    models_dir = tmp_path / "d" / "models"
    models_dir.mkdir(parents=True)
    shutil.copyfile(tiny_model, models_dir / "model.gguf")
    (models_dir / "model.gguf.sig").write_text(manifest(models_dir / "model.gguf", keys["op"][0], version=2))
    return write_daemon_config(tmp_path / "d", broker, tiny_model, device_id=DEV, download=FAST, canary=CANARY,
                               model={"path": "model.gguf", "trusted_keys": [keys[k][1] for k in trusted]})  # fmt: skip


def send(op: ShadowPeer, body: dict, token: str) -> tuple[str, dict]:
    op.send({**body, "client_token": token})
    return op.reply(token, timeout=60)


def signed(desired: dict | None, version: int, key: Any, device: str = DEV, valid_s: float = 600) -> dict:
    sig = sign_update(desired, device=device, version=version, key=key, expires=iso(time.time() + valid_s))
    return {"state": {"desired": desired}, "version": version, "signature": sig}


def source(server: ModelServer, models: dict[str, Path], name: str, file: str | None = None) -> dict:
    file = file or f"{name}.gguf"
    return {"path": file, "url": server.url(f"{name}.gguf"), "sha256": file_sha256(models[name])}


def test_every_attack_is_refused_and_the_honest_path_serves(
    tmp_path: Path, broker: MosquittoBroker, tiny_model: Path, models: dict, keys: dict, server: ModelServer,
    op: ShadowPeer,
) -> None:  # fmt: skip
    opkey, retired = keys["op"][0], keys["retired"][0]
    models_dir = tmp_path / "d" / "models"
    with InProcessDaemon(
        board(tmp_path, broker, tiny_model, keys, ["op"]),
        expect_errors=("model change to other.gguf failed: .*for other bytes", "not applied: .*for other bytes"),
    ) as d:
        assert op.doc(lambda x: x["state"]["reported"].get("serving", {}).get("file") == "model.gguf", 30)

        # 1. Full broker rights, no key: repoint the board to its own file.
        kind, r = send(op, {"state": {"desired": {"model": source(server, models, "evil")}}}, "nokey")
        assert (kind, r["code"]) == ("rejected", 403), r
        assert "model.path, model.sha256, model.url may only be changed by an update signed" in r["message"]
        assert "unsigned" in r["message"]
        # ... and removing the desired model (back to the config file's) is guarded the same way.
        kind, r = send(op, {"state": {"desired": None}}, "reset")
        assert kind == "accepted"  # nothing desired yet: nothing guarded removed
        # Keys that fetch or run nothing new keep working with broker credentials alone.
        kind, r = send(op, {"state": {"desired": {"engine": {"max_tokens_limit": 2048}}}}, "plain")
        assert kind == "accepted", r
        version = r["version"]

        # 2. Signed by a retired (untrusted) key.
        kind, r = send(op, signed({"model": source(server, models, "evil")}, version, retired), "retired")
        assert (kind, r["code"]) == ("rejected", 403) and "which this board does not trust" in r["message"], r
        # 3. A truncated update signature.
        body = signed({"model": source(server, models, "evil")}, version, opkey)
        body["signature"]["sig"] = body["signature"]["sig"][:43]
        kind, r = send(op, body, "trunc")
        assert (kind, r["code"]) == ("rejected", 403) and "not valid base64" in r["message"], r
        # 4. An operator-signed update whose patch was altered on the way.
        body = signed({"model": source(server, models, "new")}, version, opkey)
        body["state"]["desired"]["model"] = source(server, models, "evil", "new.gguf")
        kind, r = send(op, body, "altered")
        assert (kind, r["code"]) == ("rejected", 403) and "does not verify" in r["message"], r

        # 5-8: a signed update (the operator's) carrying a bad model manifest: refused before any download.
        new = source(server, models, "new")
        bad_manifests = {
            "older": (manifest(models["new"], opkey, version=1), "rollback refused"),
            "retired-model": (manifest(models["new"], retired, version=3), "does not trust"),
            "other-bytes": (manifest(models["evil"], opkey, name="new.gguf", version=3), "for other bytes"),
            "tampered": (manifest(models["new"], opkey, version=3).replace('"version": 3', '"version": 4'),
                         "does not verify"),
            "truncated": (manifest(models["new"], opkey, version=3)[:-40], "not valid JSON"),
            "missing": (None, "is not signed"),
        }  # fmt: skip
        for token, (text, reason) in bad_manifests.items():
            kind, r = send(op, signed({"model": {**new, "signature": text}}, version, opkey), token)
            assert (kind, r["code"]) == ("rejected", 400), (token, r)
            assert reason in r["errors"]["model.signature"], (token, r)
        assert server.requests() == []  # nothing was fetched

        # 9. The honest path: sign v3, set it signed, the board downloads, runs the canary, serves.
        good = manifest(models["new"], opkey, version=3)
        kind, r = send(op, signed({"model": {**new, "signature": good}}, version, opkey), "honest")
        assert kind == "accepted", r
        honest = signed({"model": {**new, "signature": good}}, version, opkey)
        version = r["version"]
        doc = op.doc(lambda x: x["state"]["reported"].get("serving", {}).get("file") == "new.gguf", 60)
        rep = doc["state"]["reported"]
        assert rep["model_change"]["outcome"] == "applied" and rep["model_change"]["canary"]["passed"]
        assert not rep.get("errors") and rep["serving"]["sha256"] == file_sha256(models["new"])

        # 10. Replaying the old signed update: the version it was signed for is gone.
        kind, r = send(op, honest, "replay")
        assert (kind, r["code"]) == ("rejected", 409) and "version conflict" in r["message"], r
        # ... and resending it at the current version does not verify (the version is signed).
        honest["version"] = version
        kind, r = send(op, honest, "replay2")
        assert (kind, r["code"]) == ("rejected", 403) and "does not verify" in r["message"], r
        # 11. Pointing back at the older signed model (the config file's, version 2) is a rollback.
        kind, r = send(op, signed({"model": {"path": "model.gguf", "url": None, "sha256": None, "signature": None}},
                                  version, opkey), "back")  # fmt: skip
        assert (kind, r["code"]) == ("rejected", 400) and "rollback refused" in r["errors"]["model.signature"], r

        # 12. A file on the board whose bytes differ from what the signed manifest names is refused
        # at load, before llama.cpp parses it; the signed model keeps serving.
        shutil.copyfile(models["evil"], models_dir / "other.gguf")
        lie = manifest(models["new"], opkey, name="other.gguf", version=4)
        kind, r = send(op, signed({"model": {"path": "other.gguf", "url": None, "sha256": None, "signature": lie}},
                                  version, opkey), "lie")  # fmt: skip
        assert kind == "accepted", r
        doc = op.doc(lambda x: "model.path" in x["state"]["reported"].get("errors", {}), 60)
        rep = doc["state"]["reported"]
        assert "the signature is for other bytes" in rep["errors"]["model.path"]
        assert rep["serving"]["file"] == "new.gguf" and rep["model_change"]["outcome"] == "load_failed"
        assert d.daemon.parts.supervisor.engine is not None
        assert not [e for e in d.engines if str(e.model_path).endswith("other.gguf")]  # never handed to llama.cpp


def test_without_trusted_keys_nothing_is_checked(
    tmp_path: Path, broker: MosquittoBroker, tiny_model: Path, models: dict, server: ModelServer, op: ShadowPeer,
) -> None:  # fmt: skip
    cfg = write_daemon_config(tmp_path / "d", broker, tiny_model, device_id=DEV, download=FAST)
    with InProcessDaemon(cfg):
        assert op.doc(lambda x: x["state"]["reported"].get("serving", {}).get("file") == "model.gguf", 30)
        kind, r = send(op, {"state": {"desired": {"model": source(server, models, "new")}}}, "plain")
        assert kind == "accepted", r
        op.doc(lambda x: x["state"]["reported"].get("serving", {}).get("file") == "new.gguf", 60)


def test_a_board_with_keys_and_an_unsigned_model_cannot_start(
    tmp_path: Path, broker: MosquittoBroker, tiny_model: Path, keys: dict
) -> None:
    from tests.test_cannot_start import cannot_start_line, run

    cfg = write_daemon_config(tmp_path / "d", broker, tiny_model, device_id=DEV,
                              model={"path": "model.gguf", "trusted_keys": [keys["op"][1]]})  # fmt: skip
    line = cannot_start_line(run(cfg))
    assert "[model_signature_invalid]" in line and "model.gguf is not signed" in line
    (tmp_path / "d" / "models" / "model.gguf.sig").write_text(manifest(tiny_model, keys["retired"][0], "model.gguf"))
    line = cannot_start_line(run(cfg))
    assert "[model_signature_invalid]" in line and "which this board does not trust" in line


def test_shadow_set_signs_with_key_and_a_second_trusted_key_works(
    tmp_path: Path, broker: MosquittoBroker, tiny_model: Path, models: dict, keys: dict, op: ShadowPeer,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    from agent.cli import main

    _, new_public = generate_key(tmp_path / "op-2027.key")  # rotation: the old and the new key, both trusted
    cfg = board(tmp_path, broker, tiny_model, keys, ["op"])
    text = cfg.read_text().replace(f'"{keys["op"][1]}"', f'"{keys["op"][1]}", "{new_public}"')
    cfg.write_text(text)
    shutil.copyfile(models["new"], tmp_path / "d" / "models" / "hand.gguf")
    sig = manifest(models["new"], load_private_key(tmp_path / "op-2027.key"), "hand.gguf", version=3)
    args = ["shadow", "set", "-c", str(cfg), "model.path=hand.gguf", f"model.signature={sig}", "--wait"]
    with InProcessDaemon(cfg):
        assert op.doc(lambda x: x["state"]["reported"].get("serving", {}).get("file") == "model.gguf", 30)
        assert main(args) == 1
        assert "rejected 403" in capsys.readouterr().err
        assert main([*args, "--key", str(tmp_path / "op-2027.key")]) == 0, capsys.readouterr().err
        assert "applied: version 1" in capsys.readouterr().out
        doc = op.doc(lambda x: x["state"]["reported"].get("serving", {}).get("file") == "hand.gguf", 30)
        assert not doc["state"]["reported"].get("errors")


def retrust(cfg: Path, keys: list[str], **model: Any) -> None:
    """Edit the board's config file as its operator does before a SIGHUP: model.trusted_keys (and more)."""
    import tomllib

    from tests.daemon_harness import to_toml

    data = tomllib.loads(cfg.read_text())
    data["model"].update({"trusted_keys": keys, **model})
    cfg.write_text(to_toml(data))


def test_key_rotation_by_sighup_applies_to_updates_and_to_model_loads(
    tmp_path: Path, broker: MosquittoBroker, tiny_model: Path, models: dict, keys: dict, op: ShadowPeer,
) -> None:  # fmt: skip
    """Two keys valid, then the old one retired and a new one added by a config change + SIGHUP: an update
    signed by the old key is refused, a model signed by it does not load (the config file's path of a
    model change, which no shadow check sees), and a model and update signed by the new key are taken."""
    old = keys["retired"][0]
    models_dir = tmp_path / "d" / "models"
    cfg = board(tmp_path, broker, tiny_model, keys, ["retired", "op"])
    _, k3_public = generate_key(tmp_path / "k3.key")
    k3 = load_private_key(tmp_path / "k3.key")
    shutil.copyfile(models["evil"], models_dir / "oldsig.gguf")
    (models_dir / "oldsig.gguf.sig").write_text(manifest(models_dir / "oldsig.gguf", old, version=3))
    shutil.copyfile(models["new"], models_dir / "hand.gguf")
    with InProcessDaemon(cfg, expect_errors=("not applied: .*which this board does not trust",
                                             "model change to oldsig.gguf failed")) as d:  # fmt: skip
        assert op.doc(lambda x: x["state"]["reported"].get("serving", {}).get("file") == "model.gguf", 30)
        # Both keys valid: an update of a guarded key signed by the old one is taken.
        kind, r = send(op, signed({"model": {"keep_previous": 2}}, 0, old), "old-ok")
        assert kind == "accepted", r
        version = r["version"]

        # The old key retired, a new one added, and the file's model moved to one signed by the old key.
        retrust(cfg, [keys["op"][1], k3_public], path="oldsig.gguf")
        d.daemon.reload()
        kind, r = send(op, signed({"model": {"keep_previous": 3}}, version, old), "old-refused")
        assert (kind, r["code"]) == ("rejected", 403) and "which this board does not trust" in r["message"], r
        assert d.daemon.parts.shadow.document.version == version  # nothing changed
        rep = d.daemon.parts.shadow.document.reported
        assert "which this board does not trust" in rep["errors"]["model.path"], rep.get("errors")
        assert rep["serving"]["file"] == "model.gguf"
        assert not [e for e in d.engines if str(e.model_path).endswith("oldsig.gguf")]  # never handed to llama.cpp
        assert d.daemon.parts.live.settings.model.trusted_keys == [keys["op"][1], k3_public]

        # The new key signs both the update and the model: taken, loaded, served.
        sig = manifest(models_dir / "hand.gguf", k3, version=4)
        kind, r = send(op, signed({"model": {"path": "hand.gguf", "signature": sig}}, version, k3), "k3")
        assert kind == "accepted", r
        doc = op.doc(lambda x: x["state"]["reported"].get("serving", {}).get("file") == "hand.gguf", 60)
        assert doc["state"]["reported"]["model_change"]["outcome"] == "applied"


def test_a_model_file_is_judged_by_its_signature_before_its_header_is_read(
    tmp_path: Path, broker: MosquittoBroker, tiny_model: Path, models: dict, keys: dict, op: ShadowPeer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """With trusted keys, neither the shadow's checks nor a load parse a model file (the GGUF header
    reader, llama.cpp) before the file's signature is judged for its bytes."""
    import agent.engine.engine
    import agent.engine.plan
    import agent.models.gguf_info
    import agent.shadow.desired

    real = agent.models.gguf_info.read_model_info
    read: list[str] = []

    def recording(path: Any) -> Any:
        read.append(Path(path).name)
        return real(path)

    # every module that reads headers (each binds the name at import)
    for module in (agent.models.gguf_info, agent.engine.plan, agent.engine.engine, agent.shadow.desired):
        monkeypatch.setattr(module, "read_model_info", recording)
    opkey = keys["op"][0]
    models_dir = tmp_path / "d" / "models"
    with InProcessDaemon(
        board(tmp_path, broker, tiny_model, keys, ["op"]),
        expect_errors=("model change to lie.gguf failed: .*for other bytes", "not applied: .*for other bytes"),
    ) as d:
        assert op.doc(lambda x: x["state"]["reported"].get("serving", {}).get("file") == "model.gguf", 30)
        read.clear()
        # Not a GGUF file at all, and unsigned: refused for its signature; its header was never parsed.
        (models_dir / "junk.gguf").write_bytes(b"\x00not a gguf file" * 64)
        kind, r = send(op, signed({"model": {"path": "junk.gguf"}}, 0, opkey), "junk")
        assert (kind, r["code"]) == ("rejected", 400), r
        assert set(r["errors"]) == {"model.signature"} and "is not signed" in r["errors"]["model.signature"], r
        # Signed for other bytes of the same size (the update cannot tell): refused at load by its sha256,
        # before the header reader or llama.cpp sees it.
        shutil.copyfile(models["evil"], models_dir / "lie.gguf")
        lie = manifest(models["new"], opkey, name="lie.gguf", version=3)
        kind, r = send(op, signed({"model": {"path": "lie.gguf", "signature": lie}}, 0, opkey), "lie")
        assert kind == "accepted", r
        doc = op.doc(lambda x: "model.path" in x["state"]["reported"].get("errors", {}), 60)
        assert "the signature is for other bytes" in doc["state"]["reported"]["errors"]["model.path"]
        assert "junk.gguf" not in read and "lie.gguf" not in read, read
        assert not [e for e in d.engines if str(e.model_path).endswith(("junk.gguf", "lie.gguf"))]
        # The honest file is read once it is proven: the header reader does run on this path.
        good = manifest(models["new"], opkey, name="good.gguf", version=3)
        shutil.copyfile(models["new"], models_dir / "good.gguf")
        kind, r = send(op, signed({"model": {"path": "good.gguf", "signature": good}}, r["version"], opkey), "good")
        assert kind == "accepted", r
        op.doc(lambda x: x["state"]["reported"].get("serving", {}).get("file") == "good.gguf", 60)
        assert "good.gguf" in read


def test_refused_updates_are_events_on_the_boards_events_topic_at_most_three_a_minute(
    tmp_path: Path, broker: MosquittoBroker, tiny_model: Path, models: dict, keys: dict, server: ModelServer,
    op: ShadowPeer,
) -> None:  # fmt: skip
    from tests.broker import BrokerClient

    def refused_events(watch: BrokerClient, until: Any, timeout: float = 30) -> list[dict]:
        """update_refused events from ``watch`` until a message for which ``until(topic, data)`` holds."""
        out, deadline = [], time.monotonic() + timeout
        while True:
            msg = watch.expect(None, timeout=max(0.01, deadline - time.monotonic()))
            data = json.loads(msg.payload) if msg.payload else {}
            if msg.topic == T.events and data.get("kind") == "update_refused":
                out.append(data)
            if until(msg.topic, data):
                return out

    evil = {"state": {"desired": {"model": source(server, models, "evil")}}}
    with BrokerClient(broker) as watch, InProcessDaemon(board(tmp_path, broker, tiny_model, keys, ["op"])):
        watch.subscribe(T.events)
        watch.subscribe(T.shadow)
        watch.barrier()
        assert op.doc(lambda x: x["state"]["reported"].get("serving", {}).get("file") == "model.gguf", 30)
        kind, r = send(op, evil, "nokey")
        assert (kind, r["code"]) == ("rejected", 403)
        (e,) = refused_events(watch, lambda topic, data: data.get("kind") == "update_refused")
        assert e["device_id"] == DEV and e["details"]["code"] == 403 and "the update is unsigned" in e["message"]
        assert e["details"]["keys"] == ["model.path", "model.sha256", "model.url"]
        assert "evil.gguf" not in json.dumps(e)  # the keys, never their values
        # A flood of ten more: two more events in this minute (three in all), then nothing one by one.
        for i in range(10):
            assert send(op, evil, f"flood-{i}")[1]["code"] == 403
        got: list[dict] = []
        while len(got) < 2:
            got += refused_events(watch, lambda topic, data: data.get("kind") == "update_refused")
        # Every refusal was queued before this update; its applied document goes out after them.
        kind, r = send(op, {"state": {"desired": {"engine": {"max_tokens_limit": 2048}}}}, "plain")
        assert kind == "accepted", r
        later = refused_events(
            watch,
            lambda topic, data: (
                topic == T.shadow
                and data.get("state", {}).get("reported", {}).get("applied_version", -1) >= r["version"]
            ),
        )
        assert len(got) == 2 and later == [], (got, later)
