"""Signed rollouts (issue 20): `edge-agent fleet rollout --key` on a fleet of real daemons (in process, the
tiny model) that trust the operator's key, on one real Mosquitto, with a real HTTP server serving the
new model. The honest path (sign, roll out in waves, canary, serve) works; a rollout sent without the
key is refused by every board it reaches, with the reason, and changes nothing."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from agent.cli import main
from agent.models.synth import synth_model
from agent.signing import generate_key, load_private_key, sign_model
from agent.system.files import file_sha256
from tests.broker import BrokerClient, MosquittoBroker
from tests.daemon_harness import InProcessDaemon, to_toml, write_daemon_config
from tests.model_server import ModelServer

IDS = [f"sig-{i:02d}" for i in range(1, 5)]
DOWNLOAD = {"retry_min_s": 0.05, "retry_max_s": 0.5, "max_failures": 100, "free_margin_mb": 0}
CANARY = {"prompt": "hello", "max_tokens": 4, "min_tokens": 1}
NEVER = {"prompt": "Answer with OK.", "max_tokens": 4, "pattern": "^OK$"}  # random weights never answer that


@pytest.fixture(scope="module")
def new_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth_model(
        "tiny", tmp_path_factory.mktemp("fleet-signed") / "new.gguf", seed=31, overrides={"n_layer": 3, "n_embd": 128}
    )


@pytest.fixture
def key(tmp_path: Path) -> tuple[Path, str]:
    public = generate_key(tmp_path / "operator.key")[1]
    return tmp_path / "operator.key", public


@pytest.fixture
def server(tmp_path: Path, new_model: Path):
    root = tmp_path / "www"
    root.mkdir()
    with ModelServer(root) as s:
        s.add(new_model, "new.gguf")
        yield s


@pytest.fixture
def operator(tmp_path: Path, broker: MosquittoBroker) -> Path:
    cfg = tmp_path / "operator.toml"
    cfg.write_text(to_toml({"mqtt": {"host": broker.host, "port": broker.port}}))
    return cfg


class SignedFleet:
    """Boards that trust the operator's key, each serving its own model signed as version 2."""

    def __init__(
        self, tmp_path: Path, broker: MosquittoBroker, tiny_model: Path, key: tuple[Path, str],
        canary: dict[str, dict[str, Any]] | None = None, expect_errors: tuple[str, ...] = (), ids: list[str] = IDS,
    ) -> None:  # fmt: skip
        private = load_private_key(key[0])
        self.daemons: dict[str, InProcessDaemon] = {}
        with BrokerClient(broker) as peer:
            peer.subscribe("edge/+/shadow")
            peer.barrier()
            for dev in ids:
                models = tmp_path / dev / "models"
                models.mkdir(parents=True)
                shutil.copyfile(tiny_model, models / "model.gguf")
                sig = sign_model(models / "model.gguf", private, sha256=file_sha256(tiny_model), version=2)
                (models / "model.gguf.sig").write_text(json.dumps(sig))
                cfg = write_daemon_config(tmp_path / dev, broker, tiny_model, device_id=dev, download=DOWNLOAD,
                                          canary=(canary or {}).get(dev, CANARY),
                                          model={"path": "model.gguf", "trusted_keys": [key[1]]})  # fmt: skip
                self.daemons[dev] = InProcessDaemon(cfg, expect_errors=expect_errors).start()
            # Every board has published its document (the rollout signs at the version it shows).
            seen: set[str] = set()
            deadline = time.monotonic() + 60
            while seen != set(ids):
                msg = peer.expect(None, timeout=max(0.01, deadline - time.monotonic()))
                if msg.payload and json.loads(msg.payload)["state"]["reported"].get("serving"):
                    seen.add(msg.topic.split("/")[1])

    def serving(self) -> dict[str, str]:
        return {dev: Path(d.daemon.parts.supervisor.engine.report.model).name for dev, d in self.daemons.items()}

    def stop(self) -> None:
        for d in self.daemons.values():
            d.close()


def fleet_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, Any, str]:
    rc = main(["fleet", *args])
    out, err = capsys.readouterr()
    return rc, json.loads(out) if out.strip().startswith("{") else out, err


def manifest(tmp_path: Path, model: Path, key: Path, version: int) -> Path:
    sig = sign_model(model, load_private_key(key), sha256=file_sha256(model), version=version)
    path = tmp_path / "new.gguf.sig"
    path.write_text(json.dumps(sig))
    return path


def rollout(operator: Path, db: Path, server: ModelServer, model: Path, *extra: str) -> list[str]:
    return ["rollout", "-c", str(operator), "--db", str(db), "--model", server.url("new.gguf"), "--sha256",
            file_sha256(model), "--devices", "sig-*", "--waves", "25%,75%", "--timeout-per-wave", "120", "--wait",
            "--json", *extra]  # fmt: skip


