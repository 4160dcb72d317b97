"""The daemon under faults: kill -9, broker restarts, jobs sent while it is down, a fleet, SIGTERM.

Everything is real: mosquitto, the engine on the tiny model, SQLite files, and the daemon as a
child process (`python -m agent run -c CONFIG`, what systemd runs). Progress is observed through
the broker (job statuses and results, the live 'online' device status), through the store file,
or through a stand-in for systemd's notify socket; every timeout is only an upper bound.

Random choices come from a seeded random.Random; the seed is printed (set FAULT_SEED to replay).
The tiny model generates several thousand tokens per second, so a job that must still be running
when the test acts asks for 4000 tokens (about 1.3 s): `max_tokens` 400 would be over in 60 ms.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import sqlite3
import threading
import time
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from agent.config import load_settings
from agent.jobs.protocol import JobStatus
from agent.jobs.store import JobRecord, JobStore
from agent.mqtt.topics import Topics
from tests.broker import BrokerClient, MosquittoBroker
from tests.daemon_harness import DaemonProcess, InProcessDaemon, wait_online, write_daemon_config

PREFIX = "edge"
# A generation that lasts long enough (about 1.3 s here) for a test to act while it runs.
LONG_TOKENS = 4000
LONG_ENGINE = {"n_ctx": 4096, "max_tokens_limit": 4096}


# ------------------------------------------------------------------------------------------------
# helpers


def seeded_rng(test: str) -> random.Random:
    """The same scenario every run (the default run is deterministic); FAULT_SEED=N replays seed N,
    FAULT_SEED=random draws a new one (printed, to replay a failure it finds)."""
    wanted = os.environ.get("FAULT_SEED", "")
    if wanted == "random":
        seed = random.SystemRandom().randrange(2**31)
    elif wanted:
        seed = int(wanted)
    else:
        seed = zlib.crc32(test.encode())
    print(f"{test}: seed {seed} (replay with FAULT_SEED={seed})")
    return random.Random(seed)


def job_payload(job_id: str, max_tokens: int, **extra: Any) -> bytes:
    # Greedy with a fixed seed: a rerun of an interrupted job produces the same text.
    body = {"job_id": job_id, "kind": "generate", "prompt": f"Tell the story of {job_id}.",
            "max_tokens": max_tokens, "temperature": 0.0, "seed": 7, **extra}  # fmt: skip
    return json.dumps(body).encode()


def epoch(rfc3339: str) -> float:
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


class Recorder:
    """Job statuses and results and live device statuses seen by test peers, filled on paho's
    network thread. Unlike a peer's message queue, nothing here is consumed by expect()."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.results: dict[str, list[tuple[str, bytes]]] = defaultdict(list)  # job_id -> [(device, payload)]
        self.statuses: dict[str, list[dict]] = defaultdict(list)
        self.online: Counter[str] = Counter()  # live (non-retained) 'online' per device
        self.events = 0  # job statuses and results

    def record(self, msg: Any) -> None:
        parts = msg.topic.split("/")
        with self._cond:
            if len(parts) == 3 and parts[2] == "status":
                if not msg.retain and json.loads(msg.payload)["state"] == "online":
                    self.online[parts[1]] += 1
            elif len(parts) == 5 and parts[2] == "jobs" and parts[4] in ("status", "result"):
                device, job_id = parts[1], parts[3]
                if parts[4] == "result":
                    self.results[job_id].append((device, bytes(msg.payload)))
                else:
                    self.statuses[job_id].append(json.loads(msg.payload))
                self.events += 1
            else:
                return
            self._cond.notify_all()

    def wait(self, what: str, predicate: Callable[[], bool], timeout: float) -> None:
        with self._cond:
            if not self._cond.wait_for(predicate, timeout):
                raise TimeoutError(f"{what}: not within {timeout}s")

    def have_results(self, job_ids: Any) -> bool:
        return all(self.results.get(j) for j in job_ids)

    def result(self, job_id: str) -> dict:
        return json.loads(self.results[job_id][0][1])


