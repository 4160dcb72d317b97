"""Liveness that a dead broker node cannot fake (issue 18, point 4): the retained 'online' carries a
heartbeat and an expiry, the daemon renews it every mqtt.heartbeat_s, and readers (`fleet list`,
`shadow get`) show a device whose 'online' expired as stale. Home Assistant's side (expire_after) is in
tests/test_ha_discovery.py."""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from agent.config import Settings
from agent.jobs.protocol import status_state
from agent.mqtt.transport import MqttTransport
from agent.operator.fleet.client import FleetClient
from agent.operator.shadow import ShadowClient
from tests.broker import BrokerClient, MosquittoBroker
from tests.daemon_harness import InProcessDaemon, write_daemon_config
from tests.helpers import FakeClock

T = 20.0


def _epoch(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def test_status_state_is_stale_once_an_online_status_expired() -> None:
    online = {"state": "online", "ts": "2026-01-01T00:00:00.000Z", "expires": "2026-01-01T00:03:00.000Z"}
    t0 = _epoch("2026-01-01T00:00:00.000Z")
    assert status_state(online, t0 + 179) == "online"
    assert status_state(online, t0 + 181) == "stale"
    assert status_state({"state": "offline", "ts": "2026-01-01T00:00:00.000Z"}, t0 + 999) == "offline"
    assert status_state({"state": "online"}, t0) == "online"  # an older agent's status: no expiry, trusted
    assert status_state(None, t0) is None


def test_the_daemon_renews_its_online_status_every_heartbeat(
    tmp_path: Path, tiny_model: Path, broker: MosquittoBroker
) -> None:
    clock = FakeClock(1_800_000_000.0)
    cfg = write_daemon_config(tmp_path / "d", broker, tiny_model, mqtt={"heartbeat_s": 60})
    with BrokerClient(broker) as peer:
        peer.subscribe("edge/dev-a/status")
        with InProcessDaemon(cfg, clock=clock) as d:
            while (first := json.loads(peer.expect("edge/dev-a/status", timeout=60).payload))["state"] != "online":
                pass
            assert first["heartbeat_s"] == 60
            assert _epoch(first["expires"]) - _epoch(first["ts"]) == 180
            clock.advance(61)
            d.daemon.parts.tick.set()
            renewed = json.loads(peer.expect("edge/dev-a/status", timeout=T).payload)
            assert renewed["state"] == "online" and _epoch(renewed["ts"]) == _epoch(first["ts"]) + 61
            assert _epoch(renewed["expires"]) == _epoch(renewed["ts"]) + 180


@pytest.mark.parametrize("link", ["-ctl", "-fleet"])
def test_online_and_the_shadow_document_wait_for_the_other_connections_even_at_a_heartbeat(
    tmp_path: Path, tiny_model: Path, broker: MosquittoBroker, monkeypatch: pytest.MonkeyPatch, link: str
) -> None:
    """The "online" status and the shadow document say the board takes control messages and, in a fleet
    group, fleet jobs: neither is published before the control connection's (the default) and the fleet
    connection's subscriptions are acknowledged, not by the connect, a store change or a heartbeat that
    comes due meanwhile (a race that published "online" twice, and fleet jobs sent on seeing it were lost)."""
    subscribed = threading.Event()
    published: list[tuple[str, str]] = []
    real_subscribed, real_publish = MqttTransport._now_subscribed, MqttTransport.publish

    def held_subscribed(self: MqttTransport) -> None:
        if self.client_id.endswith(link):
            assert subscribed.wait(T), f"the test never let the {link} connection finish subscribing"
        real_subscribed(self)

    def recorded_publish(self: MqttTransport, topic: str, payload: bytes, **kw: Any) -> Any:
        published.append((self.client_id, topic))
        return real_publish(self, topic, payload, **kw)

    monkeypatch.setattr(MqttTransport, "_now_subscribed", held_subscribed)
    monkeypatch.setattr(MqttTransport, "publish", recorded_publish)
    clock = FakeClock(1_800_000_000.0)
    cfg = write_daemon_config(tmp_path / "d", broker, tiny_model, mqtt={"heartbeat_s": 60, "fleet_group": "g"})
    held = {"edge/dev-a/status", "edge/dev-a/shadow"}
    with BrokerClient(broker) as peer:
        peer.subscribe("edge/dev-a/status")
        with InProcessDaemon(cfg, clock=clock) as d:
            parts = d.daemon.parts
            deadline = time.monotonic() + T
            while not parts.reporter.status_waits:  # the job connection is up, the control one subscribing
                assert time.monotonic() < deadline, "the job connection did not come up"
                threading.Event().wait(0.01)  # poll pacing; the loop ends on the condition
            clock.advance(3600)
            parts.reporter.heartbeat(clock())  # due by the clock: it must still wait
            parts.reporter.publish_status()  # as a store change or a peer's load would
            assert not [t for _, t in published if t in held], published
            subscribed.set()
            first = json.loads(peer.expect("edge/dev-a/status", timeout=T).payload)
            assert first["state"] == "online" and first["fleet"]["group"] == "g"
            deadline = time.monotonic() + T
            while "edge/dev-a/shadow" not in [t for _, t in published]:
                assert time.monotonic() < deadline, published
                threading.Event().wait(0.01)  # poll pacing; the loop ends on the condition
            assert [t for _, t in published].count("edge/dev-a/status") == 1, published


def test_a_control_connection_that_fails_does_not_hold_back_online(
    tmp_path: Path, tiny_model: Path, broker: MosquittoBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The board takes jobs on its job connection while the control one is refused (here: every attempt
    fails, as a broker that allows one connection per user would): "online" and the document go out then."""
    refuse = threading.Event()
    real_serve = MqttTransport._serve_one_connection

    def refused(self: MqttTransport) -> Any:
        if self.client_id.endswith("-ctl"):
            refuse.wait(T)

            def no_listener() -> None:
                raise ConnectionRefusedError(111, "Connection refused")

            self._client.reconnect = no_listener  # the transport's own path for a refused connection
        return real_serve(self)

    monkeypatch.setattr(MqttTransport, "_serve_one_connection", refused)
    cfg = write_daemon_config(tmp_path / "d", broker, tiny_model)
    with BrokerClient(broker) as peer:
        peer.subscribe("edge/dev-a/status")
        peer.subscribe("edge/dev-a/shadow")
        with InProcessDaemon(cfg) as d:
            deadline = time.monotonic() + T
            while not d.daemon.parts.reporter.status_waits:
                assert time.monotonic() < deadline, "the job connection did not come up"
                threading.Event().wait(0.01)  # poll pacing; the loop ends on the condition
            refuse.set()
            first = json.loads(peer.expect("edge/dev-a/status", timeout=T).payload)
            assert first["state"] == "online"
            assert json.loads(peer.expect("edge/dev-a/shadow", timeout=T).payload)["state"]["reported"]


def _settings(broker: MosquittoBroker, tmp_path: Path) -> Settings:
    return Settings.model_validate(
        {
            "device": {"id": "ops", "state_dir": str(tmp_path / "ops")},
            "mqtt": {"host": broker.host, "port": broker.port},
        }
    )


def test_fleet_list_and_shadow_get_show_an_expired_online_as_stale(tmp_path: Path, broker: MosquittoBroker) -> None:
    """What a broker node that died leaves behind: a retained 'online' that nobody renews (no will)."""
    now = time.time()

    def status(expires: float) -> bytes:
        fmt = "%Y-%m-%dT%H:%M:%S.000Z"
        return json.dumps(
            {
                "state": "online",
                "device_id": "gone",
                "ts": time.strftime(fmt, time.gmtime(expires - 180)),
                "heartbeat_s": 60,
                "expires": time.strftime(fmt, time.gmtime(expires)),
            }
        ).encode()

    doc: dict[str, Any] = {"version": 3, "ts": "2026-01-01T00:00:00.000Z", "state": {"reported": {}}}
    with BrokerClient(broker) as peer:
        peer.publish("edge/gone/status", status(now - 10), retain=True)
        peer.publish("edge/gone/shadow", json.dumps(doc).encode(), retain=True)
        peer.publish("edge/alive/status", status(now + 170), retain=True)
    s = _settings(broker, tmp_path)
    with FleetClient(s) as fleet:
        fleet.sync()
        assert fleet.info("gone").state == "stale"
        assert fleet.info("alive").state == "online"
    with ShadowClient(s, device_id="gone") as client:
        got, source = client.get(timeout=5)
    assert source == "retained" and client.device_state == "stale" and got["version"] == 3
