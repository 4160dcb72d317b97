"""The MQTT boundary: the only module that imports paho-mqtt.

Owns the broker connection of one agent: a persistent MQTT 5 session (stable client id,
clean_start=False, Session Expiry Interval), the retained last will, re-subscription on every
connect, reconnection with jittered exponential backoff on its own network thread, TLS and
user name/password set-up, manual acknowledgement of inbound jobs, and publish handles that
report the broker's PUBACK. paho errors and reason codes become ``agent.errors.TransportError``
here; nothing above this module sees a paho type.

Delivery contract (at least once, bounded memory):

* Inbound QoS 1 messages are acknowledged only when the daemon calls ``ack(msg)`` (after it
  stored the job). A message never acknowledged is redelivered by the broker when the same
  client id reconnects.
* Outbound publishes are not kept across a connection loss. A publish while disconnected is
  refused at once (its handle is failed), and when a connection drops, every publish still
  waiting for its PUBACK is failed and dropped from paho's in-memory queue. The daemon's store
  is the only resend queue: it republishes whatever is not yet delivered from ``on_connect``.
* A burst is slowed down, not dropped. While connected, paho holds at most ``max_queued`` QoS 1
  messages; past that, publishes wait in the transport's backlog, in order, and the network
  thread hands them to paho as PUBACKs free room. An ``ack(msg)`` made while the backlog is not
  empty waits behind it: an inbound message is acknowledged only once the replies published
  before its ack are queued. Inbound messages that arrive while the backlog is not empty are
  held, unacknowledged, and handed to ``on_message`` in order once it is sent; unacknowledged
  messages keep the broker from sending more (``RECEIVE_MAXIMUM``). The network thread never
  waits for room (it is the one that makes it); another thread waits when the backlog holds
  ``max_queued`` messages, up to ``queue_wait_s``, and only then is its publish refused
  ("queue full"): a broker that stops reading without closing the link cannot hang the daemon.

Threads: all callbacks (on_message, on_connect, on_disconnect, on_error, on_delivered) run on
the network thread. They must be quick and must not wait on a PublishHandle (the thread that
would resolve it is the one waiting); they may publish and ack. ``publish``, ``ack`` and
``stop`` may be called from any thread.
"""

from __future__ import annotations

import json
import logging
import random
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.config.sections import MQTTSettings
from agent.errors import EXIT_CANNOT_START, TransportError
from agent.mqtt.grants import SHARE_PREFIX, BrokerGrants, GrantProblem, grant_problems
from agent.mqtt.probe import probe_mqtt311
from agent.system.files import atomic_write

log = logging.getLogger(__name__)
# paho's own chatter (packet traces) goes here at DEBUG; it never contains the password.
_paho_log = logging.getLogger(__name__ + ".paho")

# MQTT 5 Receive Maximum sent in CONNECT: the broker keeps at most this many inbound QoS 1 messages
# unacknowledged, so holding acknowledgements stops the inbound side. Mosquitto's own default for
# clients that do not say is the same; the MQTT default when absent is 65,535. (Mosquitto 2.0.11
# lets more through after a PUBACK on a persistent session: up to 81 were held in a test of 300
# messages at once. They wait in RAM unacknowledged, as they would in paho's socket buffer.)
RECEIVE_MAXIMUM = 20

# Property names copied between paho and plain dicts on publish and receive.
_MESSAGE_PROPERTIES = (
    "ResponseTopic",
    "CorrelationData",
    "ContentType",
    "MessageExpiryInterval",
    "PayloadFormatIndicator",
    "UserProperty",
)

# CONNACK properties read into BrokerGrants.
_CONNACK_PROPERTIES = (
    "SessionExpiryInterval",
    "SharedSubscriptionAvailable",
    "ReceiveMaximum",
    "MaximumQoS",
    "RetainAvailable",
    "MaximumPacketSize",
    "ServerKeepAlive",
)


# --------------------------------------------------------------------------------------------
# Backoff (pure)
# --------------------------------------------------------------------------------------------


def backoff_delays(min_s: float, max_s: float, rng: random.Random) -> Iterator[float]:
    """Reconnect delays with "equal jitter": attempt n waits uniformly in [c/2, c] where
    c = min(max_s, min_s * 2**(n+1)), never below min_s.

    The floor grows with the ceiling, so a fleet that lost its broker at the same moment
    spreads out and a device failing for hours retries no more often than every max_s/2,
    unlike full jitter, which can draw near-zero delays forever.
    """
    if min_s <= 0 or max_s < min_s:
        raise ValueError("backoff needs 0 < min_s <= max_s")
    n = 0
    while True:
        ceiling = min(max_s, min_s * 2 ** min(n + 1, 62))
        yield max(min_s, rng.uniform(ceiling / 2, ceiling))
        n += 1


class Backoff:
    """Reconnect delay state: a fresh delay sequence once a connection stayed up ``stable_s``."""

    def __init__(self, min_s: float, max_s: float, rng: random.Random, stable_s: float) -> None:
        self.min_s, self.max_s, self.stable_s = min_s, max_s, stable_s
        self._rng = rng
        self._delays = backoff_delays(min_s, max_s, rng)

    def next_delay(self, connected_for_s: float | None = None) -> float:
        """The wait before the next attempt. ``connected_for_s``: how long the connection that
        just ended was up (None: the attempt never connected)."""
        # A connection that drops right after CONNACK (e.g. the broker kicks us for an ACL
        # or a session takeover) must not reset the delay, or it would reconnect in a tight loop.
        if connected_for_s is not None and connected_for_s >= self.stable_s:
            self._delays = backoff_delays(self.min_s, self.max_s, self._rng)
        return next(self._delays)


# --------------------------------------------------------------------------------------------
# Error mapping
# --------------------------------------------------------------------------------------------

