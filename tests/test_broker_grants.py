"""What the broker grants in CONNACK, read and acted on (issue 18, point 1): the pure judgement, the
transport against a Mosquitto that grants less, and a result larger than the broker takes.
ejabberd's grants (no shared subscriptions, a shorter session expiry, sessions lost on restart) are in
tests/test_interop_ejabberd.py."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from agent.codes import JobStatus
from agent.config.sections import MQTTSettings
from agent.jobs.gate import Gate
from agent.jobs.health import StoreHealth
from agent.jobs.protocol import JobSubmit
from agent.jobs.results import JobResults
from agent.jobs.runner import Runner
from agent.jobs.store import JobStore
from agent.mqtt.grants import BrokerGrants, grant_problems
from agent.mqtt.outbox import Outbox
from agent.mqtt.topics import Topics
from agent.mqtt.transport import MqttTransport
from tests.broker import BrokerClient, MosquittoBroker
from tests.daemon_harness import InProcessDaemon, wait_online, write_daemon_config
from tests.fakes import FakeEngine, FakePublisher
from tests.helpers import Clock

T = 10.0


def grants(**props: Any) -> BrokerGrants:
    return BrokerGrants.from_connack(props, session_present=False, requested_expiry_s=86400)


def test_absent_properties_mean_the_protocol_defaults() -> None:
    g = grants()
    assert (g.shared_subscriptions, g.session_expiry_s, g.receive_maximum, g.maximum_qos) == (True, 86400, 65535, 2)
    assert (g.retain_available, g.maximum_packet_size) == (True, None)
    assert grant_problems(g, MQTTSettings(fleet_group="g")) == []


def test_each_shortfall_is_judged_against_the_settings_with_its_cost_and_fix() -> None:
    g = grants(SharedSubscriptionAvailable=0, SessionExpiryInterval=300, MaximumQoS=0, RetainAvailable=0,
               MaximumPacketSize=4096)  # fmt: skip
    by_code = {p.code: p for p in grant_problems(g, MQTTSettings(fleet_group="g"))}
    assert list(by_code) == [
        "shared_subscriptions_unavailable", "session_expiry_shortened", "qos1_unavailable", "retain_unavailable",
        "packet_size_limited",
    ]  # fmt: skip
    assert by_code["shared_subscriptions_unavailable"].level == "error"
    assert "still takes jobs sent to its own topic" in by_code["shared_subscriptions_unavailable"].message
    assert "offline for longer than 5 min are lost" in by_code["session_expiry_shortened"].message
    # without a fleet group, no shared subscription is missed; an expiry at least the configured one is fine
    assert [p.code for p in grant_problems(grants(SharedSubscriptionAvailable=0), MQTTSettings())] == []
    assert grant_problems(grants(SessionExpiryInterval=90000), MQTTSettings()) == []


def test_mosquitto_grants_are_read_and_an_oversized_publish_fails_its_handle_without_losing_the_link(
    broker_factory: Any,
) -> None:
    b: MosquittoBroker = broker_factory(
        "small", extra_conf="max_packet_size 4096\nmax_qos 1\nretain_available false\nmax_inflight_messages 5"
    )
    t = MqttTransport(b.settings("grants-1"), will=None, manual_ack=False)
    t.start()
    try:
        assert t.wait_connected(T)
        g = t.grants
        assert g is not None
        assert (g.maximum_packet_size, g.maximum_qos, g.retain_available, g.shared_subscriptions) == (
            4096, 1, False, True
        )  # fmt: skip
        assert g.receive_maximum == 5
        assert t._client._max_inflight_messages == 5  # paho ignores it; the transport caps its in-flight window
        assert [p.code for p in t.problems()] == ["retain_unavailable", "packet_size_limited"]
        h = t.publish("edge/x/big", b"x" * 5000)
        assert h.done and not h.delivered and "too large for the broker" in (h.error or "")
        assert t.publish("edge/x/small", b"ok").wait(T)  # the connection is still there
        assert t.connected
    finally:
        t.stop(timeout=2)


def test_a_result_larger_than_the_broker_takes_fails_the_job_with_result_too_large(tmp_path: Path) -> None:
    clock = Clock()
    store = JobStore(tmp_path / "jobs.db", clock=clock)
    topics = Topics("edge", "pi-1")
    pub = FakePublisher()
    results = JobResults(store, topics)
    outbox = Outbox(pub)
    outbox.add_source(results)
    engine = FakeEngine()
    engine.load()
    runner = Runner(
        store, results, Gate(), engine=lambda: engine, publish=pub.publish,
        send_outcome=lambda rec: outbox.send(results, results.item(rec)),
        health=StoreHealth(store, recheck_s=lambda: 0.0, min_free_bytes=lambda: 0), clock=clock,
        max_result_bytes=lambda topic: 700 if topic == topics.result("big") else None,
    )  # fmt: skip
    for job_id, n in (("big", 200), ("small", 2)):
        assert store.accept(JobSubmit(job_id=job_id, kind="generate", prompt="hi", max_tokens=n)).outcome == "new"
        assert runner.work_once()
    big = json.loads(pub.on(topics.result("big"))[0])
    assert (big["status"], big["error"]["code"]) == ("FAILED", "result_too_large")
    assert "bytes and the broker takes 700 bytes" in big["error"]["message"] and big["text"] is None
    assert len(pub.on(topics.result("big"))[0]) <= 700
    assert store.get("big").status is JobStatus.FAILED
    assert json.loads(pub.on(topics.result("small"))[0])["status"] == "SUCCEEDED"


@pytest.mark.parametrize("entry", ["a:0", "a:x", "[::1", " ", "a b:1"])
def test_bad_hosts_entries_are_refused_by_name(entry: str) -> None:
    with pytest.raises(ValueError, match="mqtt.hosts entry"):
        MQTTSettings(hosts=[entry])


def test_hosts_parse_with_the_default_port() -> None:
    s = MQTTSettings(port=1884, hosts=["a", "b:1999", "[::1]:2000", "[fe80::1]"])
    assert s.brokers() == [("a", 1884), ("b", 1999), ("::1", 2000), ("fe80::1", 1884)]
    assert MQTTSettings(host="h", port=7).brokers() == [("h", 7)]


def test_a_broker_without_retain_gets_the_will_and_the_status_without_it_instead_of_a_refusal_loop(
    broker_factory: Any,
) -> None:
    """Mosquitto with retain_available false refuses a CONNECT whose will is retained (CONNACK 0x9A): the
    daemon, whose will always was, never connected. Now it asks again at once with a plain will, and
    publishes what it would retain without the flag (a retained PUBLISH would end the connection)."""
    b: MosquittoBroker = broker_factory("noretain", extra_conf="retain_available false\nmax_qos 0")
    t = MqttTransport(b.settings("noretain-1"), will=("edge/nr/status", b"offline"), manual_ack=False)
    t.start()
    try:
        assert t.wait_connected(T)
        assert t.grants is not None and not t.grants.retain_available and t.grants.maximum_qos == 0
        with BrokerClient(b) as peer:
            peer.subscribe("edge/nr/status", qos=0)
            assert t.publish("edge/nr/status", b"online", qos=1, retain=True).wait(T)
            msg = peer.expect("edge/nr/status")
            assert (msg.payload, msg.retain, msg.qos) == (b"online", False, 0)
        assert t.connected and t.last_error is None
    finally:
        t.stop(timeout=2)


def test_a_session_lost_while_the_daemon_was_stopped_is_told_after_its_restart(
    tmp_path: Path, tiny_model: Path, broker_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The issue's case: the daemon stopped, the broker restarted without keeping sessions, the daemon
    started again. What it remembered (state_dir/mqtt-session.json) says the session should still be
    there: a new one is a WARNING and a session_lost event, not an INFO 'new session'."""
    b: MosquittoBroker = broker_factory("volatile", persistence=False)
    cfg = write_daemon_config(tmp_path / "d", b, tiny_model)
    with BrokerClient(b) as peer:
        peer.subscribe("edge/dev-a/status")
        with InProcessDaemon(cfg):
            wait_online(peer, "dev-a")
    remembered = json.loads((tmp_path / "d" / "state" / "mqtt-session.json").read_text())
    assert remembered["client_id"] == "edge-agent-dev-a" and remembered["expiry_s"] == 86400
    b.restart()
    caplog.set_level(logging.WARNING, logger="agent.mqtt.transport")
    with BrokerClient(b) as peer:
        peer.subscribe("edge/dev-a/#")
        with InProcessDaemon(cfg):
            wait_online(peer, "dev-a")
            while (event := json.loads(peer.expect("edge/dev-a/events", timeout=T).payload))["kind"] != "session_lost":
                pass
    assert "started a new session" in event["message"]
    assert any("started a new session" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
