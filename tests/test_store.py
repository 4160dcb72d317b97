"""The job store on real SQLite files: transitions, exactly-once outcomes, recovery, retention, crashes."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from agent.config.sections import StoreSettings
from agent.errors import StoreError
from agent.jobs.protocol import ErrorCode, ErrorInfo, JobOutcome, JobStatus, JobSubmit, Timings, Usage
from agent.jobs.store import EARLY_CANCEL_KEEP_S, SCHEMA_VERSION, JobStore
from tests.helpers import Clock

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> JobStore:
    s = JobStore(
        tmp_path / "jobs.db", queue_max=5, max_attempts=2, keep_finished=10, keep_finished_days=1.0, clock=clock
    )
    yield s
    s.close()


def job(job_id: str, **over: Any) -> JobSubmit:
    return JobSubmit(**{"job_id": job_id, "kind": "generate", "prompt": f"prompt of {job_id}", "max_tokens": 8, **over})


def ok(text: str = "done", tokens_per_s: float = 4.0) -> JobOutcome:
    return JobOutcome(status=JobStatus.SUCCEEDED, text=text, finish_reason="stop",
                      usage=Usage(prompt_tokens=2, completion_tokens=1),
                      timings=Timings(queue_ms=1.0, prompt_ms=2.0, generation_ms=3.0, tokens_per_s=tokens_per_s))  # fmt: skip


refused = JobOutcome.refused


def configure(store: JobStore, **limits: Any) -> None:
    """store.configure with the store's current limits, some changed."""
    now = dict(queue_max=store.queue_max, max_attempts=store.max_attempts, max_preemptions=store.max_preemptions,
               keep_finished=store.keep_finished, keep_finished_days=store.keep_finished_days)  # fmt: skip
    store.configure(StoreSettings(**{**now, **limits}))


def pragma(s: JobStore, name: str) -> Any:
    return s._connection().execute(f"PRAGMA {name}").fetchone()[0]


# ---------------------------------------------------------------------------------------------
# Opening


def test_open_sets_durable_pragmas_and_schema_version(store: JobStore) -> None:
    assert pragma(store, "journal_mode") == "wal"
    assert pragma(store, "synchronous") == 2  # FULL
    assert pragma(store, "auto_vacuum") == 2  # INCREMENTAL
    assert pragma(store, "user_version") == SCHEMA_VERSION
    assert pragma(store, "busy_timeout") == 5000


def test_reopening_keeps_data_and_schema_creation_is_idempotent(tmp_path: Path, clock: Clock) -> None:
    with JobStore(tmp_path / "j.db", clock=clock) as s:
        s.accept(job("a"))
    for _ in range(2):
        with JobStore(tmp_path / "j.db", clock=clock) as s:
            assert s.get("a") is not None and s.counts()["QUEUED"] == 1


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    JobStore(tmp_path / "j.db").close()
    with sqlite3.connect(tmp_path / "j.db") as c:
        c.execute("PRAGMA user_version = 99")
    with pytest.raises(StoreError, match="schema version 99 was written by a newer edge-agent") as e:
        JobStore(tmp_path / "j.db")
    assert e.value.code == "store_version"


def test_garbage_file_is_reported_as_damaged_with_its_name(tmp_path: Path) -> None:
    (tmp_path / "j.db").write_bytes(b"this is not a database" * 200)
    with pytest.raises(StoreError) as e:
        JobStore(tmp_path / "j.db")
    assert e.value.code == "store_corrupt"
    assert str(tmp_path / "j.db") in str(e.value) and "move j.db and its -wal and -shm files aside" in str(e.value)


def test_missing_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="folder .*nowhere does not exist") as e:
        JobStore(tmp_path / "nowhere" / "j.db")
    assert e.value.code == "store_cantopen"


