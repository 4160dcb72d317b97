"""The discovery messages: which entities the board shows in Home Assistant, and how.

Home Assistant's MQTT discovery (its docs, "MQTT Discovery"): a retained JSON config per entity on
``<discovery_prefix>/<component>/<node_id>/<object_id>/config``; an empty retained payload removes it.
The entities, all on one device (``edge-agent <device id>``):

- sensors, from ``{root}/telemetry``: memory available, the agent's RssAnon, PSI some and full
  (avg10), the last job's tokens/s, queue depth, running jobs, and the memory governor's level;
- a ``select`` of the models in ``device.models_dir`` (its options follow the folder: see
  agent.ha.publisher), which writes the device shadow
  (``{root}/shadow/update``, ``{"state": {"desired": {"model": {"path": ...}}}}``) and shows the model in
  force from the shadow document (``{root}/shadow``, retained);
- a ``switch`` for ``intake.paused``, through the shadow in the same way;
- a connectivity ``binary_sensor`` "Online" from the retained device status, which expires (becomes
  unavailable) when the status is not renewed within its expiry (3 x mqtt.heartbeat_s): a broker node
  that dies sends no last will, so its retained "online" would otherwise stand forever.

Every other entity is available while the retained device status (``{root}/status``, whose last will is
"offline") says online. Sensors also expire after three telemetry periods without a reading.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import __version__
from agent.config import Settings
from agent.mqtt.topics import Topics

CLIENT_TOKEN = "homeassistant"
_SAFE = re.compile(r"[^A-Za-z0-9_-]")


@dataclass(frozen=True)
class Sensor:
    object_id: str
    name: str
    field: str  # in the telemetry payload (agent/telemetry fields)
    unit: str | None = None
    device_class: str | None = None
    mib: bool = False  # bytes shown as MiB
    options: tuple[str, ...] = ()  # device_class enum
    icon: str | None = None
    precision: int | None = None


SENSORS: tuple[Sensor, ...] = (
    Sensor("mem_available", "Memory available", "mem_available_bytes", "MiB", "data_size", mib=True, precision=0),
    Sensor("rss_anon", "Agent RssAnon", "rss_anon_bytes", "MiB", "data_size", mib=True, precision=0),
    Sensor("psi_some", "Memory pressure some (10 s)", "psi_some_avg10", "%", icon="mdi:gauge", precision=1),
    Sensor("psi_full", "Memory pressure full (10 s)", "psi_full_avg10", "%", icon="mdi:gauge-full", precision=1),
    Sensor("tokens_per_s", "Tokens per second", "last_job_tokens_per_s", "tok/s", icon="mdi:speedometer", precision=1),
    Sensor("queue_depth", "Queue depth", "queue_depth", "jobs", icon="mdi:tray-full"),
    Sensor("jobs_running", "Running jobs", "jobs_running", "jobs", icon="mdi:cog-play"),
    Sensor("memory_level", "Memory level", "governor_level", device_class="enum", options=("ok", "warn", "critical"),
           icon="mdi:memory"),
)  # fmt: skip


def node_id(settings: Settings) -> str:
    return "edge_agent_" + _SAFE.sub("_", settings.device.id)


def _topic(settings: Settings, component: str, object_id: str) -> str:
    return f"{settings.homeassistant.discovery_prefix}/{component}/{node_id(settings)}/{object_id}/config"


def _device(settings: Settings) -> dict[str, Any]:
    ha = settings.homeassistant
    return {
        "identifiers": [f"edge-agent-{settings.device.id}"],
        "name": ha.name or f"edge-agent {settings.device.id}",
        "manufacturer": "edge-agent",
        "model": settings.device.board,
        "sw_version": __version__,
    }


def _availability(topics: Topics) -> list[dict[str, Any]]:
    # The device status is JSON ({"state": "online" | "stopping" | "offline", ...}); stopping counts as
    # unavailable: the board takes no new jobs then.
    return [
        {
            "topic": topics.device_status,
            "value_template": "{{ 'online' if value_json.state == 'online' else 'offline' }}",
            "payload_available": "online",
            "payload_not_available": "offline",
        }
    ]


def _value_template(s: Sensor) -> str:
    v = f"value_json.{s.field}"
    if s.mib:
        expr = f"({v} / 1048576) | round(1)"
    elif s.precision is not None:
        expr = f"{v} | round({s.precision})"
    else:
        expr = v
    # A reading the board cannot give is null: "None" makes Home Assistant show the sensor as unknown.
    return f"{{{{ {expr} if {v} is not none else 'None' }}}}"


def _shadow_topics(topics: Topics) -> tuple[str, str]:
    """(update, document) topics of the device shadow. Topics defines them where the shadow is built
    (agent/shadow); the same names are spelled here for a tree without it."""
    return (
        getattr(topics, "shadow_update", f"{topics.root}/shadow/update"),
        getattr(topics, "shadow", f"{topics.root}/shadow"),
    )


def list_models(models_dir: Path) -> list[str]:
    """GGUF files in the models folder, relative to it (what model.path takes), sorted."""
    models_dir = Path(models_dir)
    if not models_dir.is_dir():
        return []
    return sorted(
        p.relative_to(models_dir).as_posix()
        for p in models_dir.rglob("*.gguf")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(models_dir).parts)
    )


def select_options(settings: Settings, models: Iterable[str]) -> list[str]:
    """The model select's options: the models folder's files, and the model in force."""
    options = list(models)
    current = str(settings.model.path)
    if current not in options and not Path(current).is_absolute():
        options.append(current)  # the model in force, even if the folder cannot be listed from here
    return options


def _shadow_update(desired: dict[str, Any]) -> str:
    return json.dumps({"state": {"desired": desired}, "client_token": CLIENT_TOKEN}, separators=(",", ":"))


def _entities(settings: Settings, models: Iterable[str]) -> list[tuple[str, dict[str, Any]]]:
    topics = Topics(settings.mqtt.prefix, settings.device.id)
    base = {"availability": _availability(topics), "device": _device(settings),
            "origin": {"name": "edge-agent", "sw_version": __version__}}  # fmt: skip
    uid = f"edge_agent_{_SAFE.sub('_', settings.device.id)}"
    out: list[tuple[str, dict[str, Any]]] = []
    expire = int(3 * settings.telemetry.interval_s) + 5
    for s in SENSORS:
        cfg: dict[str, Any] = {
            "name": s.name,
            "unique_id": f"{uid}_{s.object_id}",
            "state_topic": f"{topics.root}/telemetry",
            "value_template": _value_template(s),
            "expire_after": expire,
            **base,
        }
        if s.device_class:
            cfg["device_class"] = s.device_class
        if s.device_class == "enum":
            cfg["options"] = list(s.options)
        else:
            cfg["state_class"] = "measurement"
            cfg["unit_of_measurement"] = s.unit
        if s.icon:
            cfg["icon"] = s.icon
        out.append((_topic(settings, "sensor", s.object_id), cfg))

    out.append(
        (
            _topic(settings, "binary_sensor", "online"),
            {
                "name": "Online",
                "unique_id": f"{uid}_online",
                "state_topic": topics.device_status,
                "value_template": "{{ 'ON' if value_json.state == 'online' else 'OFF' }}",
                "payload_on": "ON",
                "payload_off": "OFF",
                "device_class": "connectivity",
                # The board renews its status every heartbeat_s; the status itself expires after 3 of them.
                "expire_after": 3 * settings.mqtt.heartbeat_s,
                "device": base["device"],
                "origin": base["origin"],
            },
        )
    )

    shadow_update, shadow_doc = _shadow_topics(topics)
    models_dir = str(Path(settings.device.models_dir)).rstrip("/") + "/"
    options = select_options(settings, models)
    out.append(
        (
            _topic(settings, "select", "model"),
            {
                "name": "Model",
                "unique_id": f"{uid}_model",
                "command_topic": shadow_update,
                "command_template": _shadow_update({"model": {"path": "__VALUE__"}}).replace(
                    '"__VALUE__"', "{{ value | tojson }}"
                ),
                "options": options,
                "state_topic": shadow_doc,
                "value_template": "{{ value_json.state.reported.model.path | replace('" + models_dir + "', '') }}",
                "qos": 1,
                "icon": "mdi:brain",
                **base,
            },
        )
    )
    out.append(
        (
            _topic(settings, "switch", "intake_paused"),
            {
                "name": "Intake paused",
                "unique_id": f"{uid}_intake_paused",
                "command_topic": shadow_update,
                "payload_on": _shadow_update({"intake": {"paused": True}}),
                "payload_off": _shadow_update({"intake": {"paused": False}}),
                "state_topic": shadow_doc,
                "value_template": "{{ 'ON' if value_json.state.reported.intake.paused else 'OFF' }}",
                "state_on": "ON",
                "state_off": "OFF",
                "qos": 1,
                "icon": "mdi:pause-circle-outline",
                **base,
            },
        )
    )
    return out


def discovery_messages(settings: Settings, models: Iterable[str]) -> list[tuple[str, bytes]]:
    """(topic, retained payload) for every entity; ``models``: the select's options (``list_models``)."""
    return [(t, json.dumps(cfg, separators=(",", ":")).encode()) for t, cfg in _entities(settings, models)]


def model_select_message(settings: Settings, models: Iterable[str]) -> tuple[str, bytes]:
    """(topic, retained payload) of the model select alone: republished when its options change."""
    topic = _topic(settings, "select", "model")
    return next((t, p) for t, p in discovery_messages(settings, models) if t == topic)


def removal_messages(settings: Settings, models: Iterable[str] = ()) -> list[tuple[str, bytes]]:
    """An empty retained payload on every entity's config topic: Home Assistant removes the entities and
    the broker drops the retained configs."""
    return [(t, b"") for t, _ in _entities(settings, models)]
