"""Fleet jobs by each board's speed, with real daemons on a private Mosquitto (issue 18, point 7).

A board hands fleet jobs it has not started to an idle peer that would end them sooner; a board that
dies holding fleet jobs loses them to the fleet after its lease (the submitter sends them again), and
when it comes back it gives them back instead of running them. The submitter is the operator's
client (agent/operator/fleet_jobs.py). Speeds are set by pacing the real engine's tokens
(tests/helpers.Paced); every job must end exactly once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent.cli import main
from agent.config import load_settings
from agent.jobs.store import JobStore
from agent.operator.fleet_jobs import FleetJobs
from tests.broker import BrokerClient, MosquittoBroker
from tests.daemon_harness import DaemonProcess, InProcessDaemon, wait_online, write_daemon_config
from tests.helpers import Paced


def _statuses(
    cloud: BrokerClient, device: str, status: str, n: int, timeout: float = 60.0
) -> dict[str, dict[str, Any]]:
    """The next ``n`` job statuses ``status`` from ``device``, by job id."""
    seen: dict[str, dict[str, Any]] = {}
    while len(seen) < n:
        msg = cloud.expect(None, timeout=timeout)
        parts = msg.topic.split("/")
        if len(parts) == 5 and parts[1] == device and parts[4] == "status":
            data = json.loads(msg.payload)
            if data["status"] == status:
                seen[data["job_id"]] = data
    return seen


def _started(cloud: BrokerClient, job_id: str, timeout: float = 60.0) -> str:
    """The board whose IN_PROGRESS status for ``job_id`` comes next."""
    while True:
        msg = cloud.expect(None, timeout=timeout)
        parts = msg.topic.split("/")
        if parts[2:] == ["jobs", job_id, "status"] and json.loads(msg.payload)["status"] == "IN_PROGRESS":
            return parts[1]


def test_a_slow_board_hands_its_queued_fleet_jobs_to_an_idle_fast_peer(
    tmp_path: Path, broker: MosquittoBroker, tiny_model: Path
) -> None:
    fleet_cfg = {"fleet_group": "g", "fleet_lease_s": 60}
    slow_cfg = write_daemon_config(tmp_path / "slow", broker, tiny_model, device_id="slow", mqtt=fleet_cfg)
    fast_cfg = write_daemon_config(tmp_path / "fast", broker, tiny_model, device_id="fast", mqtt=fleet_cfg)
    with BrokerClient(broker, client_id="cloud") as cloud:
        cloud.subscribe("edge/+/status")
        cloud.subscribe("edge/+/jobs/+/status")
        slow = InProcessDaemon(slow_cfg, engine_wrapper=lambda e: Paced(e, 10)).start()
        fast: InProcessDaemon | None = None
        try:
            wait_online(cloud, "slow")
            with FleetJobs(load_settings(slow_cfg), resend_after_s=120) as fleet:
                ids = [fleet.submit({"prompt": "Hello", "max_tokens": 16}, job_id=f"f{i}") for i in range(4)]
                _statuses(cloud, "slow", "QUEUED", 4)  # the only member of the group: it holds all four
                # 1.6 s a job there; a peer 40 times faster comes online with a free slot.
                fast = InProcessDaemon(fast_cfg, engine_wrapper=lambda e: Paced(e, 400)).start()
                results = fleet.wait(ids, timeout=120)
                assert set(results) == set(ids), f"jobs that never ended: {set(ids) - set(results)}"
                assert fleet.duplicates == 0 and fleet.resends == []
                ran_on = {j: fleet.jobs[j].ran_on for j in ids}
        finally:
            slow.stop()
            if fast is not None:
                fast.stop()
    handed = [j for j in ids if ran_on[j] == "fast"]
    assert handed, f"the slow board ran every job itself: {ran_on}"
    assert fleet.handed == set(handed)  # each announced RELEASED to 'fast', and run there once
    assert ran_on["f0"] == "slow"  # the job it started first stayed


def test_fleet_jobs_of_a_board_that_died_run_elsewhere_and_not_again_when_it_comes_back(
    tmp_path: Path, broker: MosquittoBroker, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lease = 2.0
    keep = {"fleet_group": "g", "fleet_lease_s": lease, "fleet_share": False}  # the lease alone moves them
    a_cfg = write_daemon_config(tmp_path / "a", broker, tiny_model, device_id="a", mqtt=keep, intake={"paused": True})
    b_cfg = write_daemon_config(tmp_path / "b", broker, tiny_model, device_id="b",
                                mqtt={"fleet_group": "g", "fleet_lease_s": lease})  # fmt: skip
    with BrokerClient(broker, client_id="cloud") as cloud:
        cloud.subscribe("edge/+/status")
        cloud.subscribe("edge/+/jobs/+/status")
        a = DaemonProcess(a_cfg).start()
        b: InProcessDaemon | None = None
        try:
            wait_online(cloud, "a", timeout=60)
            # Unheard jobs go again after 5 s: Mosquitto ends an expired session lazily, so a copy sent once a's
            # lease passed can still be dealt to a's dead fleet session under load, and is lost with it.
            with FleetJobs(load_settings(a_cfg), resend_after_s=5) as fleet:
                ids = [fleet.submit({"prompt": "Hello", "max_tokens": 8}, job_id=f"d{i}") for i in range(3)]
                assert set(_statuses(cloud, "a", "QUEUED", 3)) == set(ids)  # stored on a, held (paused)
                b = InProcessDaemon(b_cfg).start()
                wait_online(cloud, "b")
                a.kill()  # for good: its will says offline; its session keeps nothing it has not acknowledged
                results = fleet.wait(ids, timeout=60)
                assert set(results) == set(ids), f"jobs that never ended: {set(ids) - set(results)}"
                assert {fleet.jobs[j].ran_on for j in ids} == {"b"}
                away = sorted(j for j, why in fleet.resends if why.startswith("a has been away"))
                assert away == ids, fleet.resends  # each sent again once, for a's lease
                assert all(why.startswith(("a has been away", "nothing heard")) for _, why in fleet.resends)
                # a comes back, its intake open: away for more than half its lease, it gives the three back.
                write_daemon_config(tmp_path / "a", broker, tiny_model, device_id="a", mqtt=keep)
                a.start()
                released = _statuses(cloud, "a", "RELEASED", 3)
                assert set(released) == set(ids) and all("handed_to" not in r for r in released.values())
                assert fleet.duplicates == 0
            assert a.terminate() == 0
        finally:
            if a.alive():
                a.kill()
            if b is not None:
                b.stop()
    with JobStore(tmp_path / "a" / "state" / "jobs.db") as store:  # never run there: not in its jobs at all
        assert [store.get(j) for j in ids] == [None] * 3
        assert all((h := store.get_handoff(j)) is not None and h.to is None for j in ids)
    capsys.readouterr()
    assert main(["jobs", "show", "-c", str(a_cfg), ids[0]]) == 0  # what an operator sees on that board
    out, err = capsys.readouterr()
    assert json.loads(out)["status"] == "RELEASED" and "given back" in err
    assert main(["jobs", "list", "-c", str(a_cfg)]) == 0  # listed, though no longer in its jobs
    out, err = capsys.readouterr()
    released = [line.split() for line in out.splitlines() if "RELEASED" in line]
    assert sorted(row[0] for row in released) == ids and all(row[-2:] == ["given", "back"] for row in released)
    assert "RELEASED 3" in err
    assert main(["jobs", "list", "-c", str(a_cfg), "--status", "released", "--limit", "2"]) == 0
    assert sum("RELEASED" in line for line in capsys.readouterr().out.splitlines()) == 2


def test_submit_fleet_runs_the_job_on_a_board_of_the_group_and_says_which(
    tmp_path: Path, broker: MosquittoBroker, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_daemon_config(tmp_path / "b1", broker, tiny_model, device_id="b1", mqtt={"fleet_group": "g"})
    with BrokerClient(broker, client_id="cloud") as cloud:
        cloud.subscribe("edge/+/status")
        board = InProcessDaemon(cfg).start()
        try:
            wait_online(cloud, "b1")
            rc = main(["submit", "-c", str(cfg), "Hello", "--fleet", "--job-id", "cli-fleet", "--max-tokens", "4",
                       "--wait", "--json"])  # fmt: skip
            out, err = capsys.readouterr()
            assert main(["fleet", "list", "-c", str(cfg)]) == 0
            listing = capsys.readouterr().out
            # --stream prints the pieces of the board that runs it (with or without --wait).
            streamed_rc = main(["submit", "-c", str(cfg), "Hello", "--fleet", "--stream", "--job-id", "cli-stream",
                                "--max-tokens", "8"])  # fmt: skip
            streamed, streamed_err = capsys.readouterr()
            record = board.daemon.parts.store.get("cli-stream")
        finally:
            board.stop()
    assert rc == 0, err
    assert "FLEET JOBS" in listing and "g: " in listing and " queued" in listing  # the board's fleet load
    assert json.loads(out)["job_id"] == "cli-fleet" and json.loads(out)["status"] == "SUCCEEDED"
    assert "submitted cli-fleet to edge/fleet/jobs/submit" in err and "[QUEUED on b1]" in err
    assert streamed_rc == 0, streamed_err
    assert record is not None and record.outcome is not None and record.outcome.text
    assert streamed == record.outcome.text + "\n"  # every piece, in order, then the end of the line
    assert "[SUCCEEDED on b1]" in streamed_err and "without --wait" not in streamed_err


def test_a_streamed_fleet_job_prints_the_pieces_of_the_board_that_holds_it_only(
    tmp_path: Path, broker: MosquittoBroker, tiny_model: Path
) -> None:
    """A job handed from x to y: y's pieces are the job's; pieces from x (a copy it kept running after it
    lost the broker) are not mixed in. The boards are played by a plain client, in one ordered stream."""
    cfg = write_daemon_config(tmp_path / "op", broker, tiny_model, device_id="op")  # the operator's settings
    pieces: list[tuple[str, str]] = []
    with BrokerClient(broker, client_id="boards") as boards, FleetJobs(load_settings(cfg), stream_of=["s1"]) as fleet:
        fleet.submit({"prompt": "Hello", "stream": True}, job_id="s1")

        def send(device: str, what: str, body: dict[str, Any]) -> None:
            boards.publish(f"edge/{device}/jobs/s1/{what}", json.dumps({"job_id": "s1", **body}).encode())

        send("x", "status", {"status": "QUEUED"})
        send("x", "status", {"status": "RELEASED", "handed_to": "y"})
        send("y", "status", {"status": "IN_PROGRESS"})
        send("x", "stream", {"index": 0, "text": "stale "})
        send("y", "stream", {"index": 0, "text": "Hello"})
        send("y", "stream", {"index": 1, "text": " there"})
        send("y", "result", {"status": "SUCCEEDED", "text": "Hello there"})
        results = fleet.wait(["s1"], timeout=30, on_piece=lambda device, p: pieces.append((device, p["text"])))
    assert results["s1"]["text"] == "Hello there"
    assert pieces == [("y", "Hello"), ("y", " there")]


def test_submit_fleet_says_when_no_board_takes_fleet_jobs(
    tmp_path: Path, broker: MosquittoBroker, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_daemon_config(tmp_path / "solo", broker, tiny_model, device_id="solo")  # no fleet_group
    with BrokerClient(broker, client_id="cloud") as cloud:
        cloud.subscribe("edge/+/status")
        board = InProcessDaemon(cfg).start()
        try:
            wait_online(cloud, "solo")
            rc = main(["submit", "-c", str(cfg), "Hello", "--fleet", "--max-tokens", "4"])
        finally:
            board.stop()
    assert rc == 0
    assert "no board online says it takes fleet jobs" in capsys.readouterr().err


def test_a_fleet_of_unequal_boards_gives_every_job_one_outcome_ordinary_and_odd_requests_mixed(
    tmp_path: Path, broker: MosquittoBroker, tiny_model: Path
) -> None:
    """Ordinary jobs, an invalid one, a payload with no readable id and a long job canceled on the
    board that holds it, all to the fleet topic of a slow and a fast board: each job the submitter
    follows ends once, with the outcome it should have, and the boards go on serving."""
    fleet_cfg = {"fleet_group": "g", "fleet_lease_s": 60}
    no_id = (r"refused a message on edge/fleet/jobs/submit with no readable job_id",)
    cfgs = {
        name: write_daemon_config(tmp_path / name, broker, tiny_model, device_id=name, mqtt=fleet_cfg)
        for name in ("slow", "fast")
    }
    with BrokerClient(broker, client_id="cloud") as cloud:
        cloud.subscribe("edge/+/status")
        slow = InProcessDaemon(cfgs["slow"], engine_wrapper=lambda e: Paced(e, 20), expect_errors=no_id).start()
        fast = InProcessDaemon(cfgs["fast"], engine_wrapper=lambda e: Paced(e, 100), expect_errors=no_id).start()
        try:
            wait_online(cloud, "slow")
            wait_online(cloud, "fast")
            with FleetJobs(load_settings(cfgs["slow"]), resend_after_s=120) as fleet:
                ordinary = [fleet.submit({"prompt": "Hello", "max_tokens": 16}, job_id=f"o{i}") for i in range(6)]
                invalid = fleet.submit({"prompt": "Hello", "max_tokens": -1}, job_id="invalid")
                cloud.publish("edge/fleet/jobs/submit", b"{not json at all")
                cloud.subscribe("edge/+/jobs/long/status")
                long = fleet.submit(
                    {"prompt": "Once upon a time", "max_tokens": 1000, "temperature": 0.0}, job_id="long"
                )
                holder = _started(cloud, long)  # greedy, 10 s at the faster board's pace: canceled long before
                assert fleet.cancel(long) == holder
                ids = [*ordinary, invalid, long]
                results = fleet.wait(ids, timeout=120)
                assert set(results) == set(ids), f"jobs that never ended: {set(ids) - set(results)}"
                assert fleet.duplicates == 0 and fleet.resends == []
                assert {results[j]["status"] for j in ordinary} == {"SUCCEEDED"}
                assert (
                    results[invalid]["status"] == "REJECTED" and results[invalid]["error"]["code"] == "invalid_payload"
                )
                assert results[long]["status"] == "CANCELED"
                after = fleet.submit({"prompt": "Still there?", "max_tokens": 4}, job_id="after")
                assert fleet.wait([after], timeout=60)[after]["status"] == "SUCCEEDED"
        finally:
            slow.stop()
            fast.stop()
