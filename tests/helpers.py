"""Small helpers several test modules share (one definition each)."""

from __future__ import annotations

import json
import threading
import time
from typing import Any


class Clock:
    """An injected clock: ``t`` is what it says until the test moves it."""

    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> float:
        self.t += s
        return self.t


class FakeClock:
    """A clock the test moves, read from the daemon's threads (so behind a lock); ``now`` is its time."""

    def __init__(self, start: float) -> None:
        self.now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


def job_payload(job_id: str, *, max_tokens: int = 8, **fields: Any) -> bytes:
    """A submit payload as a client sends it: a generate job with a short prompt."""
    return json.dumps(
        {"job_id": job_id, "kind": "generate", "prompt": "Hello there", "max_tokens": max_tokens, **fields}
    ).encode()


class Paced:
    """The real engine, its tokens paced to ``tokens_per_s``: a board of that speed (fleet tests and
    tests/benchmarks/bench_fleet.py). The pause per token stands for compute time, not for a wait."""

    def __init__(self, engine: Any, tokens_per_s: float) -> None:
        object.__setattr__(self, "_engine", engine)
        object.__setattr__(self, "_delay", 1.0 / tokens_per_s)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def generate(self, req: Any, *, on_token: Any = None, **kw: Any) -> Any:
        def paced(index: int, text: str) -> None:
            time.sleep(self._delay)
            if on_token is not None:
                on_token(index, text)

        return self._engine.generate(req, on_token=paced, **kw)
