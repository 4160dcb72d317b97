"""The outbox: at-least-once publishing from durable sources, without resend storms.

Against tests.fakes.FakePublisher (its contract: tests/test_contract_publisher.py) and two sources:
an in-memory one whose bookkeeping can be made to fail, and the real job store (JobResults).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from agent.errors import StoreError
from agent.jobs.protocol import ErrorCode, JobOutcome, JobSubmit
from agent.jobs.results import JobResults
from agent.jobs.store import JobStore
from agent.mqtt.outbox import Outbox, Outgoing
from agent.mqtt.topics import Topics
from tests.fakes import FakePublisher


class MemorySource:
    """A durable queue stand-in: ``fail_delivered`` makes recording fail like a full disk."""

    name = "mem"

    def __init__(self, n: int) -> None:
        self.items = {f"k{i:03d}": Outgoing(f"k{i:03d}", f"edge/t/{i}", f"p{i}".encode()) for i in range(n)}
        self.recorded: list[str] = []
        self.fail_delivered = False
        self.fail_pending = False

    def pending(self, limit: int) -> list[Outgoing]:
        if self.fail_pending:
            raise StoreError("disk gone", code="store_io")
        return [v for k, v in sorted(self.items.items()) if k not in self.recorded][:limit]

    def delivered(self, keys: Sequence[str]) -> None:
        if self.fail_delivered:
            raise StoreError("the disk is full", code="store_full")
        self.recorded.extend(keys)


def make(publisher: FakePublisher, n: int = 0, **kw):
    errors: list[StoreError] = []
    wakes: list[int] = []
    box = Outbox(publisher, on_store_error=errors.append, wake=lambda: wakes.append(1), **kw)
    src = MemorySource(n)
    box.add_source(src)
    return box, src, errors, wakes


def test_a_pass_sends_the_backlog_in_paced_batches_and_records_delivery() -> None:
    pub = FakePublisher()
    box, src, errors, _ = make(pub, 120, batch=50)
    assert box.run_pass() == 120
    assert [m.topic for m in pub.sent] == [f"edge/t/{i}" for i in range(120)]
    assert sorted(src.recorded) == sorted(src.items) and errors == []
    assert box.run_pass() == 0  # nothing due: a resend is asked for by a connect or a failed publish


def test_an_item_waiting_for_its_ack_is_never_sent_twice() -> None:
    pub = FakePublisher(auto_ack=False)
    box, src, _, _ = make(pub, 3, ack_timeout_s=0.01)
    item = src.items["k000"]
    h1 = box.send(src, item)
    assert box.send(src, item) is h1  # a second send returns the pending handle
    box.request_resend()
    box.run_pass()  # the batch times out waiting: the in-flight item is not in it
    assert [m.payload for m in pub.sent].count(b"p0") == 1
    assert pub.ack_all() == 3
    assert sorted(src.recorded) == ["k000", "k001", "k002"]


def test_two_senders_at_the_same_moment_publish_an_item_once() -> None:
    """The runner's send and a resend pass can reach one item at once (after a restart: the job just
    finished, the connect asked for a resend). The second must see it in flight while the first is
    still inside publish(), not publish a second copy."""
    inside, release = threading.Event(), threading.Event()

    class SlowPublisher(FakePublisher):
        def publish(self, topic: str, payload: bytes, *args: Any, **kw: Any) -> Any:
            if payload == b"p0" and not inside.is_set():
                inside.set()
                assert release.wait(10)  # the first sender is held inside publish()
            return super().publish(topic, payload, *args, **kw)

    pub = SlowPublisher(auto_ack=False)
    box, src, _, _ = make(pub, 1)
    item = src.items["k000"]
    first = threading.Thread(target=box.send, args=(src, item))
    first.start()
    assert inside.wait(10)
    second = box.send(src, item)  # while the first is inside publish()
    assert not second.done
    release.set()
    first.join(10)
    assert not first.is_alive()
    assert [m.payload for m in pub.sent].count(b"p0") == 1
    assert pub.ack_all() == 1 and second.wait(1) and second.delivered
    assert src.recorded == ["k000"]


def test_a_failure_to_record_delivery_causes_no_resend_storm() -> None:
    pub = FakePublisher()
    box, src, errors, wakes = make(pub, 5)
    src.fail_delivered = True
    box.run_pass()
    assert len(pub.sent) == 5 and src.recorded == []
    assert len(errors) == 5 and errors[0].code == "store_full" and wakes
    assert box.unrecorded == 5
    # Passes while the store still fails: nothing is sent again.
    for _ in range(3):
        box.request_resend()
        box.run_pass()
    assert len(pub.sent) == 5
    # The store recovers: the acknowledgements are recorded, still nothing is sent again.
    src.fail_delivered = False
    box.request_resend()
    box.run_pass()
    assert sorted(src.recorded) == sorted(src.items) and box.unrecorded == 0 and len(pub.sent) == 5


def test_a_publish_refused_at_once_is_resent_by_the_next_pass_without_a_reconnect() -> None:
    pub = FakePublisher(auto_ack=False, queue_limit=2)
    box, src, _, wakes = make(pub, 4)
    for key in sorted(src.items):
        box.send(src, src.items[key])
    refused = [m for m in pub.sent if m.handle.done]
    assert len(pub.sent) == 2 and not refused and wakes  # two refused: the main loop is woken
    pub.ack_all()
    pub.auto_ack = True
    box.run_pass()  # no reconnect happened: the refusal alone made the resend due
    assert sorted(src.recorded) == sorted(src.items)


def test_a_link_lost_mid_batch_stops_the_pass_and_the_rest_goes_after_reconnect() -> None:
    pub = FakePublisher(auto_ack=False)
    box, src, _, _ = make(pub, 10, batch=4, ack_timeout_s=0.01)
    pub.connected = True
    box.run_pass()  # first batch waits for acks that do not come
    pub.drop()
    assert src.recorded == []
    pub.connected, pub.auto_ack = True, True
    box.request_resend()  # what the daemon does on connect
    box.run_pass()
    assert sorted(src.recorded) == sorted(src.items)


def test_an_unreadable_source_is_reported_and_retried() -> None:
    pub = FakePublisher()
    box, src, errors, _ = make(pub, 2)
    src.fail_pending = True
    assert box.run_pass() == 0 and errors and errors[0].code == "store_io"
    src.fail_pending = False
    assert box.run_pass() == 2


def test_job_results_source_sends_status_then_result_from_the_store(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.db")
    try:
        store.accept(JobSubmit(job_id="j1", kind="generate", prompt="hi", max_tokens=2))
        store.cancel("j1")
        src = JobResults(store, Topics("edge", "pi-1"))
        pub = FakePublisher()
        box = Outbox(pub)
        box.add_source(src)
        assert box.run_pass() == 1
        assert [m.topic for m in pub.sent] == ["edge/pi-1/jobs/j1/status", "edge/pi-1/jobs/j1/result"]
        result = json.loads(pub.sent[1].payload)
        assert (result["status"], result["error"]["code"]) == ("CANCELED", "canceled")
        assert store.get("j1").delivered and store.undelivered() == []
        assert (
            JobOutcome.model_validate({k: result[k] for k in JobOutcome.model_fields}).error.code is ErrorCode.canceled
        )
    finally:
        store.close()


@pytest.mark.parametrize("n", [0, 1, 49, 50, 51])
def test_batch_edges(n: int) -> None:
    pub = FakePublisher()
    box, src, _, _ = make(pub, n, batch=50)
    assert box.run_pass() == n and len(src.recorded) == n