def test_disk_full_is_a_store_error_and_leaves_the_store_usable(store: JobStore) -> None:
    # max_page_count makes SQLite hit SQLITE_FULL exactly as on a full SD card.
    store._connection().execute(f"PRAGMA max_page_count = {pragma(store, 'page_count') + 2}")
    with pytest.raises(StoreError, match="the disk is full; free space") as e:
        for i in range(100):
            store.accept(JobSubmit(job_id=f"big-{i}", kind="generate", prompt="x" * 50000, max_tokens=1))
    assert e.value.code == "store_full" and str(store.path) in str(e.value)
    store._connection().execute("PRAGMA max_page_count = 1073741823")
    assert store.accept(job("after")).outcome == "new"  # the failed transaction was rolled back


def test_read_only_is_a_store_error(store: JobStore) -> None:
    store._connection().execute("PRAGMA query_only = 1")
    with pytest.raises(StoreError, match="read-only") as e:
        store.accept(job("a"))
    assert e.value.code == "store_readonly"


def test_closed_store_refuses_politely(store: JobStore) -> None:
    store.close()
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.get("a")


# ---------------------------------------------------------------------------------------------
# accept / reject


def test_accept_stores_the_job_queued(store: JobStore, clock: Clock) -> None:
    j = job("a", priority=3, timeout_s=9.5, expires_at=datetime(2099, 1, 1, tzinfo=UTC))
    acc = store.accept(j, b'{"raw": 1}')
    r = acc.record
    assert acc.outcome == "new"
    assert (r.status, r.attempt, r.priority, r.created_at, r.timeout_s) == (JobStatus.QUEUED, 0, 3, clock.t, 9.5)
    assert r.expires_at == datetime(2099, 1, 1, tzinfo=UTC).timestamp()
    assert r.started_at is None and r.finished_at is None and r.outcome is None and not r.delivered
    assert r.job() == j


def test_duplicates_are_recognised_in_every_state(store: JobStore) -> None:
    store.accept(job("a"))
    assert store.accept(job("a")).outcome == "duplicate_pending"
    store.claim_next()
    assert store.accept(job("a")).outcome == "duplicate_pending"
    store.finish("a", ok())
    dup = store.accept(job("a", prompt="something else"))
    assert dup.outcome == "duplicate_finished" and dup.record.outcome == ok()
    assert store.counts()["SUCCEEDED"] == 1


def test_queue_full_is_stored_as_a_deliverable_rejection(store: JobStore, clock: Clock) -> None:
    for i in range(5):
        assert store.accept(job(f"q{i}")).outcome == "new"
    store.claim_next()  # a running job frees a waiting place
    assert store.accept(job("q5")).outcome == "new"
    acc = store.accept(job("over"))
    assert acc.outcome == "rejected_queue_full"
    r = acc.record
    assert r.status is JobStatus.REJECTED and r.error_code == "queue_full" and r.finished_at == clock.t
    assert r.outcome == refused(ErrorCode.queue_full, "5 jobs are already waiting (store.queue_max); try later")
    assert [x.job_id for x in store.undelivered()] == ["over"]
    # The same submission again gets the same stored rejection, not a second outcome.
    again = store.accept(job("over"))
    assert again.outcome == "duplicate_finished" and again.record.outcome == r.outcome
    msg = r.result_message("pi-1")
    assert msg.status is JobStatus.REJECTED and msg.error is not None and msg.error.code is ErrorCode.queue_full


def test_already_expired_job_is_rejected_on_arrival(store: JobStore, clock: Clock) -> None:
    past = datetime.fromtimestamp(clock.t - 1, tz=UTC)
    acc = store.accept(job("late", expires_at=past))
    assert acc.outcome == "rejected_expired" and acc.record.error_code == "expired"
    assert "had passed when the job arrived" in acc.record.outcome.error.message


