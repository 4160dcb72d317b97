"""The queue keeps moving: the pure policy (agent.jobs.schedule), and the runner on a real SQLite
store and the fake engine (kept honest by tests/test_contract_engine.py): the context rule on
measured tokens, waits with reasons that are recorded, announced and bounded, and a property test
that the queue never stalls while some job can start."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.codes import ErrorCode, JobStatus, WaitReason
from agent.config.sections import GovernorSettings
from agent.engine.types import RequestLimits, fit_context
from agent.jobs.admission import Admission
from agent.jobs.schedule import RUN, Queued, Verdict, held, pick
from tests.fakes import FakeEngine
from tests.test_runner import Rig

MEM = Verdict.wait(WaitReason.memory, "needs 90 MiB, 40 MiB available")
CTX = Verdict.end(ErrorCode.context_too_long, "too long")


def q(job_id: str, verdict: Verdict = RUN, memory_wait_s: float = 0.0) -> Queued:
    return Queued(job_id, verdict, memory_wait_s)


def decide(queue: list[Queued], free: int = 1, running: int = 0):
    return pick(queue, free_slots=free, running=running, reserve_after_s=30, memory_wait_max_s=120)


# --------------------------------------------------------------------------------------------
# the context rule


def test_the_context_rule_runs_what_fits_cuts_at_the_end_of_the_context_and_refuses_only_a_full_prompt() -> None:
    assert fit_context(10, 50, 512, "refuse") == fit_context(10, 50, 512, "keep_tail")
    as_asked = fit_context(10, 50, 512, "refuse")
    assert (as_asked.fits, as_asked.keep, as_asked.allowed, as_asked.dropped) == (True, 10, 50, 0)
    cut = fit_context(300, 600, 512, "refuse")  # fits, but 300 + 600 > 512: runs to the end of the context
    assert (cut.fits, cut.keep, cut.allowed) == (True, 300, 212)
    last = fit_context(511, 64, 512, "refuse")  # one token of room is room
    assert (last.fits, last.allowed) == (True, 1)
    full = fit_context(512, 64, 512, "refuse")
    assert not full.fits and "512 tokens" in full.refusal(512) and "holds 512 per job" in full.refusal(512)
    tail = fit_context(700, 64, 512, "keep_tail")  # keeps room for max_tokens ...
    assert (tail.fits, tail.keep, tail.allowed, tail.dropped) == (True, 448, 64, 252)
    half = fit_context(700, 600, 512, "keep_tail")  # ... but never less than half the context for the prompt
    assert (half.keep, half.allowed, half.dropped) == (256, 256, 444)


# --------------------------------------------------------------------------------------------
# the pure policy


def test_a_job_that_must_wait_never_stops_one_behind_it_that_can_start() -> None:
    p = decide([q("big", MEM), q("small")])
    assert p.start == "small"
    assert p.waits == [("big", WaitReason.memory, MEM.detail)]


def test_priority_order_is_kept_among_jobs_that_can_start_and_the_rest_wait_for_a_slot() -> None:
    p = decide([q("urgent"), q("later"), q("last")], free=1)
    assert p.start == "urgent"
    assert [(j, r) for j, r, _ in p.waits] == [("later", WaitReason.slot), ("last", WaitReason.slot)]
    two = decide([q("urgent"), q("later"), q("last")], free=2)
    assert two.start == "urgent" and [j for j, _, _ in two.waits] == ["last"]  # "later" takes the other slot next
    full = decide([q("a"), q("b")], free=0, running=2)
    assert full.start is None and [r for _, r, _ in full.waits] == [WaitReason.slot, WaitReason.slot]


def test_a_job_that_waited_for_memory_long_enough_reserves_the_next_capacity() -> None:
    young = decide([q("big", MEM, memory_wait_s=29.9), q("small")], free=1, running=1)
    assert young.start == "small"
    old = decide([q("big", MEM, memory_wait_s=30), q("small")], free=1, running=1)
    assert old.start is None
    assert [(j, r) for j, r, _ in old.waits] == [("big", WaitReason.memory), ("small", WaitReason.reserved)]
    assert "job big" in old.waits[1][2]


def test_a_memory_wait_is_bounded_only_while_nothing_else_runs() -> None:
    busy = decide([q("big", MEM, memory_wait_s=500)], free=0, running=1)
    assert busy.ends == [] and busy.waits[0][1] is WaitReason.memory
    idle = decide([q("big", MEM, memory_wait_s=120), q("small")], free=1, running=0)
    assert [(j, c) for j, c, _ in idle.ends] == [("big", ErrorCode.memory_wait_exceeded)]
    assert "needs 90 MiB, 40 MiB available" in idle.ends[0][2] and "120 s" in idle.ends[0][2]
    assert idle.start == "small"


def test_jobs_that_can_never_run_end_at_once_and_stop_nothing() -> None:
    p = decide([q("long", CTX), q("ok")])
    assert p.ends == [("long", ErrorCode.context_too_long, "too long")] and p.start == "ok" and p.waits == []


def test_a_hold_makes_every_job_wait_for_it_and_a_memory_hold_is_bounded_too() -> None:
    p = held([q("a"), q("b")], WaitReason.paused, "paused", running=0, memory_wait_max_s=120)
    assert p.start is None and [r for _, r, _ in p.waits] == [WaitReason.paused] * 2
    m = held([q("a", memory_wait_s=200), q("b", memory_wait_s=10)], WaitReason.memory, "held", running=0,
             memory_wait_max_s=120)  # fmt: skip
    assert [j for j, _, _ in m.ends] == ["a"] and [j for j, _, _ in m.waits] == ["b"]


VERDICTS = st.sampled_from([RUN, RUN, MEM, CTX, Verdict.wait(WaitReason.model, "loading")])


@given(
    queue=st.lists(st.tuples(VERDICTS, st.floats(0, 300)), max_size=12),
    free=st.integers(0, 4),
    running=st.integers(0, 4),
)
@settings(max_examples=300)
def test_the_policy_model(queue: list[tuple[Verdict, float]], free: int, running: int) -> None:
    """Against a model of the rules: the first runnable job with no reserving memory waiter ahead of
    it starts whenever a slot is free; every other job ends or gets exactly one reason."""
    items = [q(f"j{i}", v, w if v is MEM else 0.0) for i, (v, w) in enumerate(queue)]
    p = decide(items, free=free, running=running)
    expected_start = None
    if free > 0:
        for it in items:
            if it.verdict is MEM and it.memory_wait_s >= 30 and not (running == 0 and it.memory_wait_s >= 120):
                break  # it reserves the capacity
            if it.verdict is RUN:
                expected_start = it.job_id
                break
    assert p.start == expected_start
    ended = {j for j, _, _ in p.ends}
    waiting = [j for j, _, _ in p.waits]
    assert len(waiting) == len(set(waiting)) and not ended & set(waiting) and p.start not in ended | set(waiting)
    for it in items:
        if it.verdict is CTX or (it.verdict is MEM and running == 0 and it.memory_wait_s >= 120):
            assert it.job_id in ended
        elif it.verdict.kind == "wait":
            assert it.job_id in waiting
    # A runnable job neither started nor waiting may only be one a still-free slot takes at the next pass.
    unannounced = [it for it in items if it.verdict is RUN and it.job_id != p.start and it.job_id not in waiting]
    assert len(unannounced) <= max(0, free - 1)


# --------------------------------------------------------------------------------------------
# the runner: measured tokens, the rule, waits recorded and announced


@pytest.fixture
def rig(tmp_path: Path):
    r = Rig(tmp_path)
    r.engine = FakeEngine(n_ctx=512, limits=RequestLimits(max_tokens_limit=1024))
    r.engine.load()
    yield r
    r.store.close()


def words(n: int) -> str:
    """A prompt the fake engine counts as n tokens (a BOS and n - 1 words)."""
    return " ".join(["w"] * (n - 1))


def drain(rig: Rig, passes: int = 50) -> None:
    for _ in range(passes):
        if not rig.runner.work_once() and not rig.store.queued():
            return
    raise AssertionError(f"the queue did not drain: {[r.job_id for r in rig.store.queued()]}")


def test_the_four_jobs_of_the_issue_all_end_within_one_pass_each(rig: Rig) -> None:
    """n_ctx 512: a 600-token story, a small job, a 300-token prompt with 64 to generate, another small one."""
    rig.submit("story", prompt="Write a long story about a dragon:", max_tokens=600)
    rig.submit("small-1", max_tokens=4)
    rig.submit("long-prompt", prompt=words(300), max_tokens=64)
    rig.submit("small-2", max_tokens=4)
    for _ in range(4):
        assert rig.runner.work_once() is True
    assert rig.store.queued() == []
    story = rig.result("story")
    assert (story["status"], story["finish_reason"]) == ("SUCCEEDED", "length")
    prompt_tokens = story["usage"]["prompt_tokens"]
    assert story["usage"]["max_tokens_allowed"] == 512 - prompt_tokens == story["usage"]["completion_tokens"]
    lp = rig.result("long-prompt")
    assert (lp["status"], lp["usage"]["prompt_tokens"], lp["usage"]["completion_tokens"]) == ("SUCCEEDED", 300, 64)
    assert lp["usage"]["max_tokens_allowed"] == 64
    assert {rig.result(j)["status"] for j in ("small-1", "small-2")} == {"SUCCEEDED"}


def test_a_prompt_that_fills_the_context_is_rejected_at_once_with_both_numbers_and_stops_nothing(rig: Rig) -> None:
    rig.submit("huge", prompt=words(600), max_tokens=8)
    rig.submit("small", max_tokens=2)
    assert rig.runner.work_once() is True  # "small" ran in the same pass that ended "huge"
    r = rig.result("huge")
    assert (r["status"], r["error"]["code"]) == ("REJECTED", "context_too_long")
    assert "600 tokens" in r["error"]["message"] and "512" in r["error"]["message"]
    assert rig.result("small")["status"] == "SUCCEEDED"
    assert rig.store.get("huge").prompt_tokens == 600  # measured once, with the loaded tokenizer


def test_keep_tail_cuts_a_prompt_that_fills_the_context_and_says_so(rig: Rig) -> None:
    rig.engine.limits = RequestLimits(max_tokens_limit=1024, context_overflow="keep_tail")
    rig.submit("huge", prompt=words(700), max_tokens=64)
    assert rig.runner.work_once() is True
    r = rig.result("huge")
    assert r["status"] == "SUCCEEDED"
    assert (r["usage"]["prompt_tokens"], r["usage"]["prompt_tokens_dropped"], r["usage"]["max_tokens_allowed"]) == (
        448, 252, 64)  # fmt: skip


def test_a_model_change_measures_queued_jobs_again(rig: Rig) -> None:
    rig.runner._admit = lambda tokens: Admission("wait", "no room")
    rig.submit("a", prompt=words(300), max_tokens=8)
    assert rig.runner.work_once() is False
    rec = rig.store.get("a")
    assert (rec.prompt_tokens, rec.measured_for, rec.waiting_for) == (300, "fake:512", "memory")
    small = FakeEngine(n_ctx=256, name="small")  # a new model with a smaller context
    small.load()
    rig.engine = small
    assert rig.runner.work_once() is False  # 300 tokens fill a 256-token context: rejected
    rec = rig.store.get("a")
    assert (rec.prompt_tokens, rec.measured_for, rec.status) == (300, "small:256", JobStatus.REJECTED)
    assert "256" in rig.result("a")["error"]["message"]


def test_every_wait_has_a_reason_recorded_announced_once_and_logged_once(rig: Rig, caplog) -> None:
    caplog.set_level(logging.INFO, logger="agent.jobs.runner")
    rig.submit("a")
    rig.gate.hold("intake.paused")
    for _ in range(3):
        assert rig.runner.work_once() is False
    rec = rig.store.get("a")
    assert (rec.waiting_for, rec.status) == ("paused", JobStatus.QUEUED)
    assert rec.as_dict()["waiting_for"] == "paused" and "intake is paused" in rec.as_dict()["waiting_detail"]
    announced = [json.loads(p) for p in rig.pub.on(rig.topics.status("a"))]
    assert [(m["status"], m.get("waiting_for")) for m in announced] == [("QUEUED", "paused")]
    assert "intake is paused" in announced[0]["message"]
    assert sum("job a waits for paused" in r.getMessage() for r in caplog.records) == 1
    rig.gate.release("intake.paused")
    engine, rig.engine = rig.engine, None  # the model goes away: the reason changes, and is told
    assert rig.runner.work_once() is False
    assert rig.store.get("a").waiting_for == "model"
    rig.engine = engine
    assert rig.runner.work_once() is True
    assert [json.loads(p).get("waiting_for") for p in rig.pub.on(rig.topics.status("a"))] == [
        "paused", "model", None, None]  # fmt: skip
    assert rig.store.get("a").waiting_for is None


def test_a_job_waiting_for_memory_does_not_block_smaller_ones_and_its_wait_is_bounded(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    room = {"tokens": 100}
    g = GovernorSettings(reserve_after_s=30, memory_wait_max_s=120)
    rig.runner = rig.make_runner()
    rig.runner._admit = lambda tokens: (
        Admission("run", "fits")
        if tokens <= room["tokens"]
        else Admission("wait", f"needs {tokens} tokens of KV, room for {room['tokens']}")
    )
    rig.runner._governor = lambda: g
    rig.submit("big", prompt=words(50), max_tokens=200, priority=5)
    rig.submit("small", max_tokens=4)
    assert rig.runner.work_once() is True  # "small" ran; "big" waits for memory
    assert rig.result("small")["status"] == "SUCCEEDED"
    big = rig.store.get("big")
    assert big.waiting_for == "memory" and "needs 250 tokens" in big.waiting_detail
    rig.clock.t += 119
    assert rig.runner.work_once() is False and rig.store.get("big").status is JobStatus.QUEUED
    rig.clock.t += 1
    assert rig.runner.work_once() is False
    r = rig.result("big")
    assert (r["status"], r["error"]["code"]) == ("FAILED", "memory_wait_exceeded")
    assert "needs 250 tokens" in r["error"]["message"]
    rig.store.close()


# --------------------------------------------------------------------------------------------
# property: on the fake engine, the queue never stalls while some job can start


JOB = st.tuples(
    st.integers(2, 700),  # prompt tokens (a BOS and at least one word)
    st.integers(1, 700),  # max_tokens
    st.integers(-2, 2),  # priority
)


@given(jobs=st.lists(JOB, min_size=1, max_size=10), room=st.integers(50, 1200),
       pauses=st.lists(st.booleans(), max_size=10), overflow=st.sampled_from(["refuse", "keep_tail"]))  # fmt: skip
@settings(max_examples=40, deadline=None)
def test_the_queue_never_stalls_while_a_job_can_start(tmp_path_factory, jobs, room, pauses, overflow) -> None:
    rig = Rig(tmp_path_factory.mktemp("q"))
    try:
        rig.engine = FakeEngine(n_ctx=512, limits=RequestLimits(max_tokens_limit=1024, context_overflow=overflow))
        rig.engine.load()
        rig.runner._admit = lambda tokens: Admission("run" if tokens <= room else "wait", f"{tokens} > {room}")
        for i, (n, max_tokens, prio) in enumerate(jobs):
            rig.submit(f"j{i}", prompt=words(n), max_tokens=max_tokens, priority=prio)

        def can_start(rec) -> bool:  # the model: what may start, judged without the runner
            job = rec.job()
            fit = fit_context(1 + len(job.prompt.split()), job.max_tokens, 512, overflow)
            return fit.fits and fit.keep + fit.allowed <= room

        for paused in pauses + [False] * (len(jobs) + 1):
            rig.gate.set_hold("intake.paused", paused)
            before = {r.job_id for r in rig.store.queued()}
            ran = rig.runner.work_once()
            if not ran and not paused:
                assert not any(can_start(r) for r in rig.store.queued()), "a job that can start stayed queued"
            for r in rig.store.queued():  # every job left waiting says why
                assert r.waiting_for in {w.value for w in WaitReason}, r
            assert len(before) - len(rig.store.queued()) <= len(before)
        left = rig.store.queued()
        assert all(r.waiting_for == "memory" for r in left) and not any(can_start(r) for r in left)
        rig.clock.t += 1000  # nothing runs: every memory wait reaches its bound
        rig.runner.work_once()
        assert rig.store.queued() == []
        for i in range(len(jobs)):
            assert len(rig.pub.on(rig.topics.result(f"j{i}"))) == 1  # one outcome each
    finally:
        rig.store.close()


def test_status_counts_the_queue_by_what_it_waits_for(tmp_path: Path, tiny_model: Path) -> None:
    """`edge-agent status` (text and --json) shows why queued jobs wait, from the store alone."""
    import subprocess
    import sys

    from agent.config import load_settings
    from tests.broker import free_port
    from tests.daemon_harness import write_daemon_config

    class DownBroker:
        host, port = "127.0.0.1", free_port()

    cfg = write_daemon_config(tmp_path / "dev", DownBroker(), tiny_model, device_id="st-w")  # type: ignore[arg-type]
    settings = load_settings(cfg, environ={})
    settings.device.state_dir.mkdir(parents=True, exist_ok=True)
    rig = Rig(tmp_path)
    rig.store.close()
    from agent.jobs.store import JobStore

    rig.store = JobStore.from_settings(settings.store, clock=rig.clock)
    rig.runner = rig.make_runner()
    for job_id in ("a", "b"):
        rig.submit(job_id)
    rig.gate.hold("intake.paused")
    rig.runner.work_once()
    rig.store.close()
    run = [sys.executable, "-m", "agent", "status", "-c", str(cfg)]
    doc = json.loads(subprocess.run([*run, "--json"], capture_output=True, text=True, timeout=60, check=True).stdout)
    assert doc["store"]["waiting"] == {"paused": 2}
    assert [(w["job_id"], w["waiting_for"]) for w in doc["store"]["next_waits"]] == [("a", "paused"), ("b", "paused")]
    text = subprocess.run(run, capture_output=True, text=True, timeout=60, check=True).stdout
    assert "waiting for: paused 2" in text and "waiting for paused since" in text and "intake is paused" in text
