"""What the broker granted in its CONNACK, and what that means for this board (pure).

Owns ``BrokerGrants`` (read from the MQTT 5 CONNACK properties by the transport, with the
protocol's defaults for what the broker leaves out), ``grant_problems`` (the grants judged against
the settings: each problem with its level, what it costs and the fix, for the log, ``doctor`` and
the shadow's reported facts) and ``BrokerReport`` (the reported facts' ``broker`` part).

Absent properties mean (MQTT 5.0, 3.2.2.3): shared subscriptions available, the session expiry the
client asked for, Receive Maximum 65,535, Maximum QoS 2, retain available, no packet size limit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from agent.config.sections import MQTTSettings

SHARE_PREFIX = "$share/"

# Bytes a PUBLISH packet needs besides its topic and payload: fixed header (1 + up to 4 length
# bytes), topic length (2), packet id (2), property length (up to 4) and the properties the agent
# sets (a content type, a message expiry, user properties: generously 200).
PUBLISH_OVERHEAD = 256


@dataclass(frozen=True)
class BrokerGrants:
    """What one CONNACK granted."""

    session_present: bool
    session_expiry_s: int  # granted (what was asked when the broker does not say)
    requested_expiry_s: int
    shared_subscriptions: bool
    receive_maximum: int
    maximum_qos: int
    retain_available: bool
    maximum_packet_size: int | None  # bytes; None: no limit
    server_keepalive_s: int | None
    protocol: Literal["5", "3.1.1"] = "5"

    @classmethod
    def from_connack(cls, props: Mapping[str, Any], *, session_present: bool, requested_expiry_s: int) -> BrokerGrants:
        """``props``: the CONNACK properties by their MQTT 5 names (``SessionExpiryInterval`` ...)."""

        def get(name: str, default: Any) -> Any:
            v = props.get(name)
            return default if v is None else v

        return cls(
            session_present=session_present,
            session_expiry_s=int(get("SessionExpiryInterval", requested_expiry_s)),
            requested_expiry_s=requested_expiry_s,
            shared_subscriptions=bool(get("SharedSubscriptionAvailable", 1)),
            receive_maximum=int(get("ReceiveMaximum", 65535)),
            maximum_qos=int(get("MaximumQoS", 2)),
            retain_available=bool(get("RetainAvailable", 1)),
            maximum_packet_size=int(props["MaximumPacketSize"]) if props.get("MaximumPacketSize") else None,
            server_keepalive_s=int(props["ServerKeepAlive"]) if props.get("ServerKeepAlive") is not None else None,
        )

    def max_payload_bytes(self, topic: str) -> int | None:
        """The largest payload the broker takes on ``topic``; None: no limit."""
        if self.maximum_packet_size is None:
            return None
        return max(0, self.maximum_packet_size - len(topic.encode()) - PUBLISH_OVERHEAD)


@dataclass(frozen=True)
class GrantProblem:
    """One thing the broker granted that this board's settings did not count on."""

    code: str  # stable: shared_subscriptions_unavailable, session_expiry_shortened, ...
    level: Literal["error", "warning"]
    message: str  # what was granted and what it costs, in words
    fix: str


def _duration(s: int) -> str:
    if s % 86400 == 0 and s >= 86400:
        return f"{s // 86400} d"
    if s % 3600 == 0 and s >= 3600:
        return f"{s // 3600} h"
    if s % 60 == 0 and s >= 60:
        return f"{s // 60} min"
    return f"{s} s"


