"""A full disk under the job store, for real: the daemon's state folder on a tmpfs the test fills.

300 jobs are flooded while the filesystem is full and kept full for a while, then space is given
back. Every job must end with exactly one outcome, delivered, without a restart of the daemon;
while the disk is full the daemon logs one line per change of the store's state, not one per
message or per second. Needs root (mount); skipped with the reason elsewhere.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from agent.jobs.protocol import JobStatus
from agent.mqtt.topics import Topics
from tests.broker import BrokerClient, MosquittoBroker
from tests.daemon_harness import DaemonProcess, wait_online, write_daemon_config
from tests.test_daemon_faults import final_records, poll_store

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs to fill needs root"),
    pytest.mark.skipif(shutil.which("mount") is None, reason="no mount command"),
]

DEV = "dev-full"
JOBS = 300
HOLD_FULL_S = 1.5  # how long the disk stays full after the device reported it


@pytest.fixture
def small_fs(tmp_path: Path):
    mnt = tmp_path / "state"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0755", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(folder: Path) -> Path:
    """Write a file until the filesystem has no space left; returns it."""
    filler = folder / "filler"
    block = b"\0" * 65536
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(block)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
    with open(filler, "ab", buffering=0) as f:  # the last partial block
        try:
            while True:
                f.write(b"\0" * 512)
        except OSError:
            pass
    return filler


class Seen:
    """Results and the device's store state as the broker delivers them."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.results: dict[str, list[bytes]] = defaultdict(list)
        self.store_states: list[str] = []

    def on(self, msg: Any) -> None:
        parts = msg.topic.split("/")
        with self.cond:
            if parts[-1] == "result":
                self.results[parts[3]].append(bytes(msg.payload))
            elif len(parts) == 3 and parts[2] == "status" and msg.payload:
                state = json.loads(msg.payload).get("store")
                if state and (not self.store_states or self.store_states[-1] != state):
                    self.store_states.append(state)
            self.cond.notify_all()

    def wait(self, what: str, predicate, timeout: float) -> None:
        with self.cond:
            assert self.cond.wait_for(predicate, timeout), f"{what} not within {timeout}s"


def test_a_full_disk_loses_no_job_and_logs_once_per_change(
    broker: MosquittoBroker, tiny_model: Path, tmp_path: Path, small_fs: Path
) -> None:
    cfg = write_daemon_config(
        tmp_path / "d", broker, tiny_model, device_id=DEV,
        device={"id": DEV, "state_dir": str(small_fs), "models_dir": str(tmp_path / "d" / "models")},
        store={"recheck_s": 0.25, "min_free_kb": 1024, "queue_max": 1000},
    )  # fmt: skip
    topics = Topics("edge", DEV)
    seen = Seen()
    daemon = DaemonProcess(cfg)
    with BrokerClient(broker) as peer:
        peer.client.on_message = lambda c, u, m: (seen.on(m), peer.messages.put(m))
        for t in (topics.result_filter, topics.device_status):
            peer.subscribe(t)
        daemon.start()
        try:
            wait_online(peer, DEV)
            filler = fill(small_fs)
            jobs = [f"full-{i:03d}" for i in range(JOBS)]
            for job_id in jobs:
                body = {"job_id": job_id, "kind": "generate", "prompt": f"job {job_id}", "max_tokens": 2,
                        "temperature": 0.0}  # fmt: skip
                peer.publish(topics.submit, json.dumps(body).encode())
            seen.wait("the device reporting its store unwritable", lambda: "unwritable" in seen.store_states, 60)
            # The scenario: the disk stays full for a while, through several failing re-checks
            # (every 0.25 s). A deliberate duration, not a wait for something to happen.
            time.sleep(HOLD_FULL_S)
            assert seen.store_states[-1] == "unwritable"
            filler.unlink()
            seen.wait("a result for every job", lambda: all(seen.results.get(j) for j in jobs), 180)
            assert daemon.alive(), daemon.log_tail()
            poll_store(cfg, "every result confirmed delivered", lambda rows: all(
                j in rows and rows[j][2] == 1 for j in jobs), timeout=60)  # fmt: skip
            assert daemon.terminate() == 0
        finally:
            if daemon.alive():
                daemon.kill()
    assert daemon.starts == 1, "the daemon was restarted"
    records = final_records(cfg)
    assert sorted(records) == sorted(jobs)
    for job_id in jobs:
        r = records[job_id]
        assert r.status is JobStatus.SUCCEEDED and r.delivered, (job_id, r.status, r.outcome)
        copies = seen.results[job_id]
        assert len(set(copies)) == 1, (job_id, copies)  # redelivered copies are byte-identical
    text = daemon.log_path.read_text()
    assert "Traceback" not in text
    assert seen.store_states == ["writable", "unwritable", "writable"], seen.store_states
    lines = text.splitlines()
    down = [i for i, ln in enumerate(lines) if "job store unwritable" in ln]
    up = [i for i, ln in enumerate(lines) if "job store writable again" in ln]
    assert len(down) == 1 and len(up) == 1 and down[0] < up[0], text[-4000:]
    # Nothing else logged while the disk was full: not per message, not per re-check. (An outbox
    # resend pass that was under way when the disk filled may say so once, at INFO.)
    between = lines[down[0] + 1 : up[0]]
    assert not [ln for ln in between if " WARNING " in ln or " ERROR " in ln], lines[down[0] : up[0] + 1]
    assert len(between) <= 1 and all("resent" in ln for ln in between), lines[down[0] : up[0] + 1]
