"""Continuous batching on the real engine (tiny synthetic model; Gemma for a real tokenizer).

Several ``generate`` calls at once share one llama.cpp batch per step. What must hold: each job
gets exactly the text it would get alone (greedy), its own sampling, stop strings, grammar,
cancel and deadline; a busy engine makes a job wait for a slot, never run beside the others in
more slots than planned; a free slot goes to the job whose prompt it already holds.

Synchronisation is through the engine's own callbacks (on_token), never sleeps.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from agent.config.sections import EngineSettings
from agent.engine import Engine, GenerationRequest
from agent.engine.types import GenerationResult, ResponseFormat

GREEDY = dict(temperature=0.0)
PROMPTS = [f"Station {i} reports wind {i * 7} knots and rain {i * 3} mm; summary:" for i in range(6)]


def _engine(model: Path, slots: int | str, **kw) -> Engine:
    kw = {"n_ctx": 512, "n_threads": 2, "n_batch": 64, "max_tokens_limit": 512, "max_parallel": slots, **kw}
    engine = Engine(model, engine=EngineSettings(**kw))
    engine.load()
    return engine


@pytest.fixture(scope="module")
def single(tiny_model: Path):
    engine = _engine(tiny_model, 1)
    yield engine
    engine.unload()


@pytest.fixture(scope="module")
def four(tiny_model: Path):
    engine = _engine(tiny_model, 4)
    yield engine
    engine.unload()


def at_once(engine: Engine, reqs: list[GenerationRequest], **kw: Callable) -> list[GenerationResult]:
    """Run the requests from one thread each, all started before any is awaited."""
    with ThreadPoolExecutor(len(reqs)) as pool:
        futures = [pool.submit(engine.generate, r, **{k: v[i] for k, v in kw.items()}) for i, r in enumerate(reqs)]
        return [f.result(timeout=120) for f in futures]


def test_the_plan_has_the_slots_asked_for_each_with_the_whole_context(four: Engine, single: Engine) -> None:
    assert (four.slots, four.report.slots, four.n_ctx) == (4, 4, 512)
    assert (single.slots, single.n_ctx) == (1, 512)
    # The KV cache is planned for every slot: four times the single engine's (llama.cpp reports its
    # buffers in MiB with two decimals: the tiny model's 0.12 MiB is rounded).
    assert four.report.estimate.kv_cache == pytest.approx(4 * single.report.estimate.kv_cache, rel=0.05)
    assert "4 slot(s)" in four.report.summary()


def test_jobs_decoded_together_get_the_text_each_gets_alone(four: Engine, single: Engine) -> None:
    reqs = [GenerationRequest(p, max_tokens=40, **GREEDY) for p in PROMPTS[:4]]
    alone = [single.generate(r).text for r in reqs]
    together = at_once(four, reqs)
    assert [r.text for r in together] == alone
    assert all(r.finish_reason == "length" and r.stats.completion_tokens == 40 for r in together)
    assert max(r.stats.slots_in_use for r in together) >= 2  # they did share the batch


def test_each_job_keeps_its_own_stop_grammar_and_sampling(four: Engine, single: Engine) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    plain = GenerationRequest(PROMPTS[0], max_tokens=30, **GREEDY)
    first_word = single.generate(plain).text.split()[2]  # a stop string this prompt is known to reach
    reqs = [
        plain,
        GenerationRequest(PROMPTS[0], max_tokens=30, stop=[first_word], **GREEDY),
        GenerationRequest(PROMPTS[1], max_tokens=60, response_format=ResponseFormat("json_schema", schema), **GREEDY),
        GenerationRequest(PROMPTS[2], max_tokens=30, temperature=0.9, seed=7),
    ]
    res = at_once(four, reqs)
    assert res[0].text == single.generate(plain).text and res[0].finish_reason == "length"
    assert res[1].finish_reason == "stop" and first_word not in res[1].text
    assert res[0].text.startswith(res[1].text)
    assert isinstance(json.loads(res[2].text)["ok"], bool)
    # A seeded sampler gives the same text alone and in a batch.
    assert res[3].text == single.generate(reqs[3]).text


def test_cancelling_one_job_leaves_the_others_running(four: Engine) -> None:
    cancel = threading.Event()
    started = threading.Event()

    def victim_tokens(i: int, _text: str) -> None:
        if i == 3:
            started.set()

    def other_tokens(i: int, _text: str) -> None:
        if i == 5 and started.is_set() and not cancel.is_set():
            cancel.set()  # mid-generation for the victim and for this one

    reqs = [GenerationRequest(PROMPTS[i], max_tokens=200, **GREEDY) for i in range(3)]
    with ThreadPoolExecutor(3) as pool:
        victim = pool.submit(four.generate, reqs[0], on_token=victim_tokens, cancel=cancel)
        started.wait(60)
        rest = [pool.submit(four.generate, r, on_token=other_tokens) for r in reqs[1:]]
        results = [f.result(timeout=120) for f in rest]
        v = victim.result(timeout=120)
    assert v.finish_reason == "canceled" and 3 < v.stats.completion_tokens < 200
    assert all(r.finish_reason == "length" and r.stats.completion_tokens == 200 for r in results)


def test_a_deadline_ends_its_own_job_only(four: Engine) -> None:
    now = [0.0]
    four._clock = lambda: now[0]  # the engine's clock, moved by the stream

    def late(i: int, _text: str) -> None:
        if i == 10:
            now[0] = 100.0

    try:
        res = at_once(
            four,
            [
                GenerationRequest(PROMPTS[0], max_tokens=150, **GREEDY),
                GenerationRequest(PROMPTS[1], max_tokens=150, **GREEDY),
            ],
            deadline=[50.0, None],
            on_token=[late, None],
        )
    finally:
        four._clock = time.monotonic
    assert res[0].finish_reason == "timeout" and res[0].stats.completion_tokens < 150
    assert res[1].finish_reason == "length" and res[1].stats.completion_tokens == 150


def test_a_job_waits_for_a_free_slot_and_never_runs_in_more_slots_than_planned(tiny_model: Path) -> None:
    engine = _engine(tiny_model, 2)
    try:
        busy: list[int] = []

        def watch(_i: int, _text: str) -> None:
            busy.append(engine.busy_slots())

        reqs = [GenerationRequest(PROMPTS[i], max_tokens=60, **GREEDY) for i in range(5)]
        res = at_once(engine, reqs, on_token=[watch] * 5)
    finally:
        engine.unload()
    assert all(r.stats.completion_tokens == 60 for r in res)
    assert max(busy) == 2
    waited = sorted(r.stats.slot_wait_ms for r in res)
    # Five jobs, two slots: at least three waited for another job's whole generation.
    gen = min(r.stats.generation_ms for r in res)
    assert sum(w >= gen * 0.5 for w in waited) >= 3, (waited, gen)


def test_a_free_slot_goes_to_the_job_whose_prompt_it_holds(tiny_model: Path) -> None:
    engine = _engine(tiny_model, 2)
    try:
        head_a = "Alpha station log. " * 12
        head_b = "Bravo depot inventory. " * 12
        at_once(engine, [GenerationRequest(head_a + "first", max_tokens=2, **GREEDY),
                         GenerationRequest(head_b + "first", max_tokens=2, **GREEDY)])  # fmt: skip
        # Whichever slot each landed in, the next job with each prefix finds its own.
        b = engine.generate(GenerationRequest(head_b + "second", max_tokens=2, **GREEDY))
        a = engine.generate(GenerationRequest(head_a + "second", max_tokens=2, **GREEDY))
    finally:
        engine.unload()
    assert a.stats.prompt_tokens_cached > 30 and b.stats.prompt_tokens_cached > 30


def test_auto_takes_as_many_slots_as_the_budget_allows(tiny_model: Path) -> None:
    from agent.config.sections import MemorySettings

    engine = Engine(
        tiny_model,
        engine=EngineSettings(n_ctx=512, max_parallel="auto", auto_parallel_max=3),
        memory=MemorySettings(budget_mb=1024),
    )
    try:
        report = engine.load()
    finally:
        engine.unload()
    assert report.slots == 3 and "auto_parallel_max 3" in report.slots_reason


@pytest.mark.slow
def test_gemma_batched_jobs_each_continue_their_own_prompt(gemma_model: Path) -> None:
    """A real tokenizer and mixed quantisation (Q8_0, Q4_K, Q5_0, Q6_K). Their kernels sum in a
    different order for a batch of several tokens than for one, so a batched job's logits differ from
    its lone run in the last bits and greedy text may part ways at a near-tie, as in llama-server
    with -np > 1. What must hold: each job's first token is the one its prompt gives alone (no other
    job's state leaks into it) and each continues its own prompt."""
    kw = dict(n_ctx=256, n_threads=2, n_batch=64)
    prompts = ["The capital of France is", "Water boils at a temperature of", "The largest planet is"]
    reqs = [GenerationRequest(p, max_tokens=12, **GREEDY) for p in prompts]
    with Engine(gemma_model, engine=EngineSettings(max_parallel=1, **kw), allow_non_4bit=True) as one:
        one.load()
        alone = [one.generate(r).text for r in reqs]
    with Engine(gemma_model, engine=EngineSettings(max_parallel=3, **kw), allow_non_4bit=True) as three:
        three.load()
        together = [r.text for r in at_once(three, reqs)]
    assert [t.split()[0] for t in together] == [t.split()[0] for t in alone], (together, alone)
    assert len(set(together)) == 3
    # The lone runs agree with each other on their first words; so must the batch with them.
    assert all(t.split()[:2] == a.split()[:2] for t, a in zip(together, alone, strict=False)), (together, alone)


def test_more_jobs_than_a_batch_holds_take_turns(tiny_model: Path, single: Engine) -> None:
    """12 slots and n_batch 8: no decode may carry more than 8 tokens, so the generating jobs take
    turns; each still gets exactly its lone text."""
    engine = _engine(tiny_model, 12, n_ctx=256, n_batch=8)
    try:
        reqs = [GenerationRequest(f"Unit {i} of the plant", max_tokens=20, **GREEDY) for i in range(12)]
        together = at_once(engine, reqs)
    finally:
        engine.unload()
    assert [r.text for r in together] == [single.generate(r).text for r in reqs]
    assert all(r.stats.completion_tokens == 20 for r in together)
