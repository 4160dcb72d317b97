"""The memory estimate: formulas against llama.cpp's own numbers, and the whole estimate against
measured RssAnon of a real load in a fresh process (tiny here, qwen-0.5b marked slow).

"Measured" is the peak RssAnon of a process that loaded the model and ran one generation whose
prompt fills the context (see tests/benchmarks/bench_memory.py): the steady state the estimate
plans for.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from agent.engine.estimate import (
    MiB,
    choose_mode,
    compute_buffer_bytes,
    estimate_memory,
    kv_cache_bytes,
    largest_ctx_that_fits,
    pad_ctx,
)
from agent.models.gguf_info import read_model_info
from tests.benchmarks.bench_memory import measure_case

TOLERANCE = 0.15


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
    fit = estimate_memory(qwen, n_ctx=2048, mode="fit", n_batch=128, runtime_bytes=30 * MiB)
    fast = estimate_memory(qwen, n_ctx=2048, mode="fast", n_batch=128, runtime_bytes=30 * MiB)
    assert fit.repacked_weights == 0 and fast.repacked_weights == 278 * 10**6
    assert fast.anon_bytes - fit.anon_bytes == 278 * 10**6
    assert fit.file_bytes == fit.weights_mapped and fast.file_bytes < fit.file_bytes
    d = fit.as_dict()
    assert set(d) == {
        "weights_mapped", "file_working_set", "repacked_weights", "kv_cache", "compute_buffer",
        "cpu_work_buffer", "logits", "vocab", "runtime",
    }
    assert fit.anon_bytes == sum(v for k, v in d.items() if k not in ("weights_mapped", "file_working_set"))
    assert fit.kv_cache == 24 * MiB and fit.n_ubatch == 128
    assert fit.runtime >= 30 * MiB
    # Bigger context and batch cost more; the batch is clamped to the context.
    assert estimate_memory(qwen, n_ctx=4096, mode="fit", n_batch=128).anon_bytes > fit.anon_bytes
    assert estimate_memory(qwen, n_ctx=256, mode="fit", n_batch=2048).n_batch == 256
    with pytest.raises(ValueError):
        estimate_memory(qwen, n_ctx=256, mode="turbo", n_batch=8)  # type: ignore[arg-type]


def test_largest_ctx_that_fits(tiny_info) -> None:
    qwen = _shaped(tiny_info, **QWEN05, repackable_bytes=278 * 10**6, weights_bytes=278 * 10**6)
    kw = dict(mode="fit", n_batch=128, runtime_bytes=30 * MiB)
    at_2048 = estimate_memory(qwen, n_ctx=2048, **kw).anon_bytes
    ctx = largest_ctx_that_fits(qwen, at_2048, cap=32768, **kw)
    assert ctx == 2048  # exactly the budget of 2048 fits, 2304 does not
    assert largest_ctx_that_fits(qwen, at_2048 - 1, cap=32768, **kw) == 1792
    assert largest_ctx_that_fits(qwen, 10**12, cap=4096, **kw) == 4096  # the cap, not the training context
    assert largest_ctx_that_fits(qwen, 10**12, cap=1000, **kw) == 768  # never above the cap
    assert largest_ctx_that_fits(qwen, 10 * MiB, cap=4096, **kw) is None


def test_choose_mode_uses_the_headroom(tiny_info) -> None:
    qwen = _shaped(tiny_info, **QWEN05, repackable_bytes=278 * 10**6, weights_bytes=278 * 10**6)
    kw = dict(n_ctx=1024, n_batch=128, runtime_bytes=30 * MiB)
    fast = estimate_memory(qwen, mode="fast", **kw).anon_bytes
    budget = int(fast / 0.85) + 2
    assert choose_mode(qwen, budget_bytes=budget, headroom_pct=15, **kw).mode == "fast"
    c = choose_mode(qwen, budget_bytes=budget - 100, headroom_pct=15, **kw)
    assert c.mode == "fit" and "headroom" in c.reason and c.fit.anon_bytes < c.fast.anon_bytes


def _check(case: dict, label: str) -> None:
    est, meas = case["estimate_anon"], case["peak_rss_anon"]
    err = est / meas - 1
    print(
        f"\n{label}: estimate {est / MiB:.1f} MiB, measured peak RssAnon {meas / MiB:.1f} MiB ({err * 100:+.1f}%); "
        f"after load {case['rss_anon_after_load'] / MiB:.1f} MiB, before load {case['rss_anon_before_load'] / MiB:.1f} MiB"
    )
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
        # The point of fit: the weights did not become anonymous memory.
        assert case["peak_rss_anon"] < 0.5 * case["components"]["weights_mapped"]
