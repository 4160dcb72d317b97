"""The shadow service on a real Mosquitto, with the fake executor standing in for the daemon."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest

from agent.config import Settings
from agent.shadow.store import ShadowStore
from tests.broker import MosquittoBroker
from tests.shadow_harness import PENDING_NOTE, FakeExecutor, ShadowBoard, ShadowPeer, check_executor_contract
from tests.test_shadow_desired import write_q8_model

DEV = "dev-a"


@pytest.fixture
def settings(tmp_path: Path, models_dir: Path) -> Settings:
    shutil.copyfile(models_dir / "demo-tiny.gguf", models_dir / "other.gguf")
    shutil.copyfile(models_dir / "demo-tiny.gguf", models_dir / "newer-arch.gguf")
    write_q8_model(models_dir / "q8.gguf")
    state = tmp_path / "state"
    state.mkdir()
    return Settings.model_validate(
        {"device": {"id": DEV, "models_dir": str(models_dir), "state_dir": str(state)}, "telemetry": {"interval_s": 30}}
    )


@pytest.fixture
def executor(settings: Settings) -> FakeExecutor:
    return FakeExecutor(settings, unloadable={"newer-arch.gguf"})


@pytest.fixture
def board(broker: MosquittoBroker, settings: Settings, executor: FakeExecutor):
    b = ShadowBoard(broker, settings, executor=executor)
    yield b
    b.stop()


@pytest.fixture
def peer(broker: MosquittoBroker, board: ShadowBoard):
    p = ShadowPeer(broker, board.topics)
    yield p
    p.close()


def started(board: ShadowBoard, peer: ShadowPeer) -> dict:
    """Start the board and wait for its first document: then its subscriptions are in place."""
    board.start()
    return peer.doc()


def set_(peer: ShadowPeer, desired: dict, token: str, **extra) -> tuple[str, dict]:
    peer.send({"state": {"desired": desired}, "client_token": token, **extra})
    return peer.reply(token)


def applied(version: int):
    return lambda d: d["state"]["reported"].get("applied_version", -1) >= version


def test_the_fake_executor_keeps_the_executor_contract(settings):
    check_executor_contract(lambda: FakeExecutor(settings, unloadable={"newer-arch.gguf"}), settings,
                            good_model="other.gguf", bad_model="newer-arch.gguf")  # fmt: skip


def test_first_document_reports_the_settings_in_force(board, peer):
    doc = started(board, peer)
    assert doc["version"] == 0 and doc["state"]["desired"] == {} and doc["state"]["delta"] == {}
    rep = doc["state"]["reported"]
    assert rep["engine"]["n_ctx"] == "auto" and rep["telemetry"]["interval_s"] == 30.0
    assert rep["model"]["path"] == "demo-tiny.gguf" and rep["applied_version"] == 0
    assert doc["metadata"]["reported"]["engine.n_ctx"]["updated"].endswith("Z")


def test_update_is_accepted_applied_on_the_main_loop_and_reported(board, peer, executor):
    started(board, peer)
    kind, reply = set_(
        peer, {"engine": {"n_ctx": 512}, "telemetry": {"interval_s": 5}, "intake": {"paused": True}}, "t1"
    )
    assert kind == "accepted", reply
    assert reply["version"] == 1 and reply["client_token"] == "t1"
    assert reply["state"]["desired"] == {"engine": {"n_ctx": 512}, "telemetry": {"interval_s": 5.0},
                                         "intake": {"paused": True}}  # fmt: skip
    # The document first shows the update with its delta, then the applied state with an empty delta.
    first = peer.doc(lambda d: d["version"] == 1)
    delta = peer.take(board.topics.shadow_delta)
    assert delta["version"] == 1 and delta["state"]["intake"] == {"paused": True}
    assert set(first["metadata"]["desired"]) == {"engine.n_ctx", "telemetry.interval_s", "intake.paused"}
    doc = peer.doc(applied(1))
    rep = doc["state"]["reported"]
    assert rep["engine"]["n_ctx"] == 512 and rep["telemetry"]["interval_s"] == 5.0 and rep["intake"]["paused"] is True
    assert doc["state"]["delta"] == {} and "errors" not in rep
    # Executor: pausing first, then the in-place settings, then one reload; never on the network thread.
    calls = executor.calls
    assert [keys for keys, _ in calls] == [("intake.paused",), ("telemetry.interval_s",), ("engine.n_ctx",)]
    assert {thread for _, thread in calls} == {"board-main"}
    with ShadowStore.from_settings(board.settings, readonly=True) as store:
        stored = store.load()
    assert stored.version == 1 and stored.desired == reply["state"]["desired"]


@pytest.mark.parametrize(
    "desired, key, text",
    [
        ({"engine": {"n_ctx": -5}}, "engine.n_ctx", "from 16 to 131072"),
        ({"model": {"path": "../outside.gguf"}}, "model.path", "outside the models folder"),
        ({"model": {"path": "escape.gguf"}}, "model.path", "outside the models folder"),
        ({"model": {"path": "q8.gguf"}}, "model.path", "not 4-bit"),
        ({"engine": {"warp": 9}}, "engine.warp", "unknown key"),
        ({"intake": {"paused": "yes"}}, "intake.paused", "must be true or false"),
    ],
)
def test_each_bad_update_is_400_and_changes_nothing(board, peer, executor, settings, tmp_path, desired, key, text):
    outside = tmp_path / "outside.gguf"
    shutil.copyfile(settings.device.models_dir / "other.gguf", outside)
    (settings.device.models_dir / "escape.gguf").symlink_to(outside)
    started(board, peer)
    kind, reply = set_(peer, {**desired, "telemetry": {"interval_s": 7}}, "bad")
    assert kind == "rejected" and reply["code"] == 400 and reply["version"] == 0
    assert list(reply["errors"]) == [key] and text in reply["errors"][key] and key in reply["message"]
    # Nothing changed: a following good update gets version 1, and the bad one's good key is not in it.
    kind, reply = set_(peer, {"priority": {"nice": 7}}, "good")
    assert kind == "accepted" and reply["version"] == 1 and reply["state"]["desired"] == {"priority": {"nice": 7}}
    peer.doc(applied(1))
    assert all("telemetry.interval_s" not in keys for keys, _ in executor.calls)


def test_conflict_409_too_large_413_and_two_operators_without_version(board, peer):
    started(board, peer)
    assert set_(peer, {"engine": {"n_ctx": 512}}, "alice")[0] == "accepted"
    assert set_(peer, {"telemetry": {"interval_s": 9}}, "bob")[0] == "accepted"
    kind, reply = set_(peer, {"engine": {"n_ctx": 1024}}, "stale", version=1)
    assert kind == "rejected" and reply["code"] == 409 and reply["version"] == 2
    kind, reply = set_(peer, {"model": {"path": "m" * 9 * 1024}}, "huge")
    assert kind == "rejected" and reply["code"] == 413 and "more than 8192" in reply["message"]
    kind, reply = set_(peer, {"engine": {"n_ctx": 1024}}, "fresh", version=2)
    assert kind == "accepted" and reply["version"] == 3
    doc = peer.doc(applied(3))
    assert doc["state"]["desired"] == {"engine": {"n_ctx": 1024}, "telemetry": {"interval_s": 9.0}}
    assert doc["state"]["reported"]["telemetry"]["interval_s"] == 9.0


@pytest.mark.parametrize(
    "payload, code, text",
    [
        (b"{oops", 400, "not valid JSON"),
        (b"\x00\xff", 400, "not valid UTF-8"),
        (b'"just a string"', 400, "must be a JSON object"),
        (b'{"state": {"desired": {"engine": {"n_ctx": 1e999}}}}', 400, "out of range"),
        (b"x" * 70000, 413, "payload is 70000 bytes"),
    ],
)
def test_malformed_payloads_get_a_precise_reply_and_the_service_carries_on(board, peer, payload, code, text):
    started(board, peer)
    peer.send(payload)
    reply = peer.take(board.topics.shadow_update_rejected)
    assert reply["code"] == code and text in reply["message"] and reply["version"] == 0
    assert set_(peer, {"intake": {"paused": True}}, "after")[0] == "accepted"


def test_get_answers_with_the_document_and_the_token(board, peer):
    started(board, peer)
    set_(peer, {"engine": {"n_batch": 64}}, "t")
    peer.doc(applied(1))
    peer.client.publish(board.topics.shadow_get, b'{"client_token": "g1"}')
    got = peer.take(board.topics.shadow_get_accepted)
    assert got["client_token"] == "g1" and got["version"] == 1
    assert got["state"]["reported"]["engine"]["n_batch"] == 64
    peer.client.publish(board.topics.shadow_get, b"")
    assert "client_token" not in peer.take(board.topics.shadow_get_accepted)
    peer.client.publish(board.topics.shadow_get, b'{"client_token": "g2", "x": 1}')
    bad = peer.take(board.topics.shadow_get_rejected)
    assert bad["code"] == 400 and bad["client_token"] == "g2" and bad["errors"] == {"x": bad["errors"]["x"]}


def test_a_model_that_does_not_load_stays_in_delta_with_its_error_and_is_not_retried(board, peer, executor):
    started(board, peer)
    kind, _ = set_(peer, {"model": {"path": "newer-arch.gguf"}}, "m1")
    assert kind == "accepted"  # its header reads fine: only loading finds the problem
    doc = peer.doc(applied(1))
    rep = doc["state"]["reported"]
    assert rep["model"]["path"] == "demo-tiny.gguf" and "could not load newer-arch.gguf" in rep["errors"]["model.path"]
    assert doc["state"]["delta"] == {"model": {"path": "newer-arch.gguf"}}
    loads = executor.loads
    # Another update runs reconcile again: the failed value is not tried again.
    set_(peer, {"telemetry": {"interval_s": 3}}, "m2")
    doc = peer.doc(applied(2))
    assert executor.loads == loads and "model.path" in doc["state"]["reported"]["errors"]
    # A new value is tried, and its success clears the error and the delta.
    set_(peer, {"model": {"path": "other.gguf"}}, "m3")
    doc = peer.doc(applied(3))
    assert doc["state"]["reported"]["model"]["path"] == "other.gguf" and "errors" not in doc["state"]["reported"]
    assert doc["state"]["delta"] == {} and executor.loads == loads + 1


def test_a_sha256_that_does_not_match_is_reported_under_model_sha256(board, peer):
    started(board, peer)
    set_(peer, {"model": {"path": "other.gguf", "sha256": "0" * 64}}, "s")
    rep = peer.doc(applied(1))["state"]["reported"]
    assert "does not match model.sha256" in rep["errors"]["model.sha256"]
    assert rep["errors"]["model.path"] == rep["errors"]["model.sha256"] and rep["model"]["path"] == "demo-tiny.gguf"


def test_keys_nothing_applies_yet_are_stored_and_reported_as_pending(board, peer):
    started(board, peer)
    set_(peer, {"swap": {"policy": "zram", "zram_mb": 256}}, "p")
    rep = peer.doc(applied(1))["state"]["reported"]
    assert rep["swap"]["policy"] == "zram" and rep["pending"] == {
        "swap.policy": PENDING_NOTE,
        "swap.zram_mb": PENDING_NOTE,
    }


def test_null_falls_back_to_the_config_file(board, peer):
    started(board, peer)
    set_(peer, {"telemetry": {"interval_s": 5}}, "a")
    assert peer.doc(applied(1))["state"]["reported"]["telemetry"]["interval_s"] == 5.0
    set_(peer, {"telemetry": {"interval_s": None}}, "b")
    doc = peer.doc(applied(2))
    assert doc["state"]["desired"] == {} and doc["state"]["reported"]["telemetry"]["interval_s"] == 30.0


def test_a_retained_update_from_before_the_first_connect_is_applied_once_and_cleared(broker, settings, executor):
    board = ShadowBoard(broker, settings, executor=executor)
    topics = board.topics
    peer = ShadowPeer(broker, topics)
    try:
        peer.send({"state": {"desired": {"engine": {"n_ctx": 256}}}, "client_token": "first"}, retain=True)
        assert peer.retained(topics.shadow_update) is not None
        board.start()
        assert peer.reply("first")[1]["version"] == 1
        doc = peer.doc(applied(1))
        assert doc["state"]["reported"]["engine"]["n_ctx"] == 256
        assert peer.take(topics.shadow_update, lambda d: d is None) is None  # the clear
        assert peer.retained(topics.shadow_update) is None
        assert [keys for keys, _ in executor.calls] == [("engine.n_ctx",)]
    finally:
        peer.close()
        board.stop()


def test_an_update_queued_and_retained_while_offline_is_merged_once(broker, settings, executor):
    """The broker delivers the session's queued copy and, on re-subscribe, the retained copy."""
    board = ShadowBoard(broker, settings, executor=executor)
    topics = board.topics
    peer = ShadowPeer(broker, topics)
    try:
        board.start()
        peer.doc()
        board.stop()  # a clean stop: the persistent session keeps queueing QoS 1 messages
        peer.send({"state": {"desired": {"telemetry": {"interval_s": 11}}}, "client_token": "offline"}, retain=True)
        board = ShadowBoard(broker, settings, executor=executor)
        board.start()
        assert board.transport.session_present
        assert peer.reply("offline")[1]["version"] == 1
        peer.doc(applied(1))
        with pytest.raises(TimeoutError):
            peer.reply("offline", timeout=1.0)  # no second merge
        assert board.service.document.version == 1
        assert peer.retained(topics.shadow_update) is None
    finally:
        peer.close()
        board.stop()