def test_reject_stores_an_outcome_without_a_request(store: JobStore, clock: Clock) -> None:
    acc = store.reject("bad-1", ErrorCode.invalid_payload, "max_tokens must be an integer", raw=b"x" * 100000)
    r = acc.record
    assert acc.outcome == "rejected" and r.status is JobStatus.REJECTED and r.request is None and r.job() is None
    assert r.outcome.error == ErrorInfo(code=ErrorCode.invalid_payload, message="max_tokens must be an integer")
    raw = store._connection().execute("SELECT raw FROM jobs WHERE job_id = 'bad-1'").fetchone()[0]
    assert len(raw) == 65536  # a diagnosis sample, not the whole junk
    assert r.result_message("d").to_payload()


def test_reject_never_overwrites_an_existing_job(store: JobStore) -> None:
    store.accept(job("a"))
    acc = store.reject("a", ErrorCode.invalid_payload, "bad resend")
    assert acc.outcome == "duplicate_pending" and acc.record.status is JobStatus.QUEUED
    store.reject("b", ErrorCode.invalid_payload, "first")
    acc = store.reject("b", ErrorCode.prompt_too_large, "second")
    assert acc.outcome == "duplicate_finished" and acc.record.outcome.error.message == "first"


# ---------------------------------------------------------------------------------------------
# claim_next / finish / requeue


def test_claim_order_is_priority_then_arrival(store: JobStore, clock: Clock) -> None:
    for job_id, prio in [("low", -5), ("a", 0), ("high", 50), ("b", 0), ("high2", 50)]:
        store.accept(job(job_id, priority=prio))
        clock.advance(1)
    order = []
    while (r := store.claim_next()) is not None:
        order.append(r.job_id)
        assert r.status is JobStatus.IN_PROGRESS and r.attempt == 1 and r.started_at == clock.t
    assert order == ["high", "high2", "a", "b", "low"]


def test_claim_skips_expired_jobs(store: JobStore, clock: Clock) -> None:
    soon = datetime.fromtimestamp(clock.t + 10, tz=UTC)
    store.accept(job("soon", priority=9, expires_at=soon))
    store.accept(job("later"))
    clock.advance(10)
    assert store.claim_next().job_id == "later"
    assert store.claim_next() is None


def test_finish_is_exactly_once(store: JobStore, clock: Clock) -> None:
    store.accept(job("a"))
    store.claim_next()
    clock.advance(2)
    assert store.finish("a", ok("first")) is True
    clock.advance(2)
    assert store.finish("a", refused(ErrorCode.engine_error, "late")) is False
    assert store.finish("a", ok("second")) is False
    r = store.get("a")
    assert r.status is JobStatus.SUCCEEDED and r.outcome.text == "first" and r.finished_at == clock.t - 2
    assert store.finish("ghost", ok()) is False


def test_finish_checks_its_arguments(store: JobStore) -> None:
    store.accept(job("a"))
    with pytest.raises(ValidationError, match="terminal status"):
        JobOutcome(status=JobStatus.IN_PROGRESS)
    with pytest.raises(TypeError):
        store.finish("a", {"status": "SUCCEEDED"})  # type: ignore[arg-type]


def test_finish_stores_what_json_cannot_carry_as_publishable(store: JobStore) -> None:
    store.accept(job("a"))
    store.claim_next()
    assert store.finish("a", ok("half a char: \udc80", tokens_per_s=float("inf")))
    r = store.get("a")
    assert r.outcome.text == "half a char: \ufffd" and r.outcome.timings.tokens_per_s is None
    data = json.loads(r.result_message("pi-1").to_payload())
    assert data["status"] == "SUCCEEDED" and data["attempt"] == 1 and data["error"] is None


def test_result_message_takes_its_envelope_from_the_record(store: JobStore, clock: Clock) -> None:
    store.accept(job("a"))
    store.claim_next()
    store.finish("a", ok("t"))
    finished_at = clock.t
    clock.advance(30)
    msg = store.get("a").result_message("pi-1")
    assert (msg.job_id, msg.device_id, msg.attempt, msg.text) == ("a", "pi-1", 1, "t")
    assert msg.ts.timestamp() == finished_at  # every copy carries the same ts


