"""A small job client: publish a job to a device and follow its statuses, stream and result.

Used by `edge-agent submit`, `edge-agent jobs cancel`, the tests and the benchmarks. It speaks only
through agent.mqtt.transport, like the daemon. It also keeps the device's retained status and shadow
document, so that a wait that ends without a result can say what is known (``silence_reason``).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from agent.config import Settings
from agent.errors import TransportError
from agent.mqtt.topics import Topics
from agent.mqtt.transport import InboundMessage, MqttTransport

_transport_log = logging.getLogger("agent.mqtt.transport")


class JobClient:
    def __init__(self, settings: Settings, *, device_id: str, connect_timeout: float = 10.0) -> None:
        self.topics = Topics(settings.mqtt.prefix, device_id)
        # A throw-away session: a client that leaves should not make the broker queue for it.
        mqtt = settings.mqtt.model_copy(
            update={"client_id": f"edge-cli-{uuid.uuid4().hex[:12]}", "session_expiry_s": 0}
        )
        self._inbox: queue.Queue[InboundMessage] = queue.Queue()
        self._settled = threading.Event()  # connected, or the first attempt failed
        self._connect_error: TransportError | None = None
        # The device's retained status and shadow document, as last received (None: none seen).
        self.device_status: dict[str, Any] | None = None
        self.shadow: dict[str, Any] | None = None
        self.transport = MqttTransport(
            mqtt,
            will=None,
            on_message=self._route,
            on_connect=self._settled.set,
            on_error=self._on_error,
            subscriptions=[
                (self.topics.status_filter, 1),
                (self.topics.result_filter, 1),
                (self.topics.stream_filter, 0),
                (self.topics.device_status, 1),
                (self.topics.shadow, 1),
            ],
            manual_ack=False,
        )
        self._connect_timeout = connect_timeout
        self._sent: dict[str, tuple[str, bytes]] = {}  # job id -> (topic, payload), for resending
        self.resends: dict[str, int] = {}  # job id -> how many times it was sent again

    def __enter__(self) -> JobClient:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.transport.stop()

    def connect(self) -> None:
        """Connect within the connect timeout, or raise TransportError at the first failed attempt
        (nothing listens on the port, a refused login, TLS): a person is waiting, and the transport
        would only retry the same thing."""
        s = self.transport.settings
        quiet = _DropThread(f"mqtt-{self.transport.client_id}")  # its "retrying in ..." would contradict us
        _transport_log.addFilter(quiet)
        try:
            self.transport.start()
            self._settled.wait(self._connect_timeout)
        finally:
            _transport_log.removeFilter(quiet)
        if self.transport.connected:
            return
        self.transport.stop()
        err = self._connect_error
        if err is None:
            within = f"within {self._connect_timeout:g} s"
            raise TransportError(
                f"could not connect to the broker at {s.host}:{s.port} {within}", code="mqtt_unreachable"
            )
        detail = str(err).removeprefix(f"cannot connect to MQTT {s.host}:{s.port}: ")
        raise TransportError(f"could not connect to the broker at {s.host}:{s.port}: {detail}", code=err.code)

    def _on_error(self, err: TransportError) -> None:
        if not self._settled.is_set():
            self._connect_error = err
            self._settled.set()

    def _route(self, msg: InboundMessage) -> None:
        if msg.topic == self.topics.device_status:
            self.device_status = _json_object(msg.payload)
        elif msg.topic == self.topics.shadow:
            self.shadow = _json_object(msg.payload)
        else:
            self._inbox.put(msg)

    def submit(self, request: dict[str, Any], *, job_id: str | None = None, topic: str | None = None) -> str:
        """Publish a job (QoS 1) and wait for the broker's PUBACK. Returns the job id."""
        job_id = job_id or uuid.uuid4().hex
        payload = json.dumps({"job_id": job_id, "kind": "generate", **request}).encode()
        self._sent[job_id] = (topic or self.topics.submit, payload)
        self.publish_raw(topic or self.topics.submit, payload)
        return job_id

    def resend(self, job_id: str) -> bool:
        """Publish a submitted job again, same id and payload (safe: a device never runs an id twice, and
        answers a duplicate with its current status). False when it could not be sent now (not connected,
        or no PUBACK within the connect timeout): try again later."""
        topic, payload = self._sent[job_id]
        if not self.transport.publish(topic, payload, qos=1).wait(self._connect_timeout):
            return False
        self.resends[job_id] = self.resends.get(job_id, 0) + 1
        return True

    def publish_raw(self, topic: str, payload: bytes, qos: int = 1) -> None:
        """Publish and wait for the PUBACK. A connection lost before it (a broker node going down can drop
        its clients: ejabberd 23.01 does when a cluster peer dies) is waited out and the message sent again,
        within the connect timeout; only an acknowledged message counts as taken by the broker."""
        deadline = time.monotonic() + self._connect_timeout
        while True:
            handle = self.transport.publish(topic, payload, qos=qos)
            if handle.wait(max(0.0, deadline - time.monotonic())):
                return
            left = deadline - time.monotonic()
            if left <= 0 or (handle.done and self.transport.connected):  # timed out, or refused (an ACL)
                why = f": {handle.error}" if handle.error else ""
                raise TransportError(f"the broker did not acknowledge the publish to {topic}{why}")
            self.transport.wait_connected(left)

    def cancel(self, job_id: str) -> None:
        self.publish_raw(self.topics.cancel(job_id), b"")

    def messages(self, timeout: float) -> InboundMessage | None:
        try:
            return self._inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    def follow(
        self,
        job_id: str,
        *,
        timeout: float,
        on_status: Callable[[dict[str, Any]], None] | None = None,
        on_piece: Callable[[dict[str, Any]], None] | None = None,
        resend_after_s: float | None = None,
        on_resend: Callable[[float], None] | None = None,
    ) -> dict[str, Any] | None:
        """Print-free follower: calls back on statuses and stream pieces; returns the result, or None at timeout.

        ``resend_after_s``: when nothing about the job (no status, piece or result) arrived that long after it
        was sent, send it again with the same id (``resend``), then after twice as long, and so on, until the
        device answers: a job lost with a broker's session (a broker restart, a cluster node that died, a
        session that expired) still runs. ``on_resend(waited_s)`` is told each time. Only for jobs this client
        submitted."""
        start = time.monotonic()
        end = start + timeout
        want = {self.topics.status(job_id), self.topics.result(job_id), self.topics.stream(job_id)}
        heard = False
        interval = resend_after_s
        next_resend = start + interval if interval and job_id in self._sent else None
        while (left := end - time.monotonic()) > 0:
            if next_resend is not None and not heard:
                now = time.monotonic()
                if now >= next_resend:
                    assert interval is not None
                    if self.resend(job_id):
                        interval *= 2
                        if on_resend is not None:
                            on_resend(now - start)
                    next_resend = time.monotonic() + (interval or 1.0)
                left = min(left, max(0.0, next_resend - time.monotonic()))
            msg = self.messages(left)
            if msg is None or msg.topic not in want:
                continue
            heard = True
            data: dict[str, Any] = json.loads(msg.payload)
            if msg.topic.endswith("/result"):
                return data
            if msg.topic.endswith("/status") and on_status:
                on_status(data)
            elif msg.topic.endswith("/stream") and on_piece:
                on_piece(data)
        return None

    def obstacle(self) -> str | None:
        """Why the device will not run a job now, as far as its retained status and shadow say (see
        ``device_obstacle``); None when it is online and taking jobs, or when it says nothing wrong."""
        return device_obstacle(self.topics, device_status=self.device_status, shadow=self.shadow)

    def silence_reason(self, last_status: dict[str, Any] | None = None) -> str:
        """What is known about a device that gave no result (see ``silence_reason``)."""
        return silence_reason(
            self.topics,
            device_status=self.device_status,
            shadow=self.shadow,
            last_status=last_status,
            broker_error=None if self.transport.connected else (self.transport.last_error or "the connection is down"),
        )


