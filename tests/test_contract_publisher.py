"""The publishing contract the outbox and the runner rely on, run against the real transport on a
real Mosquitto and against tests.fakes.FakePublisher: a QoS 1 publish resolves delivered, with its
on_delivered callback run before a waiter wakes; a publish while disconnected comes back failed at
once, never raising; QoS 0 resolves without an acknowledgement."""

from __future__ import annotations

import pytest

from agent.mqtt.transport import MqttTransport
from tests.broker import MosquittoBroker
from tests.fakes import FakePublisher


@pytest.fixture(params=["real", "fake"])
def link(request: pytest.FixtureRequest, broker: MosquittoBroker):
    if request.param == "fake":
        fake = FakePublisher()
        yield fake, lambda: setattr(fake, "connected", False)
        return
    t = MqttTransport(broker.settings("contract-pub"), will=None, on_message=lambda m: None)
    t.start()
    assert t.wait_connected(15)
    yield t, lambda: t.stop()
    t.stop()


def test_a_qos1_publish_is_delivered_and_its_callback_runs_before_waiters_wake(link) -> None:
    pub, _ = link
    seen: list[str] = []
    h = pub.publish("edge/contract/a", b"x", qos=1, on_delivered=lambda: seen.append("cb"))
    assert h.wait(10) is True
    assert h.done and h.delivered and seen == ["cb"]


def test_qos0_resolves_without_an_acknowledgement(link) -> None:
    pub, _ = link
    h = pub.publish("edge/contract/b", b"x", qos=0)
    assert h.wait(10) is True and h.done


def test_a_publish_while_disconnected_fails_at_once_without_raising(link) -> None:
    pub, disconnect = link
    disconnect()
    assert not pub.connected
    called: list[bool] = []
    h = pub.publish("edge/contract/c", b"x", qos=1, on_delivered=lambda: called.append(True))
    assert h.done and not h.delivered and h.error
    assert h.wait(0) is False and called == []