def test_a_signed_rollout_is_verified_canaried_and_served_by_every_board(
    tmp_path: Path, broker: MosquittoBroker, tiny_model: Path, new_model: Path, server: ModelServer, operator: Path,
    key: tuple[Path, str], capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    sig = manifest(tmp_path, new_model, key[0], version=3)
    fleet = SignedFleet(tmp_path, broker, tiny_model, key)
    try:
        args = rollout(operator, tmp_path / "r.db", server, new_model, "--key", str(key[0]), "--signature", str(sig))
        rc, r, err = fleet_cli(capsys, *args)
        assert rc == 0, err
        assert r["state"] == "succeeded" and r["counts"] == {"succeeded": 4} and r["waves"] == 2, r
        assert r["key_id"] and r["target"]["signature"] == sig.read_text().strip()
        rc, text, _ = fleet_cli(capsys, "status", r["id"], "--db", str(tmp_path / "r.db"))
        assert f"signed by key {r['key_id']}" in text and "with its signed manifest" in text, text
        assert fleet.serving() == {dev: "new.gguf" for dev in IDS}
        for dev, d in fleet.daemons.items():
            rep = d.daemon.parts.shadow.document.reported
            assert rep["model_change"]["outcome"] == "applied" and rep["model_change"]["canary"]["passed"], dev
            assert not rep.get("errors"), (dev, rep.get("errors"))
            assert d.daemon.parts.shadow.document.desired["model"]["signature"] == sig.read_text().strip()
        assert server.sent("new.gguf") >= 4 * new_model.stat().st_size  # every board downloaded it
    finally:
        fleet.stop()


def test_a_signed_rollout_that_fails_its_canary_is_restored_by_signed_updates(
    tmp_path: Path, broker: MosquittoBroker, tiny_model: Path, new_model: Path, server: ModelServer, operator: Path,
    key: tuple[Path, str], capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    sig = manifest(tmp_path, new_model, key[0], version=3)
    fleet = SignedFleet(tmp_path, broker, tiny_model, key, canary={IDS[0]: NEVER},
                        expect_errors=("model change to new.gguf failed: canary_failed", "not applied: canary_failed"))  # fmt: skip
    try:
        args = rollout(operator, tmp_path / "r.db", server, new_model, "--key", str(key[0]), "--signature", str(sig))
        rc, r, err = fleet_cli(capsys, *args)
        assert rc == 1, err
        assert r["state"] == "aborted", r
        states = {d["device"]: d["state"] for d in r["devices"]}
        assert states == {IDS[0]: "restored", **{x: "pending" for x in IDS[1:]}}, r["devices"]
        assert "canary_failed" in r["devices"][0]["message"]
        # The restore removed the guarded model keys from desired: only a signed update may do that.
        d = fleet.daemons[IDS[0]].daemon.parts.shadow.document
        assert "model" not in d.desired and not d.delta() and not d.reported.get("errors")
        assert fleet.serving() == {dev: "model.gguf" for dev in IDS}
    finally:
        fleet.stop()


def test_an_unsigned_rollout_is_refused_by_the_boards_and_changes_nothing(
    tmp_path: Path, broker: MosquittoBroker, tiny_model: Path, new_model: Path, server: ModelServer, operator: Path,
    key: tuple[Path, str], capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    sig = manifest(tmp_path, new_model, key[0], version=3)
    fleet = SignedFleet(tmp_path, broker, tiny_model, key)
    try:
        before = {dev: d.daemon.parts.shadow.document.version for dev, d in fleet.daemons.items()}
        rc, r, err = fleet_cli(
            capsys, *rollout(operator, tmp_path / "r.db", server, new_model, "--signature", str(sig))
        )
        assert rc == 1, err
        assert r["state"] == "aborted" and r["key_id"] is None, r
        (first,) = [d for d in r["devices"] if d["wave"] == 1]
        assert first["state"] == "failed", first
        assert first["message"].startswith("update rejected 403: "), first
        assert (
            "model.path, model.sha256, model.signature, model.size, model.url may only be changed" in first["message"]
        )
        assert "may only be changed by an update signed with an operator key" in first["message"]
        assert "unsigned" in first["message"]
        # The refused device is not "restored": it never changed; the others were never sent anything.
        assert {d["device"]: d["state"] for d in r["devices"]} == {IDS[0]: "failed", **{x: "pending" for x in IDS[1:]}}
        assert fleet.serving() == {dev: "model.gguf" for dev in IDS}
        assert {dev: d.daemon.parts.shadow.document.version for dev, d in fleet.daemons.items()} == before
        assert all("model" not in d.daemon.parts.shadow.document.desired for d in fleet.daemons.values())
        assert server.requests() == []  # nothing was fetched

        # A refusal that comes after --reply-timeout (a slow board) fails the device as soon as it arrives,
        # with its reason, not at the wave's timeout.
        args = rollout(operator, tmp_path / "r2.db", server, new_model, "--signature", str(sig), "--reply-timeout", "0")
        rc, late, err = fleet_cli(capsys, *args)
        assert rc == 1 and late["state"] == "aborted", err
        assert late["devices"][0]["message"].startswith("update rejected 403: "), late["devices"][0]
        assert fleet.serving() == {dev: "model.gguf" for dev in IDS}

        # The same rollout resumed with a key it was not started with is refused before anything is sent.
        rc, _, err = fleet_cli(capsys, "rollout", "-c", str(operator), "--db", str(tmp_path / "r.db"), "--resume",
                               r["id"], "--key", str(key[0]))  # fmt: skip
        assert rc == 2 and "was started unsigned" in err
    finally:
        fleet.stop()


def test_signature_and_key_options_are_checked_before_anything_is_sent(
    tmp_path: Path, operator: Path, new_model: Path, key: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    sig = manifest(tmp_path, new_model, key[0], version=3)
    base = ["rollout", "-c", str(operator), "--db", str(tmp_path / "r.db"), "--devices", "*"]
    sha = file_sha256(new_model)
    (tmp_path / "junk.sig").write_text("{not json")
    (tmp_path / "not-a-key").write_text("hello")
    for extra, why in (
        (["--model", "other.gguf", "--sha256", sha, "--signature", str(sig)], "signs 'new.gguf'"),
        (["--model", "new.gguf", "--sha256", "a" * 64, "--signature", str(sig)], "not 'new.gguf' with --sha256 aaaa"),
        (["--model", "new.gguf", "--sha256", sha, "--signature", str(tmp_path / "junk.sig")], "cannot read a manifest"),
        (["--model", "new.gguf", "--sha256", sha, "--key", str(tmp_path / "not-a-key")], "cannot read the private key"),
    ):
        rc, _, err = fleet_cli(capsys, *base, *extra)
        assert rc == 2 and why in err, (extra, err)


class StaleView:
    """The fleet client, whose view of one device's document is one version behind until the rollout sends
    its update: what the operator sees when another update crossed the rollout's (its retained document
    not arrived yet)."""

    def __init__(self, client: Any, device: str) -> None:
        self.client, self.device, self.lagged, self.sent = client, device, False, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    def doc(self, device: str) -> Any:
        doc = self.client.doc(device)
        if device == self.device and not self.sent and doc is not None:
            self.lagged = True
            return {**doc, "version": doc["version"] - 1}
        return doc

    def send_update(self, device: str, *args: Any, **kwargs: Any) -> None:
        self.sent = self.sent or device == self.device
        self.client.send_update(device, *args, **kwargs)


def test_a_signed_update_that_meets_a_newer_version_is_signed_again_at_it_once(
    tmp_path: Path, broker: MosquittoBroker, tiny_model: Path, new_model: Path, server: ModelServer,
    key: tuple[Path, str],
) -> None:  # fmt: skip
    from agent.config import Settings
    from agent.operator.fleet.client import FleetClient
    from agent.operator.fleet.plan import Policy, Target, Threshold
    from agent.operator.fleet.rollout import RolloutDriver
    from agent.operator.fleet.store import RolloutStore
    from tests.shadow_harness import ShadowPeer

    dev = IDS[0]
    sig = manifest(tmp_path, new_model, key[0], version=3)
    fleet = SignedFleet(tmp_path, broker, tiny_model, key, ids=[dev])
    peer = ShadowPeer(broker, fleet.daemons[dev].daemon.parts.topics)
    try:
        peer.send({"state": {"desired": {"engine": {"max_tokens_limit": 2048}}}, "client_token": "other-operator"})
        assert peer.reply("other-operator")[1]["version"] == 1
        settings = Settings.model_validate({"mqtt": {"host": broker.host, "port": broker.port}})
        target = Target(path="new.gguf", sha256=file_sha256(new_model), url=server.url("new.gguf"),
                        signature=sig.read_text().strip())  # fmt: skip
        with FleetClient(settings) as client:
            client.sync()
            view = StaleView(client, dev)
            store = RolloutStore(tmp_path / "r.db")
            driver = RolloutDriver(store, view, key=load_private_key(key[0]))  # type: ignore[arg-type]
            r = driver.create(target, Policy((100.0,), Threshold(count=0), 1, 120.0), [dev], "--devices sig-01")
            r = driver.run(r.id, wait=True)
            store.close()
        assert view.lagged and r.state == "succeeded", r.as_dict()
        assert r.devices[0].version == 2  # signed again at version 1, which the update then moved to 2
        assert fleet.serving() == {dev: "new.gguf"}
        # The board did refuse the one signed for version 0 first (409), before it took the second.
        token = f"rollout-{r.id}-update-{dev}"
        refused = peer.take(peer.topics.shadow_update_rejected, lambda d: d.get("client_token") == token, 10)
        assert refused["code"] == 409 and refused["version"] == 1, refused
        taken = peer.take(peer.topics.shadow_update_accepted, lambda d: d.get("client_token") == token, 10)
        assert taken["version"] == 2
    finally:
        peer.close()
        fleet.stop()
