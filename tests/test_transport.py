"""agent.mqtt.transport against real mosquitto brokers (private, on free loopback ports).

Synchronisation is by events, handles and broker round trips with deadlines; nothing waits
for a fixed time hoping something happened meanwhile.
"""

from __future__ import annotations

import json
import logging
import queue
import random
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.errors import TransportError
from agent.mqtt.transport import Backoff, InboundMessage, MqttTransport, backoff_delays
from tests.broker import BrokerClient, MosquittoBroker, TcpProxy, TLSFiles, device_acl, make_tls_material

T = 10.0  # deadline for anything that should happen promptly on loopback


class Recorder:
    """Callbacks of one transport, turned into queues and events the test can wait on."""

    def __init__(self) -> None:
        self.messages: queue.Queue[InboundMessage] = queue.Queue()
        self.connects: queue.Queue[int] = queue.Queue()
        self.disconnects: queue.Queue[str] = queue.Queue()
        self.errors: queue.Queue[TransportError] = queue.Queue()
        self._n = 0

    def on_message(self, msg: InboundMessage) -> None:
        self.messages.put(msg)

    def on_connect(self) -> None:
        self._n += 1
        self.connects.put(self._n)

    def on_disconnect(self, reason: str) -> None:
        self.disconnects.put(reason)

    def on_error(self, err: TransportError) -> None:
        self.errors.put(err)

    def message(self, timeout: float = T) -> InboundMessage:
        return self.messages.get(timeout=timeout)


def make_transport(settings: Any, rec: Recorder, **kwargs: Any) -> MqttTransport:
    kwargs.setdefault("will", None)
    return MqttTransport(
        settings,
        on_message=rec.on_message,
        on_connect=rec.on_connect,
        on_disconnect=rec.on_disconnect,
        on_error=rec.on_error,
        **kwargs,
    )


@pytest.fixture
def transports() -> Any:
    """Start transports through this so they are stopped even when the test fails."""
    made: list[MqttTransport] = []

    def start(t: MqttTransport) -> MqttTransport:
        made.append(t)
        t.start()
        return t

    yield start
    for t in made:
        t.stop(timeout=2)


# --------------------------------------------------------------------------------------------
# Backoff: pure
# --------------------------------------------------------------------------------------------


def test_backoff_delays_are_jittered_bounded_and_growing() -> None:
    rng = random.Random(7)
    seqs = [[d for _, d in zip(range(12), backoff_delays(1.0, 120.0, rng), strict=False)] for _ in range(50)]
    for seq in seqs:
        assert all(1.0 <= d <= 120.0 for d in seq)
        # equal jitter: attempt n lies in [c/2, c], c = min(max, min * 2**(n+1))
        for n, d in enumerate(seq):
            c = min(120.0, 2.0 ** (n + 1))
            assert c / 2 <= d <= c
    # jitter: fifty clients do not retry in lock step, at the first attempt nor at the cap
    assert len({round(s[0], 6) for s in seqs}) == 50
    assert len({round(s[-1], 6) for s in seqs}) == 50
    # once capped, no attempt comes sooner than max/2: no reconnect storm from a long outage
    assert min(s[-1] for s in seqs) >= 60.0


def test_backoff_min_equals_max_is_constant_and_bad_bounds_refused() -> None:
    assert [d for _, d in zip(range(5), backoff_delays(2.0, 2.0, random.Random(1)), strict=False)] == [2.0] * 5
    with pytest.raises(ValueError):
        next(backoff_delays(0.0, 1.0, random.Random(1)))
    with pytest.raises(ValueError):
        next(backoff_delays(2.0, 1.0, random.Random(1)))


def test_backoff_resets_only_after_a_connection_that_stayed_up() -> None:
    b = Backoff(1.0, 64.0, random.Random(3), stable_s=30.0)
    grown = [b.next_delay(None) for _ in range(6)]
    assert grown[-1] >= 32.0
    # a connection that dropped right after CONNACK must not reset (that would be a tight loop)
    assert b.next_delay(connected_for_s=2.0) >= 32.0
    assert b.next_delay(connected_for_s=31.0) <= 2.0


