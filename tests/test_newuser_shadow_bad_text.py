"""A bad value in a shadow update is answered 400 naming its key, never 500 with a traceback (issue 17,
section 3b): a NUL byte in model.path was "the device failed to check the update". The same for every
value that could crash the check: NUL or an unpaired surrogate escape in any key or string, control
characters in a file name or URL, names too long for the filesystem.

On a real Mosquitto with the shadow service and a real models folder; the property test runs the
service itself (real SQLite store, real model checks) over random hostile updates.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from agent.config import Settings
from agent.config.live import live_keys
from agent.mqtt.topics import Topics
from agent.mqtt.transport import InboundMessage
from agent.shadow.service import ShadowService
from agent.shadow.store import ShadowStore
from tests.broker import MosquittoBroker
from tests.shadow_harness import FakeExecutor, ShadowBoard, ShadowPeer

DEV = "dev-bad"
T = Topics("edge", DEV)
SHA = "0" * 64


@pytest.fixture
def settings(tmp_path: Path, models_dir: Path) -> Settings:
    state = tmp_path / "state"
    state.mkdir()
    return Settings.model_validate({"device": {"id": DEV, "models_dir": str(models_dir), "state_dir": str(state)}})


# (desired, the key the 400 must name)
BAD = {
    "nul in model.path": ({"model": {"path": "demo\x00tiny.gguf"}}, "model.path"),
    "only a nul": ({"model": {"path": "\x00"}}, "model.path"),
    "surrogate in model.path": ({"model": {"path": "demo\udc80.gguf"}}, "model.path"),
    "surrogate in model.sha256": ({"model": {"sha256": "\ud800" * 64}}, "model.sha256"),
    "surrogate where a number goes": ({"engine": {"n_ctx": "\udfff"}}, "engine.n_ctx"),
    "nul in model.url": ({"model": {"path": "new.gguf", "url": "https://h.example/a\x00b", "sha256": SHA}},
                         "model.url"),
    "control character in model.url": ({"model": {"path": "new.gguf", "url": "https://h.example/a\x01b",
                                                  "sha256": SHA}}, "model.url"),
    "newline in model.path": ({"model": {"path": "demo-tiny.gguf\n"}}, "model.path"),
    "nul in a key": ({"model": {"pa\x00th": "demo-tiny.gguf"}}, "model.pa\\u0000th"),
    "surrogate in a section": ({"eng\udc00ine": {"n_ctx": 512}}, "eng\\udc00ine"),
    "nul in a chat message": ({"canary": {"messages": [{"role": "user", "content": "hi\x00"}]}}, "canary.messages"),
    "nul in the canary prompt": ({"canary": {"prompt": "The capital\x00"}}, "canary.prompt"),
    "a name too long for the filesystem": ({"model": {"path": "m" * 4000 + ".gguf"}}, "model.path"),
    "a folder name too long": ({"model": {"path": "d" * 300 + "/m.gguf"}}, "model.path"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(BAD))
def test_bad_text_is_a_400_naming_the_key_on_a_real_broker(
    name: str, broker: MosquittoBroker, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    desired, key = BAD[name]
    caplog.set_level(logging.INFO, logger="agent")
    with ShadowBoard(broker, settings) as board:
        peer = ShadowPeer(broker, board.topics)
        try:
            first = peer.doc()
            peer.send({"state": {"desired": desired}, "client_token": "bad"})
            kind, reply = peer.reply("bad")
            peer.send({"state": {"desired": {"engine": {"n_ctx": 512}}}, "client_token": "good"})
            assert peer.reply("good")[0] == "accepted"  # the board still takes the next update
        finally:
            peer.close()
    assert kind == "rejected" and reply["code"] == 400, reply
    assert key in reply["errors"], reply["errors"]
    assert reply["version"] == first["version"]  # nothing changed
    assert "failed to check" not in reply["message"]
    tracebacks = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not tracebacks, [r.getMessage() for r in tracebacks]


# ------------------------------------------------------------------------------------ any update at all

_HOSTILE_TEXT = st.one_of(
    st.sampled_from(["", ".", "..", "/", "../x.gguf", "demo-tiny.gguf", "a\x00b", "\udc80", "\ud800x", "x\n",
                     "\x7f", "\u202e.gguf", "m" * 300, "https://h.example/m.gguf", "auto", "true", "512", "null"]),
    st.text(max_size=20),
)  # fmt: skip
_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False), _HOSTILE_TEXT),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(_HOSTILE_TEXT, inner, max_size=3)),
    max_leaves=6,
)
_KEYS = st.one_of(st.sampled_from(sorted(live_keys())), st.tuples(_HOSTILE_TEXT, _HOSTILE_TEXT).map(".".join))


def _desired(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        section, _, name = key.partition(".")
        if isinstance(out.get(section), dict) or section not in out:
            out.setdefault(section, {})[name or "x"] = value
    return out


@pytest.fixture
def service(settings: Settings):
    store = ShadowStore.from_settings(settings)
    replies: list[tuple[str, bytes]] = []

    def publish(topic: str, payload: bytes, qos: int, retain: bool) -> None:
        assert isinstance(payload, bytes)
        if payload:  # (empty: the retained update's clear)
            json.loads(payload)  # every reply is a JSON payload the operator can read
        replies.append((topic, payload))

    svc = ShadowService(topics=T, store=store, file_settings=settings, executor=FakeExecutor(settings), publish=publish)
    svc.start()
    yield svc, replies
    store.close()


@hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pairs=st.lists(st.tuples(_KEYS, _VALUES), min_size=1, max_size=4))
def test_no_update_is_a_500(service, pairs: list[tuple[str, Any]], caplog: pytest.LogCaptureFixture) -> None:
    """Whatever an operator sends, the answer is accepted, 400 or 413, never "the device failed to check
    the update", and nothing is logged as a failure."""
    svc, replies = service
    replies.clear()
    caplog.clear()
    payload = json.dumps({"state": {"desired": _desired(pairs)}, "client_token": "p"}).encode()
    svc.on_message(InboundMessage(topic=T.shadow_update, payload=payload, qos=1, retain=False, mid=1))
    answers = [json.loads(p) for t, p in replies if t in (T.shadow_update_accepted, T.shadow_update_rejected)]
    assert len(answers) == 1, replies
    assert answers[0].get("code") in (None, 400, 413), answers[0]
    failures = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not failures, [r.getMessage() for r in failures]
    if answers[0].get("code") is None:  # accepted: forget it, so every example starts from the same document
        svc.on_message(InboundMessage(topic=T.shadow_update, payload=b'{"state": {"desired": null}}', qos=1,
                                      retain=False, mid=2))  # fmt: skip