def test_requeue_for_a_shutdown_does_not_count_the_run(store: JobStore) -> None:
    store.accept(job("a"))
    store.claim_next()
    assert store.requeue("a", "shutdown") == "requeued"
    r = store.get("a")
    assert (r.status, r.attempt, r.started_at, r.preemptions) == (JobStatus.QUEUED, 0, None, 0)
    assert store.requeue("a", "shutdown") == "not_running"
    assert store.claim_next().attempt == 1


def test_preemptions_are_free_up_to_the_limit_then_count_and_end_the_job(tmp_path: Path, clock: Clock) -> None:
    with JobStore(tmp_path / "j.db", max_attempts=3, max_preemptions=2, clock=clock) as s:
        s.accept(job("a"))
        seen = []
        for _ in range(10):
            rec = s.claim_next()
            if rec is None:
                break
            seen.append((s.requeue("a", "preempt"), rec.attempt))
        # two free preemptions (attempt given back), then each run counts, until max_attempts
        assert seen == [("requeued", 1), ("requeued", 1), ("requeued_counted", 1), ("requeued_counted", 2),
                        ("failed_preempted", 3)]  # fmt: skip
        r = s.get("a")
        assert (r.status, r.error_code, r.preemptions, r.delivered) == (JobStatus.FAILED, "preempted", 5, False)
        assert "preempted 5 time(s)" in r.outcome.error.message


# ---------------------------------------------------------------------------------------------
# cancel / expire


def test_cancel_outcomes(store: JobStore, clock: Clock) -> None:
    store.accept(job("queued"))
    store.accept(job("running", priority=1))
    store.claim_next()
    assert store.cancel("queued") == "canceled_queued"
    r = store.get("queued")
    assert r.status is JobStatus.CANCELED and r.error_code == "canceled" and not r.delivered
    assert store.cancel("queued") == "finished"
    assert store.cancel("running") == "running"
    assert store.get("running").status is JobStatus.IN_PROGRESS  # the caller stops the engine first
    assert store.finish("running", JobOutcome(status=JobStatus.CANCELED, text="par", finish_reason="canceled",
                                              error=ErrorInfo(code=ErrorCode.canceled, message="x")))  # fmt: skip
    assert store.cancel("running") == "finished"
    assert store.cancel("nobody") == "unknown"


def test_a_cancel_that_comes_before_its_job_cancels_it_on_arrival(store: JobStore, clock: Clock) -> None:
    # Cancels may travel on a connection of their own (mqtt.control_session) and overtake the submit.
    assert store.cancel("early") == "unknown"
    acc = store.accept(job("early"))
    assert acc.outcome == "canceled_before_arrival"
    r = store.get("early")
    assert r is not None and r.status is JobStatus.CANCELED and r.error_code == "canceled" and not r.delivered
    assert store.claim_next() is None  # it never runs
    # The cancel is used once: a later job with another id is not touched, and the id's record stays.
    assert store.accept(job("other")).outcome == "new"
    assert store.accept(job("early")).outcome == "duplicate_finished"


def test_an_early_cancel_is_forgotten_after_an_hour(store: JobStore, clock: Clock) -> None:
    assert store.cancel("late") == "unknown"
    clock.advance(EARLY_CANCEL_KEEP_S + 1)
    assert store.accept(job("late")).outcome == "new"
    assert store.cancel("pruned") == "unknown"
    clock.advance(EARLY_CANCEL_KEEP_S + 1)
    store.prune()
    assert store._db.execute("SELECT count(*) FROM early_cancels").fetchone()[0] == 0


