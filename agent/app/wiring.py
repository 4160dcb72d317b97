"""Builds every part of the daemon, bottom-up, in one function: ``build()`` returns a frozen ``Parts``.

Each part receives only parts built before it. Four run-time loops cannot be built in one direction,
and each is closed at the end, by name, after every part exists (``_connect``):

- the store's health tells intake, the gate, the outbox and the transport (all built after it);
- the transport hands inbound messages to the intake and the shadow, and each connection to them;
- the memory governor's readings carry the reporter's agent state; the reporter and the model delivery
  follow the shadow (which is built last, from the reporter's facts and the live settings);
- the fleet part's load goes into the reporter's status, which the fleet part asks for when it changes.

No part receives the daemon or this module's ``Parts``: each gets the parts it uses, typed.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.app.applier import LiveSettings
from agent.app.reporter import Reporter, ReporterParts, device_status
from agent.config import Settings
from agent.config.inforce import boot_settings
from agent.config.live import INTAKE_PAUSED
from agent.engine.supervisor import EngineConfig, Supervisor
from agent.engine.types import EngineLike
from agent.errors import StoreError
from agent.governor.watch import AgentActions, MemoryWatch
from agent.ha import DiscoveryPublisher
from agent.jobs.fleet import FleetShare
from agent.jobs.gate import Gate
from agent.jobs.health import StoreHealth
from agent.jobs.intake import Intake
from agent.jobs.results import JobResults
from agent.jobs.runner import Runner
from agent.jobs.store import JobRecord, JobStore
from agent.models.library import ModelDelivery
from agent.mqtt.outbox import Outbox
from agent.mqtt.topics import Topics
from agent.mqtt.transport import InboundMessage, MqttTransport
from agent.shadow.service import ShadowService
from agent.shadow.store import ShadowStore
from agent.system.sdnotify import Notifier
from agent.telemetry.sampler import Sampler, engine_residency
from agent.telemetry.spool import TelemetrySpool
from agent.telemetry.uplink import Uplink

EngineFactory = Callable[[EngineConfig], EngineLike]


@dataclass(frozen=True)
class Parts:
    """Every part of a running daemon, in the order ``build()`` makes them."""

    file_settings: Settings  # the board's own: file, environment, credentials
    settings: Settings  # in force: the file's overlaid by the shadow's desired state
    topics: Topics
    tick: threading.Event  # the main loop: something to do now
    shadow_store: ShadowStore
    store: JobStore
    results: JobResults
    health: StoreHealth
    transport: MqttTransport
    outbox: Outbox
    spool: TelemetrySpool
    gate: Gate
    supervisor: Supervisor
    uplink: Uplink
    memory: MemoryWatch
    fleet: FleetShare
    runner: Runner
    intake: Intake
    delivery: ModelDelivery
    live: LiveSettings
    reporter: Reporter
    shadow: ShadowService
    ha: DiscoveryPublisher
    control: MqttTransport | None = None  # cancels and the shadow's topics (mqtt.control_session)
    fleet_link: MqttTransport | None = None  # the fleet group's jobs (mqtt.fleet_group), a short session

    def start_connections(self) -> None:
        """The broker connections: the jobs', the control one (mqtt.control_session), the fleet's (fleet_group)."""
        self.transport.start()
        for link in (self.control, self.fleet_link):
            if link is not None:
                link.start()

    def stop_connections(self, goodbye: tuple[str, bytes] | None = None) -> None:
        """Every connection closed; ``goodbye`` (topic, payload) is published first on the jobs' one. The
        fleet part stops first (it records the last contact with the broker while it still has it)."""
        self.fleet.stop()
        if self.fleet_link is not None:
            self.fleet_link.stop()  # first: no fleet job taken that the stop would leave unstarted
        self.transport.stop(publish=goodbye)
        if self.control is not None:
            self.control.stop()

    def close_stores(self) -> None:
        """The job store, the shadow's and the telemetry spool: the last step of a stop."""
        self.store.close()
        self.shadow_store.close()
        self.spool.close()