# CONNACK reason codes (MQTT 5) that mean "this configuration will not connect".
_CONNACK_ERRORS: dict[int, tuple[str, str]] = {
    0x84: ("mqtt_protocol", "the broker does not speak MQTT 5: it must be mosquitto >= 1.6 or another MQTT 5 broker"),
    0x85: ("mqtt_refused", "client id refused by the broker: check mqtt.client_id"),
    0x86: ("mqtt_auth", "not authorised (bad user name or password): check mqtt.username/password"),
    0x87: ("mqtt_auth", "not authorised: check mqtt.username/password, the client certificate and the broker's ACL"),
    0x88: ("mqtt_refused", "broker unavailable"),
    0x89: ("mqtt_refused", "broker busy"),
    0x8A: ("mqtt_auth", "this client is banned by the broker"),
    0x8C: ("mqtt_auth", "bad authentication method"),
    0x95: ("mqtt_refused", "packet too large for the broker"),
    0x97: ("mqtt_refused", "broker quota exceeded"),
    0x9C: ("mqtt_refused", "broker asks to use another server"),
    0x9D: ("mqtt_refused", "broker moved"),
    0x9F: ("mqtt_refused", "connection rate exceeded: the broker limits reconnects"),
    0x9A: ("mqtt_refused", "the broker keeps no retained messages (retain not supported)"),
    0x9B: ("mqtt_refused", "the broker takes no QoS 1 (QoS not supported)"),
}


def connack_error(reason: ReasonCode | int, where: str) -> TransportError:
    value = reason.value if isinstance(reason, ReasonCode) else int(reason)
    code, text = _CONNACK_ERRORS.get(value, ("mqtt_refused", f"connection refused: {reason}"))
    return TransportError(f"{where}: {text} (CONNACK 0x{value:02X})", code=code)


def connect_error(exc: BaseException, where: str, ca_file: str | None) -> TransportError:
    """A readable TransportError for an exception raised while opening the connection."""
    ca = ca_file or "the system CA store"
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = exc.verify_message or str(exc)
        if "hostname" in detail.lower() or "ip address mismatch" in detail.lower():
            hint = "the broker certificate does not name this host: check mqtt.host"
        else:
            hint = f"check mqtt.tls.ca_file (the broker's certificate is not signed by a CA in {ca})"
        return TransportError(f"{where}: TLS certificate verification failed: {detail}; {hint}", code="mqtt_tls")
    if isinstance(exc, ssl.CertificateError):  # hostname check done by paho itself
        return TransportError(f"{where}: TLS host name check failed: {exc}; check mqtt.host", code="mqtt_tls")
    if isinstance(exc, ssl.SSLError):
        return tls_alert_error(str(exc.reason or exc), where)
    if isinstance(exc, ConnectionRefusedError):
        return TransportError(
            f"{where}: connection refused: is the broker running and listening there? (check mqtt.host/port)",
            code="mqtt_unreachable",
        )
    if isinstance(exc, socket.gaierror):
        return TransportError(f"{where}: cannot resolve the host name: {exc.strerror}", code="mqtt_unreachable")
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return TransportError(f"{where}: timed out opening the connection", code="mqtt_unreachable")
    if isinstance(exc, OSError):
        return TransportError(f"{where}: {exc.strerror or exc}", code="mqtt_unreachable")
    return TransportError(f"{where}: {type(exc).__name__}: {exc}", code="mqtt_unreachable")


def tls_alert_error(detail: str, where: str) -> TransportError:
    low = detail.lower()
    if "certificate required" in low or "handshake failure" in low or "bad certificate" in low or "unknown ca" in low:
        hint = "the broker refused our client certificate: check mqtt.tls.cert_file/key_file and the broker's cafile"
    elif "wrong version" in low:
        hint = "is this port a TLS listener? (check mqtt.port and mqtt.tls.enabled)"
    else:
        hint = "check mqtt.tls settings against the broker's listener"
    return TransportError(f"{where}: TLS failed: {detail}; {hint}", code="mqtt_tls")


# --------------------------------------------------------------------------------------------
# Messages and handles
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InboundMessage:
    """A message from the broker. Pass it back to ``MqttTransport.ack`` once it is stored."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    mid: int
    dup: bool = False
    properties: Mapping[str, Any] = field(default_factory=dict)
    # Which connection it arrived on: a PUBACK is only meaningful on that connection; after a
    # reconnect the broker redelivers the message with a fresh chance to ack.
    connection: int = 0
    # The client id of the transport it came through (a daemon may run two: jobs, and control).
    source: str = ""


class PublishHandle:
    """The fate of one publish: delivered (PUBACK received, or QoS 0 written) or failed."""

    def __init__(self, mid: int, topic: str, qos: int, on_delivered: Callable[[], None] | None = None) -> None:
        self.mid = mid
        self.topic = topic
        self.qos = qos
        self._on_delivered = on_delivered
        self._done = threading.Event()
        self._delivered = False
        self._error: str | None = None

    @property
    def delivered(self) -> bool:
        return self._delivered

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def error(self) -> str | None:
        """Why the message will not be delivered by this transport (the daemon resends), or None."""
        return self._error

    def wait(self, timeout: float | None = None) -> bool:
        """True once the broker acknowledged; False on failure or timeout."""
        self._done.wait(timeout)
        return self._delivered

    def _resolve(self, delivered: bool, error: str | None = None) -> None:
        if self._done.is_set():
            return
        self._delivered, self._error = delivered, error
        # The callback runs before waiters wake: whoever waits on the handle then sees its effect
        # (the daemon's store row marked delivered), not a stale state.
        if delivered and self._on_delivered is not None:
            try:
                self._on_delivered()
            except Exception:  # the network thread must survive a faulty callback
                log.exception("on_delivered callback for %s (mid %d) failed", self.topic, self.mid)
        self._done.set()

    def __repr__(self) -> str:
        state = "delivered" if self._delivered else (f"failed: {self._error}" if self.done else "pending")
        return f"PublishHandle(mid={self.mid}, topic={self.topic!r}, {state})"


def _failed_handle(topic: str, qos: int, error: str) -> PublishHandle:
    h = PublishHandle(0, topic, qos)
    h._resolve(False, error)
    return h


@dataclass
class _Deferred:
    """A QoS 1 publish waiting in the backlog for room in paho's queue."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: Properties | None
    handle: PublishHandle


def _check_publish(topic: str, qos: int) -> None:
    """What paho would refuse with ValueError, checked before a publish waits in the backlog (a
    caller bug must raise in the caller, not surface later on the network thread)."""
    if not topic or "+" in topic or "#" in topic:
        raise TransportError(f"cannot publish to {topic!r}: not a valid topic name", code="mqtt_publish_invalid")
    if qos not in (0, 1, 2):
        raise TransportError(f"cannot publish to {topic!r}: QoS {qos} is not 0, 1 or 2", code="mqtt_publish_invalid")


