"""The offline spool (real SQLite files) and the uplink that decides publish-now or spool.

The last tests run the uplink and the spool against a real broker through the agent's own MQTT
transport: the broker is stopped for several intervals, readings are spooled, bounded, counted when
dropped, and after the restart flushed in order, each exactly once.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.errors import StoreError
from agent.mqtt.outbox import Outgoing
from agent.telemetry.spool import TelemetrySpool
from agent.telemetry.uplink import Uplink

T = 15.0


def spool(tmp_path: Path, **kw: Any) -> TelemetrySpool:
    return TelemetrySpool(tmp_path / "telemetry.db", **kw)


def payload(i: int, size: int = 100) -> bytes:
    head = json.dumps({"i": i}).encode()
    return head + b" " * (size - len(head))


# ------------------------------------------------------------------------------- bounds and order


def test_pending_is_oldest_first_by_time_and_delivered_deletes(tmp_path):
    with spool(tmp_path) as s:
        for i, ts in enumerate([10.0, 11.0, 12.0]):
            s.add("reading", "edge/d/telemetry", payload(i), ts=ts)
        s.add("event", "edge/d/events", b"late but older", ts=9.5)  # a publish lost before its PUBACK
        items = s.pending(10)
        assert [i.payload[:9] for i in items] == [b"late but ", b'{"i": 0} ', b'{"i": 1} ', b'{"i": 2} ']
        assert all(isinstance(i, Outgoing) and i.qos == 1 and not i.retain for i in items)
        assert [i.topic for i in items][:2] == ["edge/d/events", "edge/d/telemetry"]
        assert len(s.pending(2)) == 2
        s.delivered([items[0].key, items[2].key, "not-a-key", "999999@1.0"])
        assert [i.key for i in s.pending(10)] == [items[1].key, items[3].key]
        s.delivered([items[0].key])  # a repeated acknowledgement changes nothing
        assert s.rows == 2 and s.stats().bytes == 2 * (100 + len("edge/d/telemetry"))


def test_rows_bound_drops_the_oldest_readings_and_counts_them(tmp_path):
    with spool(tmp_path, max_rows=5) as s:
        for i in range(8):
            s.add("reading", "t", payload(i), ts=float(i))
        assert [json.loads(x.payload)["i"] for x in s.pending(10)] == [3, 4, 5, 6, 7]
        st = s.stats()
        assert (st.rows, st.readings, st.dropped_readings, st.dropped_events) == (5, 5, 3, 0)


def test_bytes_bound(tmp_path):
    with spool(tmp_path, max_bytes=1000) as s:  # 9 rows of 101 bytes fit, not 10
        for i in range(12):
            s.add("reading", "t", payload(i), ts=float(i))
        assert s.stats().bytes <= 1000 and s.rows == 9
        assert json.loads(s.pending(1)[0].payload)["i"] == 3


def test_events_go_only_after_every_reading_is_gone(tmp_path):
    with spool(tmp_path, max_rows=4) as s:
        s.add("event", "e", payload(100), ts=1.0)
        s.add("reading", "t", payload(0), ts=2.0)
        s.add("event", "e", payload(101), ts=3.0)
        s.add("reading", "t", payload(1), ts=4.0)
        # full: a new event pushes out the oldest reading, not the oldest event
        added = s.add("event", "e", payload(102), ts=5.0)
        assert added.stored and (added.dropped_readings, added.dropped_events) == (1, 0)
        assert [json.loads(x.payload)["i"] for x in s.pending(10)] == [100, 101, 1, 102]
        s.add("event", "e", payload(103), ts=6.0)  # the last reading goes
        assert s.stats().readings == 0
        # only events left: a new reading is dropped itself rather than push out an event
        added = s.add("reading", "t", payload(2), ts=7.0)
        assert not added.stored and added.dropped_readings == 1 and added.dropped_events == 0
        assert [json.loads(x.payload)["i"] for x in s.pending(10)] == [100, 101, 102, 103]
        # a new event, once no reading is left, pushes out the oldest event
        added = s.add("event", "e", payload(104), ts=8.0)
        assert added.stored and added.dropped_events == 1
        assert [json.loads(x.payload)["i"] for x in s.pending(10)] == [101, 102, 103, 104]
        st = s.stats()
        assert (st.dropped_readings, st.dropped_events) == (3, 1)


def test_a_message_larger_than_the_spool_is_dropped_and_counted(tmp_path):
    with spool(tmp_path, max_bytes=500) as s:
        s.add("reading", "t", payload(0), ts=1.0)
        added = s.add("event", "e", b"x" * 600, ts=2.0)
        assert not added.stored and added.dropped_events == 1
        assert s.rows == 1  # nothing else was pushed out for it


def test_drop_counters_survive_a_restart_and_are_reported_once(tmp_path):
    with spool(tmp_path, max_rows=2) as s:
        for i in range(5):
            s.add("reading", "t", payload(i), ts=float(i))
        assert s.take_unreported_drops() == (3, 0)
        assert s.take_unreported_drops() == (0, 0)
        s.add("reading", "t", payload(5), ts=5.0)
    with spool(tmp_path, max_rows=2) as s:
        st = s.stats()
        assert (st.rows, st.dropped_readings) == (2, 4)
        assert s.take_unreported_drops() == (1, 0)
        assert [json.loads(x.payload)["i"] for x in s.pending(5)] == [4, 5]


def test_keys_are_never_reused(tmp_path):
    with spool(tmp_path) as s:
        s.add("reading", "t", b"a", ts=1.0)
        first = s.pending(1)[0].key
        s.delivered([first])
    with spool(tmp_path) as s:
        s.add("reading", "t", b"b", ts=2.0)  # SQLite may hand out the freed row id again
        second = s.pending(1)[0].key
        assert second != first
        s.delivered([first])  # a late acknowledgement of the old key cannot delete the new row
        assert s.rows == 1
        s.delivered(["1", "x@y", "", "@"])  # malformed keys: ignored
        assert s.rows == 1


def test_lowering_the_bounds_drops_at_once(tmp_path):
    with spool(tmp_path, max_rows=10) as s:
        s.add("event", "e", payload(100), ts=0.5)
        for i in range(6):
            s.add("reading", "t", payload(i), ts=float(i + 1))
        done = s.configure(max_rows=3)
        assert (done.dropped_readings, done.dropped_events) == (4, 0)
        assert [json.loads(x.payload)["i"] for x in s.pending(10)] == [100, 4, 5]
        done = s.configure(max_rows=1)
        assert (done.dropped_readings, done.dropped_events) == (2, 0) and s.stats().events == 1
        with pytest.raises(ValueError):
            s.configure(max_rows=0)


def test_a_damaged_spool_is_moved_aside_and_a_new_one_started(tmp_path):
    path = tmp_path / "telemetry.db"
    path.write_bytes(b"this is not a database" * 100)
    with TelemetrySpool(path) as s:
        assert s.rows == 0
        s.add("reading", "t", b"x", ts=1.0)
    aside = list(tmp_path.glob("telemetry.db.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b"this is not")


def test_schema_is_safe_to_reopen_and_uses_wal(tmp_path):
    for _ in range(3):
        with spool(tmp_path) as s:
            s.add("reading", "t", b"x", ts=1.0)
    c = sqlite3.connect(tmp_path / "telemetry.db")
    assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert c.execute("SELECT count(*) FROM spool").fetchone()[0] == 3
    c.close()


def test_errors_are_store_errors(tmp_path):
    with pytest.raises(StoreError) as e:
        TelemetrySpool(tmp_path / "missing" / "telemetry.db")
    assert e.value.code == "store_cantopen"
    s = spool(tmp_path)
    s.close()
    with pytest.raises(StoreError):
        s.add("reading", "t", b"x")
    with pytest.raises(StoreError):
        s.pending(1)
    with pytest.raises(ValueError):
        spool(tmp_path).add("other", "t", b"x")  # type: ignore[arg-type]


def test_from_settings_puts_it_in_the_state_dir(tmp_path):
    from agent.config import Settings

    st = Settings.model_validate(
        {"device": {"state_dir": str(tmp_path)}, "telemetry": {"spool_max_rows": 50, "spool_max_mb": 1}}
    )
    with TelemetrySpool.from_settings(st) as s:
        assert s.path == tmp_path / "telemetry.db" and s.max_rows == 50 and s.max_bytes == 1024 * 1024


# ------------------------------------------------------------------------------- the uplink, with a stand-in handle


@dataclass
class Handle:
    """Stands in for agent.mqtt.transport.PublishHandle (the same three properties; the contract test
    below checks the real one behaves the same for the cases the uplink relies on)."""

    done: bool = False
    delivered: bool = False
    error: str | None = None


class Link:
    def __init__(self) -> None:
        self.up = True
        self.sent: list[tuple[str, bytes, Handle]] = []
        self.refuse = False

    def publish(self, topic: str, body: bytes) -> Handle:
        h = Handle(done=True, error="queue full") if self.refuse else Handle()
        self.sent.append((topic, body, h))
        return h


def test_uplink_publishes_online_spools_offline_and_keeps_order(tmp_path):
    link = Link()
    with spool(tmp_path) as s:
        up = Uplink(s, link.publish, lambda: link.up)
        assert up.send("reading", "t", b"r0", ts=1.0) == "published"
        link.sent[-1][2].done = link.sent[-1][2].delivered = True
        up.poll()
        assert up.watched == 0 and s.rows == 0  # delivered: never written to disk
        link.up = False
        assert up.send("reading", "t", b"r1", ts=2.0) == "spooled"
        link.up = True
        # a backlog is waiting: new messages queue behind it instead of overtaking
        assert up.send("event", "e", b"e2", ts=3.0) == "spooled"
        assert [i.payload for i in s.pending(10)] == [b"r1", b"e2"]
        s.delivered([i.key for i in s.pending(10)])  # the outbox drained it
        assert up.send("reading", "t", b"r3", ts=4.0) == "published"
        assert len(link.sent) == 2


def test_uplink_spools_a_publish_refused_at_once_or_failed_later(tmp_path):
    link = Link()
    with spool(tmp_path) as s:
        up = Uplink(s, link.publish, lambda: True)
        link.refuse = True
        assert up.send("reading", "t", b"refused", ts=1.0) == "spooled"
        s.delivered([i.key for i in s.pending(10)])
        link.refuse = False
        assert up.send("reading", "t", b"lost-in-flight", ts=2.0) == "published"
        h = link.sent[-1][2]
        h.done, h.error = True, "connection lost"  # no PUBACK came
        assert up.poll() == 1 and up.watched == 0
        assert [(i.payload) for i in s.pending(10)] == [b"lost-in-flight"]
        assert up.poll() == 0  # spooled once, not again


def test_uplink_counts_what_the_disk_cannot_take(tmp_path):
    link = Link()
    link.up = False
    s = spool(tmp_path)
    up = Uplink(s, link.publish, lambda: link.up)
    s.close()  # stands for a disk that fails: add raises StoreError
    assert up.send("reading", "t", b"x", ts=1.0) == "lost" and up.lost == 1


# ------------------------------------------------------------------------------- against a real broker


def test_the_real_publish_handle_behaves_as_the_uplink_expects(broker_factory: Callable[..., Any]):
    from agent.mqtt.transport import MqttTransport

    b = broker_factory("contract")
    t = MqttTransport(b.settings("edge-agent-contract"), will=None, on_message=lambda m: None)
    t.start()
    try:
        assert t.wait_connected(T)
        h = t.publish("edge/c/telemetry", b"x", qos=1)
        assert h.wait(T) and h.done and h.delivered and h.error is None
        b.stop()
        deadline = time.monotonic() + T
        while t.connected and time.monotonic() < deadline:
            time.sleep(0.02)
        refused = t.publish("edge/c/telemetry", b"y", qos=1)
        assert refused.done and not refused.delivered and refused.error
    finally:
        t.stop()


def test_offline_spool_end_to_end_with_a_real_broker(broker_factory: Callable[..., Any], tmp_path: Path):
    """Readings every 'interval' while the broker is down for several intervals: spooled, bounded,
    drops counted; after the restart flushed oldest first, each exactly once."""
    from agent.mqtt.transport import MqttTransport
    from tests.broker import BrokerClient, free_port

    b = broker_factory("spool", port=free_port())  # a fixed port: the agent reconnects to the same one
    topic = "edge/dev/telemetry"
    t = MqttTransport(b.settings("edge-agent-dev"), will=None, on_message=lambda m: None)
    t.start()
    s = spool(tmp_path, max_rows=5)
    up = Uplink(s, lambda tp, body: t.publish(tp, body, qos=1), lambda: t.connected)
    try:
        with BrokerClient(b, "cloud") as peer:
            peer.subscribe("edge/dev/#")
            assert t.wait_connected(T)
            assert up.send("reading", topic, payload(0), ts=0.0) == "published"
            assert json.loads(peer.expect(topic, timeout=T).payload)["i"] == 0
        b.stop()
        deadline = time.monotonic() + T
        while t.connected and time.monotonic() < deadline:
            time.sleep(0.02)
        routes = [up.send("reading", topic, payload(i), ts=float(i)) for i in range(1, 9)]
        assert routes == ["spooled"] * 8
        st = s.stats()
        assert (st.rows, st.dropped_readings) == (5, 3)  # bounded; the three oldest dropped, counted
        b.start()
        with BrokerClient(b, "cloud-2") as peer:
            peer.subscribe("edge/dev/#")
            assert t.wait_connected(T)
            # What the outbox does after a reconnect: send pending() oldest first, record PUBACKs.
            while s.rows:
                batch = s.pending(2)
                handles = [(item, t.publish(item.topic, item.payload, qos=item.qos)) for item in batch]
                s.delivered([item.key for item, h in handles if h.wait(T)])
            got = [json.loads(m.payload)["i"] for m in peer.barrier(timeout=T) if m.topic == topic]
            assert got == [4, 5, 6, 7, 8]  # in order, each once
            assert up.send("reading", topic, payload(9), ts=9.0) == "published"  # spool empty: straight out
            assert json.loads(peer.expect(topic, timeout=T).payload)["i"] == 9
        assert s.take_unreported_drops() == (3, 0)
    finally:
        t.stop()
        s.close()
