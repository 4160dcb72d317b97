"""Home Assistant MQTT discovery: the messages checked against the published discovery schema, their
templates rendered with Jinja (as Home Assistant renders them), and the publisher on a real broker:
retained configs any subscriber sees, removed cleanly (empty retained payloads) once turned off.

The schema rules are Home Assistant's own (homeassistant/components/mqtt): the discovery topic
pattern (discovery.py TOPIC_MATCHER), required keys per component (config.py MQTT_RO_SCHEMA: sensor
``state_topic``; MQTT_RW_SCHEMA: ``command_topic`` for select and switch; select.py: ``options``),
a device needs ``identifiers`` or ``connections`` and entities with a device a ``unique_id``
(schemas.py), ``availability`` entries need a ``topic``, and an enum sensor takes ``options`` but no
state class or unit.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from typing import Any

import jinja2
import pytest

from agent.config import Settings
from agent.ha import DiscoveryPublisher, discovery_messages, list_models, removal_messages
from agent.ha.discovery import SENSORS
from agent.mqtt.topics import Topics
from agent.mqtt.transport import MqttTransport
from tests.broker import BrokerClient, MosquittoBroker

TOPIC_MATCHER = re.compile(r"(?P<component>\w+)/(?:(?P<node_id>[a-zA-Z0-9_-]+)/)?(?P<object_id>[a-zA-Z0-9_-]+)/config")
REQUIRED = {
    "sensor": ("state_topic",), "binary_sensor": ("state_topic",), "select": ("command_topic", "options"),
    "switch": ("command_topic",),
}  # fmt: skip
ENV = jinja2.Environment()


def settings(tmp_path: Path, **ha: Any) -> Settings:
    return Settings.model_validate({
        "device": {"id": "pi-kitchen", "board": "pi-4-2gb", "state_dir": str(tmp_path / "state"),
                   "models_dir": str(tmp_path / "models")},
        "mqtt": {"prefix": "edge"},
        "model": {"path": "qwen.gguf"},
        "homeassistant": {"enabled": True, **ha},
    })  # fmt: skip


def check_discovery(topic: str, payload: bytes, prefix: str = "homeassistant") -> dict[str, Any]:
    """One message against Home Assistant's discovery rules; returns the config."""
    assert topic.startswith(prefix + "/")
    m = TOPIC_MATCHER.fullmatch(topic[len(prefix) + 1 :])
    assert m, f"not a discovery topic Home Assistant accepts: {topic}"
    cfg = json.loads(payload)
    assert isinstance(cfg, dict)
    for key in REQUIRED[m["component"]]:
        assert cfg.get(key), f"{topic}: {key} is required"
    dev = cfg["device"]
    assert dev.get("identifiers") or dev.get("connections")
    assert cfg.get("unique_id")
    assert cfg["origin"]["name"]
    for a in cfg.get("availability", []):
        assert a["topic"] and "+" not in a["topic"] and "#" not in a["topic"]
    if "command_topic" in cfg:
        assert "+" not in cfg["command_topic"] and "#" not in cfg["command_topic"]
    if m["component"] == "select":
        assert all(isinstance(o, str) for o in cfg["options"])
    if cfg.get("device_class") == "enum":
        assert cfg["options"] and "state_class" not in cfg and "unit_of_measurement" not in cfg
    elif m["component"] == "sensor":
        assert cfg["state_class"] == "measurement" and cfg["unit_of_measurement"]
    for key in ("value_template", "command_template"):
        if key in cfg:
            ENV.from_string(cfg[key])  # valid Jinja
    return cfg


def _render(template: str, value_json: Any = None, value: Any = None) -> str:
    return ENV.from_string(template).render(value_json=value_json, value=value)


# ------------------------------------------------------------------------------------ the messages


def test_every_message_follows_the_discovery_schema(tmp_path: Path):
    s = settings(tmp_path)
    msgs = discovery_messages(s, ["qwen.gguf", "sub/tinyllama.gguf"])
    cfgs = [check_discovery(t, p) for t, p in msgs]
    comps = [TOPIC_MATCHER.fullmatch(t.split("/", 1)[1])["component"] for t, _ in msgs]
    assert comps.count("sensor") == len(SENSORS) == 8 and comps.count("select") == 1 and comps.count("switch") == 1
    assert comps.count("binary_sensor") == 1
    assert len({c["unique_id"] for c in cfgs}) == len(cfgs)
    assert all(t.startswith("homeassistant/") and "/edge_agent_pi-kitchen/" in t for t, _ in msgs)
    topics = Topics("edge", "pi-kitchen")
    assert all(c["availability"][0]["topic"] == topics.device_status for c in cfgs if "availability" in c)
    names = {c["name"] for c in cfgs}
    for wanted in ("Memory available", "Agent RssAnon", "Memory pressure some (10 s)", "Tokens per second",
                   "Queue depth", "Running jobs", "Memory level", "Model", "Intake paused"):  # fmt: skip
        assert wanted in names


