"""Home Assistant discovery as a user meets it (issue 17, section 3), checked against a real Mosquitto:

- the model select's options follow the models folder: a model copied in or downloaded later can be
  chosen, and one removed disappears, without a reconnect; the check is a stat of the folders, the
  folder is listed again only when one changed;
- on every connect the discovery configs go out before the shadow document, and when the board
  switches to a model it had not offered yet, the new options go out before the document that
  reports it, so Home Assistant never checks a model against options that lack it ("Invalid option").
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from agent.config import Settings
from agent.ha import DiscoveryPublisher, list_models
from agent.mqtt.topics import Topics
from agent.mqtt.transport import MqttTransport
from tests.broker import BrokerClient, MosquittoBroker
from tests.daemon_harness import InProcessDaemon, wait_online, write_daemon_config

DEV = "dev-ha"
T = Topics("edge", DEV)
SELECT = f"homeassistant/select/edge_agent_{DEV}/model/config"
HOUR_NS = 3600 * 10**9


def _settings(tmp_path: Path, models: Path) -> Settings:
    return Settings.model_validate({
        "device": {"id": DEV, "state_dir": str(tmp_path / "state"), "models_dir": str(models)},
        "model": {"path": "a.gguf"}, "homeassistant": {"enabled": True},
    })  # fmt: skip


def _age(*folders: Path, ns: int = -HOUR_NS) -> None:
    """Set the folders' mtime ``ns`` from now (an hour ago by default): safely in the past."""
    t = time.time_ns() + ns
    for f in folders:
        os.utime(f, ns=(t, t))


class Board:
    """A DiscoveryPublisher on a real transport, as the daemon wires it; counts the folder listings."""

    def __init__(self, broker: MosquittoBroker, settings: Settings) -> None:
        self.listings = 0
        self.connected = threading.Event()

        def models() -> list[str]:
            self.listings += 1
            return list_models(Path(settings.device.models_dir))

        self.transport = MqttTransport(broker.settings("ha-board"), will=None, on_message=lambda m: None,
                                       on_connect=self._on_connect, manual_ack=False)  # fmt: skip
        self.publisher = DiscoveryPublisher(settings, self._publish, models=models)
        self.handles: list[Any] = []

    def _publish(self, topic: str, payload: bytes, **kw: Any) -> Any:
        h = self.transport.publish(topic, payload, **kw)
        self.handles.append(h)
        return h

    def _on_connect(self) -> None:
        self.publisher.on_connect()
        self.connected.set()

    def refresh(self) -> int:
        """The daemon's main-loop call; returns once the broker has what it published."""
        n = self.publisher.refresh()
        assert all(h.wait(10) for h in self.handles)
        return n


def _options(ha: BrokerClient) -> list[str]:
    return json.loads(ha.expect(SELECT).payload)["options"]


def test_the_select_options_follow_the_models_folder_without_a_reconnect(
    tmp_path: Path, broker: MosquittoBroker, tiny_model: Path
) -> None:
    models = tmp_path / "models"
    (tmp_path / "state").mkdir()
    models.mkdir()
    shutil.copyfile(tiny_model, models / "a.gguf")
    settings = _settings(tmp_path, models)
    _age(models)
    board = Board(broker, settings)
    with BrokerClient(broker) as ha:
        ha.subscribe(SELECT)
        board.transport.start()
        try:
            assert board.connected.wait(10)
            assert _options(ha) == ["a.gguf"]
            assert board.listings == 1

            # Nothing changed: a stat per folder, no listing, nothing published.
            assert [board.refresh() for _ in range(3)] == [0, 0, 0]
            assert board.listings == 1

            shutil.copyfile(tiny_model, models / "b.gguf")  # copied in by hand, or a download ending
            assert board.refresh() == 1
            assert _options(ha) == ["a.gguf", "b.gguf"]

            (models / "sub").mkdir()
            shutil.copyfile(tiny_model, models / "sub" / "c.gguf")
            _age(models, models / "sub")
            assert board.refresh() == 1
            assert _options(ha) == ["a.gguf", "b.gguf", "sub/c.gguf"]
            listings = board.listings
            assert board.refresh() == 0 and board.listings == listings

            shutil.copyfile(tiny_model, models / "sub" / "d.gguf")  # only the sub-folder's mtime moves
            assert board.refresh() == 1
            assert _options(ha) == ["a.gguf", "b.gguf", "sub/c.gguf", "sub/d.gguf"]

            (models / "b.gguf").unlink()
            (models / "sub" / ".hidden.gguf").write_bytes(b"partial")  # hidden: never an option
            assert board.refresh() == 1
            assert _options(ha) == ["a.gguf", "sub/c.gguf", "sub/d.gguf"]

            # The model in force changed to one the folder does not list (yet): offered too.
            settings.model.path = Path("coming.gguf")
            assert board.refresh() == 1
            assert _options(ha) == ["a.gguf", "sub/c.gguf", "sub/d.gguf", "coming.gguf"]
        finally:
            board.transport.stop()
        # What a Home Assistant that connects now receives: the last options, retained.
        with BrokerClient(broker) as late:
            late.subscribe(SELECT)
            assert json.loads(late.expect(SELECT).payload)["options"][-1] == "coming.gguf"