def grant_problems(grants: BrokerGrants, settings: MQTTSettings) -> list[GrantProblem]:
    """The grants judged against the settings, worst first."""
    out: list[GrantProblem] = []
    if settings.fleet_group and not grants.shared_subscriptions:
        out.append(
            GrantProblem(
                "shared_subscriptions_unavailable",
                "error",
                f"the broker does not offer shared subscriptions (CONNACK SharedSubscriptionAvailable 0): this board "
                f"takes no fleet jobs of mqtt.fleet_group {settings.fleet_group!r}; it still takes jobs sent to its "
                "own topic",
                "use a broker with MQTT 5 shared subscriptions (Mosquitto >= 2.0, EMQX, HiveMQ, VerneMQ), or unset "
                "mqtt.fleet_group and send each job to one board's own topic",
            )
        )
    if grants.session_expiry_s < settings.session_expiry_s:
        kept = _duration(grants.session_expiry_s)
        out.append(
            GrantProblem(
                "session_expiry_shortened",
                "warning",
                f"the broker keeps this board's session {kept} after it goes offline, not the "
                f"{_duration(settings.session_expiry_s)} of mqtt.session_expiry_s (CONNACK SessionExpiryInterval "
                f"{grants.session_expiry_s}): jobs sent while the board is offline for longer than {kept} are lost",
                "raise the broker's session expiry limit (ejabberd: mod_mqtt session_expiry; Mosquitto: "
                "persistent_client_expiration), or have submitters resend jobs that get no QUEUED (edge-agent "
                "submit --wait does)",
            )
        )
    if grants.maximum_qos < 1:
        out.append(
            GrantProblem(
                "qos1_unavailable",
                "error",
                f"the broker grants QoS {grants.maximum_qos} at most (CONNACK MaximumQoS): jobs and results are "
                "sent at QoS 1, so the broker may refuse them and nothing is acknowledged",
                "allow QoS 1 on the broker (Mosquitto: max_qos 1 or 2)",
            )
        )
    if not grants.retain_available:
        out.append(
            GrantProblem(
                "retain_unavailable",
                "warning",
                "the broker does not keep retained messages (CONNACK RetainAvailable 0): the board's status, its "
                "shadow document and the Home Assistant discovery are not there for a client that subscribes later",
                "allow retained messages on the broker (Mosquitto: retain_available true)",
            )
        )
    if grants.maximum_packet_size is not None and grants.maximum_packet_size < 65536:
        out.append(
            GrantProblem(
                "packet_size_limited",
                "warning",
                f"the broker takes packets of {grants.maximum_packet_size} bytes at most (CONNACK "
                "MaximumPacketSize): a job whose result is larger fails with result_too_large",
                "raise the broker's packet size limit (Mosquitto: max_packet_size), or ask for fewer max_tokens",
            )
        )
    return out


class BrokerProblemReport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    code: str = Field(
        description="shared_subscriptions_unavailable, session_expiry_shortened, session_lost, qos1_unavailable, "
        "retain_unavailable, packet_size_limited."
    )
    level: Literal["error", "warning"] = Field(description="error: the board misses work it was set up for.")
    message: str = Field(description="What the broker granted and what it costs.")
    fix: str = Field(description="What to change.")


class BrokerReport(BaseModel):
    """What the broker granted on the latest connection: reported under ``broker`` in the shadow."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field(description="The broker this board is connected to, host:port.")
    session_present: bool = Field(description="The broker resumed the board's session on the latest connect.")
    session_expiry_s: int = Field(ge=0, description="Session expiry granted, seconds (CONNACK SessionExpiryInterval).")
    shared_subscriptions: bool = Field(description="Shared subscriptions available (fleet jobs).")
    receive_maximum: int = Field(ge=1, description="QoS 1 messages the broker takes unacknowledged from the board.")
    maximum_qos: int = Field(ge=0, le=2, description="Highest QoS the broker takes.")
    retain_available: bool = Field(description="The broker keeps retained messages.")
    maximum_packet_size: int | None = Field(description="Largest packet the broker takes, bytes; null: no limit.")
    problems: list[BrokerProblemReport] = Field(description="What the grants cost this board, with the fix.")


def broker_report(grants: BrokerGrants, settings: MQTTSettings, host: str, extra: list[GrantProblem]) -> BrokerReport:
    """The report carries each grant it has a field for, under the grant's own name."""
    granted = {f.name: getattr(grants, f.name) for f in fields(grants) if f.name in BrokerReport.model_fields}
    return BrokerReport(
        host=host,
        **granted,
        problems=[
            BrokerProblemReport(code=p.code, level=p.level, message=p.message, fix=p.fix)
            for p in [*grant_problems(grants, settings), *extra]
        ],
    )


__all__ = [
    "PUBLISH_OVERHEAD",
    "SHARE_PREFIX",
    "BrokerGrants",
    "BrokerProblemReport",
    "BrokerReport",
    "GrantProblem",
    "broker_report",
    "grant_problems",
]
