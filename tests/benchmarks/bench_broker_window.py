"""How brokers hand QoS 1 messages to a session that holds back an acknowledgement (not a test).

Two measurements, each on a private Mosquitto and a private ejabberd (tests/broker.py,
tests/ejabberd_broker.py; ejabberd is skipped when it is not installed):

1. window: a subscriber with Receive Maximum 20 holds back the PUBACK of the first of three QoS 1
   messages, then a QoS 0 one follows. What arrives before and after it acknowledges the first?
   (docs/mqtt-transport.md, "Control messages on a session of their own".)
2. shared: two subscribers of one shared subscription ($share/g/...), the "slow" one with Receive
   Maximum 1 that never acknowledges, the "fast" one acknowledging at once; 12 messages published.
   How many does each get, and does the broker hand the slow one's share to the fast one? Then the
   slow one disconnects (its session ends): do its unacknowledged messages go to the fast one?
   (docs/mqtt-transport.md, "Fleet jobs by each board's speed".)

Run: .venv/bin/python tests/benchmarks/bench_broker_window.py
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion  # noqa: E402
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402

from tests.broker import BrokerClient, MosquittoBroker  # noqa: E402
from tests.ejabberd_broker import EjabberdBroker, ejabberd_missing  # noqa: E402

SETTLE_S = 1.5  # a measurement of what arrives: the broker has this long to send it


class Holder:
    """A subscriber that acknowledges only when told (manual_ack)."""

    def __init__(
        self, broker: Any, client_id: str, receive_maximum: int, user: str | None, expiry: int = 0, resume: bool = False
    ) -> None:
        self.got: list[tuple[str, int, bytes]] = []
        self.c = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5, manual_ack=True
        )
        if user:
            self.c.username_pw_set(user, "x")
        ready = threading.Event()
        self.c.on_connect = lambda *a: ready.set()
        self.c.on_message = lambda _c, _u, m: self.got.append((m.topic, m.mid, bytes(m.payload)))
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = expiry
        props.ReceiveMaximum = receive_maximum
        self.c.connect(broker.host, broker.port, clean_start=not resume, properties=props)
        self.c.loop_start()
        ready.wait(5)

    def subscribe(self, *filters: tuple[str, int]) -> None:
        done = threading.Event()
        self.c.on_subscribe = lambda *a: done.set()
        self.c.subscribe(list(filters))
        done.wait(5)

    def ack_first(self) -> None:
        if self.got:
            self.c.ack(self.got[0][1], 1)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def window(broker: Any, user: str | None) -> str:
    h = Holder(broker, "holder", 20, user)
    h.subscribe(("job/#", 1), ("ctl/#", 1), ("ctl0/#", 0))
    kw: dict[str, Any] = {"username": "pub", "password": "x"} if user else {}
    with BrokerClient(broker, client_id="pubber", **kw) as pub:
        pub.publish("job/1", b"j1")
        pub.publish("job/2", b"j2")
        pub.publish("ctl/cancel", b"c1")
        pub.publish("ctl0/cancel", b"c0", qos=0)
        time.sleep(SETTLE_S)  # measuring: what arrived in this time
        before = [t for t, _, _ in h.got]
        h.ack_first()
        time.sleep(SETTLE_S)
        after = [t for t, _, _ in h.got]
    h.close()
    return f"before the first PUBACK: {before}; after it: {after}"


def shared(broker: Any, user: str | None) -> str:
    slow = Holder(broker, "slow", 1, user)
    fast = Holder(broker, "fast", 20, user)
    fast.c._manual_ack = False  # acknowledges at once
    for h in (slow, fast):
        h.subscribe(("$share/g/fleet/jobs", 1))
    kw: dict[str, Any] = {"username": "pub", "password": "x"} if user else {}
    with BrokerClient(broker, client_id="pubber", **kw) as pub:
        for i in range(12):
            pub.publish("fleet/jobs", f"{i}".encode())
        time.sleep(SETTLE_S)
        held = (len(slow.got), len(fast.got))
        slow.close()  # its session ends (expiry 0) with its messages unacknowledged
        time.sleep(SETTLE_S)
        after = len(fast.got)
    fast.close()
    return (
        f"12 published: slow (window 1, never acks) got {held[0]}, fast got {held[1]}; "
        f"after the slow one left, fast has {after}"
    )


def unsubscribe(broker: Any, user: str | None) -> str:
    slow = Holder(broker, "slow2", 1, user)
    fast = Holder(broker, "fast2", 20, user)
    fast.c._manual_ack = False
    for h in (slow, fast):
        h.subscribe(("$share/g/fleet/jobs", 1))
    kw: dict[str, Any] = {"username": "pub", "password": "x"} if user else {}
    with BrokerClient(broker, client_id="pubber2", **kw) as pub:
        for i in range(12):
            pub.publish("fleet/jobs", f"{i}".encode())
        time.sleep(SETTLE_S)
        held = (len(slow.got), len(fast.got))
        done = threading.Event()
        slow.c.on_unsubscribe = lambda *a: done.set()
        slow.c.unsubscribe("$share/g/fleet/jobs")
        done.wait(5)
        for i in range(12, 18):
            pub.publish("fleet/jobs", f"{i}".encode())
        time.sleep(SETTLE_S)
        mid = (len(slow.got), len(fast.got))
        while len(slow.got) < 12:  # acknowledge what the slow one has, one at a time, until no more comes
            n = len(slow.got)
            slow.c.ack(slow.got[-1][1], 1)
            time.sleep(0.3)
            if len(slow.got) == n:
                break
        after = (len(slow.got), len(fast.got))
    slow.close()
    fast.close()
    return (
        f"12 published: slow {held[0]}, fast {held[1]}; slow unsubscribed, 6 more: slow {mid[0]}, fast {mid[1]}; "
        f"slow acknowledging what it holds: slow {after[0]}, fast {after[1]}"
    )


def offline(broker: Any, user: str | None) -> str:
    """A member goes away (a dead board) while its session lives (expiry 60 s): is it still dealt its share?"""
    gone = Holder(broker, "gone", 20, user, expiry=60)
    live = Holder(broker, "live", 20, user)
    for h in (gone, live):
        h.c._manual_ack = False
        h.subscribe(("$share/g/fleet/jobs", 1))
    gone.c.disconnect()  # its session stays with the broker for 60 s
    gone.c.loop_stop()
    kw: dict[str, Any] = {"username": "pub", "password": "x"} if user else {}
    with BrokerClient(broker, client_id="pubber3", **kw) as pub:
        for i in range(12):
            pub.publish("fleet/jobs", f"{i}".encode())
        time.sleep(SETTLE_S)
        got = len(live.got)
    live.close()
    back = Holder(broker, "gone", 20, user, expiry=60, resume=True)  # what was queued in its session?
    time.sleep(SETTLE_S)
    queued = len(back.got)
    back.close()
    return f"12 published while one member was offline with a live session: the live one got {got}; queued for the offline one: {queued}"


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="broker-window-"))
    try:
        m = MosquittoBroker(tmp / "mosquitto").start()
        try:
            print("mosquitto window:", window(m, None))
            print("mosquitto shared:", shared(m, None))
            print("mosquitto unsubscribe:", unsubscribe(m, None))
            print("mosquitto offline:", offline(m, None))
        finally:
            m.stop()
        if (why := ejabberd_missing()) is not None:
            print("ejabberd: skipped:", why)
            return
        e = EjabberdBroker(tmp / "ejabberd").start()
        try:
            print("ejabberd window:", window(e, "holder"))
            print("ejabberd shared: no shared subscriptions (CONNACK SharedSubscriptionAvailable 0)")
        finally:
            e.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
