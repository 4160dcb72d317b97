"""Telemetry and events from a real daemon through a real broker, and the offline spool: the broker
is stopped for several intervals; readings are spooled (bounded, drops counted and reported) and
flushed in order after the reconnect; nothing is sent twice unless the broker failed to acknowledge it."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from agent.mqtt.topics import Topics
from tests.broker import MosquittoBroker
from tests.daemon_harness import InProcessDaemon, wait_online, write_daemon_config
from tests.test_daemon_faults import Peer

DEV = "dev-tel"
T = Topics("edge", DEV)
SPOOL_ROWS = 10  # the spool holds this many; the broker stays down until it is full and has dropped two


class Readings:
    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.ts: list[str] = []
        self.events: list[dict] = []

    def on(self, msg) -> None:
        with self.cond:
            if msg.topic == T.telemetry:
                self.ts.append(json.loads(msg.payload)["ts"])
            elif msg.topic == T.events:
                self.events.append(json.loads(msg.payload))
            self.cond.notify_all()

    def wait(self, what: str, pred, timeout: float = 60) -> None:
        with self.cond:
            assert self.cond.wait_for(pred, timeout), what


def test_readings_are_spooled_while_the_broker_is_down_and_flushed_in_order(
    tmp_path: Path, tiny_model: Path, broker_factory
) -> None:
    broker: MosquittoBroker = broker_factory("tel", persistence=True)
    cfg = write_daemon_config(tmp_path / "d", broker, tiny_model, device_id=DEV,
                              telemetry={"interval_s": 1, "spool_max_rows": SPOOL_ROWS})  # fmt: skip
    seen = Readings()
    peer = Peer(broker, session_expiry_s=600, client_id="tel-watcher")
    inner = peer.client.on_message
    peer.client.on_message = lambda c, u, m: (seen.on(m), inner(c, u, m))
    peer.connect()
    peer.subscribe(T.telemetry)
    peer.subscribe(T.events)
    peer.subscribe(T.device_status)
    with InProcessDaemon(cfg) as d:
        wait_online(peer, DEV)
        seen.wait("live readings", lambda: len(seen.ts) >= 2)
        before = len(seen.ts)
        peer.close()
        broker.stop()
        # The scenario: the broker stays down for several intervals, until the spool is full and
        # has dropped its oldest readings twice (a reading a second: about SPOOL_ROWS + 2 seconds).
        deadline = time.monotonic() + 60
        while not ((stats := d.daemon.parts.spool.stats()).rows == SPOOL_ROWS and stats.dropped >= 2):
            assert time.monotonic() < deadline, stats
            time.sleep(0.1)
        broker.start()
        peer = Peer(broker, session_expiry_s=600, client_id="tel-watcher")
        inner = peer.client.on_message
        peer.client.on_message = lambda c, u, m: (seen.on(m), inner(c, u, m))
        peer.connect()
        assert peer.session_present
        seen.wait("the spooled readings and live ones after them", lambda: len(seen.ts) >= before + SPOOL_ROWS + 2)
        seen.wait("the drops reported", lambda: any(e["kind"] == "spool_dropped" for e in seen.events))
        assert d.daemon.parts.spool.stats().rows == 0
    peer.close()
    assert seen.ts == sorted(seen.ts), seen.ts  # in order, spooled ones before the live ones after them
    assert len(set(seen.ts)) == len(seen.ts), seen.ts  # nothing twice
    dropped = next(e for e in seen.events if e["kind"] == "spool_dropped")
    assert dropped["details"], dropped