def test_after_a_restart_without_a_broker_the_accepted_state_is_applied_before_connecting(broker, settings):
    first = FakeExecutor(settings)
    board = ShadowBoard(broker, settings, executor=first)
    peer = ShadowPeer(broker, board.topics)
    try:
        board.start(main_loop=False)  # accepted, stored, but the main loop never ran it
        peer.doc()
        assert set_(peer, {"engine": {"n_ctx": 384}, "intake": {"paused": True}}, "k")[0] == "accepted"
        assert first.calls == []
        board.stop()
        broker.stop()
        # The daemon restarts with the board's config file in force, the broker down.
        again = FakeExecutor(settings)
        board = ShadowBoard(broker, settings, executor=again)
        board.start(connect=False, main_loop=False)
        assert again.settings.engine.n_ctx == 384 and again.settings.intake.paused is True
        assert [keys for keys, _ in again.calls] == [("intake.paused",), ("engine.n_ctx",)]
        assert board.service.document.reported["applied_version"] == 1
    finally:
        peer.close()
        board.stop()


def test_a_late_subscriber_reads_the_retained_document(board, peer):
    started(board, peer)
    set_(peer, {"engine": {"n_ctx": 640}}, "r")
    peer.doc(applied(1))
    retained = json.loads(peer.retained(board.topics.shadow) or b"{}")
    assert retained["version"] == 1 and retained["state"]["reported"]["engine"]["n_ctx"] == 640


