"""The governor's policy, without I/O: levels with hysteresis and held PSI, the ordered actions with
their cool-down and recovery, missing signals, admission and the preemption limit. The clock is a
number passed in; nothing sleeps."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.codes import ErrorCode, JobStatus
from agent.config.sections import GovernorSettings
from agent.governor.policy import (
    LADDER,
    TOP_RUNG,
    UNDO,
    Action,
    Governor,
    GovernorState,
    Level,
    Posture,
    Signals,
    available_to_agent,
    describe,
    step,
)
from agent.jobs.admission import admit
from agent.telemetry import Sampler, Telemetry
from agent.telemetry.events import EventKind, decision_events, signals_missing_event

G = 1 << 30
MiB = 1 << 20
FIXTURES = Path(__file__).parent / "fixtures" / "system"
S = GovernorSettings()


def mem(avail_pct: float, **kw) -> Signals:
    return Signals(mem_total=100 * G, mem_available=int(avail_pct * G), **kw)


def run(gov: Governor, *points: tuple[float, Signals]) -> list[tuple[Level, int, list[str]]]:
    out = []
    for t, sig in points:
        d = gov.observe(sig, t)
        out.append((d.level, d.posture.rung, [a.action.value for a in d.actions]))
    return out


# ------------------------------------------------------------------------------- settings


def test_defaults_are_the_issue_s():
    assert (S.mem_available_warn_pct, S.mem_available_act_pct) == (20, 10)
    assert (S.psi_full_act_pct, S.psi_hold_s, S.cool_down_s) == (40, 10, 15)
    from agent.config.live import live_keys

    live = live_keys()
    assert all(live[f"governor.{k}"] == "hot" for k in GovernorSettings.model_fields)


@pytest.mark.parametrize(
    "bad",
    [{"mem_available_act_pct": 20, "mem_available_warn_pct": 20}, {"psi_some_act_pct": 30},
     {"cgroup_warn_pct": 96}],
)  # fmt: skip
def test_thresholds_must_be_ordered(bad):
    with pytest.raises(ValueError):
        GovernorSettings(**bad)


# ------------------------------------------------------------------------------- levels


def test_mem_available_levels_with_hysteresis():
    g = Governor(S)
    levels = [g.observe(mem(p), t).level for t, p in enumerate([50, 19.9, 22, 25.1, 9.9, 14, 15.1, 30])]
    # 22 % stays warn (below 20 + 5); 14 % stays critical (below 10 + 5); 15.1 % drops to warn
    assert levels == [Level.ok, Level.warn, Level.warn, Level.ok, Level.critical, Level.critical, Level.warn, Level.ok]


def test_psi_full_must_hold_for_the_hold_time():
    g = Governor(S)
    hi = mem(50, psi_some_avg10=50.0, psi_full_avg10=45.0)
    assert g.observe(hi, 0.0).level == Level.ok  # not held yet (some is also over its warn level)
    assert g.observe(hi, 9.9).level == Level.ok
    assert g.observe(hi, 10.0).level == Level.critical
    # falls with the hysteresis at once: full 36 (> 40 - 5) keeps critical, 34 does not
    assert g.observe(mem(50, psi_some_avg10=10.0, psi_full_avg10=36.0), 11.0).level == Level.critical
    assert g.observe(mem(50, psi_some_avg10=10.0, psi_full_avg10=34.0), 12.0).level == Level.ok


def test_an_interrupted_psi_spike_restarts_the_hold():
    g = Governor(S)
    hi, lo = mem(50, psi_some_avg10=0.0, psi_full_avg10=60.0), mem(50, psi_some_avg10=0.0, psi_full_avg10=1.0)
    for t in (0, 5, 9):
        assert g.observe(hi, t).level == Level.ok
    assert g.observe(lo, 9.5).level == Level.ok
    assert g.observe(hi, 10).level == Level.ok  # the hold starts again here
    assert g.observe(hi, 19.9).level == Level.ok
    assert g.observe(hi, 20).level == Level.critical


def test_psi_some_warns_and_acts():
    g = Governor(S)
    assert [g.observe(mem(50, psi_some_avg10=45.0, psi_full_avg10=0.0), t).level for t in (0, 10)] == [
        Level.ok,
        Level.warn,
    ]
    g = Governor(S)
    assert [g.observe(mem(50, psi_some_avg10=95.0, psi_full_avg10=0.0), t).level for t in (0, 10)] == [
        Level.ok,
        Level.critical,
    ]


def test_cgroup_working_set_against_the_smaller_of_limit_and_high():
    g = Governor(S)
    sig = lambda ws: mem(60, cgroup_working_set=ws * MiB, cgroup_limit=1000 * MiB, cgroup_high=900 * MiB)  # noqa: E731
    assert g.observe(sig(700), 0).level == Level.ok
    assert g.observe(sig(766), 1).level == Level.warn  # 85 % of 900
    assert g.observe(sig(856), 2).level == Level.critical  # 95 % of 900
    assert g.observe(sig(820), 3).level == Level.critical  # 91 % > 95 - 5
    assert g.observe(sig(800), 4).level == Level.warn
    d = g.observe(sig(600), 5)
    assert d.level == Level.ok and "cgroup_limit" not in d.missing


def test_the_worst_signal_wins_and_reasons_name_it():
    g = Governor(S)
    d = g.observe(
        mem(15, cgroup_working_set=990 * MiB, cgroup_limit=1000 * MiB, psi_some_avg10=0.0, psi_full_avg10=0.0), 0
    )
    assert d.level == Level.critical
    assert any(r.startswith("MemAvailable 15.0 %") for r in d.reasons)
    assert any("cgroup working set 99.0 % of its limit 1000 MiB" in r for r in d.reasons)


def test_missing_signals_are_named_and_mem_available_still_works():
    d = Governor(S).observe(mem(5), 0)
    assert d.level == Level.critical and d.missing == ("psi", "cgroup_memory")
    d = Governor(S).observe(mem(50, cgroup_working_set=10 * MiB, psi_some_avg10=0.0, psi_full_avg10=0.0), 0)
    assert d.missing == ("cgroup_limit",)


@pytest.mark.parametrize(
    "name, missing",
    [("pi4-stock", ("psi", "cgroup_memory")), ("pi5-throttled", ()), ("v1-hybrid", ()),
     ("v2-nolimit-swapfile", ("cgroup_limit",))],
)  # fmt: skip
def test_fixture_boards_feed_the_governor(tmp_path, name, missing):
    root = tmp_path / name
    shutil.copytree(FIXTURES / name, root)
    t = Sampler("x", root=root).sample()
    sig = Signals.from_reading(t)
    d = Governor(S).observe(sig, 0)
    assert d.missing == missing
    if name == "pi5-throttled":
        # MemAvailable 17.3 % -> warn; PSI takes the worse of system (12.5) and cgroup (20)
        assert sig.psi_some_avg10 == 20.0 and d.level == Level.warn


# ------------------------------------------------------------------------------- actions


def test_the_ladder_climbs_in_order_one_rung_per_cool_down():
    g = Governor(S)
    got = run(g, (0, mem(50)), (1, mem(15)), (2, mem(15)), (16, mem(15)), (20, mem(8)), (30.9, mem(8)),
              (31, mem(8)), (46, mem(8)), (100, mem(8)))  # fmt: skip
    assert got == [
        (Level.ok, 0, []),
        (Level.warn, 1, ["hold_unfit"]),
        (Level.warn, 1, []),
        (Level.warn, 2, ["shrink_context"]),
        (Level.critical, 2, []),  # 4 s after the last action: cooling down
        (Level.critical, 2, []),
        (Level.critical, 3, ["preempt"]),
        (Level.critical, 4, ["unload"]),
        (Level.critical, 4, []),
    ]


def test_warn_never_goes_past_shrinking_the_context():
    g = Governor(S)
    rungs = [g.observe(mem(15), t).posture.rung for t in range(0, 300, 5)]
    assert max(rungs) == 2


def test_recovery_undoes_in_reverse_after_pressure_stayed_low():
    g = Governor(S)
    run(g, *[(t, mem(5)) for t in (0, 15, 30, 45)])
    assert g.posture.rung == 4
    got = run(g, (50, mem(50)), (109, mem(50)), (110, mem(50)), (120, mem(50)), (125, mem(50)), (140, mem(50)),
              (155, mem(50)), (170, mem(50)))  # fmt: skip
    assert [x[2] for x in got] == [[], [], ["reload"], [], ["resume_jobs"], ["restore_context"], ["release_hold"], []]
    assert got[-1][:2] == (Level.ok, 0)


def test_pressure_returning_during_recovery_restarts_the_wait():
    g = Governor(S)
    run(g, *[(t, mem(5)) for t in (0, 15, 30, 45)])
    run(g, (50, mem(50)), (100, mem(50)))
    assert g.observe(mem(5), 105).actions == ()  # critical again before recover_s: nothing undone
    got = run(g, (106, mem(50)), (165, mem(50)), (166, mem(50)))
    assert [x[2] for x in got] == [[], [], ["reload"]]  # counted from 106, not from 50


def test_at_warn_the_critical_rungs_are_undone_but_the_warn_ones_stay():
    g = Governor(S)
    run(g, *[(t, mem(5)) for t in (0, 15, 30, 45)])
    got = run(g, *[(t, mem(15)) for t in range(50, 400, 5)])
    actions = [a for *_, acts in got for a in acts]
    assert actions == ["reload", "resume_jobs"] and g.posture.rung == 2


def test_disabling_undoes_everything_at_once():
    g = Governor(S)
    run(g, *[(t, mem(5)) for t in (0, 15, 30)])
    g.configure(GovernorSettings(enabled=False))
    d = g.observe(mem(5), 31)
    assert [a.action for a in d.actions] == [Action.resume_jobs, Action.restore_context, Action.release_hold]
    assert d.level == Level.ok and d.posture.rung == 0


def test_configure_keeps_the_state():
    g = Governor(S)
    g.observe(mem(15), 0)
    g.configure(GovernorSettings(mem_available_warn_pct=30, mem_available_act_pct=10))
    assert g.level == Level.warn and g.posture.rung == 1
    assert g.observe(mem(25), 1).level == Level.warn  # under the new warn threshold


def test_step_is_pure():
    state = GovernorState()
    a = step(state, mem(15), 3.0, S)
    b = step(state, mem(15), 3.0, S)
    assert a == b and state == GovernorState()


levels_strategy = st.lists(
    st.tuples(
        st.floats(min_value=0.1, max_value=10.0),  # seconds since the previous reading
        st.floats(min_value=0, max_value=100),  # MemAvailable %
        st.floats(min_value=0, max_value=100),  # PSI some
        st.floats(min_value=0, max_value=100),  # PSI full
    ),
    min_size=1,
    max_size=120,
)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(levels_strategy)
def test_ladder_invariants_over_any_sequence(seq):
    state, now, last_action = GovernorState(), 0.0, None
    for dt, avail, some, full in seq:
        now += dt
        before = state
        state, d = step(state, mem(avail, psi_some_avg10=some, psi_full_avg10=full), now, S)
        assert len(d.actions) <= 1 and abs(state.rung - before.rung) <= 1
        if d.actions:
            a = d.actions[0]
            # one rung at a time, in ladder order up and reverse order down
            assert (a.action == LADDER[state.rung - 1]) if not a.undo else (a.action == UNDO[before.rung - 1])
            assert last_action is None or now - last_action >= S.cool_down_s
            last_action = now
            if not a.undo:
                assert state.rung <= TOP_RUNG[d.level]
        else:
            assert state.rung == before.rung
        assert d.posture == Posture(state.rung)


# ------------------------------------------------------------------------------- admission


CALM = Posture(0)


def _admit(posture=CALM, **kw):
    base = dict(kv_bytes=50 * MiB, model_bytes=300 * MiB, tokens=600, available_bytes=1000 * MiB,
                capacity_bytes=1500 * MiB, posture=posture, settings=S, n_ctx=2048, mem_total=2 * G)  # fmt: skip
    return admit(**{**base, **kw})


def test_admission_run_wait_reject():
    assert _admit().verdict == "run"
    never = _admit(kv_bytes=1300 * MiB)
    assert never.verdict == "reject" and never.code == ErrorCode.will_not_fit
    assert never.code.status == JobStatus.REJECTED and "at most 1500 MiB" in never.reason
    assert _admit(available_bytes=340 * MiB).verdict == "wait"  # fits the board, not now
    # hold_unfit (rung 1): the warn reserve (20 % of 2 GiB = 409 MiB) must stay free too
    assert _admit(Posture(1)).verdict == "run"
    held = _admit(Posture(1), available_bytes=700 * MiB)
    assert held.verdict == "wait" and "warn reserve" in held.reason
    # shrink_context (rung 2): within 50 % of the context
    assert _admit(Posture(2), tokens=1024).verdict == "run"
    assert _admit(Posture(2), tokens=1025).verdict == "wait"
    assert _admit(Posture(3)).verdict == "wait" and _admit(Posture(4)).reason.startswith("the model is unloaded")
    # a job that can never fit is refused whatever the pressure, so it is not held forever
    assert _admit(Posture(4), kv_bytes=1300 * MiB).verdict == "reject"


def test_jobs_at_once_fall_to_one_from_shrink_context():
    assert [Posture(r).parallel(4) for r in range(5)] == [4, 4, 1, 1, 1]
    assert Posture(0).parallel(0) == 1  # no model loaded: one worker waits for it


def test_available_to_agent_counts_what_it_holds_and_its_cgroup_bound():
    t = Telemetry.model_validate({"device_id": "d", "ts": "2025-01-01T00:00:00Z", "mem_available_bytes": 500 * MiB,
                                  "rss_anon_bytes": 100 * MiB, "rss_file_bytes": 300 * MiB})  # fmt: skip
    assert available_to_agent(t) == 900 * MiB
    limited = t.model_copy(update={"cgroup_limit_bytes": 800 * MiB, "cgroup_working_set_bytes": 450 * MiB})
    assert available_to_agent(limited) == 800 * MiB - 50 * MiB  # 50 MiB of the working set is not the agent's


# ------------------------------------------------------------------------------- events and reporting


def test_decisions_become_events_with_the_readings():
    g = Governor(S)
    reading = Telemetry.model_validate({"device_id": "pi", "ts": "2025-01-01T00:00:00Z", "mem_available_pct": 8.0})
    d = g.observe(mem(8), 0)
    events = decision_events(d, reading, device_id="pi", ts=0.0)
    assert [e.kind for e in events] == [EventKind.level_changed, EventKind.action]
    assert (
        events[0].previous_level == "ok" and events[0].level == "critical" and "MemAvailable 8.0 %" in events[0].message
    )
    assert events[1].action == "hold_unfit" and events[1].readings == reading
    assert decision_events(g.observe(mem(8), 1), reading, device_id="pi", ts=1.0) == []
    assert describe(d) == {"level": "critical", "action": "hold_unfit", "rung": 1, "reasons": list(d.reasons),
                           "missing": ["psi", "cgroup_memory"]}  # fmt: skip


def test_signals_missing_event_says_how_to_enable_them():
    e = signals_missing_event({"psi": "add psi=1"}, device_id="pi", ts=0.0)
    assert e is not None and e.kind == EventKind.signals_missing and "psi=1" in e.message
    assert signals_missing_event({}, device_id="pi", ts=0.0) is None
