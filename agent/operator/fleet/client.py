"""The operator's view of a fleet over MQTT: every device's retained status and shadow document, and
shadow updates with their replies. Used by `edge-agent fleet` (list, rollout).

It speaks only through agent.mqtt.transport, with a throw-away session, and follows
``{prefix}/+/status``, ``{prefix}/+/shadow`` and the update replies of every device. After the
connection, ``sync()`` makes sure every retained message has arrived (a round trip through the
broker after the subscriptions), so a listing is complete. Messages are kept per device; waiters
are woken on every change (``wait_change``), so the rollout loop needs no polling sleeps.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from fnmatch import fnmatchcase
from typing import Any

from agent.config import Settings
from agent.errors import TransportError
from agent.jobs.protocol import status_state
from agent.mqtt.transport import InboundMessage, MqttTransport


@dataclass(frozen=True)
class DeviceInfo:
    """One device as `fleet list` shows it."""

    device: str
    state: str | None  # online | offline | stopping (retained status); None: no status seen
    model: str | None  # the model in force (reported.serving.file)
    sha256: str | None
    agent_version: str | None
    shadow_version: int | None
    applied_version: int | None
    level: str | None  # the memory governor's level (reported.pressure.level) when the device reports one
    groups: tuple[str, ...]
    last_seen: float | None  # epoch seconds: the newest ts of its status or shadow document
    problem: str | None  # an error under model.path, or a model change that is pending
    fleet_jobs: dict[str, Any] | None = None  # its load in mqtt.fleet_group (the status's "fleet"), online only

    def as_dict(self) -> dict[str, Any]:
        return {**vars(self), "groups": list(self.groups)}


class FleetClient:
    def __init__(self, settings: Settings, *, prefix: str | None = None, connect_timeout: float = 10.0) -> None:
        self.prefix = prefix or settings.mqtt.prefix
        mqtt = settings.mqtt.model_copy(
            update={"client_id": f"edge-fleet-{uuid.uuid4().hex[:12]}", "session_expiry_s": 0}
        )
        self._barrier = f"{self.prefix}-cli/{uuid.uuid4().hex}/sync"
        p = self.prefix
        self.transport = MqttTransport(
            mqtt,
            will=None,
            on_message=self._on_message,
            manual_ack=False,
            subscriptions=[
                (f"{p}/+/status", 1),
                (f"{p}/+/shadow", 1),
                (f"{p}/+/shadow/update/accepted", 1),
                (f"{p}/+/shadow/update/rejected", 1),
                (self._barrier, 1),
            ],
        )
        self._connect_timeout = connect_timeout
        self._cond = threading.Condition()
        self._docs: dict[str, dict[str, Any]] = {}
        self._status: dict[str, dict[str, Any]] = {}
        self._replies: dict[str, tuple[str, dict[str, Any]]] = {}
        self._synced: set[str] = set()
        self._changes = 0

    def __enter__(self) -> FleetClient:
        self.transport.start()
        if not self.transport.wait_connected(self._connect_timeout) or not self.transport.wait_subscribed(
            self._connect_timeout
        ):
            self.transport.stop()
            s = self.transport.settings
            raise TransportError(
                f"could not connect to the broker at {s.host}:{s.port} within {self._connect_timeout:g} s"
            )
        return self

    def __exit__(self, *exc: object) -> None:
        self.transport.stop()

    # ------------------------------------------------------------------ reading

    def sync(self, timeout: float = 10.0) -> None:
        """Return once every retained status and document the broker holds has arrived."""
        token = uuid.uuid4().hex
        self._publish(self._barrier, token.encode())
        with self._cond:
            if not self._cond.wait_for(lambda: token in self._synced, timeout):
                raise TransportError(f"the broker did not echo a message within {timeout:g} s")

    def devices(self) -> list[str]:
        with self._cond:
            return sorted(set(self._docs) | set(self._status))

    def doc(self, device: str) -> dict[str, Any] | None:
        with self._cond:
            return self._docs.get(device)

    def info(self, device: str) -> DeviceInfo:
        with self._cond:
            doc, st = self._docs.get(device), self._status.get(device)
        reported = ((doc or {}).get("state") or {}).get("reported") or {}
        serving = reported.get("serving") or {}
        board = reported.get("board") or {}
        errors = reported.get("errors") or {}
        pending = reported.get("pending") or {}
        seen = [t for t in (_ts((st or {}).get("ts")), _ts((doc or {}).get("ts"))) if t is not None]
        return DeviceInfo(
            device=device,
            state=status_state(st, time.time()),  # "stale": an 'online' past its expiry (mqtt.heartbeat_s)
            model=serving.get("file") or (st or {}).get("model"),
            sha256=serving.get("sha256"),
            agent_version=board.get("agent_version") or (st or {}).get("agent_version"),
            shadow_version=(doc or {}).get("version"),
            applied_version=reported.get("applied_version"),
            level=(reported.get("pressure") or {}).get("level"),  # the memory governor's, where it reports one
            groups=tuple((reported.get("fleet") or {}).get("groups") or ()),
            last_seen=max(seen) if seen else None,
            problem=errors.get("model.path") or pending.get("model.path"),
            fleet_jobs=(st or {}).get("fleet") if (st or {}).get("state") == "online" else None,
        )

    def select(self, *, pattern: str | None = None, group: str | None = None) -> list[str]:
        """Devices whose id matches the glob ``pattern`` and/or that are in ``group`` (reported fleet.groups)."""
        out = []
        for d in self.devices():
            if pattern is not None and not fnmatchcase(d, pattern):
                continue
            if group is not None and group not in self.info(d).groups:
                continue
            out.append(d)
        return out

    def wait_change(self, seen: int, timeout: float) -> int:
        """Wait until something arrived after change number ``seen`` (or ``timeout``); returns the count now."""
        with self._cond:
            self._cond.wait_for(lambda: self._changes != seen, timeout)
            return self._changes

    @property
    def changes(self) -> int:
        with self._cond:
            return self._changes

    # ------------------------------------------------------------------ updating

    def send_update(
        self,
        device: str,
        desired: dict[str, Any],
        *,
        token: str,
        version: int | None = None,
        signature: dict[str, str] | None = None,
    ) -> None:
        """Publish a desired-state update (QoS 1: an offline device's persistent session gets it later).
        ``signature``: agent.signing.sign_update of ``desired`` at ``version`` for ``device``."""
        body: dict[str, Any] = {"state": {"desired": desired}, "client_token": token}
        if version is not None:
            body["version"] = version
        if signature is not None:
            body["signature"] = signature
        self._publish(f"{self.prefix}/{device}/shadow/update", json.dumps(body).encode())

    def replies(self, tokens: list[str], timeout: float) -> dict[str, tuple[str, dict[str, Any]]]:
        """The replies ("accepted" | "rejected", payload) to these updates that arrive within
        ``timeout``; a device that does not answer in time (offline) is missing from the result."""
        with self._cond:
            self._cond.wait_for(lambda: all(t in self._replies for t in tokens), timeout)
            return {t: self._replies.pop(t) for t in tokens if t in self._replies}

    # ------------------------------------------------------------------ plumbing

    def _publish(self, topic: str, payload: bytes) -> None:
        if not self.transport.publish(topic, payload, qos=1).wait(self._connect_timeout):
            raise TransportError(f"the broker did not acknowledge the publish to {topic}")

    def _on_message(self, msg: InboundMessage) -> None:
        if msg.topic == self._barrier:
            with self._cond:
                self._synced.add(msg.payload.decode(errors="replace"))
                self._cond.notify_all()
            return
        parts = msg.topic.split("/")
        if len(parts) < 3 or parts[0] != self.prefix:
            return
        device, kind = parts[1], "/".join(parts[2:])
        try:
            data = json.loads(msg.payload) if msg.payload else None
        except ValueError:
            return
        if not isinstance(data, dict):
            return
        with self._cond:
            if kind == "status":
                self._status[device] = data
            elif kind == "shadow":
                old = self._docs.get(device)
                if old is None or (data.get("version", 0), str(data.get("ts", ""))) >= (
                    old.get("version", 0),
                    str(old.get("ts", "")),
                ):
                    self._docs[device] = data
            elif kind in ("shadow/update/accepted", "shadow/update/rejected"):
                token = data.get("client_token")
                if isinstance(token, str):
                    self._replies[token] = (kind.rsplit("/", 1)[1], data)
            self._changes += 1
            self._cond.notify_all()


def _ts(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


__all__ = ["DeviceInfo", "FleetClient"]
