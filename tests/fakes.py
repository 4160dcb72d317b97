"""Fakes for fast tests of the job path, each kept honest by a contract test the real part passes too.

- ``FakeEngine`` stands in for ``agent.engine.Engine`` (tests/test_contract_engine.py runs the same
  contract against both): it "generates" one token per step, " w0", " w1", ..., honours max_tokens,
  the cancel event, the deadline, stop strings, the per-request limits and unloading under a run.
- ``FakePublisher`` stands in for ``agent.mqtt.transport.MqttTransport``'s publishing side
  (tests/test_contract_publisher.py runs the same contract against both, on a real broker).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.codes import ErrorCode
from agent.engine.types import (
    GenerationRequest,
    GenerationResult,
    GenerationStats,
    LoadReport,
    RequestLimits,
    fit_context,
)
from agent.errors import ContextTooLong, EngineError


class FakeEngine:
    """A deterministic engine. ``gate``: when set up, each run stops after its first token until the
    test sets it (``started`` tells the test the run got there). ``fail_with``: raised by generate."""

    def __init__(
        self, *, n_ctx: int = 512, limits: RequestLimits | None = None, name: str = "fake", slots: int = 1
    ) -> None:
        self.n_ctx = n_ctx
        self._slots = slots
        self._running = threading.BoundedSemaphore(slots)  # as many runs at once as the engine has slots
        self.limits = limits or RequestLimits()
        self.name = name
        self._loaded = False
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self.gate: threading.Event | None = None
        self.started = threading.Event()
        self.fail_with: BaseException | None = None
        self.load_error: BaseException | None = None
        self.runs: list[GenerationRequest] = []
        self.loads = 0

    @property
    def loaded(self) -> bool:
        return self._loaded

    @property
    def report(self) -> LoadReport | None:
        return None

    @property
    def slots(self) -> int:
        return self._slots if self._loaded else 0

    @property
    def tokenizer_key(self) -> str:
        return f"{self.name}:{self.n_ctx}"

    def measure(self, req: GenerationRequest) -> int:
        """One token per word, plus a BOS; a chat's messages are rendered one per line."""
        with self._lock:
            if not self._loaded:
                raise EngineError("the model is not loaded", code=ErrorCode.model_not_loaded)
        return 1 + len(self._text(req).split())

    @staticmethod
    def _text(req: GenerationRequest) -> str:
        if req.messages is None:
            return req.prompt
        return "\n".join(f"{m.role}: {m.content}" for m in req.messages)

    def load(self) -> Any:
        if self.load_error is not None:
            raise self.load_error
        self._closing.clear()
        self._loaded = True
        self.loads += 1
        return {"model": self.name}

    def unload(self) -> None:
        self._closing.set()
        for _ in range(self._slots):  # runs in flight end ("aborted") before the model goes
            self._running.acquire()
        with self._lock:
            self._loaded = False
        for _ in range(self._slots):
            self._running.release()

    def generate(
        self,
        req: GenerationRequest,
        *,
        on_token: Callable[[int, str], None] | None = None,
        cancel: threading.Event | None = None,
        deadline: float | None = None,
    ) -> GenerationResult:
        lim = self.limits
        if len(req.prompt.encode()) > lim.max_prompt_bytes:
            raise EngineError("prompt too large", code=ErrorCode.prompt_too_large)
        if req.max_tokens > lim.max_tokens_limit:
            raise EngineError("max_tokens too large", code=ErrorCode.max_tokens_too_large)
        with self._lock:
            if not self._loaded:
                raise EngineError("the model is not loaded", code=ErrorCode.model_not_loaded)
            self.runs.append(req)
            if self.fail_with is not None:
                raise self.fail_with
        with self._running:
            measured = 1 + len(self._text(req).split())
            fit = fit_context(measured, req.max_tokens, self.n_ctx, lim.context_overflow)
            if not fit.fits:
                raise ContextTooLong(fit.refusal(measured))
            prompt_tokens = fit.keep
            parts: list[str] = []
            finish = "length"
            t0 = time.monotonic()
            for i in range(fit.allowed):
                if cancel is not None and cancel.is_set():
                    finish = "canceled"
                    break
                if self._closing.is_set():
                    finish = "aborted"
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    finish = "timeout"
                    break
                piece = f" w{i}"
                if any(s in "".join(parts) + piece for s in req.stop):
                    finish = "stop"
                    break
                parts.append(piece)
                if on_token is not None:
                    on_token(i, piece)
                if i == 0 and self.gate is not None:
                    self.started.set()
                    self.gate.wait()
            took = time.monotonic() - t0
            n = len(parts)
            stats = GenerationStats(
                prompt_tokens=prompt_tokens, completion_tokens=n, prompt_ms=0.1, generation_ms=took * 1000,
                tokens_per_s=n / took if n and took > 0 else 0.0, peak_rss_anon=0,
                prompt_tokens_dropped=fit.dropped, max_tokens_allowed=fit.allowed,
            )  # fmt: skip
            return GenerationResult("".join(parts), finish, stats)  # type: ignore[arg-type]


