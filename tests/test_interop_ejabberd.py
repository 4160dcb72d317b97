"""Interop with ejabberd's mod_mqtt (Debian's ejabberd 23.01): a clustered broker that grants less than
Mosquitto does. Issue 18, point 1 and its tests.

ejabberd offers no shared subscriptions (CONNACK SharedSubscriptionAvailable 0, and a client asking for
one is dropped), grants a session expiry of its own (mod_mqtt session_expiry, 300 s by default) and keeps
sessions in RAM, so a restart loses them. Each test runs its own ejabberd (tests/ejabberd_broker.py, a
second or so to start); without the package they skip and say how to install it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import load_settings
from agent.errors import StoreError
from agent.mqtt.transport import MqttTransport
from agent.operator.jobs import JobClient
from agent.ops.doctor import check_broker, probe_brokers
from tests.broker import BrokerClient, TcpProxy
from tests.daemon_harness import DaemonProcess, GatedEngine, InProcessDaemon, wait_online, write_daemon_config
from tests.ejabberd_broker import EjabberdBroker, ejabberd_missing
from tests.helpers import job_payload

pytestmark = pytest.mark.skipif(ejabberd_missing() is not None, reason=ejabberd_missing() or "")

T = 20.0


@pytest.fixture
def ejabberd(tmp_path: Path) -> Iterator[EjabberdBroker]:
    b = EjabberdBroker(tmp_path / "ejabberd", session_expiry_s=300).start()
    try:
        yield b
    finally:
        b.stop()


def peer(broker: EjabberdBroker, name: str = "cloud") -> BrokerClient:
    return BrokerClient(broker, client_id=name, username=name, password="x").connect()  # type: ignore[arg-type]


def config(tmp_path: Path, broker: EjabberdBroker, model: Path, **mqtt: Any) -> Path:
    return write_daemon_config(
        tmp_path / "dev-a",
        broker,  # type: ignore[arg-type]
        model,
        mqtt={"username": "dev-a", "password": "x", **mqtt},
    )


def terminal(cloud: BrokerClient, job_id: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(cloud.expect(f"edge/dev-a/jobs/{job_id}/result", timeout=60).payload)
    return data


def reported(cloud: BrokerClient, want: str) -> dict[str, Any]:
    """The shadow's reported state, from the next document (the retained one first) that has ``want`` in it."""
    reader = peer(cloud.broker, f"reader-{want}")  # type: ignore[arg-type]
    try:
        reader.subscribe("edge/dev-a/shadow")
        return _reported(reader, want)
    finally:
        reader.close()


def _reported(cloud: BrokerClient, want: str) -> dict[str, Any]:
    while True:
        doc = json.loads(cloud.expect("edge/dev-a/shadow", timeout=T).payload)
        rep: dict[str, Any] = doc.get("state", {}).get("reported", {})
        if want in rep:
            return rep


def test_transport_reads_what_ejabberd_grants_and_drops_the_fleet_filter(ejabberd: EjabberdBroker) -> None:
    """Without shared subscriptions the fleet filter is left out of the SUBSCRIBE: the board stays
    connected and its own topic serves (before, ejabberd dropped the client on every connect)."""
    got: list[Any] = []
    s = ejabberd.settings("t-grants", fleet_group="g1")
    t = MqttTransport(
        s,
        will=None,
        on_message=got.append,
        subscriptions=[("edge/t/jobs/submit", 1), ("$share/g1/edge/fleet/jobs/submit", 1)],
        manual_ack=False,
    )
    t.start()
    try:
        assert t.wait_connected(T) and t.wait_subscribed(T)
        g = t.grants
        assert g is not None
        assert (g.shared_subscriptions, g.session_expiry_s, g.requested_expiry_s) == (False, 300, 86400)
        assert [p.code for p in t.problems()] == ["shared_subscriptions_unavailable", "session_expiry_shortened"]
        assert "lost" in t.problems()[1].message and "5 min" in t.problems()[1].message
        with peer(ejabberd) as cloud:
            cloud.publish("edge/t/jobs/submit", b"hello")
            cloud.barrier()
        assert t.connected and t.last_error is None
    finally:
        t.stop(timeout=2)


def test_doctor_fails_shared_subscriptions_with_the_fix_and_warns_the_session_expiry(
    ejabberd: EjabberdBroker,
) -> None:
    class S:
        mqtt = ejabberd.settings("ignored", fleet_group="g1")

    c = check_broker(S(), probe_brokers, 10.0)
    assert c.status == "FAIL", c
    assert "shared subscriptions" in c.summary and c.fix and "mqtt.fleet_group" in c.fix

    class S2:
        mqtt = ejabberd.settings("ignored")

    c = check_broker(S2(), probe_brokers, 10.0)
    assert c.status == "WARN", c
    assert "5 min" in c.summary and "lost" in c.summary