class Peer(BrokerClient):
    """A test peer that records job messages into a Recorder and can keep an MQTT 5 session
    (clean start off plus a session expiry) across disconnects and broker restarts.
    BrokerClient sends no session expiry, so its sessions end with the connection."""

    def __init__(
        self, broker: MosquittoBroker, recorder: Recorder | None = None, client_id: str | None = None,
        *, session_expiry_s: int = 0,
    ) -> None:  # fmt: skip
        super().__init__(broker, client_id, clean_start=session_expiry_s == 0)
        self.session_expiry_s = session_expiry_s
        self.session_present = False
        inner = self.client.on_message

        def on_message(c: Any, u: Any, msg: Any) -> None:
            if recorder is not None:
                recorder.record(msg)
            inner(c, u, msg)

        def on_connect(c: Any, u: Any, flags: Any, rc: Any, props: Any) -> None:
            self.session_present = bool(flags.session_present)
            self._connack.put(rc)

        self.client.on_message = on_message
        self.client.on_connect = on_connect

    def connect(self, timeout: float = 10.0) -> Peer:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.session_expiry_s
        self.client.connect(
            self.broker.host, self.broker.port, keepalive=30, clean_start=self._clean_start, properties=props
        )
        self.client.loop_start()
        rc = self._connack.get(timeout=timeout)
        if rc.is_failure:
            self.close()
            raise ConnectionError(f"test peer refused: {rc}")
        return self

    def follow(self, device: str) -> Peer:
        t = Topics(PREFIX, device)
        for topic in (t.status_filter, t.result_filter, t.device_status):
            self.subscribe(topic)
        return self


def store_path(config: Path) -> Path:
    path = load_settings(config, environ={}).store.path
    assert path is not None
    return path


def store_rows(config: Path) -> dict[str, tuple[str, int, int]]:
    """job_id -> (status, attempt, delivered), read while the daemon may be running (WAL readers
    do not block it). mode=rw: never create the file."""
    with closing(sqlite3.connect(f"file:{store_path(config)}?mode=rw", uri=True, timeout=10)) as c:
        return {r[0]: (r[1], r[2], r[3]) for r in c.execute("SELECT job_id, status, attempt, delivered FROM jobs")}


def final_records(config: Path) -> dict[str, JobRecord]:
    """The store as the daemon left it, through JobStore (call only once the daemon has stopped)."""
    with JobStore(store_path(config)) as store:
        return {r.job_id: r for r in store.list_jobs(limit=1_000_000)}


