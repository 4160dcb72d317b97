"""The governor at the daemon's edge (agent.governor.watch): scripted readings in; the actions carried
out on the runner and the supervisor in order, events and readings out through the real Uplink and
a real spool file, and admission verdicts. The policy itself is tested in tests/test_governor.py;
the whole daemon under a real memory hog in tests/test_memory_pressure.py."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import pytest

from agent.codes import ErrorCode
from agent.config import Settings
from agent.governor.watch import JobNeed, MemoryWatch
from agent.mqtt.topics import Topics
from agent.telemetry.fields import Telemetry
from agent.telemetry.spool import TelemetrySpool
from agent.telemetry.uplink import Uplink
from tests.fakes import FakePublisher
from tests.helpers import Clock

MiB = 1024 * 1024
GiB = 1024 * MiB


class Script:
    """A sampler that returns the readings a test sets (MemAvailable in MiB of 1 GiB)."""

    unavailable = {"psi": "no /proc/pressure/memory (test)"}

    def __init__(self) -> None:
        self.avail_mib = 800

    def sample(self, now: float) -> Telemetry:
        return Telemetry(
            device_id="pi", ts=datetime.fromtimestamp(now, tz=UTC), mem_total_bytes=GiB,
            mem_available_bytes=self.avail_mib * MiB, rss_anon_bytes=100 * MiB, rss_file_bytes=200 * MiB,
        )  # fmt: skip


class Actions:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def hold_jobs(self, hold: bool) -> None:
        self.calls.append("hold" if hold else "release")

    def preempt_jobs(self) -> list[str]:
        self.calls.append("preempt")
        return []

    def unload_model(self) -> list[str]:
        self.calls.append("unload")
        return []

    def reload_model(self) -> bool:
        self.calls.append("reload")
        return True


@pytest.fixture
def rig(tmp_path: Path):
    s = Settings.model_validate({
        "device": {"id": "pi", "state_dir": str(tmp_path)},
        "governor": {"cool_down_s": 5, "recover_s": 10, "interval_s": 1},
        "telemetry": {"interval_s": 30},
    })  # fmt: skip
    clock = Clock(1000.0)
    spool = TelemetrySpool.from_settings(s)
    pub = FakePublisher()
    uplink = Uplink(spool, lambda t, p: pub.publish(t, p, qos=1), lambda: pub.connected)
    script, actions = Script(), Actions()
    watch = MemoryWatch(s, sampler=script, uplink=uplink, topics=Topics("edge", "pi"), actions=actions,
                        clock=clock, monotonic=clock)  # fmt: skip
    yield SimpleNamespace(s=s, clock=clock, spool=spool, pub=pub, script=script, actions=actions, watch=watch)
    spool.close()


def run(rig, seconds: int) -> None:
    for _ in range(seconds):
        rig.clock.t += 1
        rig.watch.tick()


def events(rig) -> list[dict]:
    return [json.loads(p) for p in rig.pub.on("edge/pi/events")]


def test_the_ladder_is_climbed_and_undone_in_order_with_events(rig) -> None:
    run(rig, 2)
    first = events(rig)
    assert [e["kind"] for e in first] == ["signals_missing"] and "psi" in first[0]["message"]
    rig.script.avail_mib = 50  # 4.9 % of MemTotal: critical
    run(rig, 30)
    assert rig.actions.calls == ["hold", "preempt", "unload"]  # rungs 1-2 change only the posture
    kinds = [(e["kind"], e.get("action") or e.get("level")) for e in events(rig)[1:]]
    assert kinds == [("level_changed", "critical"), ("action", "hold_unfit"), ("action", "shrink_context"),
                     ("action", "preempt"), ("action", "unload")]  # fmt: skip
    assert rig.watch.describe()["level"] == "critical" and rig.watch.describe()["action"] == "unload"
    rig.script.avail_mib = 800
    run(rig, 60)
    assert rig.actions.calls == ["hold", "preempt", "unload", "reload", "release"]
    undo = [e.get("action") for e in events(rig) if e["kind"] == "action"][4:]
    assert undo == ["reload", "resume_jobs", "restore_context", "release_hold"]
    assert rig.watch.level == "ok"


def test_readings_at_the_telemetry_interval_and_spooled_in_order_while_offline(rig) -> None:
    run(rig, 61)
    assert len(rig.pub.on("edge/pi/telemetry")) == 3  # t = 1, 31, 61
    rig.pub.connected = False
    run(rig, 60)
    assert len(rig.pub.on("edge/pi/telemetry")) == 3 and rig.spool.rows == 2
    rig.pub.connected = True
    run(rig, 30)  # still spooled first: a new reading never overtakes spooled ones
    assert rig.spool.rows == 3
    items = rig.spool.pending(10)
    assert [json.loads(i.payload)["ts"] for i in items] == sorted(json.loads(i.payload)["ts"] for i in items)


def test_admission(rig) -> None:
    need = JobNeed(tokens=100, kv_bytes_per_token=1 * MiB, model_anon_bytes=50 * MiB, budget_bytes=400 * MiB, n_ctx=512)
    run(rig, 1)
    assert rig.watch.admit(need).verdict == "run"
    never = rig.watch.admit(JobNeed(tokens=500, kv_bytes_per_token=1 * MiB, model_anon_bytes=50 * MiB,
                                    budget_bytes=400 * MiB, n_ctx=512))  # fmt: skip
    assert never.verdict == "reject" and never.code is ErrorCode.insufficient_memory and "550 MiB" in never.reason
    rig.script.avail_mib = 60  # 100 MiB of KV does not fit what is available
    run(rig, 1)
    wait = rig.watch.admit(need)
    assert wait.verdict == "wait", wait


def test_a_jobs_need_comes_from_its_measured_tokens_and_the_plan_in_force(rig) -> None:
    """JobNeed.of: the tokens the runner measured (prompt + what it may generate, within a slot's
    context); KV bytes per token over every slot's cells; the model's own anonymous memory is the
    plan's without its KV cache."""
    report = SimpleNamespace(
        n_ctx=512, slots=4, budget=SimpleNamespace(bytes=400 * MiB),
        estimate=SimpleNamespace(kv_cache=2048 * 4096, anon_bytes=2048 * 4096 + 60 * MiB),
    )  # fmt: skip
    need = JobNeed.of(165, report)
    assert need == JobNeed(tokens=165, kv_bytes_per_token=4096, model_anon_bytes=60 * MiB,
                           budget_bytes=400 * MiB, n_ctx=512)  # fmt: skip
    assert rig.watch.admit_job(165, None).reason == "no plan to judge by"  # nothing loaded
    assert rig.watch.admit_job(100_001, report).verdict == "reject"  # 100k tokens x 4 KiB > 400 MiB - 60
    assert rig.watch.parallel(4) == 4  # no pressure: every slot