def test_prefix_and_name_are_configurable(tmp_path: Path):
    msgs = discovery_messages(settings(tmp_path, discovery_prefix="ha/disc", name="Kitchen LLM"), ["qwen.gguf"])
    cfgs = [check_discovery(t, p, prefix="ha/disc") for t, p in msgs]
    assert {c["device"]["name"] for c in cfgs} == {"Kitchen LLM"}


def test_sensor_templates_read_the_telemetry_payload(tmp_path: Path):
    msgs = dict(discovery_messages(settings(tmp_path), []))
    sensors = {t.split("/")[-2]: json.loads(p) for t, p in msgs.items() if "/sensor/" in t}
    reading = {"mem_available_bytes": 1536 * 2**20, "rss_anon_bytes": 85 * 2**20 + 300_000, "psi_some_avg10": 1.234,
               "psi_full_avg10": None, "last_job_tokens_per_s": 38.57, "queue_depth": 3, "jobs_running": 1,
               "governor_level": "warn"}  # fmt: skip
    got = {k: _render(c["value_template"], reading) for k, c in sensors.items()}
    assert got == {"mem_available": "1536.0", "rss_anon": "85.3", "psi_some": "1.2", "psi_full": "None",
                   "tokens_per_s": "38.6", "queue_depth": "3", "jobs_running": "1", "memory_level": "warn"}  # fmt: skip
    assert sensors["memory_level"]["options"] == ["ok", "warn", "critical"]
    # the telemetry fields exist (agent/telemetry declares them once)
    from agent import telemetry

    declared = set(telemetry.Telemetry.model_fields)
    missing = {s.field for s in SENSORS} - declared
    if hasattr(telemetry, "Sampler"):  # the telemetry package of the memory issue
        assert not missing
    else:  # before it is merged: only its new fields are absent
        assert missing <= {"last_job_tokens_per_s", "jobs_running", "governor_level", "psi_full_avg10"} - declared


def test_the_online_sensor_expires_when_the_status_is_not_renewed(tmp_path: Path):
    """A broker node that dies sends no will: its retained 'online' stays. The status is renewed every
    mqtt.heartbeat_s and the sensor expires after 3 of them (Home Assistant's expire_after)."""
    s = settings(tmp_path)
    cfgs = {t: json.loads(p) for t, p in discovery_messages(s, [])}
    online = cfgs["homeassistant/binary_sensor/edge_agent_pi-kitchen/online/config"]
    assert online["state_topic"] == "edge/pi-kitchen/status" and online["device_class"] == "connectivity"
    assert online["expire_after"] == 3 * s.mqtt.heartbeat_s == 180
    for state, expect in (("online", "ON"), ("stopping", "OFF"), ("offline", "OFF")):
        assert _render(online["value_template"], {"state": state}) == expect
    assert "availability" not in online  # offline is OFF, not unavailable; unavailable means stale


def test_availability_follows_the_device_status(tmp_path: Path):
    cfg = json.loads(discovery_messages(settings(tmp_path), [])[0][1])
    a = cfg["availability"][0]
    for state, expect in (("online", "online"), ("stopping", "offline"), ("offline", "offline")):
        assert _render(a["value_template"], {"state": state}) == expect
    assert (a["payload_available"], a["payload_not_available"]) == ("online", "offline")


def test_select_and_switch_write_the_shadow(tmp_path: Path):
    s = settings(tmp_path)
    msgs = {t.split("/")[1]: json.loads(p) for t, p in discovery_messages(s, ["qwen.gguf", 'odd "name".gguf'])
            if t.split("/")[1] in ("select", "switch")}  # fmt: skip
    sel, sw = msgs["select"], msgs["switch"]
    assert sel["command_topic"] == "edge/pi-kitchen/shadow/update" and sel["state_topic"] == "edge/pi-kitchen/shadow"
    for option in sel["options"]:
        update = json.loads(_render(sel["command_template"], value=option))
        assert update == {"state": {"desired": {"model": {"path": option}}}, "client_token": "homeassistant"}
    doc = {"version": 3, "state": {"reported": {"model": {"path": "qwen.gguf"}, "intake": {"paused": True}}}}
    assert _render(sel["value_template"], doc) == "qwen.gguf"
    absolute = {"state": {"reported": {"model": {"path": str(tmp_path / "models" / "qwen.gguf")}}}}
    assert _render(sel["value_template"], absolute) == "qwen.gguf"
    assert json.loads(sw["payload_on"])["state"]["desired"] == {"intake": {"paused": True}}
    assert json.loads(sw["payload_off"])["state"]["desired"] == {"intake": {"paused": False}}
    assert _render(sw["value_template"], doc) == sw["state_on"] == "ON"
    try:  # the shadow's own parser, where it exists, takes these updates
        from agent.shadow.messages import ShadowUpdate  # type: ignore[import-not-found]
    except ImportError:
        return
    ShadowUpdate.model_validate_json(sw["payload_on"])
    ShadowUpdate.model_validate_json(_render(sel["command_template"], value="qwen.gguf"))


