"""A broker that does not speak MQTT 5 (issue 18, point 5), reproduced with tests/fake_mqtt311.py
(RabbitMQ 3.10 closes the connection on an MQTT 5 CONNECT and answers a 3.1.1 one).

Before: the daemon retried forever with "the broker closed the connection" and doctor advised
"start the broker". Now the close is confirmed by a 3.1.1 probe and is a cannot-start condition."""

from __future__ import annotations

import threading
from pathlib import Path

from agent.config.sections import MQTTSettings
from agent.errors import EXIT_CANNOT_START, TransportError
from agent.mqtt.probe import connect_311, probe_mqtt311
from agent.mqtt.transport import MqttTransport
from agent.ops.doctor import check_broker, probe_brokers
from tests.daemon_harness import DaemonProcess, write_daemon_config
from tests.fake_mqtt311 import FakeMqtt311Broker

T = 10.0


def settings(fake: FakeMqtt311Broker) -> MQTTSettings:
    return MQTTSettings(host=fake.host, port=fake.port, client_id="dev-311", reconnect_min_s=0.1, reconnect_max_s=1.0)


def test_connect_311_is_the_packet_the_spec_gives() -> None:
    # MQTT 3.1.1, 3.1: fixed header 0x10, remaining length, "MQTT", level 4, flags, keep-alive, client id
    assert connect_311("ab") == b"\x10\x0e\x00\x04MQTT\x04\x02\x00\x0a\x00\x02ab"
    assert connect_311("ab", "u", "p")[9] == 0x02 | 0x80 | 0x40


def test_the_transport_confirms_a_311_only_broker_and_says_it_cannot_start() -> None:
    errors: list[TransportError] = []
    failed = threading.Event()

    def on_error(e: TransportError) -> None:
        errors.append(e)
        if e.code == "mqtt_protocol":
            failed.set()

    with FakeMqtt311Broker() as fake:
        t = MqttTransport(settings(fake), will=None, on_error=on_error)
        t.start()
        try:
            assert failed.wait(T)
            err = errors[-1]
            assert err.code == "mqtt_protocol" and t.fatal is err
            assert "speaks MQTT 3.1.1 only" in str(err) and "enable MQTT 5" in str(err)
            # our MQTT 5 CONNECT closed twice in a row (one close could be a restart), then the probe's 3.1.1 one
            assert fake.connects[:3] == [5, 5, 4]
        finally:
            t.stop(timeout=2)


def test_a_listener_that_closes_every_connection_is_not_called_311() -> None:
    errors: list[TransportError] = []
    failed = threading.Event()

    def on_error(e: TransportError) -> None:
        errors.append(e)
        failed.set()

    with FakeMqtt311Broker(answer_311=False) as fake:
        assert probe_mqtt311(fake.host, fake.port, timeout=2) is None
        t = MqttTransport(settings(fake), will=None, on_error=on_error)
        t.start()
        try:
            assert failed.wait(T)
            assert errors[0].code == "mqtt_unreachable" and t.fatal is None
            assert "closed the connection" in str(errors[0])
        finally:
            t.stop(timeout=2)


def test_doctor_says_the_broker_is_311_only_with_the_fix() -> None:
    with FakeMqtt311Broker() as fake:

        class S:
            mqtt = settings(fake)

        c = check_broker(S(), probe_brokers, 5.0)
    assert c.status == "FAIL"
    assert "speaks MQTT 3.1.1 only" in c.summary
    assert c.fix is not None and c.fix.startswith("enable MQTT 5 on the broker") and "exits 78" in c.fix


def test_the_daemon_exits_78_with_the_reason(tmp_path: Path, tiny_model: Path) -> None:
    with FakeMqtt311Broker() as fake:
        cfg = write_daemon_config(tmp_path / "d", fake, tiny_model)  # type: ignore[arg-type]
        with DaemonProcess(cfg) as proc:
            code = proc.wait(timeout=60)
        log = proc.log_tail()
    assert code == EXIT_CANNOT_START, log
    assert "cannot start [mqtt_protocol]" in log and "speaks MQTT 3.1.1 only" in log