def test_daemon_on_ejabberd_with_fleet_group_runs_own_jobs_cancels_and_reports_why(
    tmp_path: Path, tiny_model: Path, ejabberd: EjabberdBroker, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = config(tmp_path, ejabberd, tiny_model, fleet_group="g1")
    gated: list[GatedEngine] = []
    with peer(ejabberd) as cloud:
        cloud.subscribe("edge/dev-a/#")
        wrap = lambda e: gated.append(GatedEngine(e)) or gated[0]  # noqa: E731
        with InProcessDaemon(cfg, expect_errors=("shared subscriptions",), engine_wrapper=wrap) as d:
            wait_online(cloud, "dev-a", timeout=60)
            rep = reported(cloud, "broker")
            broker = rep["broker"]
            assert broker["shared_subscriptions"] is False and broker["session_expiry_s"] == 300
            codes = [p["code"] for p in broker["problems"]]
            assert codes == ["shared_subscriptions_unavailable", "session_expiry_shortened"]
            # its own jobs run
            gated[0].gate.set()
            cloud.publish("edge/dev-a/jobs/submit", job_payload("own-1", max_tokens=4))
            assert terminal(cloud, "own-1")["status"] == "SUCCEEDED"
            # a cancel reaches it while a job runs (held at its first token)
            gated[0].gate.clear()
            cloud.publish("edge/dev-a/jobs/submit", job_payload("long-1", max_tokens=40))
            assert gated[0].started.wait(T)
            cloud.publish("edge/dev-a/jobs/long-1/cancel", b"{}")
            assert gated[0].cancel is not None and gated[0].cancel.wait(T)
            gated[0].gate.set()
            assert terminal(cloud, "long-1")["status"] == "CANCELED"
            # the shadow answers a get
            cloud.publish("edge/dev-a/shadow/get", b"{}")
            cloud.expect("edge/dev-a/shadow/get/accepted", timeout=T)
            assert d.daemon.parts.transport.connected
    assert any(r.levelno == logging.ERROR and "shared subscriptions" in r.getMessage() for r in caplog.records), (
        "the reason is logged at ERROR"
    )


def test_ejabberd_restart_loses_the_session_and_the_daemon_says_so(
    tmp_path: Path, tiny_model: Path, ejabberd: EjabberdBroker, caplog: pytest.LogCaptureFixture
) -> None:
    # The daemon reaches the broker through a relay held shut until the observer is subscribed again
    # (the broker's restart forgets every subscription): it cannot reconnect and send its event unseen.
    proxy = TcpProxy(ejabberd.host, ejabberd.port)
    cfg = config(tmp_path, ejabberd, tiny_model, host=proxy.host, port=proxy.port)
    caplog.set_level(logging.WARNING, logger="agent.mqtt.transport")
    try:
        with InProcessDaemon(cfg):
            with peer(ejabberd) as cloud:
                cloud.subscribe("edge/dev-a/status")
                wait_online(cloud, "dev-a", timeout=60)
            proxy.partition()
            ejabberd.restart()  # sessions live in RAM: gone
            with peer(ejabberd, "cloud2") as cloud:
                cloud.subscribe("edge/dev-a/#")
                proxy.heal()
                wait_online(cloud, "dev-a", timeout=60)
                while True:
                    event = json.loads(cloud.expect("edge/dev-a/events", timeout=T).payload)
                    if event["kind"] == "session_lost":
                        break
                assert "new session" in event["message"] and "resend" in event["message"]
                assert "fix" in event["details"]
                # the shadow's reported facts say it too, and jobs run again
                while "session_lost" not in [p["code"] for p in _reported(cloud, "broker")["broker"]["problems"]]:
                    pass
                cloud.publish("edge/dev-a/jobs/submit", job_payload("after-1", max_tokens=2))
                assert terminal(cloud, "after-1")["status"] == "SUCCEEDED"
    finally:
        proxy.close()
    assert any("new session" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_will_on_ejabberd_when_the_daemon_is_killed(tmp_path: Path, tiny_model: Path, ejabberd: EjabberdBroker) -> None:
    cfg = config(tmp_path, ejabberd, tiny_model)
    with peer(ejabberd) as cloud:
        cloud.subscribe("edge/dev-a/status")
        with DaemonProcess(cfg) as proc:
            wait_online(cloud, "dev-a", timeout=60)
            proc.kill()
        while True:
            state = json.loads(cloud.expect("edge/dev-a/status", timeout=T).payload)["state"]
            if state == "offline":
                break


def test_cluster_failover_through_mqtt_hosts_loses_no_acknowledged_job(tmp_path: Path, tiny_model: Path) -> None:
    """Two ejabberd nodes in one cluster; the daemon on node A (mqtt.hosts = [A, B]), the submitter on B.
    A is killed (SIGKILL): the daemon fails over to B, and every job B acknowledged to the submitter, also
    those sent while the daemon had no session anywhere, ends exactly once (the submitter resends what got
    no answer; the board never runs an id twice)."""
    a = EjabberdBroker(tmp_path / "a").start()
    b: EjabberdBroker | None = None
    try:
        b = EjabberdBroker(tmp_path / "b", join=a).start()
        hosts = [f"{a.host}:{a.port}", f"{b.host}:{b.port}"]
        cfg = config(tmp_path, a, tiny_model, hosts=hosts, failback_s=3600)
        file_settings = load_settings(cfg, environ={})
        on_b = file_settings.model_copy(
            update={"mqtt": file_settings.mqtt.model_copy(update={"hosts": [hosts[1]], "username": "cloud"})}
        )
        with peer(a, "watch-a") as watch:
            watch.subscribe("edge/dev-a/status")
            with InProcessDaemon(cfg) as d, JobClient(on_b, device_id="dev-a") as client:
                wait_online(watch, "dev-a", timeout=60)
                first = client.submit({"prompt": "Hello", "max_tokens": 2}, job_id="c-0")
                # A cluster that has just formed may not route B's publish to A's subscription yet (the message
                # is then dropped, as for any topic nobody subscribes to): the submitter resends, as documented.
                result = client.follow(first, timeout=60, resend_after_s=2.0)
                assert result is not None and result["status"] == "SUCCEEDED"  # routed from B to the daemon on A
                a.kill()
                ids = [client.submit({"prompt": "Hello", "max_tokens": 2}, job_id=f"c-{i}") for i in range(1, 4)]
                for job_id in ids:
                    result = client.follow(job_id, timeout=90, resend_after_s=2.0)
                    assert result is not None and result["status"] == "SUCCEEDED", job_id
                assert d.daemon.parts.transport.broker == hosts[1]
                for job_id in [first, *ids]:
                    rec = d.daemon.parts.store.get(job_id)
                    assert rec is not None and rec.attempt == 1, job_id
                # the session died with node A: the board says so
                problems = d.daemon.parts.reporter.reported_facts()["broker"]["problems"]
                assert "session_lost" in [p["code"] for p in problems]
                print(f"cluster failover: resends {client.resends}")
    finally:
        if b is not None:
            b.stop()
        a.stop()


def test_control_messages_do_not_wait_behind_a_job_the_board_has_not_acknowledged(
    tmp_path: Path, tiny_model: Path, ejabberd: EjabberdBroker
) -> None:
    """ejabberd hands a session one QoS 1 message at a time: a job left unacknowledged (the store is
    unwritable) holds back every later message of that session. Cancels and the shadow come through the
    board's control session (mqtt.control_session), so a shadow update is answered meanwhile."""
    cfg = write_daemon_config(
        tmp_path / "dev-a", ejabberd, tiny_model,  # type: ignore[arg-type]
        mqtt={"username": "dev-a", "password": "x"}, store={"recheck_s": 3600},
    )  # fmt: skip
    update = {"state": {"desired": {"telemetry": {"interval_s": 30}}}, "client_token": "while-held"}
    with peer(ejabberd) as cloud:
        cloud.subscribe("edge/dev-a/#")
        with InProcessDaemon(cfg, expect_errors=("job store unwritable",)) as d:
            wait_online(cloud, "dev-a", timeout=60)
            d.daemon.parts.health.failed(StoreError("test: the disk is full", code="store_full"))
            cloud.publish("edge/dev-a/jobs/submit", job_payload("held-1", max_tokens=2))
            cloud.publish("edge/dev-a/shadow/update", json.dumps(update).encode())
            reply = json.loads(cloud.expect("edge/dev-a/shadow/update/accepted", timeout=T).payload)
            assert reply["client_token"] == "while-held"
            assert d.daemon.parts.store.get("held-1") is None  # the job is still held at the broker
            # once the store takes writes again, the job comes and runs
            assert d.daemon.parts.health.recheck(force=True)
            assert terminal(cloud, "held-1")["status"] == "SUCCEEDED"