def build(
    file_settings: Settings,
    *,
    engine_factory: EngineFactory,
    notifier: Notifier,
    config_path: Path | None,
    clock: Callable[[], float],
    monotonic: Callable[[], float],
) -> Parts:
    """The parts for ``file_settings``; nothing is started (no thread, no connection, no model)."""
    topics = Topics(file_settings.mqtt.prefix, file_settings.device.id)
    try:
        file_settings.device.state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"cannot create device.state_dir {file_settings.device.state_dir}: {e.strerror}") from None
    tick = threading.Event()
    shadow_store = ShadowStore.from_settings(file_settings)
    # The settings in force: the file's, overlaid by desired, so a board that restarts without its
    # broker applies what it last accepted before it connects. Parts read them live through ``s``.
    s = boot_settings(file_settings, shadow_store.load().desired)
    store = JobStore.from_settings(s.store, clock=clock)
    results = JobResults(store, topics, clock=clock)
    health = StoreHealth(store, recheck_s=lambda: s.store.recheck_s, min_free_bytes=lambda: s.store.min_free_kb * 1024)
    # Cancels (and the shadow's topics, below) on a session of their own unless mqtt.control_session is off:
    # they must not wait behind a job whose PUBACK the board holds back (ejabberd: one QoS 1 message at a time).
    control = _control_transport(s, topics)
    subscriptions = [(topics.submit, 1)] + ([] if control is not None else [(topics.cancel_filter, 1)])
    fleet_link = _fleet_transport(s, topics)
    offline = device_status(s, "offline", store_writable=False, ts=clock())
    transport = MqttTransport(
        s.mqtt,
        will=(topics.device_status, offline),
        subscriptions=subscriptions,
        session_file=s.device.state_dir / "mqtt-session.json",
        on_error=lambda _err: tick.set(),  # the main loop reads transport.fatal at once
    )
    outbox = Outbox(transport, on_store_error=health.failed, wake=tick.set, keepalive=notifier.watchdog)

    def ack(msg: InboundMessage) -> bool:
        """On the connection the message came through."""
        links = [link for link in (control, fleet_link) if link is not None and msg.source == link.client_id]
        return (links[0] if links else transport).ack(msg)

    spool = TelemetrySpool.from_settings(s, clock=clock)
    outbox.add_source(results)
    outbox.add_source(spool)  # readings and events kept while offline, sent in order after the results

    gate = Gate()
    supervisor = Supervisor(engine_factory, gate, grace_s=lambda: s.service.shutdown_grace_s, canary=lambda: s.canary)
    uplink = Uplink(spool, lambda t, p: transport.publish(t, p, qos=1), lambda: transport.connected)
    sampler = Sampler(
        s.device.id,
        clock=clock,
        residency=lambda: engine_residency(supervisor.engine)(),
        residency_interval_s=s.telemetry.residency_interval_s,
    )
    memory = MemoryWatch(
        s,
        sampler=sampler,
        uplink=uplink,
        topics=topics,
        actions=AgentActions(gate, supervisor),
        parked_need=supervisor.parked_need,
        clock=clock,
    )
    fleet = FleetShare(
        store,
        topics,
        settings=lambda: s.mqtt,
        model=lambda: str(s.model.path),
        publish=transport.publish,
        connected=lambda: transport.connected,
        capacity=lambda: memory.parallel(supervisor.slots),
        running=lambda: gate.running,
        holds=lambda: gate.holds,
        clock=clock,
        monotonic=monotonic,
    )
    transport.add_subscriptions(fleet.subscriptions)  # the peers' load
    gate.on_slots(fleet.poke)

    def send_outcome(rec: JobRecord) -> object:
        fleet.job_ended(rec)
        return outbox.send(results, results.item(rec))

    runner = Runner(
        store,
        results,
        gate,
        engine=lambda: supervisor.engine,
        publish=transport.publish,
        send_outcome=send_outcome,
        health=health,
        clock=clock,
        monotonic=monotonic,
        admit=lambda tokens: memory.admit_job(tokens, supervisor.report),
        capacity=lambda: memory.parallel(supervisor.slots),
        governor=lambda: s.governor,
        max_result_bytes=transport.max_payload_bytes,
    )

    def job_queued() -> None:
        fleet.place()  # a fleet job a faster peer would end sooner leaves before the runner sees it
        runner.wake()

    intake = Intake(
        store,
        topics,
        limits=lambda: s.engine,
        ack=ack,
        publish=transport.publish,
        send_outcome=send_outcome,
        cancel_running=gate.cancel,
        job_queued=job_queued,
        health=health,
        clock=clock,
    )
    delivery = ModelDelivery(
        models_dir=s.device.models_dir, state_dir=s.device.state_dir, settings=lambda: s.download, on_progress=tick.set
    )
    live = LiveSettings(
        s,
        supervisor=supervisor,
        store=store,
        hold_intake=lambda on: gate.set_hold(INTAKE_PAUSED, on),
        spool=spool,
        inference_threads=lambda: runner.thread_ids,
        delivery=delivery,
    )
    reporter = Reporter(
        s,
        config_path=config_path,
        topics=topics,
        clock=clock,
        parts=ReporterParts(
            supervisor=supervisor,
            runner=runner,
            gate=gate,
            store=store,
            health=health,
            transport=transport,
            spool=spool,
            memory=memory,
            delivery=delivery,
            uplink=uplink,
            fleet=fleet,
        ),
    )
    shadow = ShadowService(
        topics=topics,
        store=shadow_store,
        file_settings=file_settings,
        executor=live,
        ack=ack,
        publish=lambda t, p, q, r: transport.publish(t, p, qos=q, retain=r),
        facts=reporter.reported_facts,
        clock=clock,
        wake=tick.set,
        send_event=lambda e: uplink.send("event", topics.events, e.to_payload(), ts=e.ts.timestamp()),
    )
    (control or transport).add_subscriptions(shadow.subscriptions())
    ha = DiscoveryPublisher(s, transport.publish)  # Home Assistant's entities (optional)
    parts = Parts(
        file_settings,
        s,
        topics,
        tick,
        shadow_store,
        store,
        results,
        health,
        transport,
        outbox,
        spool,
        gate,
        supervisor,
        uplink,
        memory,
        fleet,
        runner,
        intake,
        delivery,
        live,
        reporter,
        shadow,
        ha,
        control,
        fleet_link,
    )
    _connect(parts, sampler)
    return parts