def test_network_thread_never_runs_the_executor_even_while_a_swap_is_slow(broker, settings):
    """An update arriving while the main loop is inside a (slow) apply is still answered at once."""
    release = threading.Event()
    entered = threading.Event()

    class SlowExecutor(FakeExecutor):
        def apply(self, target, keys):
            if "engine.n_ctx" in keys:
                entered.set()
                assert release.wait(10)
            return super().apply(target, keys)

    ex = SlowExecutor(settings)
    board = ShadowBoard(broker, settings, executor=ex)
    peer = ShadowPeer(broker, board.topics)
    try:
        started(board, peer)
        set_(peer, {"engine": {"n_ctx": 512}}, "slow")
        assert entered.wait(10)
        kind, reply = set_(peer, {"telemetry": {"interval_s": 4}}, "during")  # answered while the swap runs
        assert kind == "accepted" and reply["version"] == 2
        release.set()
        doc = peer.doc(applied(2))
        assert doc["state"]["reported"]["engine"]["n_ctx"] == 512
        assert doc["state"]["reported"]["telemetry"]["interval_s"] == 4.0
    finally:
        release.set()
        peer.close()
        board.stop()


def test_sighup_reload_changes_the_base_and_desired_still_wins(board, peer, settings, executor):
    started(board, peer)
    set_(peer, {"engine": {"n_ctx": 512}}, "d")
    peer.doc(applied(1))
    edited = settings.model_copy(deep=True)
    edited.engine.n_ctx = 2048  # the file now says 2048: desired (512) still wins
    edited.telemetry.interval_s = 12.0  # not in desired: the file's new value applies
    edited.mqtt.keepalive_s = 99  # not a run-time setting
    report = board.service.reload(edited)
    assert report.applied == {"telemetry.interval_s": 12.0} and report.restart == ["mqtt.keepalive_s"]
    assert executor.settings.engine.n_ctx == 512 and executor.settings.telemetry.interval_s == 12.0
    # Removing the desired key now falls back to the edited file.
    set_(peer, {"engine": {"n_ctx": None}}, "r")
    assert peer.doc(applied(2))["state"]["reported"]["engine"]["n_ctx"] == 2048


