"""An operator's client for a board's shadow: get the document, send an update, wait until applied.

Used by `edge-agent shadow get|set` and the tests. It speaks only through agent.mqtt.transport, like the
job client (agent/operator/jobs.py), with a throw-away session. Requests carry a fresh client_token, and
replies are matched by it, so several operators can work on one board at once.
"""

from __future__ import annotations

import json
import queue
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from agent.config import Settings
from agent.errors import EdgeAgentError, TransportError
from agent.jobs.protocol import status_state
from agent.mqtt.topics import Topics
from agent.mqtt.transport import InboundMessage, MqttTransport


class ShadowClientError(EdgeAgentError):
    """The board did not answer, or answered something unreadable."""

    code = "shadow_no_answer"


class ShadowClient:
    def __init__(self, settings: Settings, *, device_id: str, connect_timeout: float = 10.0) -> None:
        self.topics = Topics(settings.mqtt.prefix, device_id)
        mqtt = settings.mqtt.model_copy(
            update={"client_id": f"edge-cli-{uuid.uuid4().hex[:12]}", "session_expiry_s": 0}
        )
        self._inbox: queue.Queue[InboundMessage] = queue.Queue()
        t = self.topics
        self.transport = MqttTransport(
            mqtt,
            will=None,
            on_message=self._inbox.put,
            subscriptions=[
                (t.shadow, 1),
                (t.shadow_update_accepted, 1),
                (t.shadow_update_rejected, 1),
                (t.shadow_get_accepted, 1),
                (t.shadow_get_rejected, 1),
                (t.device_status, 1),
            ],
            manual_ack=False,
        )
        self._connect_timeout = connect_timeout
        self.latest: dict[str, Any] | None = None  # the newest document seen on {root}/shadow
        self.device_state: str | None = None  # from the retained {root}/status: online, offline, stopping, stale

    def __enter__(self) -> ShadowClient:
        self.transport.connect_or_raise(self._connect_timeout)
        return self

    def __exit__(self, *exc: object) -> None:
        self.transport.stop()

    # ------------------------------------------------------------------ requests

    def get(self, timeout: float) -> tuple[dict[str, Any], str]:
        """The document and where it came from: "device" (get/accepted), or "retained" when the board
        is offline or does not answer in time (the last document it published)."""
        token = _token()
        self._publish(self.topics.shadow_get, json.dumps({"client_token": token}).encode())
        for msg, data in self._observed(timeout):
            if data is not None and msg.topic == self.topics.shadow_get_accepted and _has_token(data, token):
                return data, "device"
            if data is not None and msg.topic == self.topics.shadow_get_rejected and _has_token(data, token):
                raise ShadowClientError(f"the device refused the get: {data.get('message')}", code="shadow_rejected")
            if self.device_state in ("offline", "stale") and self.latest is not None:
                return self.latest, "retained"
        if self.latest is not None:
            return self.latest, "retained"
        raise ShadowClientError(
            f"device {self.topics.device_id!r} did not answer within {timeout:g} s and has no retained document "
            f"on {self.topics.shadow} (has it ever run with this mqtt.prefix and broker?)"
        )

    def update(
        self,
        desired: dict[str, Any] | None,
        *,
        version: int | None,
        timeout: float,
        retain: bool = False,
        signature: dict[str, str] | None = None,
    ) -> tuple[str, dict[str, Any] | None]:
        """Send an update; returns ("accepted" | "rejected", reply), or ("sent", None) when the board
        did not answer within ``timeout`` (the broker keeps it for the board's persistent session).
        ``signature``: agent.signing.sign_update of ``desired`` at ``version`` for this device."""
        token = _token()
        body: dict[str, Any] = {"state": {"desired": desired}, "client_token": token}
        if version is not None:
            body["version"] = version
        if signature is not None:
            body["signature"] = signature
        self._publish(self.topics.shadow_update, json.dumps(body).encode(), retain=retain)
        for msg, data in self._observed(timeout):
            if msg.topic == self.topics.shadow_update_accepted and _has_token(data, token):
                return "accepted", data
            if msg.topic == self.topics.shadow_update_rejected and _has_token(data, token):
                return "rejected", data
        return "sent", None

    def wait_applied(
        self, version: int, timeout: float, on_document: Callable[[dict[str, Any]], None] | None = None
    ) -> dict[str, Any] | None:
        """The first document whose reported.applied_version is at least ``version`` (None at timeout)."""
        if self.latest is not None and _applied(self.latest) >= version:
            return self.latest
        for msg, data in self._observed(timeout):
            if msg.topic == self.topics.shadow and data is not None:
                if on_document is not None:
                    on_document(data)
                if _applied(data) >= version:
                    return data
        return None

    # ------------------------------------------------------------------ plumbing

    def _publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        if not self.transport.publish(topic, payload, qos=1, retain=retain).wait(self._connect_timeout):
            raise TransportError(f"the broker did not acknowledge the publish to {topic}")

    def _observed(self, timeout: float) -> Iterator[tuple[InboundMessage, dict[str, Any] | None]]:
        """Each message that arrives within ``timeout`` s, decoded and observed (``_observe``)."""
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            msg = self._next(left)
            if msg is None:
                return
            yield msg, self._observe(msg)

    def _next(self, timeout: float) -> InboundMessage | None:
        try:
            return self._inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    def _observe(self, msg: InboundMessage) -> dict[str, Any] | None:
        """Decode a message and keep track of the newest document and the device's status."""
        try:
            data = json.loads(msg.payload) if msg.payload else None
        except ValueError:
            return None
        if not isinstance(data, dict):
            return None
        if msg.topic == self.topics.shadow:
            if self.latest is None or _newer(data, self.latest):
                self.latest = data
        elif msg.topic == self.topics.device_status:
            self.device_state = status_state(data, time.time())  # "stale": an 'online' past its expiry
        return data


def _token() -> str:
    return f"cli-{uuid.uuid4().hex[:16]}"


def _has_token(data: dict[str, Any] | None, token: str) -> bool:
    return data is not None and data.get("client_token") == token


def _applied(doc: dict[str, Any]) -> int:
    v = doc.get("state", {}).get("reported", {}).get("applied_version")
    return v if isinstance(v, int) else -1


def _newer(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (a.get("version", 0), str(a.get("ts", ""))) >= (b.get("version", 0), str(b.get("ts", "")))


__all__ = ["ShadowClient", "ShadowClientError"]