def poll_store(config: Path, what: str, predicate: Callable[[dict], bool], timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        rows = store_rows(config)
        if predicate(rows):
            return rows
        if time.monotonic() > deadline:
            raise TimeoutError(f"store: {what} not within {timeout}s; rows: {rows}")
        time.sleep(0.02)  # poll pacing only: the loop ends on the condition


def succeeded(rows: dict[str, tuple[str, int, int]]) -> int:
    return sum(1 for status, _, _ in rows.values() if status == "SUCCEEDED")


def all_delivered(job_ids: Any) -> Callable[[dict], bool]:
    return lambda rows: all(j in rows and rows[j][2] == 1 for j in job_ids)


def retained_state(broker: MosquittoBroker, device: str) -> str:
    with BrokerClient(broker) as p:
        p.subscribe(Topics(PREFIX, device).device_status)
        msg = p.expect(Topics(PREFIX, device).device_status, timeout=10)
        assert msg.retain
        return json.loads(msg.payload)["state"]


@contextmanager
def supervised(*procs: DaemonProcess) -> Iterator[tuple[DaemonProcess, ...]]:
    """Kill whatever is still running at the end; on failure print the daemons' logs."""
    try:
        yield procs
    except BaseException:
        for p in procs:
            print(f"----- {p.log_path} -----\n{p.log_tail(80)}")
        raise
    finally:
        for p in procs:
            if p.alive():
                p.kill()


class NotifySocket:
    """Stands in for systemd's notify socket: the daemon sends READY=1, STOPPING=1 ... here."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        name = f"edge-agent-test-{os.getpid()}-{id(self)}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + name)  # abstract: no path, nothing to clean up
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)  # DaemonProcess passes the environment on

    def expect(self, line: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {line} on the notify socket within {timeout}s")
            self.sock.settimeout(left)
            if line in self.sock.recv(4096).decode().splitlines():
                return

    def close(self) -> None:
        self.sock.close()


# ------------------------------------------------------------------------------------------------
# 1. kill -9 soak


@pytest.mark.parametrize("max_parallel", [1, 4])
def test_kill9_soak_every_job_gets_exactly_one_outcome_and_is_delivered(broker, tiny_model, tmp_path, max_parallel):
    """50 jobs, one or four at a time (engine.max_parallel), the daemon SIGKILLed at random moments
    and restarted each time: no job lost, none completed twice, every result delivered at least once,
    attempts accounted for by the kills."""
    rng = seeded_rng(f"soak-{max_parallel}")
    t_start = time.monotonic()
    dev = f"soak{max_parallel}"
    topics = Topics(PREFIX, dev)
    cfg = write_daemon_config(
        tmp_path / dev, broker, tiny_model, device_id=dev,
        store={"max_attempts": 10}, engine={"n_ctx": 2048, "max_tokens_limit": 2048, "max_parallel": max_parallel},
    )  # fmt: skip
    # Mostly short jobs, a quarter long enough (300-1500 tokens) for kills to land mid-generation.
    jobs = {
        f"soak-{i:02d}": job_payload(
            f"soak-{i:02d}",
            rng.randint(300, 1500) if rng.random() < 0.25 else rng.randint(32, 64),
            priority=rng.choice([0, 0, 0, 10]),
        )
        for i in range(50)
    }
    rec = Recorder()
    watch = Peer(broker, rec).connect().follow(dev)
    sender = Peer(broker).connect()
    send_errors: list[BaseException] = []

    def submit_all() -> None:
        try:
            for payload in jobs.values():
                sender.publish(topics.submit, payload, qos=1)
        except BaseException as e:  # reported by the main thread
            send_errors.append(e)

    daemon = DaemonProcess(cfg)
    kills = 0
    with supervised(daemon):
        daemon.start()
        wait_online(watch, dev)
        submitter = threading.Thread(target=submit_all, name="submitter")
        submitter.start()  # kills may land while jobs are still arriving, too
        target = rng.randint(6, 8)
        while kills < target:
            threshold = rec.events + rng.randint(1, 20)
            rec.wait("progress", lambda t=threshold: rec.events >= t or rec.have_results(jobs), 60)
            if rec.have_results(jobs):
                break
            assert daemon.alive(), f"daemon died on its own:\n{daemon.log_tail()}"
            daemon.kill()
            kills += 1
            daemon.start()
        rec.wait("a result for every job", lambda: rec.have_results(jobs), 120)
        submitter.join(30)
        assert not send_errors, send_errors
        # The daemon learns of delivery from the broker's PUBACK; let it confirm all before stopping.
        poll_store(cfg, "every result confirmed delivered", all_delivered(jobs))
        assert daemon.terminate() == 0
    watch.barrier()  # everything the broker had for us is recorded now
    watch.close()
    sender.close()

    assert kills >= 5, f"only {kills} kills before all jobs finished; try another FAULT_SEED"
    records = final_records(cfg)
    assert sorted(records) == sorted(jobs), "jobs lost or invented"
    for job_id, r in records.items():
        assert r.status is JobStatus.SUCCEEDED, (job_id, r.status, r.outcome)
        assert r.terminal and r.outcome is not None and r.finished_at is not None and r.delivered
        copies = {payload for _, payload in rec.results[job_id]}
        # One completion: every copy is the stored outcome, byte for byte (ts is finished_at).
        assert len(copies) == 1, (job_id, copies)
        msg = rec.result(job_id)
        assert (msg["status"], msg["attempt"], msg["text"]) == ("SUCCEEDED", r.attempt, r.outcome.text)
        started = {s["attempt"] for s in rec.statuses[job_id] if s["status"] == "IN_PROGRESS"}
        assert r.attempt >= 1 and started <= set(range(1, r.attempt + 1)), (job_id, r.attempt, started)
    # A run that did not end in an outcome was cut short by a kill: at most max_parallel runs at a time.
    interrupted_runs = sum(r.attempt - 1 for r in records.values())
    assert interrupted_runs <= kills * max_parallel
    copies_total = sum(len(rec.results[j]) for j in jobs)
    print(
        f"soak at max_parallel {max_parallel}: {len(jobs)} jobs, {kills} kills, {daemon.starts} daemon starts, "
        f"{copies_total - len(jobs)} duplicate result deliveries, {interrupted_runs} interrupted runs, "
        f"attempts {dict(sorted(Counter(r.attempt for r in records.values()).items()))}, "
        f"{time.monotonic() - t_start:.1f}s"
    )


# ------------------------------------------------------------------------------------------------
# 2. broker restarts and jobs sent while the daemon is down


def test_broker_restart_mid_run_daemon_reconnects_and_nothing_is_lost(broker, tiny_model, tmp_path):
    """The broker stops (SIGTERM, persistence saved) while 20 jobs run and comes back: the daemon
    reconnects by itself and every result reaches a persistent-session subscriber."""
    rng = seeded_rng("broker-restart")
    t_start = time.monotonic()
    dev = "dev-b"
    topics = Topics(PREFIX, dev)
    cfg = write_daemon_config(
        tmp_path / dev, broker, tiny_model, device_id=dev, engine={"n_ctx": 2048, "max_tokens_limit": 2048}
    )
    jobs = {f"br-{i:02d}": job_payload(f"br-{i:02d}", rng.randint(300, 1200)) for i in range(20)}
    rec = Recorder()
    cloud_id = "cloud-persistent"
    cloud = Peer(broker, rec, cloud_id, session_expiry_s=3600).connect().follow(dev)
    daemon = DaemonProcess(cfg)
    with supervised(daemon):
        daemon.start()
        wait_online(cloud, dev)
        for payload in jobs.values():
            cloud.publish(topics.submit, payload)
        rec.wait("3 results", lambda: sum(1 for j in jobs if rec.results.get(j)) >= 3, 60)
        cloud.close()  # its session (and what the daemon sends meanwhile) stays with the broker
        broker.stop()
        done_at_stop = succeeded(store_rows(cfg))
        # The daemon keeps working while the broker is down; its results wait in the store.
        poll_store(cfg, "2 more jobs done with the broker down", lambda rows: succeeded(rows) >= done_at_stop + 2)
        done_while_down = succeeded(store_rows(cfg)) - done_at_stop
        broker.restart()
        cloud = Peer(broker, rec, cloud_id, session_expiry_s=3600).connect()
        assert cloud.session_present, "the broker lost the subscriber's session"
        wait_online(cloud, dev)  # the daemon reconnected by itself
        rec.wait("a result for every job", lambda: rec.have_results(jobs), 60)
        poll_store(cfg, "every result confirmed delivered", all_delivered(jobs))
        assert daemon.terminate() == 0
    cloud.barrier()
    cloud.close()

    records = final_records(cfg)
    assert sorted(records) == sorted(jobs)
    for job_id, r in records.items():
        assert (r.status, r.attempt, r.delivered) == (JobStatus.SUCCEEDED, 1, True), (job_id, r)
        assert len({p for _, p in rec.results[job_id]}) == 1
    dups = sum(len(rec.results[j]) for j in jobs) - len(jobs)
    print(
        f"broker restart: {done_at_stop} jobs done when the broker stopped, {done_while_down} done while it was "
        f"down, {dups} duplicate result deliveries, daemon started {daemon.starts}x, {time.monotonic() - t_start:.1f}s"
    )


@pytest.mark.parametrize("restart_broker", [False, True], ids=["broker-up", "broker-restarted"])
def test_jobs_sent_while_daemon_is_down_wait_in_its_session(broker, tiny_model, tmp_path, restart_broker):
    """The daemon is SIGKILLed; jobs published meanwhile are kept by the broker for its persistent
    session (across a broker restart too) and all run once it is back."""
    dev = "dev-c"
    topics = Topics(PREFIX, dev)
    cfg = write_daemon_config(tmp_path / dev, broker, tiny_model, device_id=dev)
    rec = Recorder()
    cloud_id = "cloud-c"
    cloud = Peer(broker, rec, cloud_id, session_expiry_s=3600).connect().follow(dev)
    daemon = DaemonProcess(cfg)
    jobs = {f"late-{i:02d}": job_payload(f"late-{i:02d}", 48) for i in range(10)}
    with supervised(daemon):
        daemon.start()
        wait_online(cloud, dev)  # connected once: its session and subscriptions exist
        daemon.kill()
        # The last will says the broker has seen it go.
        while json.loads(cloud.expect(topics.device_status, timeout=30).payload)["state"] != "offline":
            pass
        for payload in jobs.values():
            cloud.publish(topics.submit, payload)
        if restart_broker:
            cloud.close()
            broker.restart()
            cloud = Peer(broker, rec, cloud_id, session_expiry_s=3600).connect()
            assert cloud.session_present
        assert not rec.results
        daemon.start()
        wait_online(cloud, dev)
        rec.wait("a result for every job", lambda: rec.have_results(jobs), 60)
        poll_store(cfg, "every result confirmed delivered", all_delivered(jobs))
        assert daemon.terminate() == 0
    cloud.close()
    records = final_records(cfg)
    assert sorted(records) == sorted(jobs)
    assert all((r.status, r.attempt) == (JobStatus.SUCCEEDED, 1) for r in records.values())


# ------------------------------------------------------------------------------------------------
# 3. fleet


def test_fleet_each_job_runs_on_exactly_one_device(broker, tiny_model, tmp_path):
    """Three daemon processes share $share/g1/edge/fleet/jobs/submit: each of 30 jobs is run and
    answered by exactly one of them."""
    t_start = time.monotonic()
    devices = ["fleet-1", "fleet-2", "fleet-3"]
    cfgs = {
        d: write_daemon_config(tmp_path / d, broker, tiny_model, device_id=d, mqtt={"fleet_group": "g1"})
        for d in devices
    }
    rec = Recorder()
    watch = Peer(broker, rec).connect()
    watch.subscribe(f"{PREFIX}/+/jobs/+/result")
    watch.subscribe(f"{PREFIX}/+/status")
    procs = [DaemonProcess(cfgs[d]) for d in devices]
    jobs = {f"fl-{i:02d}": job_payload(f"fl-{i:02d}", 32) for i in range(30)}
    with supervised(*procs):
        for p in procs:
            p.start()
        # 'online' is published after the subscriptions are sent on the same connection: once it
        # is seen, the broker has the device in the share group.
        rec.wait("all devices online", lambda: all(rec.online[d] for d in devices), 60)
        for payload in jobs.values():
            watch.publish(Topics(PREFIX, devices[0]).fleet_publish, payload)
        rec.wait("a result for every job", lambda: rec.have_results(jobs), 60)
        for d, p in zip(devices, procs, strict=False):
            poll_store(cfgs[d], f"{d}: results confirmed delivered",
                       lambda rows: all(delivered for _, _, delivered in rows.values()))  # fmt: skip
            assert p.terminate() == 0
    watch.barrier()  # a second answer from another device would have arrived by now
    watch.close()

    owner = {}
    for job_id in jobs:
        devs = {d for d, _ in rec.results[job_id]}
        assert len(devs) == 1, f"{job_id} answered by {devs}"
        owner[job_id] = devs.pop()
    stored: dict[str, str] = {}
    for d in devices:
        for job_id, r in final_records(cfgs[d]).items():
            assert job_id not in stored, f"{job_id} stored on {stored[job_id]} and {d}"
            stored[job_id] = d
            assert (r.status, r.attempt) == (JobStatus.SUCCEEDED, 1)
    assert stored == owner
    split = Counter(owner.values())
    print(f"fleet split: {dict(sorted(split.items()))}, {time.monotonic() - t_start:.1f}s")
    # mosquitto hands shared-subscription messages out round robin
    assert set(split) == set(devices)


# ------------------------------------------------------------------------------------------------
# 4. a job interrupted by a crash


def prepare_long_job(
    broker: MosquittoBroker, tiny_model: Path, tmp_path: Path, dev: str, **sections: Any
) -> tuple[Path, Topics, Recorder, Peer, DaemonProcess]:
    """A device with the long-generation engine, a peer recording its jobs and stream, its daemon (not started)."""
    topics = Topics(PREFIX, dev)
    cfg = write_daemon_config(tmp_path / dev, broker, tiny_model, device_id=dev, engine=LONG_ENGINE, **sections)
    rec = Recorder()
    peer = Peer(broker, rec).connect().follow(dev)
    peer.subscribe(topics.stream_filter, qos=0)
    return cfg, topics, rec, peer, DaemonProcess(cfg)


def start_generating(daemon: DaemonProcess, peer: Peer, topics: Topics, job_id: str) -> None:
    """Start the daemon, submit a long streamed job and return once it is generating (first piece seen)."""
    daemon.start()
    wait_online(peer, topics.device_id)
    peer.publish(topics.submit, job_payload(job_id, LONG_TOKENS, stream=True))
    peer.expect(topics.stream(job_id), timeout=30)


@pytest.mark.parametrize("max_attempts", [3, 1])
def test_job_interrupted_by_kill_is_retried_or_fails_interrupted(broker, tiny_model, tmp_path, max_attempts):
    """SIGKILL while a job generates: after the restart it runs again as attempt 2, or, with
    store.max_attempts 1, ends FAILED 'interrupted' without running again."""
    cfg, topics, rec, peer, daemon = prepare_long_job(
        broker, tiny_model, tmp_path, "dev-d", store={"max_attempts": max_attempts}
    )
    job_id = "long-1"
    with supervised(daemon):
        start_generating(daemon, peer, topics, job_id)
        daemon.kill()
        assert store_rows(cfg)[job_id] == ("IN_PROGRESS", 1, 0), "the kill came after the job had finished"
        assert not rec.results
        daemon.start()
        rec.wait("the result", lambda: rec.have_results([job_id]), 60)
        poll_store(cfg, "result confirmed delivered", all_delivered([job_id]))
        assert daemon.terminate() == 0
    peer.close()

    msg = rec.result(job_id)
    r = final_records(cfg)[job_id]
    started = [s["attempt"] for s in rec.statuses[job_id] if s["status"] == "IN_PROGRESS"]
    if max_attempts > 1:
        assert (msg["status"], msg["attempt"], msg["usage"]["completion_tokens"]) == ("SUCCEEDED", 2, LONG_TOKENS)
        # Job statuses are not kept for resending (results are): the rerun can start before the
        # restarted daemon is connected, so its IN_PROGRESS attempt 2 may never be seen.
        assert started[0] == 1 and set(started) <= {1, 2}
        assert (r.status, r.attempt) == (JobStatus.SUCCEEDED, 2)
    else:
        assert (msg["status"], msg["attempt"], msg["error"]["code"]) == ("FAILED", 1, "interrupted")
        assert msg["text"] is None and started == [1]  # never ran again
        assert (r.status, r.attempt, r.error_code) == (JobStatus.FAILED, 1, "interrupted")
        final_status = rec.statuses[job_id][-1]
        assert (final_status["status"], final_status["reason"]) == ("FAILED", "interrupted")
    print(f"interrupted job, max_attempts {max_attempts}: {msg['status']} attempt {msg['attempt']}")


# ------------------------------------------------------------------------------------------------
# 5. SIGTERM


def test_sigterm_lets_the_running_job_finish_within_grace(broker, tiny_model, tmp_path):
    dev = "dev-e"
    cfg, topics, rec, peer, daemon = prepare_long_job(
        broker, tiny_model, tmp_path, dev, service={"shutdown_grace_s": 30}
    )
    job_id = "term-a"
    with supervised(daemon):
        start_generating(daemon, peer, topics, job_id)
        t_term = time.time()
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(timeout=60) == 0
    peer.barrier()
    peer.close()
    msg = rec.result(job_id)
    assert (msg["status"], msg["attempt"], msg["usage"]["completion_tokens"]) == ("SUCCEEDED", 1, LONG_TOKENS)
    assert epoch(msg["ts"]) > t_term, "the job had finished before SIGTERM: nothing was tested"
    r = final_records(cfg)[job_id]
    assert (r.status, r.delivered) == (JobStatus.SUCCEEDED, True)
    assert retained_state(broker, dev) == "stopping"
    print(f"SIGTERM: job finished {epoch(msg['ts']) - t_term:.2f}s after the signal, exit 0")


def test_sigterm_without_grace_requeues_the_running_job_and_it_completes_after_restart(broker, tiny_model, tmp_path):
    dev = "dev-f"
    cfg, topics, rec, peer, daemon = prepare_long_job(
        broker, tiny_model, tmp_path, dev, service={"shutdown_grace_s": 0}
    )
    job_id = "term-b"
    with supervised(daemon):
        start_generating(daemon, peer, topics, job_id)
        assert daemon.terminate(timeout=30) == 0
        # Requeued without counting the run (JobStore.requeue gives the attempt back).
        assert store_rows(cfg)[job_id] == ("QUEUED", 0, 0)
        assert retained_state(broker, dev) == "stopping"
        peer.barrier()
        assert not rec.results
        daemon.start()
        rec.wait("the result", lambda: rec.have_results([job_id]), 60)
        poll_store(cfg, "result confirmed delivered", all_delivered([job_id]))
        assert daemon.terminate() == 0
    peer.close()
    msg = rec.result(job_id)
    assert (msg["status"], msg["attempt"], msg["usage"]["completion_tokens"]) == ("SUCCEEDED", 1, LONG_TOKENS)
    assert set(s["attempt"] for s in rec.statuses[job_id] if s["status"] == "IN_PROGRESS") == {1}
    assert final_records(cfg)[job_id].status is JobStatus.SUCCEEDED


def test_second_sigterm_forces_the_stop(broker, tiny_model, tmp_path, monkeypatch):
    dev = "dev-g"
    notify = NotifySocket(monkeypatch)  # before the daemon starts: it passes NOTIFY_SOCKET on
    cfg, topics, rec, peer, daemon = prepare_long_job(
        broker, tiny_model, tmp_path, dev, service={"shutdown_grace_s": 600}
    )
    job_id = "term-c"
    with supervised(daemon):
        start_generating(daemon, peer, topics, job_id)
        daemon.signal(signal.SIGTERM)
        notify.expect("STOPPING=1")  # the first one is being handled: it waits for the job
        t0 = time.monotonic()
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0
        took = time.monotonic() - t0
    notify.close()
    peer.barrier()
    peer.close()
    assert not rec.results, "the job ran to its end: the second SIGTERM did not force"
    assert store_rows(cfg)[job_id] == ("QUEUED", 0, 0)
    assert retained_state(broker, dev) == "stopping"
    print(f"second SIGTERM: exit 0 after {took:.2f}s, job requeued")


def test_job_claimed_while_a_stop_begins_is_requeued_not_run(broker, tiny_model, tmp_path):
    """The worker passes its "draining?" check, then SIGTERM arrives while it claims the next job,
    and shutdown, finding nothing running yet, gives up on stopping anything. The claimed job
    must not start: it goes back to the queue. In process, to place the stop in that window."""
    dev = "dev-h"
    topics = Topics(PREFIX, dev)
    cfg = write_daemon_config(tmp_path / dev, broker, tiny_model, device_id=dev, service={"shutdown_grace_s": 0})
    d = InProcessDaemon(cfg)
    daemon = d.daemon
    aborted = threading.Event()  # shutdown looked for running jobs to stop
    real_wait_idle, real_claim = daemon.parts.gate.wait_idle, daemon.parts.store.claim

    def wait_idle(timeout: float | None) -> bool:
        idle = real_wait_idle(timeout)
        aborted.set()
        return idle

    def claim(job_id: str, now: float | None = None) -> JobRecord | None:
        if daemon.parts.store.queued_count() and daemon._stop_requested == 0:
            daemon.request_stop()  # what the SIGTERM handler does
            aborted.wait(30)  # shutdown found no job running yet (grace 0) and moved on
        return real_claim(job_id, now)

    daemon.parts.gate.wait_idle = wait_idle  # type: ignore[method-assign]
    rec = Recorder()
    peer = Peer(broker, rec).connect().follow(dev)
    with d:
        wait_online(peer, dev)
        daemon.parts.store.claim = claim  # type: ignore[method-assign]
        peer.publish(topics.submit, job_payload("race-1", 32))
        d._thread.join(30)  # not d.stop(): a second stop request would force, and hide the race
        assert not d._thread.is_alive() and d.exit_code == 0
        assert aborted.is_set()
    peer.barrier()
    peer.close()
    assert not rec.results, "the job ran although the stop began before it started"
    r = final_records(cfg)["race-1"]
    assert (r.status, r.attempt) == (JobStatus.QUEUED, 0)