def device_obstacle(
    topics: Topics, *, device_status: dict[str, Any] | None, shadow: dict[str, Any] | None
) -> str | None:
    """Why a device will not run a job now, from its retained status ({root}/status) and its shadow's
    reported intake.paused; None when neither says anything is in the way. Pure."""
    device = topics.device_id
    if device_status is None:
        return (
            f"no device '{device}' has ever connected to this broker (no retained status on "
            f"{topics.device_status}): nothing takes the job; check --device (or device.id) and "
            "mqtt.prefix"
        )
    state, since = device_status.get("state"), device_status.get("ts", "?")
    if state == "offline":
        return (
            f"device '{device}' is offline (its retained status says so since {since}): the broker keeps the job "
            "in the device's session, and it runs when the device reconnects (unless that session "
            "expired)"
        )
    if state == "stopping":
        return (
            f"device '{device}' stopped (its retained status says 'stopping' since {since}): the broker keeps the "
            "job in the device's session until it starts again"
        )
    if device_status.get("store") == "unwritable":
        return (
            f"device '{device}' is online but its job store is unwritable (a full or read-only disk): it takes no "
            "new jobs until the store recovers; the broker keeps them"
        )
    reported = ((shadow or {}).get("state") or {}).get("reported") or {}
    if (reported.get("intake") or {}).get("paused") is True:
        return (
            f"device '{device}' has paused its intake (its shadow reports intake.paused = true): the job waits in "
            f"its queue until `edge-agent shadow set intake.paused=false --device {device}`"
        )
    return None


def silence_reason(
    topics: Topics,
    *,
    device_status: dict[str, Any] | None,
    shadow: dict[str, Any] | None,
    last_status: dict[str, Any] | None = None,
    broker_error: object | None = None,
) -> str:
    """Why a job's result may not have come, from what the broker told this client: the connection,
    the device's status and shadow (``device_obstacle``) and the job's last status. Pure: one sentence."""
    device = topics.device_id
    if broker_error is not None:
        return (
            f"the connection to the broker was lost ({broker_error}): a result published meanwhile did not "
            f"reach this client; the device keeps it (`edge-agent jobs show JOB_ID` on the device)"
        )
    if (why := device_obstacle(topics, device_status=device_status, shadow=shadow)) is not None:
        return why
    if last_status is not None:
        waiting = f", waiting for {last_status['waiting_for']}" if last_status.get("waiting_for") else ""
        return (
            f"device '{device}' is online; the job's last status was {last_status.get('status')}{waiting}: it "
            "goes on there; wait longer (--wait-timeout) or look with `edge-agent jobs show JOB_ID` on the "
            "device"
        )
    return (
        f"device '{device}' is online but sent no status for the job: it may not have received it (a "
        "device that was restarted with a new session, or a job id it refused to read)"
    )


def _json_object(payload: bytes) -> dict[str, Any] | None:
    """A retained JSON object, or None for an empty (cleared) or unreadable one."""
    try:
        data = json.loads(payload) if payload else None
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


class _DropThread(logging.Filter):
    """Drops the records one thread logs (a client's network thread while it connects)."""

    def __init__(self, thread_name: str) -> None:
        super().__init__()
        self._thread_name = thread_name

    def filter(self, record: logging.LogRecord) -> bool:
        return record.threadName != self._thread_name