def _to_paho_properties(props: Mapping[str, Any] | None) -> Properties | None:
    if not props:
        return None
    out = Properties(PacketTypes.PUBLISH)
    for name, value in props.items():
        if name not in _MESSAGE_PROPERTIES:
            raise TransportError(f"unsupported publish property {name!r} (use one of {', '.join(_MESSAGE_PROPERTIES)})")
        setattr(out, name, value)
    return out


def _from_paho_properties(props: Properties | None) -> dict[str, Any]:
    if props is None:
        return {}
    return {name: getattr(props, name) for name in _MESSAGE_PROPERTIES if hasattr(props, name)}


# --------------------------------------------------------------------------------------------
# The transport
# --------------------------------------------------------------------------------------------


class MqttTransport:
    """One persistent MQTT 5 session to the broker, kept up by a network thread of its own.

    Lifecycle: construct (validates TLS files; raises TransportError), ``start()`` once,
    ``stop()`` once. A broker that is down at start-up is not an error: the thread keeps
    retrying with backoff, and ``on_error`` / ``last_error`` say why it cannot connect.
    """

    def __init__(
        self,
        settings: MQTTSettings,
        *,
        will: tuple[str, bytes] | None,
        on_message: Callable[[InboundMessage], None] | None = None,
        on_connect: Callable[[], None] | None = None,
        on_disconnect: Callable[[str], None] | None = None,
        on_error: Callable[[TransportError], None] | None = None,
        subscriptions: Sequence[tuple[str, int]] = (),
        manual_ack: bool = True,
        max_queued: int = 256,
        queue_wait_s: float = 10.0,
        stable_after_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        session_file: Path | None = None,
        wall: Callable[[], float] = time.time,
        tell_grants: bool = True,
    ) -> None:
        """``session_file``: where the transport remembers, across restarts, until when the broker should
        keep this board's session (a session that should have resumed but is new is then told). ``tell_grants``:
        log what the grants cost (False for a second connection of the same board: the first says it)."""
        if not settings.client_id:
            # A random id would start a new session on every connect and lose queued jobs.
            raise TransportError(
                "mqtt.client_id must be set: the persistent session is keyed by it", code="mqtt_config"
            )
        self.settings = settings
        self.client_id: str = settings.client_id
        self._brokers = settings.brokers()
        self._broker = 0  # index into _brokers of the current attempt or connection
        self._where = self._where_of(0)
        self._will = will
        self._on_message_cb = on_message
        self._on_connect_cb = on_connect
        self._on_disconnect_cb = on_disconnect
        self._on_error_cb = on_error
        self._on_subscribed_cb: Callable[[], None] | None = None
        self._subscriptions = list(subscriptions)
        self._manual_ack = manual_ack
        self._max_queued = max(max_queued, settings.max_inflight)
        self._queue_wait_s = queue_wait_s
        self._clock = clock
        self._backoff = Backoff(
            settings.reconnect_min_s, settings.reconnect_max_s, rng or random.Random(), stable_after_s
        )

        self._lock = threading.Lock()
        self._pending: dict[int, PublishHandle] = {}
        # PUBACKs that overtook the registration of their handle (the network thread can see
        # the PUBACK before publish() returns in the caller's thread).
        self._early: dict[int, ReasonCode] = {}
        # PUBACKs read during one loop pass, resolved after it: paho calls on_publish holding its
        # queue lock, and an on_delivered callback must be free to publish.
        self._acked: list[tuple[int, ReasonCode]] = []
        # Publishes waiting for room in paho's queue, and acks waiting behind them, in order.
        # Guarded by _out, which also orders every hand-off to paho against them.
        self._out = threading.Condition()
        self._backlog: deque[_Deferred | InboundMessage] = deque()
        self._stalled = False  # a publisher waited queue_wait_s in vain: refuse at once until it drains
        # Inbound messages that arrived while publishes waited: handed to on_message, in order, once
        # the backlog is sent. Network thread only.
        self._held: deque[InboundMessage] = deque()
        self._sub_topics: dict[int, list[str]] = {}
        self._connected = threading.Event()
        self._subscribed = threading.Event()  # this connection's subscriptions are acknowledged
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._generation = 0
        self._connected_at: float | None = None
        self._session_present = False
        self._attempt_error: TransportError | None = None
        self._last_error: TransportError | None = None
        self._paho_error: str | None = None
        self._disconnect_reason: str | None = None
        self._reconnect_why: str | None = None
        # What the broker granted on the latest connection, what that costs, and what was told already.
        self._grants: BrokerGrants | None = None
        self._told_problems: tuple[str, ...] = () if tell_grants else ("(not told)",)
        self._tell_grants = tell_grants
        self._fatal: TransportError | None = None
        self._closed_before_connack = 0  # attempts in a row closed after CONNECT without a CONNACK
        self._no_retain = False  # the broker refused a retained will (CONNACK 0x9A): nothing is retained
        self._will_qos = 1  # 0 once the broker refused a QoS 1 will (CONNACK 0x9B)
        # Until when (wall clock) the broker should still hold this board's session: a connect before
        # then that gets a new session lost what was queued in it.
        self._wall = wall
        self._session_file = session_file
        self._session_until: float | None = self._read_session_file()
        self._session_losses: deque[str] = deque(maxlen=16)
        self._next_failback = 0.0
        self._failback_due = False

        self._client = self._make_client()

    # -- set-up ----------------------------------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        s = self.settings
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
            manual_ack=self._manual_ack,
        )
        # paho doubles 1 s..120 s without jitter and only inside loop_forever; we run our own
        # loop and never let paho reconnect by itself.
        client.reconnect_delay_set(1, 1)
        client.max_inflight_messages_set(s.max_inflight)
        client.max_queued_messages_set(self._max_queued)
        if s.username is not None:
            client.username_pw_set(s.username, s.password.get_secret_value() if s.password is not None else None)
        if s.tls.enabled:
            client.tls_set_context(self._tls_context())
        if self._will is not None:
            topic, payload = self._will
            client.will_set(topic, payload, qos=1, retain=True)
        self._connect_to(client, 0)

        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_publish = self._handle_publish
        client.on_subscribe = self._handle_subscribe
        client.on_log = self._handle_log
        # With a register-write hook paho never writes from the publishing thread; every byte
        # goes out on the network thread (publish() wakes it through paho's socket pair).
        client.on_socket_register_write = lambda *_: None
        client.on_socket_unregister_write = lambda *_: None
        client.on_socket_open = self._handle_socket_open
        return client

    def _where_of(self, index: int) -> str:
        host, port = self._brokers[index]
        return f"MQTT {'[' + host + ']' if ':' in host else host}:{port}"

    def _connect_to(self, client: mqtt.Client, index: int) -> None:
        """Point the next attempt at broker ``index`` of mqtt.hosts (paho only stores the parameters)."""
        s = self.settings
        self._broker, self._where = index, self._where_of(index)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = s.session_expiry_s
        props.ReceiveMaximum = RECEIVE_MAXIMUM
        host, port = self._brokers[index]
        client.connect_async(host, port, keepalive=s.keepalive_s, clean_start=False, properties=props)

    @staticmethod
    def _handle_socket_open(_client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        # MQTT sends small packets that wait for an answer (PUBLISH -> PUBACK): with Nagle's
        # algorithm on, each one can sit ~40 ms waiting for a delayed ACK (measured: a 1-token
        # job 88 ms round trip with it, 3 ms without; docs/benchmarks.md).
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError):  # not a TCP socket (e.g. a test double): nothing to tune
            pass

    def _tls_context(self) -> ssl.SSLContext:
        tls = self.settings.tls
        try:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_file) if tls.ca_file else None)
        except (OSError, ssl.SSLError) as e:
            raise TransportError(
                f"mqtt.tls.ca_file {tls.ca_file}: cannot load CA bundle: {e}", code="mqtt_tls"
            ) from None
        if tls.cert_file is not None and tls.key_file is not None:
            try:
                ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
            except (OSError, ssl.SSLError) as e:
                raise TransportError(
                    f"mqtt.tls.cert_file {tls.cert_file} / key_file {tls.key_file}: cannot load client certificate: {e}",
                    code="mqtt_tls",
                ) from None
        if tls.insecure_skip_verify:
            ctx.check_hostname = False
            log.warning(
                "mqtt.tls.insecure_skip_verify is on: the broker's host name is not checked "
                "(any holder of a certificate from the CA can impersonate it); for lab use only"
            )
        return ctx

    # -- public API ------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def session_present(self) -> bool:
        """Whether the broker resumed the previous session on the latest connect."""
        return self._session_present

    @property
    def grants(self) -> BrokerGrants | None:
        """What the broker granted on the latest connection (None before the first)."""
        return self._grants

    @property
    def broker(self) -> str:
        """host:port of the broker of the current (or next) attempt."""
        return self._where.removeprefix("MQTT ")

    def problems(self) -> list[GrantProblem]:
        """What the latest grants cost this board (see agent.mqtt.grants), worst first."""
        return grant_problems(self._grants, self.settings) if self._grants is not None else []

    def take_session_losses(self) -> list[str]:
        """Sessions that should have resumed but were new, each in words, once (the daemon makes events)."""
        out = []
        while self._session_losses:
            out.append(self._session_losses.popleft())
        return out

    def check_mqtt311(self) -> TransportError | None:
        """After a connection closed without a CONNACK: the 3.1.1 probe now, for a one-shot check (doctor)
        that cannot wait for the second close the network thread waits for. The error when confirmed."""
        return self._mqtt311_error()

    @property
    def fatal(self) -> TransportError | None:
        """A condition no retry cures (a broker that does not speak MQTT 5, confirmed): the daemon stops
        with EXIT_CANNOT_START. The transport keeps retrying meanwhile."""
        return self._fatal

    @property
    def last_error(self) -> TransportError | None:
        """Why the latest attempt failed or the latest connection was lost; None after success."""
        return self._last_error

    def add_subscriptions(self, subscriptions: Sequence[tuple[str, int]]) -> None:
        """More topic filters to subscribe to on every connect. Only before ``start()``."""
        if self._thread is not None:
            raise RuntimeError("subscriptions are fixed once the transport has started")
        self._subscriptions.extend(subscriptions)

    def handle(
        self,
        on_message: Callable[[InboundMessage], None],
        on_connect: Callable[[], None] | None = None,
        *,
        on_subscribed: Callable[[], None] | None = None,
        on_error: Callable[[TransportError], None] | None = None,
    ) -> None:
        """Where inbound messages and each (re)connection go; called before ``start()`` when the receiver is
        built after the transport. ``on_subscribed()``: each connection's subscriptions are acknowledged
        (network thread). ``on_error``, when given, replaces the one given at construction."""
        self._on_message_cb, self._on_connect_cb = on_message, on_connect
        self._on_subscribed_cb = on_subscribed
        if on_error is not None:
            self._on_error_cb = on_error

    @property
    def subscribed(self) -> bool:
        """This connection's subscriptions are acknowledged."""
        return self._subscribed.is_set()

    def _now_subscribed(self) -> None:
        self._subscribed.set()
        if self._on_subscribed_cb is not None:
            try:
                self._on_subscribed_cb()
            except Exception:
                log.exception("on_subscribed callback failed")

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("MqttTransport.start() may be called once")
        self._thread = threading.Thread(target=self._run, name=f"mqtt-{self.client_id}", daemon=True)
        self._thread.start()

    def wait_connected(self, timeout: float | None = None) -> bool:
        return self._connected.wait(timeout)

    def connect_or_raise(self, timeout: float) -> None:
        """For short-lived clients (the CLI): start, wait up to ``timeout`` for the connection, or stop
        and raise ``TransportError`` naming the broker."""
        self.start()
        if not self.wait_connected(timeout):
            self.stop()
            raise TransportError(
                f"could not connect to the broker at {self.broker} within {timeout:g} s"
                + (f": {self._last_error}" if self._last_error is not None else "")
            )

    def wait_subscribed(self, timeout: float | None = None) -> bool:
        """Wait until the broker acknowledged this connection's subscriptions (messages published
        by others before that may not reach this session, if it is new)."""
        return self._subscribed.wait(timeout)

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        *,
        on_delivered: Callable[[], None] | None = None,
        properties: Mapping[str, Any] | None = None,
    ) -> PublishHandle:
        """Send a message. Never raises for connection state: a handle that will not be
        delivered comes back failed (``handle.error`` says why) and the caller resends later.
        ``on_delivered()`` runs on the network thread when the broker acknowledges.

        When paho's queue is full the message waits in the backlog and its handle stays pending.
        Called from another thread than the network thread while the backlog is full too, this
        waits for room, at most ``queue_wait_s``."""
        if self._stop.is_set():
            return _failed_handle(topic, qos, "transport stopped")
        if not self._connected.is_set():
            return _failed_handle(topic, qos, "not connected: resend after reconnect")
        _check_publish(topic, qos)
        grants = self._grants
        if grants is not None:
            # What the broker takes, not more: a retained or higher-QoS PUBLISH it does not allow is a protocol
            # error that ends the connection (MQTT 5, 3.3.1.3 and 3.3.1.2). grant_problems says what it costs.
            qos = min(qos, grants.maximum_qos)
            retain = retain and grants.retain_available and not self._no_retain
        too_large = self._too_large(topic, payload)
        if too_large is not None:
            log.error("publish to %s refused: %s", topic, too_large)
            return _failed_handle(topic, qos, too_large)
        props = _to_paho_properties(properties)
        on_network_thread = threading.current_thread() is self._thread
        deadline: float | None = None
        with self._out:
            while True:
                if self._stop.is_set():
                    return _failed_handle(topic, qos, "transport stopped")
                if not self._connected.is_set():
                    return _failed_handle(topic, qos, "not connected: resend after reconnect")
                if qos == 0 or not self._backlog:
                    # QoS 0 never waits: paho does not count it against its queue.
                    info = self._paho_publish(topic, payload, qos, retain, props)
                    if info.rc != MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
                        break
                if on_network_thread or len(self._backlog) < self._max_queued:
                    handle = PublishHandle(0, topic, qos, on_delivered)
                    return self._defer(_Deferred(topic, payload, qos, retain, props, handle))
                # Another thread, and the backlog is full: wait for the network thread to move it.
                if self._stalled:
                    return _failed_handle(topic, qos, self._full_error())
                if deadline is None:
                    deadline = time.monotonic() + self._queue_wait_s
                left = deadline - time.monotonic()
                if left <= 0:
                    self._stalled = True
                    log.warning(
                        "the broker took no message for %.0fs with %d waiting: publishes from other "
                        "threads are refused until half of them are sent",
                        self._queue_wait_s,
                        len(self._backlog),
                    )
                    return _failed_handle(topic, qos, self._full_error())
                self._out.wait(left)
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and qos == 0:
            return _failed_handle(topic, qos, "not connected: resend after reconnect")
        # QoS>0 with NO_CONN stays in paho's queue until the loss handler drops it (or the next
        # connection resends it): either way the handle is resolved, so register it.
        return self._register(PublishHandle(info.mid, topic, qos, on_delivered))

    def _too_large(self, topic: str, payload: bytes) -> str | None:
        grants = self._grants
        limit = grants.max_payload_bytes(topic) if grants is not None else None
        if limit is None or len(payload) <= limit:
            return None
        return (
            f"{len(payload)} bytes is too large for the broker (CONNACK MaximumPacketSize "
            f"{grants.maximum_packet_size if grants else '?'} bytes takes payloads of {limit} bytes on this topic)"
        )

    def max_payload_bytes(self, topic: str) -> int | None:
        """The largest payload the broker takes on ``topic`` on this connection (None: no limit known)."""
        return self._grants.max_payload_bytes(topic) if self._grants is not None else None

    def _full_error(self) -> str:
        return f"outgoing queue full ({self._max_queued} queued, {len(self._backlog)} waiting): resend later"

    def _paho_publish(
        self, topic: str, payload: bytes, qos: int, retain: bool, props: Properties | None
    ) -> mqtt.MQTTMessageInfo:
        try:
            return self._client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        except ValueError as e:  # bad topic, QoS or size: a caller bug, not a network state
            raise TransportError(f"cannot publish to {topic!r}: {e}", code="mqtt_publish_invalid") from None

    def _register(self, handle: PublishHandle) -> PublishHandle:
        with self._lock:
            early = self._early.pop(handle.mid, None)
            if early is None:
                self._pending[handle.mid] = handle
        if early is not None:
            self._resolve_puback(handle, early)
        return handle

    def _defer(self, entry: _Deferred) -> PublishHandle:
        """Into the backlog (``_out`` held). Other threads stop at ``max_queued`` and inbound messages
        are held while it is not empty, so only a callback publishing in a loop reaches the hard
        bound: memory stays bounded."""
        if len(self._backlog) >= 4 * self._max_queued:
            log.warning(
                "outgoing backlog at its bound (%d messages): publish to %s refused", len(self._backlog), entry.topic
            )
            return _failed_handle(entry.topic, entry.qos, self._full_error())
        if not self._backlog:
            log.debug(
                "%d messages queued: publishes wait in the backlog, in order, acknowledgements behind them",
                self._max_queued,
            )
        self._backlog.append(entry)
        return entry.handle

    def reconnect(self, why: str) -> None:
        """Drop the connection and open a new one at once, resuming the session. MQTT 5 delivers
        unacknowledged messages again only on a new connection: the daemon asks for one when it can
        take the messages it had to leave unacknowledged."""
        if self._stop.is_set() or not self._connected.is_set():
            return
        self._reconnect_why = why
        self._client.disconnect()

    def ack(self, msg: InboundMessage) -> bool:
        """Acknowledge an inbound message (PUBACK). False when it cannot be acknowledged any
        more (the connection it came on is gone): the broker will redeliver it. While publishes
        wait in the backlog, the PUBACK is sent once they are handed to paho (True: it will be)."""
        if not self._manual_ack or msg.qos == 0:
            return True
        if msg.connection != self._generation or not self._connected.is_set():
            log.debug(
                "not acking %s (mid %d): it arrived on an earlier connection; the broker redelivers it",
                msg.topic,
                msg.mid,
            )
            return False
        with self._out:
            if self._backlog:
                # Behind the replies published before it: the broker sends nothing new meanwhile.
                self._backlog.append(msg)
                return True
            return self._client.ack(msg.mid, msg.qos) == MQTTErrorCode.MQTT_ERR_SUCCESS

    def stop(
        self, publish: tuple[str, bytes] | None = None, timeout: float = 5.0, *, end_session: bool = False
    ) -> bool:
        """Optionally publish a final retained QoS 1 message (the daemon's "stopping" status)
        and wait for its PUBACK, then send a clean DISCONNECT and end the network thread.

        A clean DISCONNECT does not fire the last will: the final message replaces it. ``end_session``: the
        DISCONNECT sets the session expiry to 0, so the broker forgets the session (a probe's).
        Returns whether the final message was acknowledged (True when none was asked for).
        """
        deadline = time.monotonic() + timeout
        delivered = publish is None
        if publish is not None:
            if self._connected.is_set():
                topic, payload = publish
                delivered = self.publish(topic, payload, qos=1, retain=True).wait(timeout)
                if not delivered:
                    log.warning("final status on %s not acknowledged by the broker within %.1fs", topic, timeout)
            else:
                log.warning("not connected at stop: final status on %s not sent", publish[0])
        # Set before disconnect(): the network thread checks it after each connect attempt, so
        # a DISCONNECT that found no socket is sent by that thread instead.
        self._stop.set()
        with self._out:
            self._out.notify_all()  # publishers waiting for room give up
        if end_session:
            props = Properties(PacketTypes.DISCONNECT)
            props.SessionExpiryInterval = 0
            self._client.disconnect(properties=props)
        else:
            self._client.disconnect()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(max(0.0, deadline - time.monotonic()) + 1.0)
            if self._thread.is_alive():
                log.warning("MQTT network thread did not end within %.1fs", timeout)
        self._connected.clear()
        self._fail_backlog("transport stopped")
        self._fail_pending("transport stopped")
        return delivered

    # -- network thread --------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                connected_for, err = self._serve_one_connection()
            except Exception:  # never let the thread die: the daemon would be deaf forever
                log.exception("unexpected error in the MQTT network loop")
                connected_for, err = self._connection_ended()
            if self._stop.is_set():
                break
            why, self._reconnect_why = self._reconnect_why, None
            if why is not None:
                if self._failback_due:
                    self._failback_due = False
                    self._connect_to(self._client, 0)
                log.info("reconnecting to %s: %s", self._where, why)
                continue
            delay = self._backoff.next_delay(connected_for)
            if len(self._brokers) > 1:
                # Fail over: the next broker at once, the backoff only once every one was tried.
                was = self._where
                self._connect_to(self._client, (self._broker + 1) % len(self._brokers))
                if self._broker != 0:
                    delay = self.settings.reconnect_min_s
                log.info("%s failed: trying %s next", was, self._where)
            # Log first, then tell the daemon: one WARNING per attempt, with the reason.
            reason = err.message if err is not None else "connection closed"
            if connected_for is None:
                log.warning("%s; retrying in %.1fs", reason, delay)
            else:
                log.warning("%s (after %.0fs connected); reconnecting in %.1fs", reason, connected_for, delay)
                if self._on_disconnect_cb is not None:
                    try:
                        self._on_disconnect_cb(reason)
                    except Exception:
                        log.exception("on_disconnect callback failed")
            if err is not None and self._on_error_cb is not None:
                try:
                    self._on_error_cb(err)
                except Exception:
                    log.exception("on_error callback failed")
            self._stop.wait(delay)
        log.debug("MQTT network thread ends")

    def _serve_one_connection(self) -> tuple[float | None, TransportError | None]:
        """One attempt: open, serve until the socket closes. Returns how long it was
        connected (None if it never got a CONNACK) and why it ended."""
        self._attempt_error = None
        self._paho_error = None
        self._disconnect_reason = None
        self._connected_at = None
        try:
            rc = self._client.reconnect()
        except (OSError, ValueError) as e:  # ssl errors are OSError; CertificateError is ValueError
            err = connect_error(e, f"cannot connect to {self._where}", self._ca_name())
            self._last_error = err
            return None, err
        if self._stop.is_set():
            self._client.disconnect()
        if rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_AGAIN):
            log.debug("CONNECT not sent: %s", mqtt.error_string(rc))
        while self._client.loop(timeout=1.0) == MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._resolve_acked()
            self._drain_backlog()
            self._deliver_held()
            self._check_failback()
        return self._connection_ended()

    def _check_failback(self) -> None:
        """Network thread, connected to another broker than the first of mqtt.hosts: every failback_s, go
        back to the first once it accepts connections (a TCP connect, at most 1 s)."""
        if self._broker == 0 or not self._connected.is_set() or self._reconnect_why is not None:
            return
        now = self._clock()
        if now < self._next_failback:
            return
        self._next_failback = now + self.settings.failback_s
        host, port = self._brokers[0]
        try:
            socket.create_connection((host, port), timeout=1.0).close()
        except OSError:
            return
        self._failback_due = True
        self._reconnect_why = f"the first broker ({self._where_of(0).removeprefix('MQTT ')}) accepts connections again"
        self._client.disconnect()

    def _ca_name(self) -> str | None:
        tls = self.settings.tls
        return str(tls.ca_file) if tls.enabled and tls.ca_file else None

    def _connection_ended(self) -> tuple[float | None, TransportError | None]:
        # paho's on_disconnect has already cleared _connected; _connected_at says whether
        # this attempt ever got a CONNACK.
        self._connected.clear()
        self._subscribed.clear()
        connected_for = None
        if self._connected_at is not None:
            connected_for = max(0.0, self._clock() - self._connected_at)
            self._session_kept_from(self._wall())
        # Our resend queue is the daemon's store, not paho's RAM: drop what paho would resend.
        self._resolve_acked()  # acknowledged before the loss: delivered
        self._client.drop_out_messages()
        self._sub_topics.clear()
        self._held.clear()  # never acknowledged: the broker delivers them again
        self._fail_backlog("connection lost before the broker acknowledged: resend after reconnect")
        self._fail_pending("connection lost before the broker acknowledged: resend after reconnect")
        if self._stop.is_set():
            if connected_for is not None:
                log.info("disconnected from %s", self._where)
            return connected_for, None
        err = self._attempt_error or self._lost_error(connected_for is not None)
        asked_again = self._reconnect_why is not None  # e.g. the will without retain: not a close to judge
        if connected_for is None and self._attempt_error is None and err.code == "mqtt_unreachable" and not asked_again:
            # Closed after our CONNECT, without a CONNACK. Twice in a row before the probe: a broker that
            # drops one connection (a restart, a rate limit) and speaks both versions is not called 3.1.1.
            self._closed_before_connack += 1
            if self._closed_before_connack >= 2:
                err = self._mqtt311_error() or err
        else:
            self._closed_before_connack = 0
        self._last_error = err
        return connected_for, err

    def _mqtt311_error(self) -> TransportError | None:
        """The broker took the TCP connection and closed it without a CONNACK (twice in a row): if a 3.1.1
        CONNECT gets one, it does not speak MQTT 5. Confirmed, it is fatal (the daemon exits 78)."""
        if self._fatal is not None:
            return self._fatal
        s = self.settings
        host, port = self._brokers[self._broker]
        try:
            ctx = self._tls_context() if s.tls.enabled else None
        except TransportError:
            return None
        code = probe_mqtt311(
            host,
            port,
            ssl_context=ctx,
            username=s.username,
            password=s.password.get_secret_value() if s.password is not None else None,
            timeout=min(5.0, float(s.keepalive_s)),
        )
        if code is None:
            return None
        self._fatal = TransportError(
            f"{self._where} speaks MQTT 3.1.1 only: it closed the connection on an MQTT 5 CONNECT and answered a "
            f"3.1.1 one (CONNACK {code}); edge-agent needs MQTT 5 (persistent sessions with an expiry, manual "
            "acknowledgement, shared subscriptions). Fix: enable MQTT 5 on the broker (RabbitMQ >= 3.13 with the "
            "mqtt plugin, Mosquitto >= 1.6, EMQX, HiveMQ, VerneMQ, ejabberd) or point mqtt.host at one that has it",
            code="mqtt_protocol",
        )
        self._fatal.exit_code = EXIT_CANNOT_START  # no retry cures it
        log.error("%s", self._fatal)
        return self._fatal

    # -- session memory ---------------------------------------------------------------------

    def _read_session_file(self) -> float | None:
        if self._session_file is None:
            return None
        try:
            rec = json.loads(self._session_file.read_text())
            if rec.get("client_id") != self.client_id or rec.get("broker") not in [
                self._where_of(i) for i in range(len(self._brokers))
            ]:
                return None
            return float(rec["seen_at"]) + float(rec["expiry_s"]) if int(rec["expiry_s"]) > 0 else None
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def _write_session_file(self, seen_at: float, expiry_s: int) -> None:
        if self._session_file is None:
            return
        rec = {"client_id": self.client_id, "broker": self._where, "expiry_s": expiry_s, "seen_at": seen_at}
        try:
            atomic_write(self._session_file, json.dumps(rec) + "\n", durable=False)
        except OSError as e:  # a lost record only costs the "session lost" warning after a restart
            log.debug("cannot write %s: %s", self._session_file, e)

    def _session_kept_from(self, now: float) -> None:
        """The connection ended (or is ending): the broker keeps the session for the granted expiry from now."""
        grants = self._grants
        if grants is None or grants.session_expiry_s <= 0:
            self._session_until = None
            return
        self._session_until = now + grants.session_expiry_s
        self._write_session_file(now, grants.session_expiry_s)

    def _lost_error(self, was_connected: bool) -> TransportError:
        detail = self._disconnect_reason or self._paho_error or "the broker closed the connection"
        low = detail.lower()
        if any(k in low for k in ("ssl", "tls", "certificate", "alert")):
            return tls_alert_error(detail, f"{self._where}")
        prefix = f"connection to {self._where} lost" if was_connected else f"cannot connect to {self._where}"
        return TransportError(f"{prefix}: {detail}", code="mqtt_lost" if was_connected else "mqtt_unreachable")

    def _drain_backlog(self) -> None:
        """Network thread, after each loop pass: hand waiting publishes to paho while it takes them,
        and send the acknowledgements queued behind them."""
        with self._out:
            if not self._backlog:
                return
            moved = 0
            while self._backlog and self._connected.is_set():
                entry = self._backlog[0]
                if isinstance(entry, InboundMessage):
                    if entry.connection == self._generation:
                        self._client.ack(entry.mid, entry.qos)
                else:
                    try:
                        info = self._client.publish(
                            entry.topic, entry.payload, qos=entry.qos, retain=entry.retain, properties=entry.properties
                        )
                    except ValueError as e:  # checked before it waited; paho's own size limit is left
                        entry.handle._resolve(False, f"cannot publish to {entry.topic!r}: {e}")
                    else:
                        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
                            break
                        entry.handle.mid = info.mid
                        self._register(entry.handle)
                self._backlog.popleft()
                moved += 1
            if self._stalled and len(self._backlog) <= self._max_queued // 2:
                self._stalled = False
                log.info("outgoing backlog down to %d messages: publishes are taken again", len(self._backlog))
            if moved:
                self._out.notify_all()

    def _deliver_held(self) -> None:
        """Network thread: hand held inbound messages to on_message while no publish waits."""
        while self._held and self._connected.is_set():
            with self._out:
                if self._backlog:
                    return
            self._deliver(self._held.popleft())

    def _fail_backlog(self, reason: str) -> None:
        """The connection is gone: waiting publishes fail (the daemon resends), waiting acks are
        dropped (the broker redelivers those messages), waiting publishers give up."""
        with self._out:
            backlog, self._backlog = self._backlog, deque()
            self._stalled = False
            self._out.notify_all()
        for entry in backlog:
            if isinstance(entry, _Deferred):
                entry.handle._resolve(False, reason)

    def _resolve_acked(self) -> None:
        with self._lock:
            acked, self._acked = self._acked, []
        for mid, reason in acked:
            with self._lock:
                handle = self._pending.pop(mid, None)
                if handle is None:
                    if len(self._early) >= 1024:  # only races leave entries behind: keep it bounded
                        self._early.clear()
                    self._early[mid] = reason
                    continue
            self._resolve_puback(handle, reason)

    def _fail_pending(self, reason: str) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        for handle in pending.values():
            handle._resolve(False, reason)

    # -- paho callbacks (network thread) ---------------------------------------------------

    def _handle_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Properties | None
    ) -> None:
        if reason.is_failure:
            if self._will is not None and self._will_downgraded(reason.value):
                topic, payload = self._will
                client.will_set(topic, payload, qos=self._will_qos, retain=not self._no_retain)
                self._reconnect_why = "the will asked again as the broker takes it"
                return
            self._attempt_error = connack_error(reason, f"{self._where} refused the connection")
            return
        self._generation += 1
        self._session_present = bool(flags.session_present)
        self._connected_at = self._clock()
        self._last_error = None
        self._fatal = None
        got = {
            n: getattr(properties, n) for n in _CONNACK_PROPERTIES if properties is not None and hasattr(properties, n)
        }
        grants = BrokerGrants.from_connack(
            got, session_present=self._session_present, requested_expiry_s=self.settings.session_expiry_s
        )
        self._grants = grants
        # paho does not read the broker's Receive Maximum: never more QoS 1 publishes in flight than it takes.
        # Its setter refuses a connected client for fear of in-flight messages being counted against a new
        # window; there are none here (a lost connection drops them), so the window is set directly.
        client._max_inflight_messages = min(self.settings.max_inflight, grants.receive_maximum)
        log.info(
            "connected to %s as %s (%s; session expiry %d s granted)",
            self._where,
            self.client_id,
            "session resumed" if self._session_present else "new session",
            grants.session_expiry_s,
        )
        now = self._wall()
        if not self._session_present and self._session_until is not None and now < self._session_until:
            lost = (
                f"{self._where} started a new session for {self.client_id} although it should have kept the old "
                f"one {self._session_until - now:.0f} s longer (a broker restarted without keeping sessions, or "
                "another broker that does not share them): jobs queued for this board while it was away are lost "
                "unless their submitters resend them"
            )
            log.warning("%s", lost)
            self._session_losses.append(lost)
        self._session_until = None
        self._write_session_file(now, grants.session_expiry_s)
        self._tell_problems()
        self._subscribed.clear()
        subscriptions = self._subscriptions
        if not grants.shared_subscriptions:
            # A broker without them drops a client that asks (ejabberd does): the board's own topics still serve.
            subscriptions = [(t, q) for t, q in subscriptions if not t.startswith(SHARE_PREFIX)]
        if subscriptions:
            # Even with a resumed session: the broker may have lost it (restart without
            # persistence, expiry), and a duplicate SUBSCRIBE is harmless.
            rc, mid = client.subscribe([(topic, qos) for topic, qos in subscriptions])
            if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
                self._sub_topics[mid] = [topic for topic, _ in subscriptions]
        self._connected.set()
        if not subscriptions:  # nothing to wait for; after connected, which on_subscribed may read
            self._now_subscribed()
        if self._on_connect_cb is not None:
            try:
                self._on_connect_cb()
            except Exception:
                log.exception("on_connect callback failed")

    def _will_downgraded(self, reason: int) -> bool:
        """A broker that keeps no retained messages (0x9A) or takes no QoS 1 (0x9B) refuses the will as
        such: ask again at once with a will it takes, and publish likewise from now on. True when changed."""
        if reason == 0x9A and not self._no_retain:
            self._no_retain = True
            log.warning(
                "%s keeps no retained messages (CONNACK 0x9A): the last will and the status are sent without "
                "retain; a client that subscribes later sees no status until the next one",
                self._where,
            )
            return True
        if reason == 0x9B and self._will_qos > 0:
            self._will_qos = 0
            log.error(
                "%s takes no QoS 1 (CONNACK 0x9B): the last will is sent at QoS 0, and so is every publish "
                "(results can be lost); allow QoS 1 on the broker",
                self._where,
            )
            return True
        return False

    def _tell_problems(self) -> None:
        """Log what the grants cost, once per change (a flapping connection does not repeat it)."""
        if not self._tell_grants:
            return
        problems = self.problems()
        codes = tuple(p.code for p in problems)
        if codes == self._told_problems:
            return
        self._told_problems = codes
        for p in problems:
            log.log(
                logging.ERROR if p.level == "error" else logging.WARNING,
                "%s: %s; fix: %s",
                self._where,
                p.message,
                p.fix,
            )

    def _handle_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Properties | None
    ) -> None:
        if flags.is_disconnect_packet_from_server:
            self._disconnect_reason = f"the broker disconnected us: {reason}"
        elif reason.getName() == "Keep alive timeout":
            self._disconnect_reason = (
                f"no answer from the broker within the keep-alive ({self.settings.keepalive_s}s): "
                "network lost or broker hung"
            )
        elif reason.getName() == "Protocol error":
            self._disconnect_reason = "protocol error (malformed packet from the broker)"
        self._connected.clear()

    def _handle_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:
            log.warning("dropped a message with a topic that is not UTF-8 (mid %d)", message.mid)
            return
        msg = InboundMessage(
            topic=topic,
            payload=bytes(message.payload),
            qos=message.qos,
            retain=bool(message.retain),
            mid=message.mid,
            dup=bool(message.dup),
            properties=_from_paho_properties(getattr(message, "properties", None)),
            connection=self._generation,
            source=self.client_id,
        )
        with self._out:
            busy = bool(self._held or self._backlog)
        if busy:
            # Its replies would only lengthen the backlog: it waits, unacknowledged, until the
            # backlog is sent (_deliver_held). Unacknowledged, it also keeps the broker from
            # sending more (Receive Maximum).
            self._held.append(msg)
            return
        self._deliver(msg)

    def _deliver(self, msg: InboundMessage) -> None:
        try:
            if self._on_message_cb is not None:
                self._on_message_cb(msg)
        except Exception:
            # Not acked: the broker redelivers it on the next connection.
            log.exception("on_message failed for %s (mid %d); left unacknowledged", msg.topic, msg.mid)

    def _handle_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode, properties: Properties | None
    ) -> None:
        # Resolved after this loop pass (_resolve_acked), outside paho's locks.
        with self._lock:
            self._acked.append((mid, reason))

    def _resolve_puback(self, handle: PublishHandle, reason: ReasonCode) -> None:
        # 0x10 "no matching subscribers" is a success: the broker has the message.
        if reason.is_failure:
            hint = " (the broker's ACL denies this topic)" if reason.value == 0x87 else ""
            log.warning("broker refused publish to %s: %s%s", handle.topic, reason, hint)
            handle._resolve(False, f"refused by the broker: {reason}{hint}")
        else:
            handle._resolve(True)

    def _handle_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, reasons: list[ReasonCode], properties: Properties | None
    ) -> None:
        topics = self._sub_topics.pop(mid, [])
        for topic, reason in zip(topics, reasons, strict=False):
            if reason.is_failure:
                log.warning("broker refused subscription to %s: %s", topic, reason)
        if not self._sub_topics:
            self._now_subscribed()

    def _handle_log(self, client: mqtt.Client, userdata: Any, level: int, buf: str) -> None:
        if level == mqtt.MQTT_LOG_ERR:
            # Socket and TLS errors surface only here; keep the latest as the reason of a loss.
            if "not connected" not in buf.lower():
                self._paho_error = buf
        _paho_log.debug("%s", buf)


__all__ = [
    "Backoff",
    "InboundMessage",
    "MqttTransport",
    "PublishHandle",
    "backoff_delays",
    "connack_error",
    "connect_error",
]
