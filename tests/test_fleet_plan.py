"""The rollout's decisions (agent.operator.fleet.plan), pure: no broker, no clock; and its record (a real
SQLite file) surviving a reopen, as after a crash of the operator's machine."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.operator.fleet.plan import (
    PlanError,
    Policy,
    Row,
    Target,
    Threshold,
    decide,
    observe,
    parse_waves,
    restore_desired,
    restore_observe,
    wave_sizes,
)
from agent.operator.fleet.store import RolloutStore, Spec

SHA = "a" * 64
OLD = "b" * 64
T = Target("new.gguf", SHA, "https://models.example/new.gguf", 1000)
POLICY = Policy((25, 25, 50), Threshold.parse("20%"), 3, 600)


def doc(version: int, applied: int | None, *, desired: dict | None = None, model: dict | None = None,
        serving: str | None = "old.gguf", errors: dict | None = None, pending: dict | None = None,
        delta: dict | None = None) -> dict:  # fmt: skip
    reported: dict = {"model": model or {"path": "old.gguf", "sha256": OLD}, "serving": {"file": serving}}
    if applied is not None:
        reported["applied_version"] = applied
    if errors:
        reported["errors"] = errors
    if pending:
        reported["pending"] = pending
    return {"version": version, "state": {"desired": desired if desired is not None else {"model": T.desired()},
                                          "reported": reported, "delta": delta or {}}}  # fmt: skip


# ------------------------------------------------------------------ waves and thresholds


def test_waves_are_shares_that_add_up_to_100() -> None:
    assert parse_waves("5%,15%,80%") == (5, 15, 80)
    assert parse_waves("50,50") == (50, 50)
    for bad in ("5%,15%", "0%,100%", "x", "", "10%,-5%,95%"):
        with pytest.raises(PlanError):
            parse_waves(bad)


@pytest.mark.parametrize("n, waves, sizes", [
    (8, (5, 15, 80), [1, 1, 6]),
    (8, (25, 25, 50), [2, 2, 4]),
    (100, (5, 15, 80), [5, 15, 80]),
    (1, (5, 15, 80), [1]),
    (2, (5, 15, 80), [1, 1]),
    (3, (34, 33, 33), [2, 1]),
    (0, (100,), []),
])  # fmt: skip
def test_wave_sizes_round_up_so_small_waves_still_have_a_device(n: int, waves: tuple, sizes: list) -> None:
    assert wave_sizes(n, waves) == sizes
    assert sum(sizes) == n


def test_thresholds_are_a_share_or_a_count() -> None:
    pct, count = Threshold.parse("20%"), Threshold.parse("2")
    assert not pct.exceeded(1, 5) and pct.exceeded(2, 5) and not pct.exceeded(0, 0)
    assert not count.exceeded(2, 3) and count.exceeded(3, 100)
    for bad in ("-1", "120%", "ten"):
        with pytest.raises(PlanError):
            Threshold.parse(bad)


# ------------------------------------------------------------------ one device


def test_a_device_succeeds_when_the_target_is_in_force_after_our_version() -> None:
    assert observe(doc(5, 4), T, 5).outcome == "waiting"  # not applied yet
    done = doc(5, 5, model={"path": "new.gguf", "sha256": SHA}, serving="new.gguf")
    assert observe(done, T, 5) == observe(done, T, 5) and observe(done, T, 5).outcome == "succeeded"


def test_a_device_fails_on_an_error_under_model_path_after_our_version() -> None:
    bad = doc(5, 5, errors={"model.path": "canary_failed: new.gguf: ... output: 'xx'"})
    obs = observe(bad, T, 5)
    assert obs.outcome == "failed" and obs.message.startswith("canary_failed")
    # An error from before our update does not count: the device has not applied ours yet.
    assert observe(doc(5, 4, errors={"model.path": "old trouble"}), T, 5).outcome == "waiting"


def test_a_download_in_progress_is_waiting_with_its_progress() -> None:
    d = doc(5, 5, pending={"model.path": "downloading new.gguf (progress under reported.download)"})
    d["state"]["reported"]["download"] = {"path": "new.gguf", "bytes": 2**20, "total": 4 * 2**20}
    obs = observe(d, T, 5)
    assert obs.outcome == "waiting" and "1.0 of 4.0 MiB" in obs.message


def test_an_unacknowledged_update_is_found_in_the_document_or_still_waiting() -> None:
    assert observe(doc(3, 2, desired={"model": {"path": "old.gguf"}}), T, None).outcome == "waiting"
    done = doc(7, 7, model={"path": "new.gguf", "sha256": SHA}, serving="new.gguf")
    assert observe(done, T, None) == observe(done, T, 7)
    assert observe(None, T, None).outcome == "waiting"


def test_someone_else_changing_desired_fails_the_device() -> None:
    other = doc(9, 9, desired={"model": {"path": "other.gguf"}})
    assert observe(other, T, 6).outcome == "failed"


def test_restoring_puts_back_the_previous_keys_and_clears_the_rest() -> None:
    assert restore_desired({"path": "old.gguf", "sha256": OLD}) == {"path": "old.gguf", "sha256": OLD, "url": None,
                                                                    "size": None, "signature": None}  # fmt: skip
    assert restore_desired(None) == {"path": None, "sha256": None, "url": None, "size": None, "signature": None}
    # A signed previous model gets its manifest back with it (boards that trust keys load it again).
    assert restore_desired({"path": "old.gguf", "sha256": OLD, "signature": "{...}"})["signature"] == "{...}"
    prev = {"path": "old.gguf", "sha256": OLD}
    back = doc(8, 8, desired={"model": prev})
    assert restore_observe(back, prev, 8).outcome == "succeeded"
    assert restore_observe(doc(8, 7, desired={"model": prev}), prev, 8).outcome == "waiting"
    assert restore_observe(doc(8, 8, desired={"model": prev}, delta={"model": {"path": "old.gguf"}}), prev,
                           8).outcome == "waiting"  # fmt: skip


# ------------------------------------------------------------------ the rollout


def rows(*states: str, waves: tuple[int, ...] = (0, 0, 1, 1, 2, 2, 2, 2)) -> list[Row]:
    return [Row(f"d{i}", waves[i], s) for i, s in enumerate(states)]


def test_the_first_step_starts_wave_one() -> None:
    assert decide(rows(*["pending"] * 8), POLICY, -1, None, 0).action == "advance"
    assert decide([], POLICY, -1, None, 0).action == "finish"


def test_a_wave_advances_when_every_device_finished_within_the_threshold() -> None:
    assert decide(rows("succeeded", "updating", *["pending"] * 6), POLICY, 0, 0, 10).action == "wait"
    d = decide(rows("succeeded", "succeeded", *["pending"] * 6), POLICY, 0, 0, 10)
    assert d.action == "advance" and "2 of 2 succeeded" in d.reason
    last = rows(*["succeeded"] * 8)
    assert decide(last, POLICY, 2, 0, 10).action == "finish"


def test_failures_past_the_threshold_abort_once_enough_devices_finished() -> None:
    # 1 failure of 2 finished: above 20 %, but fewer than --min-devices 3 finished: keep going mid-wave.
    assert decide(rows("failed", "succeeded", *["pending"] * 6, waves=(0, 0, 0, 0, 1, 1, 2, 2)), POLICY, 0, 0,
                  1).action == "wait"  # fmt: skip
    # 1 of 3: 33 % > 20 %: abort, mid-wave.
    d = decide(rows("succeeded", "succeeded", "failed", "updating", *["pending"] * 4), POLICY, 1, 0, 1)
    assert d.action == "abort" and "1 of 3 finished devices failed" in d.reason


def test_a_finished_wave_whose_own_failures_pass_the_threshold_aborts() -> None:
    p = Policy((50, 50), Threshold.parse("1"), 10, 600)  # min-devices never reached in a wave of 4
    r = [
        Row(f"d{i}", 0 if i < 4 else 1, s)
        for i, s in enumerate(
            ["failed", "failed", "succeeded", "succeeded", "pending", "pending", "pending", "pending"]
        )
    ]
    d = decide(r, p, 0, 0, 1)
    assert d.action == "abort" and d.reason.startswith("wave 1: 2 of 4")
    r[1] = Row("d1", 0, "succeeded")
    assert decide(r, p, 0, 0, 1).action == "advance"  # 1 failure is within a count of 1


def test_devices_still_pending_at_the_wave_timeout_count_as_failed() -> None:
    r = rows("succeeded", "updating", *["pending"] * 6)
    assert decide(r, POLICY, 0, 100, 699).timed_out == ()
    d = decide(r, POLICY, 0, 100, 700)
    assert d.timed_out == ("d1",) and d.action == "abort"  # the wave's 1 of 2 is over 20 %
    assert decide(r, Policy((25, 25, 50), Threshold.parse("60%"), 3, 600), 0, 100, 700).action == "advance"


# ------------------------------------------------------------------ the record


def test_the_record_survives_a_reopen(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    store = RolloutStore(db)
    r = store.create(Spec(T, POLICY, "--group canary", "edge"), [("a", 0), ("b", 1)], 100.0)
    store.set_device(r.id, "a", state="updating", previous={"path": "old.gguf"}, version=4, sent_at=101.0)
    store.set_rollout(r.id, wave=0, wave_started=101.0)
    store.close()
    again = RolloutStore(db).load(r.id)
    assert again.spec.target == T and again.spec.policy == POLICY and again.wave == 0
    a = again.devices[0]
    assert (a.device, a.state, a.previous, a.version) == ("a", "updating", {"path": "old.gguf"}, 4)
    assert again.devices[1].state == "pending"