# --------------------------------------------------------------------------------------------
# Basic behaviour
# --------------------------------------------------------------------------------------------


def test_round_trip_publish_subscribe_ack_and_delivery_callback(broker: MosquittoBroker, transports: Any) -> None:
    rec = Recorder()
    t = transports(make_transport(broker.settings("edge-agent-dev1"), rec, subscriptions=[("edge/dev1/jobs/#", 1)]))
    assert t.wait_connected(T) and t.wait_subscribed(T)
    assert rec.connects.get(timeout=T) == 1
    with BrokerClient(broker) as cloud:
        cloud.subscribe("edge/dev1/results/#")
        cloud.publish("edge/dev1/jobs/submit", b'{"id": "j1"}')
        msg = rec.message()
        assert (msg.topic, msg.payload, msg.qos, msg.retain) == ("edge/dev1/jobs/submit", b'{"id": "j1"}', 1, False)
        assert t.ack(msg)

        delivered = threading.Event()
        h = t.publish(
            "edge/dev1/results/j1",
            b"done",
            qos=1,
            on_delivered=delivered.set,
            properties={"CorrelationData": b"j1", "UserProperty": [("k", "v")]},
        )
        assert h.wait(T) and h.delivered and h.error is None
        assert delivered.wait(T)
        got = cloud.expect("edge/dev1/results/j1")
        assert got.payload == b"done"
        assert got.properties.CorrelationData == b"j1"

        h0 = t.publish("edge/dev1/results/q0", b"x", qos=0)
        assert h0.wait(T)
        assert cloud.expect("edge/dev1/results/q0").payload == b"x"


def test_outgoing_queue_is_bounded_and_overflow_on_the_network_thread_waits_in_order(
    broker: MosquittoBroker, transports: Any
) -> None:
    handles: queue.Queue[list[Any]] = queue.Queue()
    holder: list[MqttTransport] = []

    def burst() -> None:
        # On the network thread no PUBACK can be processed meanwhile: the queue fills for sure.
        hs = [holder[0].publish(f"edge/q/results/{i}", b"x") for i in range(5)]
        handles.put([(h, h.mid) for h in hs])

    with BrokerClient(broker) as cloud:
        cloud.subscribe("edge/q/results/+")
        t = MqttTransport(
            broker.settings("edge-agent-q", max_inflight=1),
            will=None,
            on_message=lambda m: None,
            on_connect=burst,
            max_queued=2,
        )
        holder.append(t)
        transports(t)
        hs = handles.get(timeout=T)
        # Two in paho's queue; the rest waited in the backlog (not handed to paho yet: no mid), not refused.
        assert [mid != 0 for _, mid in hs] == [True, True, False, False, False]
        assert [h.wait(T) for h, _ in hs] == [True] * 5
        assert [cloud.expect().topic for _ in range(5)] == [f"edge/q/results/{i}" for i in range(5)]


def test_publish_when_not_connected_fails_fast_without_raising(
    broker_factory: Callable[..., MosquittoBroker], transports: Any
) -> None:
    absent = broker_factory("absent", start=False)  # nothing listens on its port
    rec = Recorder()
    t = transports(make_transport(absent.settings("edge-agent-off"), rec))
    h = t.publish("edge/off/results/1", b"x")
    assert h.done and not h.delivered and "not connected" in (h.error or "")
    assert h.wait(0) is False
    t.stop()
    assert "stopped" in (t.publish("edge/off/results/1", b"x").error or "")


