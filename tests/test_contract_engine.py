"""The engine contract the job path relies on, run against the real engine (tiny model) and the fake.

What the runner and the supervisor depend on, and nothing about the text itself (the tiny model's
weights are random): load/unload state, the not-loaded error, max_tokens, streaming pieces that add
up to the text, cancel before and during a run, deadlines, unloading under a run ("aborted"), the
request limits and their error codes.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from agent.codes import ErrorCode, JobStatus
from agent.config.sections import EngineSettings, MemorySettings
from agent.engine.types import EngineLike, GenerationRequest, RequestLimits
from agent.errors import EngineError
from tests.fakes import FakeEngine


@pytest.fixture(params=["real", "fake"])
def engine(request: pytest.FixtureRequest, tiny_model: Path) -> EngineLike:
    if request.param == "real":
        from agent.engine import Engine

        e: EngineLike = Engine(
            tiny_model,
            engine=EngineSettings(
                n_ctx=512, n_threads=1, n_batch=64, load_mode="fit", max_tokens_limit=400, max_parallel=2
            ),
            memory=MemorySettings(budget_mb=1024),
        )
    else:
        e = FakeEngine(n_ctx=512, limits=RequestLimits(max_tokens_limit=400), slots=2)
    yield e
    e.unload()


def greedy(prompt: str = "Hello there", max_tokens: int = 8, **kw) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, max_tokens=max_tokens, temperature=0.0, **kw)


def test_is_an_engine_and_reports_not_loaded(engine: EngineLike) -> None:
    assert isinstance(engine, EngineLike)
    assert not engine.loaded
    with pytest.raises(EngineError) as e:
        engine.generate(greedy())
    assert e.value.code is ErrorCode.model_not_loaded and e.value.code.status is JobStatus.FAILED
    engine.load()
    assert engine.loaded
    engine.unload()
    assert not engine.loaded
    engine.load()  # loads again after an unload
    assert engine.loaded


def test_generates_at_most_max_tokens_and_streams_pieces_that_add_up(engine: EngineLike) -> None:
    engine.load()
    pieces: list[tuple[int, str]] = []
    r = engine.generate(greedy(max_tokens=6), on_token=lambda i, t: pieces.append((i, t)))
    assert r.finish_reason in ("stop", "length")
    assert 0 <= r.stats.completion_tokens <= 6 and r.stats.prompt_tokens >= 1
    assert [i for i, _ in pieces] == list(range(len(pieces)))
    assert "".join(t for _, t in pieces) == r.text and all(t for _, t in pieces)


def test_cancel_before_and_during_a_run(engine: EngineLike) -> None:
    engine.load()
    cancel = threading.Event()
    cancel.set()
    r = engine.generate(greedy(max_tokens=50), cancel=cancel)
    assert r.finish_reason == "canceled" and r.stats.completion_tokens == 0

    cancel = threading.Event()
    r = engine.generate(greedy(max_tokens=300), cancel=cancel, on_token=lambda i, t: cancel.set())
    assert r.finish_reason == "canceled" and r.stats.completion_tokens < 300


def test_a_deadline_that_passed_times_out(engine: EngineLike) -> None:
    engine.load()
    r = engine.generate(greedy(max_tokens=50), deadline=time.monotonic() - 1)
    assert r.finish_reason == "timeout" and r.stats.completion_tokens == 0


def test_unloading_under_a_run_aborts_it(engine: EngineLike) -> None:
    engine.load()
    at_first = threading.Event()
    release = threading.Event()
    results = []

    def on_token(i: int, _t: str) -> None:
        if i == 0:
            at_first.set()
            release.wait(30)

    t = threading.Thread(target=lambda: results.append(engine.generate(greedy(max_tokens=300), on_token=on_token)))
    t.start()
    assert at_first.wait(30)
    unloader = threading.Thread(target=engine.unload)
    unloader.start()
    assert engine._closing.wait(30)  # type: ignore[attr-defined]  unload() marks closing before it waits
    release.set()
    t.join(30)
    unloader.join(30)
    assert results and results[0].finish_reason == "aborted"
    assert not engine.loaded


def test_request_limits_and_their_codes(engine: EngineLike) -> None:
    engine.load()
    with pytest.raises(EngineError) as e:
        engine.generate(greedy(max_tokens=401))
    assert e.value.code is ErrorCode.max_tokens_too_large
    engine.limits = RequestLimits(max_tokens_limit=400, max_prompt_bytes=64)
    with pytest.raises(EngineError) as e:
        engine.generate(greedy(prompt="x" * 65))
    assert e.value.code is ErrorCode.prompt_too_large and e.value.code.status is JobStatus.REJECTED
    engine.limits = RequestLimits(max_tokens_limit=1000)
    with pytest.raises(EngineError) as e:  # the prompt alone fills the context
        engine.generate(greedy(prompt="hello " * 600, max_tokens=8))
    assert e.value.code is ErrorCode.context_too_long and e.value.code.status is JobStatus.REJECTED


def test_a_prompt_that_fits_runs_to_the_end_of_the_context_and_is_measured_as_it_runs(engine: EngineLike) -> None:
    """The context rule (docs/protocol.md): prompt + max_tokens past the context still runs, allowed
    what is left of it; ``measure`` counts the prompt as the run does."""
    engine.load()
    engine.limits = RequestLimits(max_tokens_limit=1000)
    req = greedy(prompt="hello " * 20, max_tokens=900)
    n = engine.measure(req)
    r = engine.generate(req)
    assert r.stats.prompt_tokens == n and r.stats.max_tokens_allowed == engine.n_ctx - n
    assert r.stats.completion_tokens <= engine.n_ctx - n
    if r.finish_reason == "length":
        assert r.stats.completion_tokens == engine.n_ctx - n
    key = engine.tokenizer_key
    assert key and key == engine.tokenizer_key and str(engine.n_ctx) in key


def test_runs_as_many_jobs_at_once_as_it_has_slots(engine: EngineLike) -> None:
    assert engine.slots == 0  # nothing loaded
    engine.load()
    assert engine.slots == 2
    results = []
    with_both = threading.Barrier(2, timeout=60)

    def run(prompt: str) -> None:
        with_both.wait()
        results.append(engine.generate(greedy(prompt, max_tokens=30)))

    threads = [threading.Thread(target=run, args=(p,)) for p in ("Hello there", "Good morning")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 2 and all(r.stats.completion_tokens == 30 for r in results)
    engine.unload()
    assert engine.slots == 0
