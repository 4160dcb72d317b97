"""Reconcile (agent.shadow.reconcile), pure: which actions, in which order, and what is remembered."""

from __future__ import annotations

from agent.config import Settings
from agent.config.inforce import effective_settings
from agent.config.live import ApplyReport
from agent.shadow.desired import live_values
from agent.shadow.reconcile import Action, Settled, plan, settle, tidy

BASE = Settings()
IN_FORCE = live_values(BASE)


def target(**desired: dict) -> dict:
    return live_values(effective_settings(BASE, desired))


def test_in_sync_means_no_action():
    assert plan(IN_FORCE, IN_FORCE) == []


def test_order_pause_first_then_hot_then_one_reload_then_nothing_else():
    want = target(
        engine={"n_ctx": 512, "max_tokens_limit": 99, "load_mode": "fit"},
        model={"path": "b.gguf"},
        intake={"paused": True},
        telemetry={"interval_s": 5},
    )
    assert plan(want, IN_FORCE) == [
        Action("pause_intake", ("intake.paused",)),
        Action("hot", ("engine.max_tokens_limit", "telemetry.interval_s")),
        Action("reload", ("model.path", "engine.load_mode", "engine.n_ctx")),
    ]


def test_resuming_intake_comes_last_after_the_reload():
    paused = dict(IN_FORCE, **{"intake.paused": True})
    want = target(engine={"n_ctx": 512}, intake={"paused": False})
    assert plan(want, paused) == [Action("reload", ("engine.n_ctx",)), Action("resume_intake", ("intake.paused",))]


def test_a_removed_desired_key_goes_back_to_the_config_file_value():
    in_force = dict(IN_FORCE, **{"telemetry.interval_s": 5.0})
    assert plan(target(), in_force) == [Action("hot", ("telemetry.interval_s",))]


def test_a_failed_value_is_not_retried_until_the_target_changes():
    want = target(model={"path": "bad.gguf"})
    failed = {"model.path": "bad.gguf"}
    assert plan(want, IN_FORCE, failed=failed) == []
    assert plan(target(model={"path": "good.gguf"}), IN_FORCE, failed=failed) == [Action("reload", ("model.path",))]
    # Other reload keys still go ahead, without the failed one.
    both = target(model={"path": "bad.gguf"}, engine={"n_ctx": 512})
    assert plan(both, IN_FORCE, failed=failed) == [Action("reload", ("engine.n_ctx",))]


def test_settle_folds_each_kind_of_report():
    want = target(model={"path": "bad.gguf"}, engine={"n_ctx": 512}, swap={"policy": "zram"})
    action = Action("reload", ("model.path", "engine.n_ctx"))
    report = ApplyReport(failed={"model.path": "does not load"}, applied={"engine.n_ctx": 512})
    after = dict(IN_FORCE, **{"engine.n_ctx": 512})
    s = settle(Settled(), action, report, want, after)
    assert s.failed == {"model.path": "bad.gguf"} and s.errors == {"model.path": "does not load"}

    s = settle(
        s,
        Action("hot", ("swap.policy",)),
        ApplyReport(pending={"swap.policy": "not applied yet"}),
        want,
        dict(after, **{"swap.policy": "zram"}),
    )
    assert s.pending == {"swap.policy": "not applied yet"} and "model.path" in s.errors

    s = settle(s, action, ApplyReport(applied={"model.path": "bad.gguf"}), want, after)
    assert s.failed == {} and s.errors == {}


def test_settle_never_ignores_a_key_silently():
    want = target(telemetry={"interval_s": 5}, priority={"nice": 3})
    action = Action("hot", ("telemetry.interval_s", "priority.nice"))
    # interval_s: no report but in force (someone else applied it); nice: no report and not in force.
    after = dict(IN_FORCE, **{"telemetry.interval_s": 5.0})
    s = settle(Settled(), action, ApplyReport(), want, after)
    assert s.errors == {"priority.nice": "not applied: the daemon did not report on this key"}
    s = settle(Settled(), Action("hot", ("priority.nice",)), ApplyReport(restart=["priority.nice"]), want, after)
    assert s.errors == {"priority.nice": "takes effect only after a restart"}


def test_tidy_forgets_an_error_once_the_target_is_what_is_in_force():
    s = Settled(failed={"model.path": "bad.gguf"}, errors={"model.path": "does not load"})
    assert tidy(s, target(model={"path": "bad.gguf"}), IN_FORCE) == s
    # The operator removed the desired path: the config file's value is in force, no error.
    assert tidy(s, target(), IN_FORCE) == Settled()