def test_facts_are_reported_and_republished_only_when_they_change(broker, settings):
    facts = {"board": {"agent_version": "x", "llama_cpp_python": None, "board": "b", "machine": "aarch64",
                       "cpu": {"model": None, "cores": 4, "features": ["neon", "dotprod"]}, "mem_total_bytes": 1,
                       "cgroup_limit_bytes": None, "cgroup_note": None, "psi": False, "psi_note": "no psi",
                       "swap": [], "models_free_bytes": 2**30},
             "serving": {"file": "demo-tiny.gguf", "sha256": None, "load_mode": "fit", "n_ctx": 2048}}  # fmt: skip
    board = ShadowBoard(broker, settings, facts=lambda: json.loads(json.dumps(facts)))
    peer = ShadowPeer(broker, board.topics)
    try:
        doc = started(board, peer)
        assert doc["state"]["reported"]["board"]["cpu"]["features"] == ["neon", "dotprod"]
        assert doc["state"]["reported"]["serving"]["n_ctx"] == 2048
        board.service.refresh_facts()  # unchanged: nothing published
        facts["board"]["models_free_bytes"] = 2**29
        board.service.refresh_facts()
        doc = peer.doc()  # the next document is the changed one: the first refresh published nothing
        assert doc["state"]["reported"]["board"]["models_free_bytes"] == 2**29
        assert "board.models_free_bytes" in doc["metadata"]["reported"]
    finally:
        peer.close()
        board.stop()