def test_expire_queued(store: JobStore, clock: Clock) -> None:
    at = lambda dt: datetime.fromtimestamp(clock.t + dt, tz=UTC)  # noqa: E731
    store.accept(job("x5", expires_at=at(5)))
    store.accept(job("x50", expires_at=at(50)))
    store.accept(job("never"))
    store.accept(job("running", priority=9, expires_at=at(5)))
    store.claim_next()
    assert store.expire_queued() == []
    clock.advance(5)
    expired = store.expire_queued()
    assert [r.job_id for r in expired] == ["x5"]
    assert expired[0].status is JobStatus.REJECTED and expired[0].error_code == "expired"
    assert "passed while the job waited in the queue" in expired[0].outcome.error.message
    assert store.get("running").status is JobStatus.IN_PROGRESS  # started in time: it runs on
    assert store.expire_queued() == []


# ---------------------------------------------------------------------------------------------
# recover


def test_recover_requeues_then_fails_after_max_attempts(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "j.db"
    with JobStore(path, max_attempts=2, clock=clock) as s:
        s.accept(job("crashy"))
        s.claim_next()  # attempt 1, then the process "dies"
    with JobStore(path, max_attempts=2, clock=clock) as s:
        assert s.recover() == [("crashy", "requeued")]
        r = s.get("crashy")
        assert (r.status, r.attempt, r.started_at) == (JobStatus.QUEUED, 1, None)
        assert s.claim_next().attempt == 2
    with JobStore(path, max_attempts=2, clock=clock) as s:
        assert s.recover() == [("crashy", "failed_interrupted")]
        r = s.get("crashy")
        assert r.status is JobStatus.FAILED and r.error_code == "interrupted" and not r.delivered
        assert "2 time(s) (store.max_attempts 2)" in r.outcome.error.message
    with JobStore(path, max_attempts=2, clock=clock) as s:
        assert s.recover() == [("crashy", "undelivered")]  # until the result is confirmed
        s.mark_delivered("crashy")
        assert s.recover() == []


def test_recover_lists_each_job_once(store: JobStore) -> None:
    store.accept(job("done"))
    store.claim_next()
    store.finish("done", ok())
    store.accept(job("sent"))
    store.claim_next()
    store.finish("sent", ok())
    store.mark_delivered("sent")
    store.accept(job("running"))
    store.claim_next()
    store.accept(job("waiting"))
    assert sorted(store.recover()) == [("done", "undelivered"), ("running", "requeued")]


# ---------------------------------------------------------------------------------------------
# delivery and queries


def test_mark_delivered_and_undelivered_order(store: JobStore, clock: Clock) -> None:
    for name in ("a", "b", "c"):
        store.accept(job(name))
    store.claim_next()
    clock.advance(1)
    store.cancel("c")
    clock.advance(1)
    store.finish("a", ok())
    assert [r.job_id for r in store.undelivered()] == ["c", "a"]
    assert store.mark_delivered("b") is False  # not terminal: nothing to deliver yet
    assert store.mark_delivered("c") is True and store.get("c").delivered
    assert store.mark_delivered("c") is True  # a second PUBACK is harmless
    assert [r.job_id for r in store.undelivered()] == ["a"]
    assert store.mark_delivered("ghost") is False


def test_queries(store: JobStore) -> None:
    for i in range(4):
        store.accept(job(f"j{i}"))
    store.claim_next()
    store.reject("bad", ErrorCode.invalid_payload, "x")
    assert [r.job_id for r in store.list_jobs()] == ["bad", "j3", "j2", "j1", "j0"]
    assert [r.job_id for r in store.list_jobs(limit=2)] == ["bad", "j3"]
    assert [r.job_id for r in store.list_jobs(JobStatus.IN_PROGRESS)] == ["j0"]
    assert [r.job_id for r in store.list_jobs("QUEUED")] == ["j3", "j2", "j1"]
    assert store.counts() == {"QUEUED": 3, "IN_PROGRESS": 1, "SUCCEEDED": 0, "FAILED": 0, "REJECTED": 1,
                              "CANCELED": 0, "TIMED_OUT": 0, "RELEASED": 0}  # fmt: skip
    assert store.queued_count() == 3
    assert store.get("nope") is None


def test_status_message_from_a_record(store: JobStore, clock: Clock) -> None:
    store.reject("bad", ErrorCode.invalid_payload, "why")
    msg = store.get("bad").status_message("pi-1", clock.t)
    assert (msg.status, msg.reason, msg.message) == (JobStatus.REJECTED, ErrorCode.invalid_payload, "why")
    store.accept(job("a"))
    with pytest.raises(ValueError, match="has no result yet"):
        store.get("a").result_message("pi-1")


def test_configure_changes_limits_in_place(store: JobStore) -> None:
    configure(store, queue_max=1)
    assert store.accept(job("a")).outcome == "new"
    assert store.accept(job("b")).outcome == "rejected_queue_full"
    configure(store, keep_finished=20)
    assert (store.queue_max, store.keep_finished, store.max_attempts) == (1, 20, 2)


# ---------------------------------------------------------------------------------------------
# prune


def finished(store: JobStore, job_id: str, *, delivered: bool) -> None:
    store.accept(job(job_id))
    store.cancel(job_id)
    if delivered:
        store.mark_delivered(job_id)


def test_prune_keeps_the_newest_delivered_and_everything_undelivered(store: JobStore, clock: Clock) -> None:
    for i in range(15):
        finished(store, f"old{i:02d}", delivered=True)
        clock.advance(1)
    finished(store, "undelivered", delivered=False)
    store.accept(job("queued"))
    store.accept(job("running"))
    store.claim_next()
    assert store.prune() == 5  # keep_finished = 10
    left = {r.job_id for r in store.list_jobs(limit=100)}
    assert left == {f"old{i:02d}" for i in range(5, 15)} | {"undelivered", "queued", "running"}


def test_prune_by_age_never_touches_undelivered(store: JobStore, clock: Clock) -> None:
    finished(store, "sent", delivered=True)
    finished(store, "unsent", delivered=False)
    clock.advance(86400 - 1)
    assert store.prune() == 0
    clock.advance(2)
    assert store.prune() == 1
    clock.advance(365 * 86400)
    assert store.prune() == 0
    assert store.get("unsent") is not None and store.get("sent") is None


def test_prune_gives_space_back_and_truncates_the_wal(store: JobStore) -> None:
    configure(store, queue_max=1000, keep_finished=10)
    for i in range(300):
        store.accept(JobSubmit(job_id=f"j{i}", kind="generate", prompt="x" * 4000, max_tokens=1))
        store.cancel(f"j{i}")
        store.mark_delivered(f"j{i}")
    pages_before = pragma(store, "page_count")
    assert store.prune() == 290
    wal = Path(str(store.path) + "-wal")
    assert pragma(store, "freelist_count") == 0
    assert pragma(store, "page_count") < pages_before / 5
    assert wal.stat().st_size == 0


# ---------------------------------------------------------------------------------------------
# concurrency and crashes


def test_two_threads_share_the_store(store: JobStore) -> None:
    configure(store, queue_max=10000)
    n = 200
    errors: list[BaseException] = []
    claimed: list[str] = []

    def producer() -> None:
        try:
            for i in range(n):
                assert store.accept(job(f"t{i}")).outcome == "new"
        except BaseException as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    def worker() -> None:
        try:
            while len(claimed) < n:
                r = store.claim_next()
                if r is None:
                    continue
                claimed.append(r.job_id)
                assert store.finish(r.job_id, ok())
                assert store.mark_delivered(r.job_id)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=producer), threading.Thread(target=worker)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert sorted(claimed) == sorted(f"t{i}" for i in range(n))  # each once
    assert store.counts()["SUCCEEDED"] == n and store.undelivered() == []


