"""Live settings through the one diff-and-apply path (SIGHUP here; the device shadow uses the same
path), with the real daemon, engine, broker and store: HOT keys in place, RELOAD keys by a model
change that rolls back when the new model does not load, paused intake, restart-only keys."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest

from agent.config import load_settings
from tests.broker import BrokerClient, MosquittoBroker
from tests.daemon_harness import GatedEngine, InProcessDaemon, to_toml, wait_online, write_daemon_config
from tests.helpers import job_payload

DEV = "dev-live"
ROOT = f"edge/{DEV}"


def job(job_id: str, **kw: Any) -> bytes:
    return job_payload(job_id, **{"max_tokens": 4, **kw})


def expect_status(peer: BrokerClient, job_id: str, status: str) -> dict:
    while True:
        data = json.loads(peer.expect(f"{ROOT}/jobs/{job_id}/status", timeout=30).payload)
        if data["status"] == status:
            return data


def edit(cfg: Path, section: str, **values: Any) -> None:
    """Set keys of one section in the config file (what an operator does before SIGHUP)."""
    import tomllib

    data = tomllib.loads(cfg.read_text())
    data.setdefault(section, {}).update(values)
    cfg.write_text(to_toml(data))


@pytest.fixture
def cfg(tmp_path: Path, broker: MosquittoBroker, tiny_model: Path) -> Path:
    return write_daemon_config(tmp_path / "d", broker, tiny_model, device_id=DEV)


@pytest.fixture
def peer(broker: MosquittoBroker):
    with BrokerClient(broker) as p:
        p.subscribe(f"{ROOT}/#")
        yield p


def test_a_reload_key_reloads_the_model_with_the_new_value(cfg: Path, peer: BrokerClient, caplog) -> None:
    with InProcessDaemon(cfg) as d:
        wait_online(peer, DEV)
        assert d.daemon.parts.supervisor.engine.report.n_ctx == 512
        edit(cfg, "engine", n_ctx=1024)
        caplog.set_level(logging.INFO)
        d.daemon.reload()
        assert d.daemon.parts.supervisor.engine.report.n_ctx == 1024 and d.settings.engine.n_ctx == 1024
        assert len(d.engines) == 2 and not d.engines[0].loaded
        assert "reload: engine.n_ctx = 1024" in caplog.text
        peer.publish(f"{ROOT}/jobs/submit", job("after"))
        assert expect_status(peer, "after", "SUCCEEDED")


def test_a_model_that_does_not_load_is_rolled_back_and_reported(cfg: Path, peer: BrokerClient, caplog) -> None:
    with InProcessDaemon(cfg, expect_errors=("model change to missing.gguf failed", "not applied: model file")) as d:
        wait_online(peer, DEV)
        edit(cfg, "model", path="missing.gguf")
        caplog.set_level(logging.INFO)
        d.daemon.reload()
        assert re.search(
            r"reload: model.path not applied: .*missing.gguf.*the previous model serves again", caplog.text
        )
        assert str(d.settings.model.path) == "model.gguf"  # the settings in force hold what is in force
        assert d.daemon.parts.supervisor.engine is d.engines[0] and d.engines[0].loaded
        peer.publish(f"{ROOT}/jobs/submit", job("still"))
        assert expect_status(peer, "still", "SUCCEEDED")


def test_paused_intake_stores_jobs_and_runs_them_once_resumed(cfg: Path, peer: BrokerClient) -> None:
    with InProcessDaemon(cfg) as d:
        wait_online(peer, DEV)
        edit(cfg, "intake", paused=True)
        d.daemon.reload()
        peer.publish(f"{ROOT}/jobs/submit", job("waits"))
        assert expect_status(peer, "waits", "QUEUED")  # stored and acknowledged
        peer.publish(f"{ROOT}/jobs/waits/cancel", b"")  # cancels are still answered
        peer.publish(f"{ROOT}/jobs/submit", job("runs-later"))
        assert expect_status(peer, "waits", "CANCELED")
        assert expect_status(peer, "runs-later", "QUEUED")
        assert d.daemon.parts.store.get("runs-later").status.value == "QUEUED"
        edit(cfg, "intake", paused=False)
        d.daemon.reload()
        assert expect_status(peer, "runs-later", "SUCCEEDED")


def test_a_model_change_while_a_job_runs_lets_it_finish_or_requeues_it(cfg: Path, peer: BrokerClient) -> None:
    gated: list[GatedEngine] = []

    def wrap(e):
        gated.append(GatedEngine(e))
        return gated[-1]

    edit(cfg, "service", shutdown_grace_s=0)
    with InProcessDaemon(cfg, engine_wrapper=wrap) as d:
        wait_online(peer, DEV)
        peer.publish(f"{ROOT}/jobs/submit", job("running", max_tokens=8))
        assert gated[0].started.wait(30)
        edit(cfg, "engine", n_ctx=768)
        import threading

        swap = threading.Thread(target=d.daemon.reload)
        swap.start()
        # grace 0: the running job is preempted at once; its gate opens so it can notice
        assert gated[0].cancel is not None and gated[0].cancel.wait(30)
        gated[0].gate.set()
        swap.join(60)
        assert d.daemon.parts.supervisor.engine.report.n_ctx == 768
        gated[1].gate.set()  # the requeued job runs on the new model
        final = expect_status(peer, "running", "SUCCEEDED")
        assert final["attempt"] == 1  # the preemption did not cost an attempt
    rows = load_settings(cfg, environ={})
    assert rows.engine.n_ctx == 768


def test_restart_only_keys_are_reported_not_applied(cfg: Path, peer: BrokerClient, caplog) -> None:
    with InProcessDaemon(cfg) as d:
        wait_online(peer, DEV)
        edit(cfg, "mqtt", keepalive_s=60)
        caplog.set_level(logging.INFO)
        d.daemon.reload()
        assert "reload: mqtt.keepalive_s changed; it takes effect after a restart" in caplog.text
        assert d.settings.mqtt.keepalive_s == 5