def test_list_models_and_removal_messages(tmp_path: Path):
    models = tmp_path / "models"
    (models / "sub").mkdir(parents=True)
    for name in ("b.gguf", "a.gguf", "sub/c.gguf", ".partial.gguf", "notes.txt"):
        (models / name).write_bytes(b"x")
    assert list_models(models) == ["a.gguf", "b.gguf", "sub/c.gguf"]
    s = settings(tmp_path)
    removal = removal_messages(s)
    assert [t for t, _ in removal] == [t for t, _ in discovery_messages(s, ["a.gguf"])]
    assert all(p == b"" for _, p in removal)


# ------------------------------------------------------------------------------------ on a real broker


class Published:
    """The transport's publish, keeping the handles so a test can wait for the broker's PUBACKs."""

    def __init__(self, transport: MqttTransport) -> None:
        self.transport = transport
        self.handles: list[Any] = []
        self.lock = threading.Lock()

    def __call__(self, topic: str, payload: bytes, **kw: Any) -> Any:
        h = self.transport.publish(topic, payload, **kw)
        with self.lock:
            self.handles.append(h)
        return h

    def wait_all(self) -> None:
        with self.lock:
            handles = list(self.handles)
        assert handles and all(h.wait(10) for h in handles), handles


def _connect(
    s: Settings, broker: MosquittoBroker, publisher_box: list
) -> tuple[MqttTransport, Published, threading.Event]:
    mqtt = s.mqtt.model_copy(update={"host": broker.host, "port": broker.port, "client_id": "ha-test-dev"})
    connected = threading.Event()

    def on_connect() -> None:
        publisher_box[0].on_connect()  # what the daemon's connect callback does
        connected.set()

    t = MqttTransport(mqtt, will=None, on_message=lambda m: None, on_connect=on_connect, manual_ack=False)
    pub = Published(t)
    return t, pub, connected


def _retained(broker: MosquittoBroker, prefix: str = "homeassistant") -> dict[str, bytes]:
    """What a Home Assistant connecting now would receive."""
    with BrokerClient(broker) as ha:
        ha.subscribe(f"{prefix}/#")
        return {m.topic: m.payload for m in ha.barrier() if m.retain}


def test_publisher_on_a_real_broker_publishes_then_removes_cleanly(tmp_path: Path, broker: MosquittoBroker):
    s = settings(tmp_path)
    (tmp_path / "state").mkdir()
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "qwen.gguf").write_bytes(b"x")
    box: list = [None]
    transport, pub, connected = _connect(s, broker, box)
    box[0] = DiscoveryPublisher(s, pub)
    transport.start()
    try:
        assert connected.wait(10)  # the connect callback has published
        pub.wait_all()
    finally:
        transport.stop()
    seen = _retained(broker)
    assert len(seen) == 11
    for topic, payload in seen.items():
        check_discovery(topic, payload)
    marker = json.loads((tmp_path / "state" / "homeassistant.json").read_text())
    assert sorted(marker["topics"]) == sorted(seen)

    # Turned off: the next connect removes every entity, and forgets them once the broker has them.
    off = settings(tmp_path, enabled=False)
    box2: list = [None]
    transport, pub, connected = _connect(off, broker, box2)
    box2[0] = DiscoveryPublisher(off, pub)
    transport.start()
    try:
        assert connected.wait(10)  # the connect callback has published
        pub.wait_all()
    finally:
        transport.stop()
    assert len(pub.handles) == 11
    assert _retained(broker) == {}
    assert not (tmp_path / "state" / "homeassistant.json").exists()
    # A board that never enabled discovery (or already removed it) publishes nothing.
    assert DiscoveryPublisher(off, lambda *a, **k: pytest.fail("published")).on_connect() == 0


def test_a_changed_prefix_removes_the_old_entities(tmp_path: Path, broker: MosquittoBroker):
    (tmp_path / "state").mkdir()
    for prefix in ("homeassistant", "ha2"):
        s = settings(tmp_path, discovery_prefix=prefix)
        box: list = [None]
        transport, pub, connected = _connect(s, broker, box)
        box[0] = DiscoveryPublisher(s, pub, models=lambda: ["qwen.gguf"])
        transport.start()
        try:
            assert connected.wait(10)  # the connect callback has published
            pub.wait_all()
        finally:
            transport.stop()
    assert _retained(broker, "homeassistant") == {}
    assert len(_retained(broker, "ha2")) == 11
    marker = json.loads((tmp_path / "state" / "homeassistant.json").read_text())
    assert all(t.startswith("ha2/") for t in marker["topics"])