CHILD = textwrap.dedent(
    """
    import sys
    from agent.jobs.protocol import JobSubmit
    from agent.jobs.store import JobStore

    store = JobStore(sys.argv[1], queue_max=1_000_000)
    for i in range(1_000_000):
        job_id = f"c{i}"
        store.accept(JobSubmit(job_id=job_id, kind="generate", prompt="p" * 200, max_tokens=4))
        if i % 7 == 0:  # keep state changes going too, not only inserts
            store.claim_next()
        sys.stdout.write(job_id + "\\n")
        sys.stdout.flush()
    """
)


@pytest.mark.parametrize("kill_after", [1, 60, 400])
def test_every_acknowledged_job_survives_sigkill(tmp_path: Path, kill_after: int) -> None:
    # SIGKILL tests the process dying at any point; surviving a power cut additionally rests on
    # synchronous=FULL (every commit fsynced), which a test cannot cut the power to check.
    path = tmp_path / "jobs.db"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path)],
        stdout=subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert child.stdout is not None
    acked = []
    for line in child.stdout:
        acked.append(line.decode().strip())
        if len(acked) >= kill_after:
            break
    child.send_signal(signal.SIGKILL)
    acked += [line.decode().strip() for line in child.stdout]  # written before the kill landed
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    with JobStore(path) as s:
        assert s._connection().execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        missing = [job_id for job_id in acked if s.get(job_id) is None]
        assert missing == []
        total = sum(s.counts().values())
        assert len(acked) <= total <= len(acked) + 1  # at most the one committed but not yet reported
        actions = dict(s.recover())
        assert set(actions.values()) <= {"requeued"}
        assert s.counts()["IN_PROGRESS"] == 0