def test_boot_settings_start_the_daemon_with_the_accepted_desired_state(broker, settings):
    from agent.config.inforce import boot_settings

    board = ShadowBoard(broker, settings)
    peer = ShadowPeer(broker, board.topics)
    try:
        started(board, peer)
        set_(
            peer, {"engine": {"n_ctx": 384, "type_v": "q8_0", "flash_attn": True}, "model": {"path": "other.gguf"}}, "b"
        )
        peer.doc(applied(1))
        board.stop()
        with ShadowStore.from_settings(settings) as store:
            boot = boot_settings(settings, store.load().desired)
        assert boot.engine.n_ctx == 384 and str(boot.model.path) == "other.gguf" and boot.engine.type_v == "q8_0"
        # Started with them, the daemon has nothing left to apply: no model is loaded twice.
        ex = FakeExecutor(boot)
        board = ShadowBoard(broker, settings, executor=ex)
        board.start(connect=False, main_loop=False)
        assert ex.calls == [] and board.service.document.reported["applied_version"] == 1
    finally:
        peer.close()
        board.stop()


def test_boot_settings_leave_out_a_desired_key_the_config_file_no_longer_allows(settings):
    from agent.config.inforce import boot_settings
    from agent.shadow.document import ShadowDocument

    with_fa = settings.model_copy(deep=True)
    with_fa.engine.flash_attn = True
    with ShadowStore.from_settings(settings) as store:
        store.save_desired(ShadowDocument(version=1, desired={"engine": {"n_ctx": 384, "type_v": "q8_0"}}))
        assert boot_settings(with_fa, store.load().desired).engine.type_v == "q8_0"
        boot = boot_settings(settings, store.load().desired)  # the file turned flash attention off since
    assert boot.engine.n_ctx == 384 and boot.engine.type_v == "f16"


def test_a_desired_key_the_edited_config_file_no_longer_allows_is_reported(broker, settings):
    with_fa = settings.model_copy(deep=True)
    with_fa.engine.flash_attn = True
    ex = FakeExecutor(with_fa)
    board = ShadowBoard(broker, with_fa, executor=ex)
    peer = ShadowPeer(broker, board.topics)
    try:
        started(board, peer)
        set_(peer, {"engine": {"type_v": "q8_0", "n_ctx": 384}}, "q")
        assert peer.doc(applied(1))["state"]["reported"]["engine"]["type_v"] == "q8_0"
        board.service.reload(settings)  # the file turned flash attention off
        doc = peer.doc(lambda d: "engine.type_v" in d["state"]["reported"].get("errors", {}))
        assert "cannot be applied with the board's config file" in doc["state"]["reported"]["errors"]["engine.type_v"]
        assert ex.settings.engine.type_v == "f16" and ex.settings.engine.n_ctx == 384
        assert doc["state"]["delta"] == {"engine": {"type_v": "q8_0"}}
    finally:
        peer.close()
        board.stop()


def test_a_message_before_start_is_left_for_the_broker_to_redeliver(settings):
    from agent.mqtt.topics import Topics
    from agent.mqtt.transport import InboundMessage
    from agent.shadow.service import ShadowService

    published, acked = [], []
    with ShadowStore.from_settings(settings) as store:
        service = ShadowService(
            topics=Topics("edge", DEV), store=store, file_settings=settings, executor=FakeExecutor(settings),
            publish=lambda *a: published.append(a), ack=acked.append,
        )  # fmt: skip
        msg = InboundMessage(topic=f"edge/{DEV}/shadow/update", payload=b'{"state": {"desired": {"a": 1}}}',
                             qos=1, retain=False, mid=1)  # fmt: skip
        service.on_message(msg)
        assert published == [] and acked == []
        service.start()
        service.on_message(msg)
        assert acked == [msg] and published[0][0] == f"edge/{DEV}/shadow/update/rejected"