def test_a_folder_changed_within_its_timestamp_tick_is_listed_again(
    tmp_path: Path, broker: MosquittoBroker, tiny_model: Path
) -> None:
    """A file added in the same clock tick as the listing leaves the folder's mtime where it was; a
    folder whose mtime is not safely in the past is therefore listed again at the next pass."""
    models = tmp_path / "models"
    (tmp_path / "state").mkdir()
    models.mkdir()
    shutil.copyfile(tiny_model, models / "a.gguf")
    _age(models, ns=+HOUR_NS)  # not safely in the past (a clock set back, or a change just now)
    listed_mtime = os.stat(models).st_mtime_ns
    board = Board(broker, _settings(tmp_path, models))
    with BrokerClient(broker) as ha:
        ha.subscribe(SELECT)
        board.transport.start()
        try:
            assert board.connected.wait(10)
            assert _options(ha) == ["a.gguf"]
            shutil.copyfile(tiny_model, models / "b.gguf")
            os.utime(models, ns=(listed_mtime, listed_mtime))  # the same tick: the mtime did not move
            assert board.refresh() == 1
            assert _options(ha) == ["a.gguf", "b.gguf"]
        finally:
            board.transport.stop()


# ------------------------------------------------------------------------------------ the daemon


def _until(ha: BrokerClient, done: Any, timeout: float = 60) -> list[tuple[str, dict]]:
    """Messages (topic, JSON) in arrival order, up to and including the first for which done(topic, data)."""
    seen: list[tuple[str, dict]] = []
    deadline = time.monotonic() + timeout
    while True:
        msg = ha.expect(timeout=max(0.01, deadline - time.monotonic()))
        if not msg.payload:
            continue
        seen.append((msg.topic, json.loads(msg.payload)))
        if done(*seen[-1]):
            return seen


def _reported_model(topic: str, data: dict) -> str | None:
    return data["state"]["reported"].get("model", {}).get("path") if topic == T.shadow else None


def test_the_daemon_sends_the_options_before_the_state_that_needs_them(
    tmp_path: Path, broker: MosquittoBroker, tiny_model: Path
) -> None:
    cfg = write_daemon_config(tmp_path / "d", broker, tiny_model, device_id=DEV, homeassistant={"enabled": True})
    models = cfg.parent / "models"
    with BrokerClient(broker) as ha, BrokerClient(broker) as peer:
        ha.subscribe(SELECT)
        ha.subscribe(T.shadow)
        peer.subscribe(T.device_status)
        for start in (1, 2):  # the first connect, and every restart
            with InProcessDaemon(cfg):
                seen = _until(ha, lambda t, d: t == T.shadow)
                assert [t for t, _ in seen][0] == SELECT, f"start {start}: {[t for t, _ in seen]}"
                assert "model.gguf" in seen[0][1]["options"]
                wait_online(peer, DEV)
                if start == 1:
                    # A model copied in while the board runs: offered without a reconnect.
                    shutil.copyfile(tiny_model, models / "fresh.gguf")
                    _until(ha, lambda t, d: t == SELECT and "fresh.gguf" in d["options"])

                    # Copied and chosen at once (the shadow, the CLI, a fleet rollout): the options that hold
                    # it reach Home Assistant before the document that reports it in force.
                    shutil.copyfile(tiny_model, models / "second.gguf")
                    update = {"state": {"desired": {"model": {"path": "second.gguf"}}}}
                    peer.publish(T.shadow_update, json.dumps(update).encode())
                    seen = _until(ha, lambda t, d: _reported_model(t, d) == "second.gguf")
                    offered = [i for i, (t, d) in enumerate(seen) if t == SELECT and "second.gguf" in d["options"]]
                    assert offered and offered[0] < len(seen) - 1, [t for t, _ in seen]
            ha.barrier()  # what the first run sent last is not taken for the second's


@pytest.fixture(autouse=True)
def _no_stray_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("EDGE_AGENT__"):
            monkeypatch.delenv(name)
