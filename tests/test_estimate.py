"""The memory plan: the header formulas against llama.cpp's own numbers, the exact plan's probe
against the real load, and the whole plan against measured RssAnon of a real load in a fresh
process (tiny here; qwen-0.5b, the real Gemma 3 270M file and its Q4_0 requantisation marked slow).

"Measured" is the peak RssAnon of a process that loaded the model and ran one generation whose
prompt fills the context (see tests/benchmarks/bench_memory.py, which prints the full table): the
steady state the plan is for.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from agent.engine.estimate import (
    SAMPLER_BYTES_PER_TOKEN,
    LlamaSizes,
    MiB,
    Serving,
    choose_mode,
    compute_buffer_bytes,
    estimate_memory,
    kv_cache_bytes,
    largest_ctx_that_fits,
    pad_ctx,
)
from agent.models.gguf_info import read_model_info
from tests.benchmarks.bench_memory import measure_case

TOLERANCE = 0.10


@pytest.fixture(scope="module")
def tiny_info(tiny_model: Path):
    return read_model_info(tiny_model)


def _shaped(info, **shape):
    # The estimate is a pure function of these header fields: a tiny header with other shapes
    # stands for a model of those shapes.
    return dataclasses.replace(info, **shape)


QWEN05 = dict(n_layer=24, n_embd=896, n_head=14, n_head_kv=2, head_dim=64, head_dim_v=64, n_ff=4864, n_vocab=151936)
TINYLLAMA = dict(n_layer=22, n_embd=2048, n_head=32, n_head_kv=4, head_dim=64, head_dim_v=64, n_ff=5632, n_vocab=32000)

# llama.cpp's compute buffer for these shapes (its DEBUG line at context free, 4 decimals of MiB),
# llama-cpp-python 0.3.36, n_outputs_max = 1, no flash attention. Re-measure after an upgrade.
LLAMA_CPP_COMPUTE = [
    (QWEN05, 256, 32, 2277927),
    (QWEN05, 1024, 128, 10291249),
    (QWEN05, 4096, 128, 33884209),
    (QWEN05, 2048, 512, 72622067),
    (TINYLLAMA, 256, 128, 12191793),
    (TINYLLAMA, 2048, 512, 160440307),
    (TINYLLAMA, 4096, 32, 18678284),
]


@pytest.mark.parametrize("shape,n_ctx,n_ubatch,expected", LLAMA_CPP_COMPUTE)
def test_compute_buffer_formula_reproduces_llama_cpp(tiny_info, shape, n_ctx, n_ubatch, expected) -> None:
    got = compute_buffer_bytes(_shaped(tiny_info, **shape), n_ctx, n_ubatch)
    assert abs(got - expected) <= 0.001 * expected


def test_kv_cache_formula(tiny_info) -> None:
    qwen = _shaped(tiny_info, **QWEN05)
    # llama.cpp: "KV buffer size = 24.00 MiB" for 2048 cells, 24 layers, 2 KV heads of 64, f16
    assert kv_cache_bytes(qwen, 2048) == 24 * MiB
    assert kv_cache_bytes(qwen, 2048, "q8_0", "q8_0") == 24 * MiB * 34 // 64
    assert kv_cache_bytes(qwen, 2048, "q4_0", "q4_0") == 24 * MiB * 18 // 64
    assert kv_cache_bytes(qwen, 1000) == kv_cache_bytes(qwen, 1024)  # llama.cpp pads to 256
    assert pad_ctx(1) == 256 and pad_ctx(256) == 256 and pad_ctx(257) == 512


def test_estimate_components_and_modes(tiny_info) -> None:
    qwen = _shaped(tiny_info, **QWEN05, repackable_bytes=278 * 10**6, weights_bytes=278 * 10**6)
    serving = Serving(n_batch=128, runtime_bytes=30 * MiB)
    fit = estimate_memory(qwen, serving, n_ctx=2048, mode="fit")
    fast = estimate_memory(qwen, serving, n_ctx=2048, mode="fast")
    assert fit.repacked_weights == 0 and fast.repacked_weights == 278 * 10**6
    assert fast.anon_bytes - fit.anon_bytes == 278 * 10**6
    assert fit.file_bytes == fit.weights_mapped and fast.file_bytes < fit.file_bytes
    d = fit.as_dict()
    assert set(d) == {
        "weights_mapped",
        "file_working_set",
        "repacked_weights",
        "kv_cache",
        "compute_buffer",
        "cpu_work_buffer",
        "logits",
        "vocab",
        "runtime",
    }
    assert fit.anon_bytes == sum(v for k, v in d.items() if k not in ("weights_mapped", "file_working_set"))
    assert fit.kv_cache == 24 * MiB and fit.n_ubatch == 128
    assert fit.runtime >= 30 * MiB
    # Bigger context and batch cost more; the batch is clamped to the context.
    assert estimate_memory(qwen, Serving(n_batch=128), n_ctx=4096, mode="fit").anon_bytes > fit.anon_bytes
    assert estimate_memory(qwen, Serving(n_batch=2048), n_ctx=256, mode="fit").n_batch == 256
    with pytest.raises(ValueError):
        estimate_memory(qwen, Serving(n_batch=8), n_ctx=256, mode="turbo")  # type: ignore[arg-type]


def test_exact_plan_takes_llama_cpp_sizes_per_context(tiny_info) -> None:
    """With a sizer the llama.cpp components are llama.cpp's numbers for that context size; the
    header's repack bound and formulas are not used. (The sizer is the engine's no-alloc probe;
    tests/test_engine.py checks it against real loads.)"""
    qwen = _shaped(tiny_info, **QWEN05, repackable_bytes=278 * 10**6, weights_bytes=278 * 10**6)
    asked: list[int] = []

    def sizer(n_ctx: int, slots: int = 1) -> LlamaSizes:
        asked.append(n_ctx)
        return LlamaSizes(
            repacked=100 * MiB,
            repacked_duplicates=30 * MiB,
            kv=n_ctx * 1000,
            compute=7 * MiB,
            output=600_000,
            host_tables=20 * MiB,
        )

    serving = Serving(n_batch=128, runtime_bytes=30 * MiB, sizer=sizer)
    fit = estimate_memory(qwen, serving, n_ctx=1000, mode="fit")
    fast = estimate_memory(qwen, serving, n_ctx=1000, mode="fast")
    assert asked == [1024, 1024]  # asked for the padded context
    assert fit.source == fast.source == "llama.cpp" and "exact plan" in fit.describe()
    assert fit.repacked_weights == 0 and fast.repacked_weights == 100 * MiB
    assert fit.kv_cache == 1024 * 1000 and fit.compute_buffer == 7 * MiB and fit.vocab == 20 * MiB
    assert fit.logits == 600_000 + qwen.n_vocab * SAMPLER_BYTES_PER_TOKEN
    # The duplicate (a tied output) leaves its source in the file's working set.
    assert fit.file_bytes - fast.file_bytes == 70 * MiB
    assert fast.anon_bytes - fit.anon_bytes == 100 * MiB
    # The planner searches contexts through the same sizer.
    budget = estimate_memory(qwen, serving, mode="fit", n_ctx=1536).anon_bytes
    assert largest_ctx_that_fits(qwen, serving, budget, "fit", cap=4096) == 1536
    header = estimate_memory(qwen, Serving(n_batch=128), mode="fast", n_ctx=1000)
    assert header.source == "header" and header.repacked_weights == 278 * 10**6 and header.notes


def test_largest_ctx_that_fits(tiny_info) -> None:
    qwen = _shaped(tiny_info, **QWEN05, repackable_bytes=278 * 10**6, weights_bytes=278 * 10**6)
    serving = Serving(n_batch=128, runtime_bytes=30 * MiB)
    at_2048 = estimate_memory(qwen, serving, n_ctx=2048, mode="fit").anon_bytes
    ctx = largest_ctx_that_fits(qwen, serving, at_2048, "fit", cap=32768)
    assert ctx == 2048  # exactly the budget of 2048 fits, 2304 does not
    assert largest_ctx_that_fits(qwen, serving, at_2048 - 1, "fit", cap=32768) == 1792
    assert largest_ctx_that_fits(qwen, serving, 10**12, "fit", cap=4096) == 4096  # the cap, not the training context
    assert largest_ctx_that_fits(qwen, serving, 10**12, "fit", cap=1000) == 768  # never above the cap
    assert largest_ctx_that_fits(qwen, serving, 10 * MiB, "fit", cap=4096) is None


def test_choose_mode_uses_the_headroom(tiny_info) -> None:
    qwen = _shaped(tiny_info, **QWEN05, repackable_bytes=278 * 10**6, weights_bytes=278 * 10**6)
    serving = Serving(n_batch=128, runtime_bytes=30 * MiB)
    fast = estimate_memory(qwen, serving, n_ctx=1024, mode="fast").anon_bytes
    budget = int(fast / 0.85) + 2
    assert choose_mode(qwen, serving, budget_bytes=budget, headroom_pct=15, n_ctx=1024).mode == "fast"
    c = choose_mode(qwen, serving, budget_bytes=budget - 100, headroom_pct=15, n_ctx=1024)
    assert c.mode == "fit" and "headroom" in c.reason and c.fit.anon_bytes < c.fast.anon_bytes


def _check(case: dict, label: str) -> None:
    est, meas = case["estimate_anon"], case["peak_rss_anon"]
    err = est / meas - 1
    print(
        f"\n{label}: {case['estimate_source']} plan {est / MiB:.1f} MiB, measured peak RssAnon {meas / MiB:.1f} MiB "
        f"({err * 100:+.1f}%); after load {case['rss_anon_after_load'] / MiB:.1f} MiB, before load "
        f"{case['rss_anon_before_load'] / MiB:.1f} MiB; planning took {case['plan_ms']:.0f} ms"
    )
    assert case["estimate_source"] == "llama.cpp"
    assert case["full_ctx_prompt_tokens"] == case["n_ctx"] - 16
    assert abs(err) <= TOLERANCE


@pytest.mark.parametrize("mode", ["fit", "fast"])
def test_estimate_matches_measured_rss_anon_tiny(tiny_model: Path, mode: str) -> None:
    _check(measure_case(tiny_model, mode, n_ctx=1024, n_batch=128, tokens=16), f"tiny {mode}")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fit", "fast"])
def test_estimate_matches_measured_rss_anon_qwen05(qwen05_model: Path, mode: str) -> None:
    case = measure_case(qwen05_model, mode, n_ctx=1024, n_batch=128, tokens=16)
    _check(case, f"qwen-0.5b {mode}")
    if mode == "fit":
        # The point of fit: the weights did not become anonymous memory. Measured from before the load, so
        # what the interpreter and its imports hold (which grows with the code) does not count.
        grown = case["peak_rss_anon"] - case["rss_anon_before_load"]
        assert grown < 0.5 * case["components"]["weights_mapped"], (grown, case["components"]["weights_mapped"])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fit", "fast"])
def test_plan_matches_measured_rss_anon_real_model(gemma_model: Path, mode: str) -> None:
    case = measure_case(gemma_model, mode, n_ctx=1024, n_batch=128, tokens=16)
    _check(case, f"gemma-3-270m Q4_K_M {mode}")
    repack = case["llama_buffers"].get("CPU_REPACK model", 0)  # logged with 2 decimals of MiB
    assert abs(case["components"]["repacked_weights"] - (repack if mode == "fast" else 0)) <= 0.006 * MiB


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fit", "fast"])
def test_plan_matches_measured_rss_anon_real_model_q4_0(gemma_q4_0_model: Path, mode: str) -> None:
    """A requantisation whose blocks this CPU does repack (Q4_0 on AVX2 and ARM dotprod): fast costs
    the blocks again in anonymous memory, and the plan must say so."""
    case = measure_case(gemma_q4_0_model, mode, n_ctx=1024, n_batch=128, tokens=16)
    _check(case, f"gemma-3-270m Q4_0 {mode}")