def test_missing_broker_at_startup_is_retried_until_it_appears(
    broker_factory: Callable[..., MosquittoBroker], transports: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agent.mqtt.transport")
    late = broker_factory("late", start=False)
    rec = Recorder()
    t = transports(make_transport(late.settings("edge-agent-late"), rec))
    first = rec.errors.get(timeout=T)
    assert first.code == "mqtt_unreachable" and "connection refused" in first.message
    assert rec.errors.get(timeout=T)  # a second attempt: it keeps trying
    assert not t.connected
    late.start()
    assert t.wait_connected(T) and t.wait_subscribed(T)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "retrying in" in r.getMessage()]
    assert warnings and all("connection refused" in r.getMessage() for r in warnings)
    assert any(r.levelno == logging.INFO and "connected to" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------------------------
# Durability: persistent session, manual ack, broker restarts
# --------------------------------------------------------------------------------------------


def test_unacked_message_is_redelivered_after_reconnect_and_acked_one_is_not(
    broker: MosquittoBroker, transports: Any
) -> None:
    settings = broker.settings("edge-agent-ack")
    subs = [("edge/ack/jobs/#", 1)]
    rec1 = Recorder()
    t1 = transports(make_transport(settings, rec1, subscriptions=subs))
    assert t1.wait_connected(T) and t1.wait_subscribed(T)
    with BrokerClient(broker) as cloud:
        cloud.publish("edge/ack/jobs/submit", b"job-1")
        first = rec1.message()
        assert first.payload == b"job-1" and not first.dup
        t1.stop()  # never acked: as if the daemon died before storing it
        assert not t1.ack(first)  # too late: that connection is gone

        rec2 = Recorder()
        t2 = transports(make_transport(settings, rec2, subscriptions=subs))
        again = rec2.message()
        assert again.payload == b"job-1" and again.dup
        assert t2.session_present
        assert t2.ack(again)
        t2.stop()

        rec3 = Recorder()
        t3 = transports(make_transport(settings, rec3, subscriptions=subs))
        assert t3.wait_connected(T) and t3.wait_subscribed(T)
        cloud.publish("edge/ack/jobs/submit", b"job-2")
        # the acked job-1 does not come back: the next message is job-2
        assert rec3.message().payload == b"job-2"


def test_persistent_session_keeps_messages_published_while_offline(broker: MosquittoBroker, transports: Any) -> None:
    settings = broker.settings("edge-agent-offline")
    subs = [("edge/offline/jobs/#", 1)]
    rec1 = Recorder()
    t1 = transports(make_transport(settings, rec1, subscriptions=subs))
    assert t1.wait_connected(T) and t1.wait_subscribed(T)
    t1.stop()
    with BrokerClient(broker) as cloud:
        for i in range(3):
            cloud.publish("edge/offline/jobs/submit", f"job-{i}".encode())
    rec2 = Recorder()
    t2 = transports(make_transport(settings, rec2, subscriptions=subs))
    got = [rec2.message() for _ in range(3)]
    assert [m.payload for m in got] == [b"job-0", b"job-1", b"job-2"]
    assert t2.session_present
    for m in got:
        assert t2.ack(m)


@pytest.mark.parametrize("persistence", [True, False], ids=["persistent-broker", "broker-forgets-sessions"])
def test_reconnects_by_itself_after_broker_restart_and_resubscribes(
    broker_factory: Callable[..., MosquittoBroker], transports: Any, persistence: bool
) -> None:
    b = broker_factory("restarting", persistence=persistence)
    rec = Recorder()
    holder: list[MqttTransport] = []
    announced: queue.Queue[Any] = queue.Queue()

    def on_connect() -> None:
        # What the daemon does: announce itself (and resend undelivered results) on every connect,
        # from the network thread, without waiting on the handles.
        announced.put(holder[0].publish("edge/r/status", b"online", retain=True))
        rec.on_connect()

    t = MqttTransport(
        b.settings("edge-agent-restart"),
        will=("edge/r/status", b"offline"),
        on_message=rec.on_message,
        on_connect=on_connect,
        on_disconnect=rec.on_disconnect,
        subscriptions=[("edge/r/jobs/#", 1)],
    )
    holder.append(t)
    transports(t)
    assert rec.connects.get(timeout=T) == 1
    b.restart()
    assert rec.disconnects.get(timeout=T)
    assert rec.connects.get(timeout=T) == 2
    announced.get_nowait()
    # The broker may have published the will ("offline") while it went down; the status sent
    # from on_connect replaces it once acknowledged.
    assert announced.get_nowait().wait(T)
    # with persistence the broker resumed the session; without, only re-subscribing makes jobs flow
    assert t.session_present is persistence
    with BrokerClient(b) as cloud:
        cloud.subscribe("edge/r/status")
        assert cloud.expect("edge/r/status").payload == b"online"  # retained, from the second on_connect
        cloud.publish("edge/r/jobs/submit", b"after-restart")
        msg = rec.message()
        assert msg.payload == b"after-restart"
        assert t.ack(msg)
        assert t.publish("edge/r/status", b"busy", retain=True).wait(T)
        assert cloud.expect("edge/r/status").payload == b"busy"


def test_pending_publishes_fail_when_the_connection_drops(broker: MosquittoBroker, transports: Any) -> None:
    rec = Recorder()
    t = transports(make_transport(broker.settings("edge-agent-drop"), rec))
    assert t.wait_connected(T) and t.wait_subscribed(T)
    broker.kill()
    assert rec.disconnects.get(timeout=T)
    h = t.publish("edge/drop/results/1", b"x")
    assert not h.wait(T) and "not connected" in (h.error or "")


def test_silent_network_loss_is_detected_by_keepalive_and_recovered(broker: MosquittoBroker, transports: Any) -> None:
    # Slowest test here (about 2 keep-alive periods): a half-open link only shows up that way.
    proxy = TcpProxy(broker.host, broker.port)
    try:
        rec = Recorder()
        settings = broker.settings("edge-agent-wifi", port=proxy.port, keepalive_s=5)
        t = transports(
            make_transport(
                settings, rec, will=("edge/wifi/status", b"offline"), subscriptions=[("edge/wifi/jobs/#", 1)]
            )
        )
        assert rec.connects.get(timeout=T) == 1
        with BrokerClient(broker) as cloud:
            cloud.subscribe("edge/wifi/status")
            proxy.partition()
            lost = t.publish("edge/wifi/results/1", b"r1")
            # the broker notices after 1.5 keep-alives and publishes the will
            assert cloud.expect("edge/wifi/status", timeout=20).payload == b"offline"
            # the agent notices when its PINGREQ goes unanswered; the unacked result fails (daemon resends)
            assert "keep-alive" in rec.disconnects.get(timeout=20)
            assert lost.done and not lost.delivered
            proxy.heal()
            assert rec.connects.get(timeout=T) == 2
            assert t.session_present
            cloud.publish("edge/wifi/jobs/submit", b"after-heal")
            assert rec.message().payload == b"after-heal"
            t.stop()
    finally:
        proxy.close()


# --------------------------------------------------------------------------------------------
# Last will: a crash publishes "offline", a clean stop does not
# --------------------------------------------------------------------------------------------

_CHILD = r"""
import json, sys, threading
from agent.config.sections import MQTTSettings
from agent.mqtt.transport import MqttTransport
cfg = json.loads(sys.argv[1])
def on_message(msg):  # never acks: the job must survive this process being killed
    print("got", msg.topic, msg.payload.decode(), flush=True)
t = MqttTransport(MQTTSettings.model_validate(cfg["settings"]), will=(cfg["status"], b"offline"),
                  on_message=on_message, subscriptions=[(cfg["jobs"], 1)])
t.start()
assert t.wait_connected(10)
assert t.publish(cfg["status"], b"online", retain=True).wait(10)
print("ready", flush=True)
if sys.stdin.readline().strip() == "stop":
    print("stopped", t.stop(publish=(cfg["status"], b"stopping")), flush=True)
"""


class Child:
    """The agent's transport in a separate process, so it can be SIGKILLed."""

    def __init__(self, broker: MosquittoBroker, client_id: str, device: str) -> None:
        self.status, self.jobs = f"edge/{device}/status", f"edge/{device}/jobs/#"
        cfg = {"settings": broker.settings(client_id).model_dump(mode="json"), "status": self.status, "jobs": self.jobs}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, json.dumps(cfg)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def expect(self, prefix: str) -> str:
        line = self.lines.get(timeout=T)
        assert line.startswith(prefix), line
        return line

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(T)


def test_will_offline_is_published_when_the_process_is_killed_and_jobs_survive(broker: MosquittoBroker) -> None:
    with BrokerClient(broker) as cloud:
        cloud.subscribe("edge/willdev/status")
        child = Child(broker, "edge-agent-willdev", "willdev")
        try:
            child.expect("ready")
            assert cloud.expect("edge/willdev/status").payload == b"online"
            cloud.publish("edge/willdev/jobs/submit", b"job-k")
            child.expect("got edge/willdev/jobs/submit job-k")
            child.proc.kill()
            child.proc.wait(T)
            offline = cloud.expect("edge/willdev/status")
            assert (offline.payload, offline.retain) == (b"offline", False)  # live copy of a retained will
        finally:
            child.close()
        with BrokerClient(broker) as late:  # a newcomer sees the retained will
            late.subscribe("edge/willdev/status")
            got = late.expect("edge/willdev/status")
            assert (got.payload, got.retain) == (b"offline", True)

    # the job that was received but never acked comes back to the same client id
    rec = Recorder()
    t = make_transport(broker.settings("edge-agent-willdev"), rec, subscriptions=[("edge/willdev/jobs/#", 1)])
    t.start()
    try:
        again = rec.message()
        assert (again.payload, again.dup) == (b"job-k", True)
        assert t.ack(again)
    finally:
        t.stop()


def test_clean_stop_publishes_stopping_and_no_will(broker: MosquittoBroker) -> None:
    with BrokerClient(broker) as cloud:
        cloud.subscribe("edge/cleandev/status")
        child = Child(broker, "edge-agent-cleandev", "cleandev")
        try:
            child.expect("ready")
            assert cloud.expect("edge/cleandev/status").payload == b"online"
            assert child.proc.stdin is not None
            child.proc.stdin.write("stop\n")
            child.proc.stdin.flush()
            child.expect("stopped True")
            assert child.proc.wait(T) == 0
        finally:
            child.close()
        assert cloud.expect("edge/cleandev/status").payload == b"stopping"
        # everything the broker did about that disconnect is before the barrier: no "offline"
        after = [m for m in cloud.barrier() if m.topic == "edge/cleandev/status"]
        assert after == []


# --------------------------------------------------------------------------------------------
# TLS, authentication, ACL
# --------------------------------------------------------------------------------------------


def _tls_broker(broker_factory: Callable[..., MosquittoBroker], tls: TLSFiles) -> MosquittoBroker:
    return broker_factory("tls", tls=tls, require_certificate=True, acl=device_acl(), allow_anonymous=False)


def _tls_settings(b: MosquittoBroker, tls: TLSFiles, device: str, **tls_over: Any) -> Any:
    cert = tls.clients[device]
    tls_cfg = {
        "enabled": True,
        "ca_file": str(tls.ca_file),
        "cert_file": str(cert.cert_file),
        "key_file": str(cert.key_file),
    }
    tls_cfg.update(tls_over)
    return b.settings(f"edge-agent-{device}", tls=tls_cfg)


def test_mutual_tls_connects_and_acl_isolates_devices(
    broker_factory: Callable[..., MosquittoBroker],
    tls_material: TLSFiles,
    transports: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="agent.mqtt.transport")
    b = _tls_broker(broker_factory, tls_material)
    rec = Recorder()
    # dev-a also asks for dev-b's jobs: the broker must not hand them over
    t = transports(
        make_transport(
            _tls_settings(b, tls_material, "dev-a"),
            rec,
            subscriptions=[("edge/dev-b/jobs/#", 1), ("edge/dev-a/jobs/#", 1)],
        )
    )
    assert t.wait_connected(T) and t.wait_subscribed(T)
    with BrokerClient(b, cert=tls_material.clients["cloud"]) as cloud:
        cloud.subscribe("edge/dev-a/results/#")
        cloud.subscribe("edge/dev-b/results/#")
        cloud.publish("edge/dev-b/jobs/submit", b"for-b")
        cloud.publish("edge/dev-a/jobs/submit", b"for-a")
        msg = rec.message()
        # same publisher, same subscriber: ordered; for-b would have come first
        assert (msg.topic, msg.payload) == ("edge/dev-a/jobs/submit", b"for-a")
        assert t.ack(msg)

        ok = t.publish("edge/dev-a/results/1", b"mine")
        assert ok.wait(T)
        denied = t.publish("edge/dev-b/results/1", b"spoof")
        assert not denied.wait(T) and "refused by the broker" in (denied.error or "")
        assert cloud.expect("edge/dev-a/results/1").payload == b"mine"
        assert [m.topic for m in cloud.barrier()] == []
    assert rec.messages.empty()


def test_wrong_ca_fails_with_a_clear_error_naming_the_ca_file(
    broker_factory: Callable[..., MosquittoBroker],
    tls_material: TLSFiles,
    transports: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="agent.mqtt.transport")
    b = _tls_broker(broker_factory, tls_material)
    rec = Recorder()
    settings = _tls_settings(b, tls_material, "dev-a", ca_file=str(tls_material.other_ca_file))
    t = transports(make_transport(settings, rec))
    err = rec.errors.get(timeout=T)
    assert err.code == "mqtt_tls"
    assert "certificate verification failed" in err.message and str(tls_material.other_ca_file) in err.message
    assert not t.connected and t.last_error is not None
    assert any(
        str(tls_material.other_ca_file) in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
    )


def test_broker_refusing_our_client_certificate_is_explained(
    broker_factory: Callable[..., MosquittoBroker], tls_material: TLSFiles, transports: Any
) -> None:
    b = _tls_broker(broker_factory, tls_material)
    rec = Recorder()
    settings = _tls_settings(b, tls_material, "dev-a", cert_file=None, key_file=None)
    transports(make_transport(settings, rec))
    err = rec.errors.get(timeout=T)
    assert err.code == "mqtt_tls" and "client certificate" in err.message


def test_host_name_mismatch_is_refused_unless_insecure_skip_verify(
    broker_factory: Callable[..., MosquittoBroker], tmp_path: Path, transports: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="agent.mqtt.transport")
    tls = make_tls_material(tmp_path / "tls-other-name", server_names=("broker.invalid",))
    b = broker_factory("tls-name", tls=tls)
    tls_cfg = {"enabled": True, "ca_file": str(tls.ca_file)}
    strict = Recorder()
    transports(make_transport(b.settings("edge-agent-strict", tls=tls_cfg), strict))
    err = strict.errors.get(timeout=T)
    assert err.code == "mqtt_tls" and "does not name this host" in err.message

    lax = Recorder()
    t = transports(make_transport(b.settings("edge-agent-lax", tls={**tls_cfg, "insecure_skip_verify": True}), lax))
    assert t.wait_connected(T) and t.wait_subscribed(T)
    assert any("insecure_skip_verify" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_missing_tls_files_fail_at_construction() -> None:
    from agent.config.sections import MQTTSettings

    s = MQTTSettings(client_id="x", tls={"enabled": True, "ca_file": "/nonexistent/ca.pem"})
    with pytest.raises(TransportError, match="/nonexistent/ca.pem"):
        MqttTransport(s, will=None, on_message=lambda m: None)


def test_password_auth_and_the_secret_never_reaches_the_logs(
    broker_factory: Callable[..., MosquittoBroker],
    tls_material: TLSFiles,
    transports: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret = "s3cr3t-Pa55-do-not-log"
    caplog.set_level(logging.DEBUG)  # paho's packet traces included
    b = broker_factory("auth", tls=tls_material, passwords={"dev-a": secret}, allow_anonymous=False)
    tls_cfg = {"enabled": True, "ca_file": str(tls_material.ca_file)}

    good = Recorder()
    t = transports(make_transport(b.settings("edge-agent-auth", username="dev-a", password=secret, tls=tls_cfg), good))
    assert t.wait_connected(T) and t.wait_subscribed(T)
    assert t.publish("edge/dev-a/status", b"online").wait(T)

    bad = Recorder()
    wrong = "wrong-" + secret
    transports(make_transport(b.settings("edge-agent-auth2", username="dev-a", password=wrong, tls=tls_cfg), bad))
    err = bad.errors.get(timeout=T)
    assert err.code == "mqtt_auth" and "mqtt.username/password" in err.message

    none = Recorder()
    transports(make_transport(b.settings("edge-agent-auth3", tls=tls_cfg), none))
    assert none.errors.get(timeout=T).code == "mqtt_auth"

    text = caplog.text + "\n".join(str(r.args) for r in caplog.records)
    assert secret not in text and wrong not in text
    assert secret not in err.message
