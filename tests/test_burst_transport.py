"""The transport under a burst, on a real Mosquitto (issue 17, 3b): a full outgoing queue slows the
inbound side down and keeps every message; nothing is refused while the broker keeps reading.

A small ``max_queued`` makes paho's queue overflow with a few messages. Synchronisation is by handles,
events and broker round trips with deadlines.
"""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
from typing import Any

import pytest

from agent.mqtt.transport import InboundMessage, MqttTransport, PublishHandle
from tests.broker import BrokerClient, MosquittoBroker

T = 10.0


@pytest.fixture
def transports() -> Any:
    made: list[MqttTransport] = []

    def start(t: MqttTransport) -> MqttTransport:
        made.append(t)
        t.start()
        assert t.wait_connected(T) and t.wait_subscribed(T)
        return t

    yield start
    for t in made:
        t.stop(timeout=2)


def _run_once(t: MqttTransport) -> MqttTransport:
    """Started and connected; the caller stops it (a transport is started once and stopped once)."""
    t.start()
    assert t.wait_connected(T) and t.wait_subscribed(T)
    return t


def _resumed(broker: MosquittoBroker) -> None:
    if broker.pid is not None:
        os.kill(broker.pid, signal.SIGCONT)


class Replier:
    """An inbound handler like the daemon's: each message gets ``k`` replies, then its ack. Records,
    at each message, whether every reply of the messages before it had been handed to paho."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.t: MqttTransport | None = None
        self.handles: list[PublishHandle] = []
        self.seen: list[bytes] = []
        self.earlier_replies_queued: list[bool] = []

    def on_message(self, msg: InboundMessage) -> None:
        assert self.t is not None
        self.seen.append(msg.payload)
        self.earlier_replies_queued.append(all(h.mid != 0 or h.done for h in self.handles))
        for i in range(self.k):
            self.handles.append(self.t.publish(f"edge/burst/out/{msg.payload.decode()}/{i}", b"r"))
        self.t.ack(msg)


def test_an_inbound_burst_whose_replies_overflow_the_queue_loses_none_in_order_and_acks_all(
    broker: MosquittoBroker, transports: Any
) -> None:
    n, k = 300, 5
    replier = Replier(k)
    t = MqttTransport(broker.settings("edge-agent-burst"), will=None, on_message=replier.on_message,
                      subscriptions=[("edge/burst/in", 1)], max_queued=8)  # fmt: skip
    replier.t = t
    try:
        _run_once(t)
        with BrokerClient(broker) as cloud:
            cloud.subscribe("edge/burst/out/#")
            for i in range(n):  # at once: paho sends them as the broker's window allows
                cloud.client.publish("edge/burst/in", str(i).encode(), qos=1)
            got = [cloud.expect(timeout=T).topic for _ in range(n * k)]
        # The subscriber has them all; the broker's PUBACKs to the transport may still be on the
        # way: wait for them before stopping (a stop fails what is still unacknowledged).
        delivered = all(h.wait(T) for h in replier.handles)
    finally:
        t.stop()
    assert got == [f"edge/burst/out/{i}/{j}" for i in range(n) for j in range(k)]
    assert delivered
    # A message was handed to the handler only once the replies before it were queued in paho.
    assert all(replier.earlier_replies_queued)
    assert replier.seen == [str(i).encode() for i in range(n)]
    # Every message was acknowledged: the same session, resumed, gets none of them again.
    again: queue.Queue[InboundMessage] = queue.Queue()
    t2 = MqttTransport(broker.settings("edge-agent-burst"), will=None, on_message=again.put,
                       subscriptions=[("edge/burst/in", 1)])  # fmt: skip
    transports(t2)
    assert t2.session_present
    with BrokerClient(broker) as cloud:
        cloud.barrier()
        cloud.publish("edge/burst/in", b"marker")
    assert again.get(timeout=T).payload == b"marker"


def test_publishers_on_other_threads_wait_for_room_and_lose_nothing(broker: MosquittoBroker, transports: Any) -> None:
    threads_n, per_thread = 4, 150
    t = transports(MqttTransport(broker.settings("edge-agent-threads"), will=None, on_message=lambda m: None,
                                 max_queued=4))  # fmt: skip
    handles: dict[int, list[PublishHandle]] = {}
    with BrokerClient(broker) as cloud:
        cloud.subscribe("edge/threads/#")

        def publish_all(w: int) -> None:
            handles[w] = [t.publish(f"edge/threads/{w}", str(i).encode()) for i in range(per_thread)]

        workers = [threading.Thread(target=publish_all, args=(w,)) for w in range(threads_n)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(60)
        got: dict[str, list[bytes]] = {}
        for _ in range(threads_n * per_thread):
            msg = cloud.expect(timeout=T)
            got.setdefault(msg.topic, []).append(msg.payload)
    assert all(h.wait(T) for hs in handles.values() for h in hs)
    # Nothing refused, and each thread's messages in the order it published them.
    assert got == {f"edge/threads/{w}": [str(i).encode() for i in range(per_thread)] for w in range(threads_n)}


def test_a_broker_that_stops_reading_bounds_the_wait_of_other_threads(broker: MosquittoBroker, transports: Any) -> None:
    t = transports(MqttTransport(broker.settings("edge-agent-stall", max_inflight=1), will=None,
                                 on_message=lambda m: None, max_queued=4, queue_wait_s=0.5))  # fmt: skip
    with BrokerClient(broker) as cloud:
        cloud.subscribe("edge/stall/#")
        assert broker.pid is not None
        os.kill(broker.pid, signal.SIGSTOP)  # reads nothing, acknowledges nothing; the link stays up
        try:
            kept = [t.publish(f"edge/stall/{i}", b"x") for i in range(8)]  # 4 in paho, 4 in the backlog
            assert not any(h.done for h in kept)
            started = time.monotonic()
            late = t.publish("edge/stall/late", b"x")
            waited = time.monotonic() - started
            assert late.done and not late.delivered and "queue full" in (late.error or ""), late
            assert 0.4 <= waited < 3.0  # waited for room, within the bound
            started = time.monotonic()
            again = t.publish("edge/stall/again", b"x")
            assert again.done and "queue full" in (again.error or "") and time.monotonic() - started < 0.2
        finally:
            _resumed(broker)
        assert all(h.wait(T) for h in kept)  # the kept ones go out once the broker reads again
        assert [cloud.expect(timeout=T).topic for _ in range(8)] == [f"edge/stall/{i}" for i in range(8)]
        assert t.connected
        assert t.publish("edge/stall/after", b"x").wait(T)  # taken again once the backlog drained


def test_a_connection_lost_with_a_backlog_fails_its_publishes_and_the_broker_redelivers_what_was_held(
    broker: MosquittoBroker,
) -> None:
    settings = broker.settings("edge-agent-lost", max_inflight=1)
    # Create the session and its subscription, then leave: two messages wait for it at the broker.
    seen: queue.Queue[InboundMessage] = queue.Queue()
    _run_once(MqttTransport(settings, will=None, on_message=seen.put, subscriptions=[("edge/lost/in", 1)])).stop()
    with BrokerClient(broker) as cloud:
        cloud.publish("edge/lost/in", b"A")
        cloud.publish("edge/lost/in", b"B")
    replies: list[PublishHandle] = []
    holder: list[MqttTransport] = []
    stopped = threading.Event()

    def on_message(msg: InboundMessage) -> None:
        seen.put(msg)
        if msg.payload == b"A" and not stopped.is_set():
            stopped.set()
            assert broker.pid is not None
            os.kill(broker.pid, signal.SIGSTOP)  # A's replies can only wait now; B (if read) is held
            replies.extend(holder[0].publish(f"edge/lost/out/{i}", b"r") for i in range(6))
        holder[0].ack(msg)

    t = MqttTransport(settings, will=None, on_message=on_message, subscriptions=[("edge/lost/in", 1)], max_queued=2)
    holder.append(t)
    try:
        try:
            t.start()
            first = seen.get(timeout=T)
            assert first.payload == b"A" and stopped.wait(T)
            assert seen.empty()  # B was not handed over while A's replies wait
            t.reconnect("test: the link drops with a backlog")
            assert all(h.wait(T) is False for h in replies[2:])
            assert all("connection lost" in (h.error or "") for h in replies[2:])
        finally:
            _resumed(broker)
        # Neither A (its ack waited behind its replies) nor B was acknowledged: both come again.
        assert [seen.get(timeout=T).payload for _ in range(2)] == [b"A", b"B"]
    finally:
        t.stop()
