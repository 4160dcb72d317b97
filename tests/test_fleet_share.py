"""Fleet jobs by each board's speed, without a broker: the hand-off decision (pure), the store's
release of a fleet job (real SQLite), and the fleet part's lease and hand-offs over the in-memory
publisher (tests/fakes.py, kept honest by tests/test_contract_publisher.py)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent.config.sections import MQTTSettings
from agent.jobs.fleet import CONTACT_KEY, FleetShare
from agent.jobs.protocol import JobSubmit, parse_submit
from agent.jobs.share import PeerLoad, Waiting, finish_times, plan_handoffs
from agent.jobs.store import JobStore
from agent.mqtt.topics import Topics
from tests.fakes import FakePublisher
from tests.helpers import Clock, job_payload

# ------------------------------------------------------------------------------ the decision


def _queue(n: int, tokens: int = 48, movable: bool = True) -> list[Waiting]:
    return [Waiting(f"j{i}", tokens, movable) for i in range(n)]


def test_finish_times_fill_the_lane_that_frees_first() -> None:
    ends = finish_times(_queue(3, tokens=10), running_left=[20], slots=2, ms_per_token=100.0)
    # lane 1 busy 2 s with the running job, lane 2 free: j0 on lane 2 (1 s), j1 on lane 2 (2 s), j2 on lane 1 (3 s)
    assert ends == {"j0": pytest.approx(1.0), "j1": pytest.approx(2.0), "j2": pytest.approx(3.0)}


def test_a_slow_board_hands_jobs_from_the_back_until_the_peer_would_end_them_no_sooner() -> None:
    # Here 20 ms a token behind a running job with 24 tokens left: j0 ends at 1.44 s ... j5 at 6.24 s.
    # The peer, twice as fast with a free slot, ends them at 0.53, 1.01, 1.49, 1.97, then 2.45 s (its queue).
    plan = plan_handoffs(
        _queue(6), running_left=[24], slots=1, ms_per_token=20.0, peers=[PeerLoad("fast", 1, 10.0)], hop_s=0.05
    )
    assert [(h.job_id, h.to) for h in plan] == [("j5", "fast"), ("j4", "fast"), ("j3", "fast"), ("j2", "fast")]
    assert plan[0].here_s == pytest.approx((24 + 6 * 48) * 0.020)
    assert [h.there_s for h in plan] == pytest.approx([0.05 + n * 48 * 0.010 for n in (1, 2, 3, 4)])


def test_no_hand_off_to_a_slower_peer_that_would_end_later() -> None:
    plan = plan_handoffs(
        _queue(1), running_left=[24], slots=1, ms_per_token=5.0, peers=[PeerLoad("slow", 1, 20.0)], hop_s=0.05
    )
    assert plan == []


def test_the_next_job_stays_when_speeds_are_equal() -> None:
    # Nothing ahead of it: it would end here as soon as there (plus the hop): not worth a hand-off.
    peer = [PeerLoad("p", 1, 10.0)]
    assert plan_handoffs(_queue(1), running_left=[], slots=1, ms_per_token=10.0, peers=peer, hop_s=0.05) == []
    plan = plan_handoffs(_queue(2), running_left=[], slots=1, ms_per_token=10.0, peers=peer, hop_s=0.05)
    assert [h.job_id for h in plan] == ["j1"]  # behind another job, the idle peer takes it


def test_nothing_moves_before_this_board_has_measured_its_speed() -> None:
    for theirs in (5.0, None):
        plan = plan_handoffs(
            _queue(5), running_left=[], slots=1, ms_per_token=None, peers=[PeerLoad("p", 1, theirs)], hop_s=0.05
        )
        assert plan == [], theirs


def test_a_peer_that_has_not_measured_its_speed_gets_one_job_if_idle() -> None:
    peers = [PeerLoad("new-idle", 1, None), PeerLoad("new-busy", 0, None)]
    plan = plan_handoffs(_queue(5), running_left=[], slots=1, ms_per_token=10.0, peers=peers, hop_s=0.05)
    assert [(h.job_id, h.to) for h in plan] == [("j4", "new-idle")]


def test_a_held_board_hands_every_fleet_job_on_measured_or_not() -> None:
    # Intake paused (or a model change, the governor, a full disk): nothing ends here soon.
    queue = [*_queue(3), Waiting("own", 48, False)]
    plan = plan_handoffs(
        queue, running_left=[], slots=1, ms_per_token=None, peers=[PeerLoad("p", 1, 10.0)], hop_s=0.05, held=True
    )
    assert sorted(h.job_id for h in plan) == ["j0", "j1", "j2"] and {h.to for h in plan} == {"p"}


def test_only_fleet_jobs_move_and_a_peer_s_queue_counts() -> None:
    queue = [*_queue(3, movable=False), Waiting("fleet", 48, True)]
    peers = [PeerLoad("fast-but-full", 0, 5.0, queued=100), PeerLoad("idle", 1, 20.0)]
    plan = plan_handoffs(queue, running_left=[48], slots=1, ms_per_token=20.0, peers=peers, hop_s=0.05)
    assert [(h.job_id, h.to) for h in plan] == [("fleet", "idle")]


def test_each_job_goes_where_it_ends_first_as_the_peers_fill_up() -> None:
    plan = plan_handoffs(
        _queue(3), running_left=[], slots=1, ms_per_token=20.0,
        peers=[PeerLoad("b", 1, 10.0), PeerLoad("a", 1, 4.0)], hop_s=0.05,
    )  # fmt: skip
    # here: j0 0.96 s, j1 1.92 s, j2 2.88 s; a ends its 1st, 2nd, 3rd job at 0.24, 0.43, 0.63 s; b its 1st at 0.53 s
    assert [(h.job_id, h.to) for h in plan] == [("j2", "a"), ("j1", "a"), ("j0", "b")]


# ------------------------------------------------------------------------------ the store


@pytest.fixture
def store(tmp_path: Path) -> JobStore:
    with JobStore(tmp_path / "jobs.db", clock=Clock()) as s:
        yield s


def _accept(store: JobStore, job_id: str, via: str | None = "fleet") -> None:
    job = parse_submit(job_payload(job_id), max_prompt_bytes=65536, max_tokens_limit=4096)
    assert store.accept(job, via=via).outcome == "new"


def test_release_takes_a_queued_fleet_job_out_of_the_queue_once(store: JobStore) -> None:
    _accept(store, "f1")
    _accept(store, "own", via=None)
    handoff = store.release("f1", "peer")
    assert handoff is not None and handoff.to == "peer" and handoff.request["job_id"] == "f1"
    assert store.get("f1") is None and [q.job_id for q in store.queue_view()] == ["own"]
    assert store.release("f1", "peer") is None  # not queued here any more
    assert store.release("own", "peer") is None  # sent to this board: never handed on
    assert store.release("own", None) is None  # nor given back
    _accept(store, "h1", via="handed")
    assert store.release("h1", "other") is None  # handed here: not handed on
    assert store.release("h1", None) is not None  # but given back when the lease lapses
    assert store.counts()["RELEASED"] == 2
    assert [h.job_id for h in store.unsent_handoffs()] == ["f1", "h1"]
    assert store.handoff_sent("f1") and [h.job_id for h in store.unsent_handoffs()] == ["h1"]


def test_a_running_fleet_job_is_not_released(store: JobStore) -> None:
    _accept(store, "f1")
    assert store.claim_next() is not None
    assert store.release("f1", None) is None


def test_a_released_job_that_comes_back_is_a_new_job_and_calls_off_an_unsent_hand_off(store: JobStore) -> None:
    _accept(store, "f1")
    store.release("f1", "peer")
    _accept(store, "f1")  # the submitter sent it again (its new holder died): it runs here
    assert store.get("f1") is not None and store.unsent_handoffs() == []


def test_a_store_of_schema_4_gains_the_fleet_columns(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.db"
    with JobStore(path, clock=Clock()) as s:
        _accept(s, "old", via=None)
    db = sqlite3.connect(path)
    db.execute("ALTER TABLE jobs DROP COLUMN via")
    db.execute("DROP TABLE handoffs")
    db.execute("PRAGMA user_version = 4")
    db.commit()
    db.close()
    with JobStore(path, clock=Clock()) as s:
        assert [q.job_id for q in s.queue_view()] == ["old"]
        _accept(s, "f1")
        assert s.release("f1", None) is not None


# ------------------------------------------------------------------------------ the fleet part


class _Board:
    def __init__(self, store: JobStore, clock: Clock, *, lease_s: float = 10.0, connected: bool = True) -> None:
        self.pub = FakePublisher()
        self.clock = clock
        self.mono = Clock(1000.0)
        self.connected = connected
        self.running: list[str] = []
        self.holds: frozenset[str] = frozenset()
        self.loads = 0
        self.fleet = FleetShare(
            store,
            Topics("edge", "slow"),
            settings=lambda: MQTTSettings(fleet_group="g", fleet_lease_s=lease_s),
            model=lambda: "/models/model.gguf",
            publish=self.pub.publish,
            connected=lambda: self.connected,
            capacity=lambda: 1,
            running=lambda: self.running,
            holds=lambda: self.holds,
            clock=clock,
            monotonic=self.mono,
        )
        self.fleet.follow(on_load=self._told)
        self.fleet.measured(480.0, 48)  # 10 ms a token here (a job ran)

    def _told(self) -> None:
        self.loads += 1

    def peer(
        self, device: str, *, free: int, ms: float | None = 10.0, model: str = "/other/model.gguf", held: bool = False
    ) -> None:
        expires = datetime.fromtimestamp(self.clock() + 60, UTC).isoformat()
        status = {"state": "online", "device_id": device, "model": model, "expires": expires,
                  "fleet": {"group": "g", "free": free, "held": held, "queued": 0, "ms_per_token": ms, "lease_s": 10.0}}  # fmt: skip
        self.fleet.on_peer_status(f"edge/{device}/status", json.dumps(status).encode())

    def sent(self, topic_end: str) -> list[dict]:
        return [json.loads(m.payload) for m in self.pub.sent if m.topic.endswith(topic_end)]


def test_an_idle_peer_gets_the_job_at_the_back_of_the_queue(store: JobStore) -> None:
    board = _Board(store, Clock())
    for i in range(3):
        _accept(store, f"f{i}")
    board.peer("fast", free=1)
    board.fleet.run_pass()
    [handed] = board.sent("/jobs/submit")
    assert board.pub.sent[0].topic == "edge/fast/jobs/submit"
    job = JobSubmit.model_validate(handed)
    assert (job.job_id, job.handed_from) == ("f2", "slow")
    [released] = board.sent("/jobs/f2/status")
    assert released["status"] == "RELEASED" and released["handed_to"] == "fast"
    assert [q.job_id for q in store.queue_view()] == ["f0", "f1"]
    board.fleet.run_pass()  # acknowledged: recorded as sent, not sent again
    assert store.unsent_handoffs() == [] and len(board.sent("/jobs/submit")) == 1
    assert board.loads >= 1 and board.fleet.load() is not None


def test_a_peer_with_another_model_or_a_stale_status_gets_nothing(store: JobStore) -> None:
    clock = Clock()
    board = _Board(store, clock)
    for i in range(3):
        _accept(store, f"f{i}")
    board.peer("other", free=1, model="/models/bigger.gguf")
    board.peer("gone", free=1)
    clock.advance(120)  # its status expired
    board.fleet.run_pass()
    assert board.sent("/jobs/submit") == []


def test_a_hand_off_not_acknowledged_is_sent_again(store: JobStore) -> None:
    board = _Board(store, Clock())
    board.pub.auto_ack = False
    for i in range(3):
        _accept(store, f"f{i}")
    board.peer("fast", free=1)
    board.fleet.run_pass()
    board.pub.drop()  # the connection was lost before the PUBACKs
    board.pub.connected = True
    board.fleet.run_pass()
    assert len(board.sent("/jobs/submit")) == 2 and store.unsent_handoffs() != []
    board.pub.ack_all()
    board.fleet.run_pass()
    assert store.unsent_handoffs() == []


def test_a_board_back_after_half_its_lease_gives_back_unstarted_fleet_jobs(store: JobStore) -> None:
    clock = Clock()
    _accept(store, "f1")
    _accept(store, "h1", via="handed")  # handed here by a peer: its submitter may send it again too
    _accept(store, "own", via=None)
    store.set_meta(CONTACT_KEY, clock() - 6.0)  # last in touch 6 s ago; lease 10 s
    board = _Board(store, clock, lease_s=10.0, connected=False)
    board.fleet.recover()  # at start, before the runner
    assert [q.job_id for q in store.queue_view()] == ["own"]  # not run here
    board.connected = True
    board.fleet.run_pass()
    for job_id in ("f1", "h1"):
        [released] = board.sent(f"/jobs/{job_id}/status")
        assert released["status"] == "RELEASED" and "handed_to" not in released


def test_a_board_back_within_half_its_lease_keeps_its_fleet_jobs(store: JobStore) -> None:
    clock = Clock()
    _accept(store, "f1")
    store.set_meta(CONTACT_KEY, clock() - 4.0)
    board = _Board(store, clock, lease_s=10.0, connected=False)
    board.fleet.recover()
    assert [q.job_id for q in store.queue_view()] == ["f1"]
    board.mono.advance(0.9)  # still away, 4.9 s in all
    board.fleet.run_pass()
    assert [q.job_id for q in store.queue_view()] == ["f1"]
    board.mono.advance(0.2)  # 5.1 s: half the lease
    board.fleet.run_pass()
    assert store.queue_view() == [] and board.pub.sent == []  # announced once connected


def test_a_stored_job_goes_to_a_much_faster_idle_peer_before_it_starts_in_a_free_slot_here(store: JobStore) -> None:
    board = _Board(store, Clock())  # one free slot here, 10 ms a token
    board.peer("fast", free=1, ms=1.0)
    job = parse_submit(job_payload("f0", max_tokens=64), max_prompt_bytes=65536, max_tokens_limit=4096)
    store.accept(job, via="fleet")
    board.fleet.place()  # what the intake calls before it wakes the runner
    assert store.queue_view() == [] and [m.topic for m in board.pub.sent][0] == "edge/fast/jobs/submit"
    # A peer only a little faster does not get it: starting here now ends about as soon.
    board.peer("fast", free=1, ms=9.5)
    _accept(store, "f1")
    board.fleet.place()
    assert [q.job_id for q in store.queue_view()] == ["f1"]


def test_a_held_board_says_so_hands_its_fleet_jobs_on_and_gets_none(store: JobStore) -> None:
    board = _Board(store, Clock())
    _accept(store, "f0")
    board.holds = frozenset({"intake.paused"})
    load = board.fleet.load()
    assert load is not None and (load.free, load.held, load.queued) == (0, True, 1)
    board.peer("busy-too", free=1, held=True)
    board.fleet.run_pass()
    assert board.sent("/jobs/submit") == []  # a held peer gets nothing
    board.peer("idle", free=1)
    board.fleet.run_pass()
    assert [m.topic for m in board.pub.sent if m.topic.endswith("/submit")] == ["edge/idle/jobs/submit"]


def test_a_store_that_takes_no_writes_leaves_the_job_stored_here_and_is_told_once(
    store: JobStore, caplog: pytest.LogCaptureFixture
) -> None:
    board = _Board(store, Clock())
    board.peer("fast", free=1, ms=1.0)
    _accept(store, "f0")
    store.close()  # every store call now raises StoreError, as a full disk makes writes do
    with caplog.at_level("WARNING", logger="agent.jobs.fleet"):
        board.fleet.place()  # from the intake: must not raise (the job is stored; the message gets its PUBACK)
        board.fleet.place()
    assert [r.levelname for r in caplog.records] == ["WARNING"] and "store" in caplog.records[0].getMessage()
    assert board.pub.sent == []


def test_the_measured_speed_outlives_a_restart(store: JobStore) -> None:
    board = _Board(store, Clock())  # measured 10 ms a token
    board.fleet.run_pass()  # connected: records the contact and the speed
    again = FleetShare(
        store, Topics("edge", "slow"), settings=lambda: MQTTSettings(fleet_group="g"), model=lambda: "m.gguf",
        publish=FakePublisher().publish, connected=lambda: False, capacity=lambda: 1, running=list,
    )  # fmt: skip
    first = again.load()
    assert first is not None and first.ms_per_token is None  # not read before recover()
    again.recover()
    load = again.load()
    assert load is not None and load.ms_per_token == pytest.approx(10.0)
