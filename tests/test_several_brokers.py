"""Several brokers (issue 18, point 2): mqtt.hosts tried in order, failover when the broker in use dies,
and a return to the first once it is back. Two private Mosquittos stand for two nodes; a two-node
ejabberd cluster is in tests/test_interop_ejabberd.py."""

from __future__ import annotations

import json
import queue
from pathlib import Path
from typing import Any

from agent.config.sections import MQTTSettings
from agent.mqtt.transport import InboundMessage, MqttTransport
from tests.broker import BrokerClient, MosquittoBroker, free_port
from tests.daemon_harness import InProcessDaemon, wait_online, write_daemon_config
from tests.helpers import job_payload

T = 15.0


def two_hosts(a: MosquittoBroker, b: MosquittoBroker, **kw: Any) -> MQTTSettings:
    return MQTTSettings(
        hosts=[f"{a.host}:{a.port}", f"{b.host}:{b.port}"],
        client_id="multi-1",
        reconnect_min_s=0.1,
        reconnect_max_s=1.0,
        keepalive_s=5,
        failback_s=1.0,
        **kw,
    )


def test_fails_over_to_the_next_broker_and_returns_to_the_first(broker_factory: Any) -> None:
    a: MosquittoBroker = broker_factory("a")
    b: MosquittoBroker = broker_factory("b")
    connects: queue.Queue[str] = queue.Queue()
    got: queue.Queue[InboundMessage] = queue.Queue()
    t: MqttTransport | None = None

    def on_connect() -> None:
        assert t is not None
        connects.put(t.broker)

    t = MqttTransport(
        two_hosts(a, b), will=None, on_message=got.put, on_connect=on_connect,
        subscriptions=[("edge/multi/jobs/submit", 1)], manual_ack=False,
    )  # fmt: skip
    t.start()
    try:
        assert connects.get(timeout=T) == f"{a.host}:{a.port}"
        a.kill()
        assert connects.get(timeout=T) == f"{b.host}:{b.port}"
        assert t.wait_subscribed(T)
        with BrokerClient(b) as peer:
            peer.publish("edge/multi/jobs/submit", b"via b")
        assert got.get(timeout=T).payload == b"via b"
        a.restart()
        assert connects.get(timeout=T) == f"{a.host}:{a.port}"  # back to the first within failback_s
        assert t.wait_subscribed(T)
        with BrokerClient(a) as peer:
            peer.publish("edge/multi/jobs/submit", b"via a")
        assert got.get(timeout=T).payload == b"via a"
    finally:
        t.stop(timeout=2)


def test_a_first_broker_that_is_down_at_start_is_skipped(broker_factory: Any) -> None:
    b: MosquittoBroker = broker_factory("b")
    dead = MosquittoBroker(b.dir.parent / "dead", port=free_port())  # never started
    t = MqttTransport(two_hosts(dead, b), will=None, manual_ack=False)
    t.start()
    try:
        assert t.wait_connected(T) and t.broker == f"{b.host}:{b.port}"
    finally:
        t.stop(timeout=2)


def test_a_daemon_keeps_taking_jobs_through_the_second_broker(
    tmp_path: Path, tiny_model: Path, broker_factory: Any
) -> None:
    a: MosquittoBroker = broker_factory("a")
    b: MosquittoBroker = broker_factory("b")
    cfg = write_daemon_config(
        tmp_path / "d", a, tiny_model, mqtt={"hosts": [f"{a.host}:{a.port}", f"{b.host}:{b.port}"], "failback_s": 1.0}
    )
    with InProcessDaemon(cfg):
        with BrokerClient(b) as on_b:
            on_b.subscribe("edge/dev-a/#")
            with BrokerClient(a) as on_a:
                on_a.subscribe("edge/dev-a/status")
                wait_online(on_a, "dev-a")
            a.kill()
            wait_online(on_b, "dev-a")
            on_b.publish("edge/dev-a/jobs/submit", job_payload("via-b", max_tokens=2))
            msg = on_b.expect("edge/dev-a/jobs/via-b/result", timeout=60)
            assert json.loads(msg.payload)["status"] == "SUCCEEDED"