def _control_transport(s: Settings, topics: Topics) -> MqttTransport | None:
    """The second connection for cancels and the shadow (mqtt.control_session), or None."""
    if not s.mqtt.control_session:
        return None
    client_id = s.mqtt.client_id or f"edge-agent-{s.device.id}"
    return MqttTransport(
        s.mqtt.model_copy(update={"client_id": f"{client_id[:60]}-ctl"}),
        will=None,  # the board's status and will are the job connection's
        subscriptions=[(topics.cancel_filter, 1)],
        tell_grants=False,  # the job connection tells them
    )


def _fleet_transport(s: Settings, topics: Topics) -> MqttTransport | None:
    """The connection that takes the fleet group's jobs (mqtt.fleet_group), or None. Its session lasts half
    of mqtt.fleet_lease_s: Mosquitto deals a shared subscription's messages to a member's session while it
    is offline too, so a board that died stops taking its share once that session expires, when it would
    give back what it holds anyway (the jobs dealt to it meanwhile are lost with the session, and their
    submitters send them again: docs/protocol.md, Fleet jobs)."""
    if not s.mqtt.fleet_group:
        return None
    client_id = s.mqtt.client_id or f"edge-agent-{s.device.id}"
    return MqttTransport(
        s.mqtt.model_copy(
            update={"client_id": f"{client_id[:58]}-fleet", "session_expiry_s": math.ceil(s.mqtt.fleet_lease_s / 2)}
        ),
        will=None,
        subscriptions=[(topics.fleet_submit(s.mqtt.fleet_group), 1)],
        tell_grants=False,
    )


def link_ready_or_failed(link: MqttTransport | None) -> bool:
    """No such connection, or its subscriptions are in place, or it failed (nothing waits for it)."""
    return link is None or (link.connected and link.subscribed) or link.last_error is not None


def _connect(p: Parts, sampler: Sampler) -> None:
    """The run-time loops, closed once every part exists (see the module's docstring)."""

    def on_message(msg: InboundMessage) -> None:
        if p.fleet.handles(msg.topic):  # a peer's status: its load
            p.fleet.on_peer_status(msg.topic, msg.payload)
            p.transport.ack(msg)
            return
        (p.shadow.on_message if p.shadow.handles(msg.topic) else p.intake.on_message)(msg)

    def on_connect() -> None:
        # "online" says the board takes jobs, control messages and (in a fleet group) fleet jobs, and the
        # shadow document says it takes updates: both once the control and fleet connections have their
        # subscriptions in place (link_ready), or failed (not held back by them).
        p.ha.on_connect()  # before the shadow document: Home Assistant checks its model against the options
        if p.reporter.status_after_connect():
            p.shadow.on_connect()  # else link_ready publishes it, maybe at once on another connection's thread
        p.shadow.refresh_facts_soon()  # what this connection's broker granted (reported.broker)
        p.outbox.request_resend()
        p.tick.set()

    def store_changed(writable: bool) -> None:
        if writable:
            p.intake.resume()
            p.gate.release("store")
            p.outbox.request_resend()
            for link in (p.transport, p.fleet_link):
                if link is not None:
                    link.reconnect("the job store takes writes again: the broker delivers what was left unacknowledged")
        else:
            p.intake.pause()
            p.gate.hold("store")
        p.reporter.publish_status()
        p.tick.set()

    p.health.listen(store_changed)
    p.transport.handle(on_message, on_connect)

    def link_ready() -> None:  # a connection's subscriptions are in place, or it failed: nothing waits for it
        if p.reporter.status_ready():
            p.shadow.on_connect()
            p.tick.set()

    p.reporter.wait_for_links(lambda: link_ready_or_failed(p.control) and link_ready_or_failed(p.fleet_link))
    if p.control is not None:
        p.control.handle(on_message, on_subscribed=link_ready, on_error=lambda _err: link_ready())
    if p.fleet_link is not None:
        p.fleet_link.handle(p.intake.on_message, on_subscribed=link_ready, on_error=lambda _err: link_ready())
    sampler.read_agent_state(p.reporter.agent_state)
    p.reporter.follow_shadow(p.shadow)
    p.fleet.follow(on_load=p.reporter.publish_status)
    p.delivery.follow(protected=p.shadow.protected_models, on_done=p.shadow.reconcile_soon)
