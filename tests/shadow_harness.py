"""Running the shadow service in tests: an honest fake executor, its contract, and a board.

``FakeExecutor`` stands in for the daemon's diff-and-apply path (agent.app.applier.LiveSettings) so the
service and the CLI can be tested against a real broker in milliseconds. It keeps the same
contract, checked by ``check_executor_contract`` (run it on the real executor too): it changes only
the keys it is given, holds in ``settings`` only values really in force, reports every changed key,
and a model change that cannot load leaves the old value with the reason. Its "load" really checks
the file: inside the models folder, a readable 4-bit GGUF, the sha256 when one is set (hashed for
real); ``unloadable`` names files the real engine would refuse though their header reads fine.

``ShadowBoard`` wires a ShadowService to a real MqttTransport the way the daemon does, with a main
loop thread that runs the reconcile when the service wakes it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from agent.app.applier import SWAP_NOTE
from agent.config import Settings
from agent.config.live import ApplyReport, diff
from agent.mqtt.topics import Topics
from agent.mqtt.transport import MqttTransport
from agent.shadow.desired import check_model_file
from agent.shadow.service import ShadowService
from agent.shadow.store import ShadowStore
from agent.system.files import file_sha256
from tests.broker import MosquittoBroker

# What the real executor (agent.app.applier.LiveSettings) reports for a swap key: the fake says the same.
PENDING_NOTE = SWAP_NOTE


def _set(settings: Settings, key: str, value: Any) -> None:
    *path, name = key.split(".")
    node: Any = settings
    for part in path:
        node = getattr(node, part)
    setattr(node, name, value)


class FakeExecutor:
    def __init__(self, settings: Settings, *, unloadable: Collection[str] = ()) -> None:
        self.settings = settings.model_copy(deep=True)
        self.unloadable = set(unloadable)
        self.calls: list[tuple[tuple[str, ...], str]] = []  # (keys, thread name)
        self.loads = 0

    def apply(self, target: Settings, keys: Collection[str]) -> ApplyReport:
        self.calls.append((tuple(keys), threading.current_thread().name))
        changes = [c for c in diff(self.settings, target) if c.key in keys]
        report = ApplyReport(restart=[c.key for c in changes if c.kind is None])
        for c in changes:
            if c.kind == "hot":
                _set(self.settings, c.key, c.new)
                if c.key.startswith("swap."):
                    report.pending[c.key] = PENDING_NOTE
                else:
                    report.applied[c.key] = c.new
        reload = [c for c in changes if c.kind == "reload"]
        if reload:
            candidate = self.settings.model_copy(deep=True)
            for c in reload:
                _set(candidate, c.key, c.new)
            why = self._load(candidate)
            for c in reload:
                if why is None:
                    _set(self.settings, c.key, c.new)
                    report.applied[c.key] = c.new
                else:
                    report.failed[c.key] = why
        return report

    def set_trusted_keys(self, keys: Collection[str]) -> None:
        self.settings.model.trusted_keys = list(keys)

    def _load(self, s: Settings) -> str | None:
        self.loads += 1
        problem = check_model_file(s)
        if problem is not None:
            return problem
        path = s.model_file()
        if path.name in self.unloadable:
            return f"llama.cpp could not load {path.name}: unknown model architecture; the previous model serves"
        if s.model.sha256 is not None and file_sha256(path) != s.model.sha256:
            return f"{path.name} does not match model.sha256; the previous model serves"
        return None


def check_executor_contract(make: Callable[[], Any], settings: Settings, good_model: str, bad_model: str) -> None:
    """The executor contract the shadow relies on. ``make()`` builds an executor in force with
    ``settings``; ``good_model`` loads, ``bad_model`` (names in the models folder) does not."""
    ex = make()
    # Only the keys given change.
    target = settings.model_copy(deep=True)
    target.telemetry.interval_s = settings.telemetry.interval_s + 7
    target.engine.max_tokens_limit = settings.engine.max_tokens_limit + 1
    report = ex.apply(target, ["telemetry.interval_s"])
    assert report.applied == {"telemetry.interval_s": target.telemetry.interval_s}, report
    assert ex.settings.telemetry.interval_s == target.telemetry.interval_s
    assert ex.settings.engine.max_tokens_limit == settings.engine.max_tokens_limit
    # Keys already in force are not reported (nothing to do).
    assert ex.apply(target, ["telemetry.interval_s"]) == ApplyReport()
    # A model that does not load: the old value stays in force, with why.
    bad = target.model_copy(deep=True)
    bad.model.path = Path(bad_model)
    report = ex.apply(bad, ["model.path"])
    assert set(report.failed) == {"model.path"} and report.failed["model.path"], report
    assert ex.settings.model.path == settings.model.path
    # A model that loads, together with another reload key: both in force.
    good = target.model_copy(deep=True)
    good.model.path = Path(good_model)
    good.engine.n_ctx = 256
    report = ex.apply(good, ["model.path", "engine.n_ctx"])
    assert set(report.applied) == {"model.path", "engine.n_ctx"} and not report.failed, report
    assert ex.settings.model.path == Path(good_model) and ex.settings.engine.n_ctx == 256


class ShadowBoard:
    """A ShadowService on a real broker, wired like the daemon, with a main loop thread."""

    def __init__(
        self,
        broker: MosquittoBroker,
        settings: Settings,
        *,
        executor: FakeExecutor | None = None,
        facts: Callable[[], dict[str, Any]] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.settings = settings
        self.topics = Topics(settings.mqtt.prefix, settings.device.id)
        self.store = ShadowStore.from_settings(settings)
        self.executor = executor or FakeExecutor(settings)
        self.tick = threading.Event()
        self.passes = 0
        self._stop = threading.Event()
        self._loop: threading.Thread | None = None
        kwargs: dict[str, Any] = {"clock": clock} if clock else {}
        self.service = ShadowService(
            topics=self.topics, store=self.store, file_settings=settings, executor=self.executor,
            publish=lambda *a: self.transport.publish(*a), ack=lambda m: self.transport.ack(m),
            facts=facts or (lambda: {"board": None, "serving": None}), wake=self.tick.set, **kwargs,
        )  # fmt: skip
        self.transport = MqttTransport(
            broker.settings(f"board-{settings.device.id}"), will=None, on_message=self.service.on_message,
            on_connect=self.service.on_connect, subscriptions=self.service.subscriptions(),
        )  # fmt: skip

    def start(self, *, connect: bool = True, main_loop: bool = True) -> ShadowBoard:
        """Like the daemon: start the service and reconcile before connecting."""
        self.service.start()
        self.service.run_pending()
        if main_loop:
            self._loop = threading.Thread(target=self._main_loop, name="board-main", daemon=True)
            self._loop.start()
        if connect:
            self.transport.start()
            assert self.transport.wait_connected(10), "board did not connect"
        return self

    def _main_loop(self) -> None:
        while not self._stop.is_set():
            self.tick.wait(1.0)
            self.tick.clear()
            if self.service.pending_work():
                self.service.run_pending()
                self.passes += 1

    def stop(self) -> None:
        self._stop.set()
        self.tick.set()
        if self._loop is not None:
            self._loop.join(5)
        self.transport.stop()
        self.store.close()

    def __enter__(self) -> ShadowBoard:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ShadowPeer:
    """An operator on the broker (plain paho, tests.broker.BrokerClient) following one board's shadow
    topics. Messages are kept per topic until a test takes them, so waiting for one topic never
    drops another."""

    def __init__(self, broker: MosquittoBroker, topics: Topics) -> None:
        from tests.broker import BrokerClient

        self.topics = topics
        self.client = BrokerClient(broker).connect()
        self._kept: list[Any] = []
        for t in (f"{topics.root}/shadow", f"{topics.root}/shadow/+", f"{topics.root}/shadow/+/+"):
            self.client.subscribe(t, 1)

    def send(self, body: Any, *, retain: bool = False) -> None:
        import json

        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.client.publish(self.topics.shadow_update, payload, retain=retain)

    def take(self, topic: str, predicate: Callable[[Any], bool] = lambda d: True, timeout: float = 10.0) -> Any:
        """The first message on ``topic`` whose decoded JSON (None for an empty payload) satisfies
        ``predicate``; earlier non-matching ones on that topic are dropped, other topics are kept."""
        import json
        import queue
        import time

        deadline = time.monotonic() + timeout
        while True:
            for i, msg in enumerate(self._kept):
                if msg.topic != topic:
                    continue
                data = json.loads(msg.payload) if msg.payload else None
                del self._kept[i]
                if predicate(data):
                    return data
                break
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no matching message on {topic} within {timeout}s")
                try:
                    self._kept.append(self.client.messages.get(timeout=left))
                except queue.Empty:
                    pass

    def doc(self, predicate: Callable[[Any], bool] = lambda d: True, timeout: float = 10.0) -> Any:
        return self.take(self.topics.shadow, predicate, timeout)

    def reply(self, token: str, timeout: float = 10.0) -> tuple[str, Any]:
        """The accepted or rejected reply to the update with this client_token."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            for topic in (self.topics.shadow_update_accepted, self.topics.shadow_update_rejected):
                try:
                    return topic.rsplit("/", 1)[1], self.take(topic, lambda d: d.get("client_token") == token, 0.05)
                except TimeoutError:
                    pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"no reply to update {token!r}")

    def retained(self, topic: str, timeout: float = 5.0) -> bytes | None:
        """The retained message on ``topic`` as a fresh subscriber sees it (None: nothing retained).
        A round trip through the broker after subscribing bounds the wait."""
        from tests.broker import BrokerClient

        with BrokerClient(self.client.broker) as fresh:
            fresh.subscribe(topic, 1)
            before = fresh.barrier(timeout)
        hits = [m.payload for m in before if m.topic == topic]
        return hits[0] if hits else None

    def close(self) -> None:
        self.client.close()
