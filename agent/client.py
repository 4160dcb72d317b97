"""A small job client: publish a job to a device and follow its statuses, stream and result.

Used by `edge-agent submit`, `edge-agent jobs cancel`, the tests and the benchmarks. It speaks only
through agent.transport, like the daemon.
"""

from __future__ import annotations

import json
import queue
import time
import uuid
from typing import Any, Callable

from agent.config import Settings
from agent.errors import TransportError
from agent.protocol import Topics
from agent.transport import InboundMessage, MqttTransport


class JobClient:
    def __init__(self, settings: Settings, *, device_id: str, connect_timeout: float = 10.0) -> None:
        self.topics = Topics(settings.mqtt.prefix, device_id)
        # A throw-away session: a client that leaves should not make the broker queue for it.
        mqtt = settings.mqtt.model_copy(
            update={"client_id": f"edge-cli-{uuid.uuid4().hex[:12]}", "session_expiry_s": 0}
        )
        self._inbox: queue.Queue[InboundMessage] = queue.Queue()
        self.transport = MqttTransport(
            mqtt,
            will=None,
            on_message=self._inbox.put,
            subscriptions=[
                (self.topics.status_filter, 1),
                (self.topics.result_filter, 1),
                (self.topics.stream_filter, 0),
            ],
            manual_ack=False,
        )
        self._connect_timeout = connect_timeout

    def __enter__(self) -> "JobClient":
        self.transport.connect_or_raise(self._connect_timeout)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.transport.stop()

    def submit(self, request: dict[str, Any], *, job_id: str | None = None, topic: str | None = None) -> str:
        """Publish a job (QoS 1) and wait for the broker's PUBACK. Returns the job id."""
        job_id = job_id or uuid.uuid4().hex
        payload = json.dumps({"job_id": job_id, "kind": "generate", **request}).encode()
        self.publish_raw(topic or self.topics.submit, payload)
        return job_id

    def publish_raw(self, topic: str, payload: bytes, qos: int = 1) -> None:
        if not self.transport.publish(topic, payload, qos=qos).wait(self._connect_timeout):
            raise TransportError(f"the broker did not acknowledge the publish to {topic}")

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
        on_status: Callable[[dict], None] | None = None,
        on_piece: Callable[[dict], None] | None = None,
    ) -> dict | None:
        """Print-free follower: calls back on statuses and stream pieces; returns the result, or None at timeout."""
        end = time.monotonic() + timeout
        want = {self.topics.status(job_id), self.topics.result(job_id), self.topics.stream(job_id)}
        while (left := end - time.monotonic()) > 0:
            msg = self.messages(left)
            if msg is None or msg.topic not in want:
                continue
            data = json.loads(msg.payload)
            if msg.topic.endswith("/result"):
                return data
            if msg.topic.endswith("/status") and on_status:
                on_status(data)
            elif msg.topic.endswith("/stream") and on_piece:
                on_piece(data)
        return None