# ---------------------------------------------------------------------------------------------
# schema migration, read-only opening, the write probe


def test_a_version_1_store_is_migrated_in_place(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with JobStore(path) as s:
        s.accept(job("kept"))
    c = sqlite3.connect(path)
    c.executescript(
        "ALTER TABLE jobs DROP COLUMN preemptions; ALTER TABLE jobs DROP COLUMN prompt_tokens; "
        "ALTER TABLE jobs DROP COLUMN measured_for; ALTER TABLE jobs DROP COLUMN waiting_for; "
        "ALTER TABLE jobs DROP COLUMN waiting_since; ALTER TABLE jobs DROP COLUMN waiting_detail; "
        "ALTER TABLE jobs DROP COLUMN via; PRAGMA user_version = 1;"
    )
    c.close()
    with JobStore(path) as s:
        assert pragma(s, "user_version") == SCHEMA_VERSION
        r = s.get("kept")
        assert (r.status, r.preemptions) == (JobStatus.QUEUED, 0)
        assert (r.prompt_tokens, r.waiting_for) == (None, None)
        assert s.waiting("kept", "slot", "busy") and s.get("kept").waiting_for == "slot"
        s.claim_next()
        assert s.requeue("kept", "preempt") == "requeued" and s.get("kept").preemptions == 1


def test_a_read_only_opening_reads_while_a_writer_works_and_never_writes(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    with pytest.raises(StoreError) as e:
        JobStore(path, readonly=True)
    assert e.value.code == "store_cantopen" and not path.exists()
    with JobStore(path) as writer:
        writer.accept(job("a"))
        with JobStore(path, readonly=True) as reader:
            assert [r.job_id for r in reader.list_jobs()] == ["a"]
            writer.accept(job("b"))
            assert reader.counts()["QUEUED"] == 2
            with pytest.raises(StoreError) as e:
                reader.accept(job("c"))
            assert e.value.code == "store_readonly"


def test_probe_needs_the_free_space_margin_and_a_real_write(store: JobStore) -> None:
    store.probe(0)
    with pytest.raises(StoreError) as e:
        store.probe(1 << 62)
    assert e.value.code == "store_full" and "store.min_free_kb" in str(e.value)