class FakeHandle:
    """A publish handle like agent.mqtt.transport.PublishHandle."""

    def __init__(self, topic: str, qos: int, on_delivered: Callable[[], None] | None) -> None:
        self.topic = topic
        self.qos = qos
        self._on_delivered = on_delivered
        self._done = threading.Event()
        self._delivered = False
        self.error: str | None = None

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def delivered(self) -> bool:
        return self._delivered

    def wait(self, timeout: float | None = None) -> bool:
        self._done.wait(timeout)
        return self._delivered

    def resolve(self, delivered: bool, error: str | None = None) -> None:
        if self._done.is_set():
            return
        self._delivered, self.error = delivered, error
        if delivered and self._on_delivered is not None:
            try:
                self._on_delivered()
            except Exception:  # noqa: BLE001  like the transport: the callback's failure is logged there
                pass
        self._done.set()


@dataclass
class Sent:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    handle: FakeHandle


@dataclass
class FakePublisher:
    """An in-memory broker link. ``auto_ack``: QoS 1 publishes are acknowledged at once (on the
    caller's thread, as a fast broker would, before ``publish`` returns); otherwise the test calls
    ``ack_all()``. ``connected = False`` refuses publishes at once; ``drop()`` fails what is in flight
    (a lost connection); ``queue_limit`` refuses publishes beyond that many in flight."""

    connected: bool = True
    auto_ack: bool = True
    queue_limit: int | None = None
    sent: list[Sent] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, *,
        on_delivered: Callable[[], None] | None = None, properties: Any = None,
    ) -> FakeHandle:  # fmt: skip
        h = FakeHandle(topic, qos, on_delivered)
        if not self.connected:
            h.resolve(False, "not connected: resend after reconnect")
            return h
        with self._lock:
            if self.queue_limit is not None and len(self.in_flight()) >= self.queue_limit:
                h.resolve(False, "outgoing queue full")
                return h
            self.sent.append(Sent(topic, payload, qos, retain, h))
        if qos == 0 or self.auto_ack:
            h.resolve(True)
        return h

    def in_flight(self) -> list[Sent]:
        return [m for m in self.sent if not m.handle.done]

    def ack_all(self) -> int:
        pending = self.in_flight()
        for m in pending:
            m.handle.resolve(True)
        return len(pending)

    def drop(self) -> None:
        """The connection is lost: everything in flight fails, nothing more goes out."""
        self.connected = False
        for m in self.in_flight():
            m.handle.resolve(False, "connection lost")

    def on(self, topic: str) -> list[bytes]:
        return [m.payload for m in self.sent if m.topic == topic]


__all__ = ["FakeEngine", "FakeHandle", "FakePublisher", "Sent"]
