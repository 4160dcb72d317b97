"""The engine on a real llama.cpp model (the tiny synthetic preset; qwen-0.5b where marked slow).

No fakes: every test loads the model through llama-cpp-python. Cancellation is synchronised
through the engine's own callbacks (an event that sets itself inside the abort callback, the
on_token stream), never through sleeps.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from agent.config.sections import EngineSettings
from agent.engine import Engine, GenerationRequest
from agent.engine.batch import StopFilter as _StopFilter
from agent.errors import ContextTooLong, EngineError, WillNotFit
from agent.system.cpu import qemu_user_emulated
from agent.system.memory import Budget, MiB, proc_status

GREEDY = dict(temperature=0.0)


def _engine(model: Path, **engine_kw) -> Engine:
    engine_kw.setdefault("n_ctx", 512)
    engine_kw.setdefault("n_threads", 2)
    return Engine(model, engine=EngineSettings(**engine_kw))


@pytest.fixture(scope="module")
def tiny_engine(tiny_model: Path):
    engine = _engine(tiny_model, n_ctx=2048, n_batch=512, max_tokens_limit=2048)
    engine.load()
    yield engine
    engine.unload()


class CancelAfter(threading.Event):
    """A cancel event that sets itself on its n-th check: the engine checks it once before the
    prompt and then from llama.cpp's abort callback inside llama_decode."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n
        self.checks = 0
        self.checks_when_set: int | None = None

    def is_set(self) -> bool:
        self.checks += 1
        if self.checks == self.n and not super().is_set():
            self.checks_when_set = self.checks
            self.set()
        return super().is_set()


# ------------------------------------------------------------------------------- generation


def test_greedy_generation_is_deterministic_and_streams_the_whole_text(tiny_engine: Engine) -> None:
    pieces: list[tuple[int, str]] = []
    req = GenerationRequest("Once upon a time", max_tokens=24, **GREEDY)
    a = tiny_engine.generate(req, on_token=lambda i, t: pieces.append((i, t)))
    b = tiny_engine.generate(req)
    assert a.finish_reason == "length"
    assert a.stats.completion_tokens == 24
    assert a.text and a.text == b.text
    assert [i for i, _ in pieces] == list(range(len(pieces)))
    assert all(t for _, t in pieces)
    assert "".join(t for _, t in pieces) == a.text
    s = a.stats
    assert s.prompt_tokens > 1 and s.prompt_ms > 0 and s.generation_ms > 0 and s.tokens_per_s > 0
    assert s.peak_rss_anon >= proc_status().rss_anon * 0.5


def test_empty_prompt_generates_from_bos(tiny_engine: Engine) -> None:
    res = tiny_engine.generate(GenerationRequest("", max_tokens=4, **GREEDY))
    assert res.stats.prompt_tokens == 1 and res.stats.completion_tokens == 4


def test_sampling_with_a_seed_is_repeatable(tiny_engine: Engine) -> None:
    req = GenerationRequest("Hello", max_tokens=16, temperature=1.0, top_p=0.9, seed=1234)
    assert tiny_engine.generate(req).text == tiny_engine.generate(req).text


def test_stop_sequence_cuts_output_and_stream_without_leaking_it(tiny_engine: Engine) -> None:
    full = tiny_engine.generate(GenerationRequest("The sky is", max_tokens=40, **GREEDY)).text
    # A stop string taken from the middle of the greedy output, at least 2 characters long.
    start = len(full) // 3
    stop = full[start : start + 3]
    assert len(stop) >= 2
    pieces: list[str] = []
    res = tiny_engine.generate(
        GenerationRequest("The sky is", max_tokens=40, stop=[stop], **GREEDY), on_token=lambda i, t: pieces.append(t)
    )
    assert res.finish_reason == "stop"
    assert res.text == full[: full.find(stop)]
    assert "".join(pieces) == res.text
    assert stop not in "".join(pieces)


def test_text_held_back_for_an_unfinished_stop_sequence_is_emitted(tiny_engine: Engine) -> None:
    full = tiny_engine.generate(GenerationRequest("The sky is", max_tokens=20, **GREEDY)).text
    never = full[-2:] + "\x00never"  # starts like the end of the output, never completes
    pieces: list[str] = []
    res = tiny_engine.generate(
        GenerationRequest("The sky is", max_tokens=20, stop=[never], **GREEDY), on_token=lambda i, t: pieces.append(t)
    )
    assert res.finish_reason == "length"
    assert res.text == full == "".join(pieces)


def test_stop_filter_holds_partial_matches() -> None:
    f = _StopFilter(["###", "END"])
    assert f.push("abc#") == ("abc", False)
    assert f.push("#") == ("", False)
    assert f.push("x") == ("##x", False)
    assert f.push("E") == ("", False)
    assert f.push("ND tail") == ("", True)
    g = _StopFilter(["ab"])
    assert g.push("xa") == ("x", False)
    assert g.flush() == "a"


# ------------------------------------------------------------------------------- cancellation


def test_cancel_inside_prompt_evaluation_via_the_abort_callback(tiny_engine: Engine) -> None:
    prompt = "one two three four five six seven eight nine ten " * 12
    ref = tiny_engine.generate(GenerationRequest(prompt, max_tokens=8, **GREEDY))
    assert 300 < ref.stats.prompt_tokens <= 512  # one llama_decode call (n_batch 512) for the whole prompt
    # Check 1 is before the prompt; the engine's next own check comes only after the prompt's
    # llama_decode returns. Checks 2..40 can therefore only come from the abort callback.
    cancel = CancelAfter(40)
    res = tiny_engine.generate(GenerationRequest(prompt, max_tokens=8, **GREEDY), cancel=cancel)
    assert res.finish_reason == "canceled"
    assert res.stats.completion_tokens == 0 and res.text == ""
    assert cancel.checks_when_set == 40
    assert cancel.checks == 40  # the check that saw it stopped the decode; nothing asked again
    # The KV cache and the Llama's token state were reset: the same request gives the same text.
    again = tiny_engine.generate(GenerationRequest(prompt, max_tokens=8, **GREEDY))
    assert again.text == ref.text and again.finish_reason == "length"


def test_cancel_between_tokens_from_on_token(tiny_engine: Engine) -> None:
    req = GenerationRequest("Count with me:", max_tokens=200, **GREEDY)
    ref = tiny_engine.generate(req)
    cancel = threading.Event()
    pieces: list[str] = []

    def on_token(i: int, text: str) -> None:
        pieces.append(text)
        if i == 4:
            cancel.set()

    res = tiny_engine.generate(req, on_token=on_token, cancel=cancel)
    assert res.finish_reason == "canceled"
    assert len(pieces) == 5 and res.text == "".join(pieces)
    assert ref.text.startswith(res.text)
    assert res.stats.completion_tokens < 200
    assert tiny_engine.generate(req).text == ref.text


def test_cancel_from_another_thread(tiny_engine: Engine) -> None:
    req = GenerationRequest("Tell a long story.", max_tokens=1500, **GREEDY)
    cancel, started, cancelled = threading.Event(), threading.Event(), threading.Event()

    def canceller() -> None:
        started.wait(30)
        cancel.set()
        cancelled.set()

    def on_token(i: int, _text: str) -> None:
        if i == 0:
            started.set()
            # Hold the generation until the other thread has set the event, so the test does not
            # depend on which thread the scheduler runs first.
            assert cancelled.wait(30)

    t = threading.Thread(target=canceller)
    t.start()
    res = tiny_engine.generate(req, on_token=on_token, cancel=cancel)
    t.join()
    assert res.finish_reason == "canceled"
    assert res.stats.completion_tokens == 1


def test_deadline_already_passed_times_out_before_any_work(tiny_engine: Engine) -> None:
    import time

    res = tiny_engine.generate(GenerationRequest("Hi", max_tokens=8), deadline=time.monotonic() - 1)
    assert res.finish_reason == "timeout"
    assert res.stats.completion_tokens == 0 and res.text == ""


def test_deadline_inside_prompt_evaluation_with_an_injected_clock(tiny_model: Path) -> None:
    calls = 0

    def clock() -> float:
        # Time passes only when the engine looks at it: the 30th look is past the deadline.
        nonlocal calls
        calls += 1
        return 0.0 if calls < 30 else 100.0

    engine = Engine(tiny_model, engine=EngineSettings(n_ctx=1024, n_batch=512, n_threads=2), clock=clock)
    with engine:
        engine.load()
        res = engine.generate(GenerationRequest("seven eight nine " * 60, max_tokens=8), deadline=1.0)
        assert res.finish_reason == "timeout"
        assert res.stats.completion_tokens == 0
        assert calls == 30
        calls = -(10**9)  # the clock stands still: the engine works normally again
        assert engine.generate(GenerationRequest("Hi", max_tokens=4, **GREEDY), deadline=1.0).finish_reason == "length"


# ------------------------------------------------------------------------------- request bounds


def test_context_too_long_names_both_numbers_and_n_ctx(tiny_model: Path) -> None:
    with _engine(tiny_model, n_ctx=256) as engine:
        engine.load()
        prompt = "alpha beta gamma delta " * 40
        n_prompt = engine.count_tokens(prompt)
        assert n_prompt > 200
        with pytest.raises(ContextTooLong) as err:
            engine.generate(GenerationRequest(prompt, max_tokens=100))
        msg = str(err.value)
        assert f"the prompt is {n_prompt} tokens" in msg and "holds 256 per job" in msg and "engine.n_ctx" in msg
        assert err.value.code == "context_too_long"


def test_a_prompt_that_fits_runs_to_the_end_of_the_context(tiny_model: Path) -> None:
    """prompt + max_tokens past n_ctx: the job runs and stops at the context's end ("length")."""
    with _engine(tiny_model, n_ctx=256) as engine:
        engine.load()
        prompt = "alpha beta gamma delta " * 10
        n_prompt = engine.count_tokens(prompt)
        assert 100 < n_prompt < 256
        res = engine.generate(GenerationRequest(prompt, max_tokens=200, **GREEDY))
        assert res.stats.prompt_tokens == n_prompt and res.stats.max_tokens_allowed == 256 - n_prompt
        assert res.stats.completion_tokens <= 256 - n_prompt
        assert res.finish_reason == "stop" or res.stats.completion_tokens == 256 - n_prompt


def test_keep_tail_keeps_bos_and_the_last_tokens(tiny_model: Path) -> None:
    with _engine(tiny_model, n_ctx=256, context_overflow="keep_tail") as engine:
        engine.load()
        prompt = "alpha beta gamma delta " * 40
        n_prompt = engine.count_tokens(prompt)
        res = engine.generate(GenerationRequest(prompt, max_tokens=56, **GREEDY))
        assert res.stats.prompt_tokens == 256 - 56
        assert res.stats.prompt_tokens_dropped == n_prompt - (256 - 56)
        assert res.stats.completion_tokens == 56 and res.finish_reason == "length"
        # keep_tail is the same as sending only the tail (BOS is added by the tokenizer).
        llama = engine._llama
        toks = llama.tokenize(prompt.encode(), add_bos=True, special=True)
        tail_text = llama.detokenize(toks[-(256 - 56 - 1) :]).decode()
        assert engine.count_tokens(tail_text) <= 256 - 56 + 1


def test_prompt_bytes_checked_before_tokenising_and_max_tokens_bounded(tiny_model: Path) -> None:
    engine = _engine(tiny_model, max_prompt_bytes=100, max_tokens_limit=10)
    # Not loaded: the size check must come before anything touches the model.
    with pytest.raises(EngineError) as err:
        engine.generate(GenerationRequest("x" * 101, max_tokens=5))
    assert err.value.code == "prompt_too_large" and "100" in str(err.value)
    with pytest.raises(EngineError) as err:
        engine.generate(GenerationRequest("hi", max_tokens=11))
    assert err.value.code == "max_tokens_too_large"
    with pytest.raises(EngineError) as err:
        engine.generate(GenerationRequest("hi", max_tokens=5))
    assert err.value.code == "model_not_loaded"


# ------------------------------------------------------------------------------- load planning


def test_load_report_fit_mode_keeps_weights_file_backed(tiny_model: Path) -> None:
    with _engine(tiny_model, load_mode="fit") as engine:
        rep = engine.load()
        assert rep.mode == "fit" and rep.mode_reason == "engine.load_mode"
        assert not any("REPACK" in k for k in rep.llama_buffers)
        assert engine._llama.model_params.use_extra_bufts is False
        assert rep.n_ctx == 512 and rep.n_threads == 2 and rep.load_ms > 0
        assert rep.estimate.repacked_weights == 0
        assert rep.after.rss_file > 0
        assert "fit mode" in rep.summary()
    with _engine(tiny_model, load_mode="fast") as engine:
        rep = engine.load()
        # ggml repacks Q4_0 on x86 (AVX2) and on ARM with dotprod; a Cortex-A72 (Pi 4) has no kernel for it and
        # repacks nothing, as the plan says.
        assert ("CPU_REPACK model" in rep.llama_buffers) == (rep.estimate.repacked_weights > 0)
        if os.uname().machine == "x86_64":
            assert rep.estimate.repacked_weights > 0


def _assert_plan_is_what_llama_cpp_allocated(rep) -> None:
    """The exact plan's llama.cpp components against the buffers the real load logged (both with 2
    decimals of MiB), and no mismatch note."""
    est, buffers = rep.estimate, rep.llama_buffers
    assert est.source == "llama.cpp"
    assert abs(est.compute_buffer - buffers["CPU compute"]) <= 0.006 * MiB
    assert abs(est.kv_cache - buffers["CPU KV"]) <= 0.006 * MiB
    assert abs(est.repacked_weights - buffers.get("CPU_REPACK model", 0)) <= 0.006 * MiB
    assert not [n for n in rep.notes if "the plan said" in n], rep.notes


@pytest.mark.parametrize(
    "settings",
    [
        dict(n_ctx=256, n_batch=32, load_mode="fit"),
        dict(n_ctx=1024, n_batch=128, load_mode="fast"),
        dict(n_ctx=2048, n_batch=512, load_mode="fast", flash_attn=True),
        dict(n_ctx=768, n_batch=100, load_mode="fit", flash_attn=True),
    ],
)
def test_exact_plan_is_what_llama_cpp_allocates(tiny_model: Path, settings: dict) -> None:
    with _engine(tiny_model, **settings) as engine:
        rep = engine.load()
        _assert_plan_is_what_llama_cpp_allocated(rep)
        assert rep.plan_ms is not None and rep.plan_ms > 0


def test_header_only_plan_still_models_llama_cpp(tiny_model: Path) -> None:
    """The header-only estimate (what `model inspect --header-only` shows) reproduces llama.cpp's
    compute buffer and KV cache for the synthetic shapes; the engine itself plans exactly."""
    for n_ctx, n_batch in ((256, 32), (1024, 128), (2048, 512)):
        with _engine(tiny_model, n_ctx=n_ctx, n_batch=n_batch) as engine:
            header = engine.plan(exact=False)
            assert header.estimate.source == "header" and header.probe_ms is None
            rep = engine.load()
            llama_says = rep.llama_buffers["CPU compute"]  # printed with 2 decimals of MiB
            assert abs(header.estimate.compute_buffer - llama_says) <= 0.006 * MiB + 0.01 * llama_says
            assert abs(header.estimate.kv_cache - rep.llama_buffers["CPU KV"]) <= 0.006 * MiB


def test_a_file_llama_cpp_cannot_read_is_refused_at_planning(tmp_path: Path) -> None:
    import gguf
    import numpy as np

    q4 = gguf.GGMLQuantizationType.Q4_0
    w = gguf.GGUFWriter(tmp_path / "no-hparams.gguf", "llama")  # a valid GGUF header, but no llama hyper-parameters
    w.add_block_count(1)
    w.add_tensor("blk.0.ffn_up.weight", np.zeros((64, 64 // 32 * 18), dtype=np.uint8), raw_dtype=q4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    engine = _engine(tmp_path / "no-hparams.gguf")
    with pytest.raises(EngineError) as err:
        engine.load()
    assert err.value.code == "model_not_loaded" and "key not found in model" in str(err.value)
    assert not engine.loaded


@pytest.mark.slow
@pytest.mark.parametrize(
    "settings",
    [
        dict(load_mode="fit"),
        dict(load_mode="fast"),
        dict(load_mode="fast", flash_attn=True, type_k="q8_0", type_v="q4_0"),
    ],
)
def test_exact_plan_on_the_real_model_is_what_llama_cpp_allocates(gemma_model: Path, settings: dict) -> None:
    """Gemma 3: sliding-window attention (a KV cache llama.cpp sizes per layer type), a 262k
    vocabulary and mixed Q8_0/Q5_0/Q4_K/Q6_K weights of which this CPU repacks only some."""
    with _engine(gemma_model, n_ctx=1024, n_batch=128, **settings) as engine:
        rep = engine.load()
        _assert_plan_is_what_llama_cpp_allocated(rep)
        print(f"\n{rep.summary()}")


def test_will_not_fit_refuses_with_the_numbers_and_force_overrides(tiny_model: Path) -> None:
    budget = Budget(20 * MiB, "test budget of 20 MiB")
    engine = Engine(tiny_model, engine=EngineSettings(n_ctx=512, load_mode="fit"), budget=budget)
    with pytest.raises(WillNotFit) as err:
        engine.load()
    msg = str(err.value)
    assert "test budget of 20 MiB" in msg and "budget is 20 MiB" in msg
    assert "kv cache" in msg and "runtime" in msg
    assert not engine.loaded
    forced = Engine(tiny_model, engine=EngineSettings(n_ctx=512, load_mode="fit"), budget=budget, force=True)
    with forced:
        rep = forced.load()
        assert any("forced" in n for n in rep.notes)


def test_auto_mode_and_auto_ctx_follow_the_budget(tiny_model: Path) -> None:
    with Engine(tiny_model, engine=EngineSettings(n_threads=2), budget=Budget(8 * 1024 * MiB, "big")) as engine:
        rep = engine.load()
        assert rep.mode == "fast"
        assert rep.n_ctx == 2048  # the tiny preset's training context caps auto
        assert "training context 2048" in rep.n_ctx_reason
    fast_est = rep.estimate.anon_bytes
    fit_est = fast_est - rep.estimate.repacked_weights
    # A budget between fit and fast-with-headroom: auto must pick fit.
    budget = Budget(int((fit_est + fast_est / 0.85) / 2), "between")
    with Engine(tiny_model, engine=EngineSettings(n_threads=2, n_ctx=2048), budget=budget) as engine:
        rep = engine.load()
        assert rep.mode == "fit" and "headroom" in rep.mode_reason


def test_auto_ctx_shrinks_to_the_budget(tiny_model: Path) -> None:
    with Engine(tiny_model, engine=EngineSettings(n_threads=2, load_mode="fit"), budget=Budget(10**12, "x")) as e:
        big = e.load()
    # A budget that holds the 2048 context minus 2 MiB: auto must step down, in multiples of 256.
    budget = Budget(big.estimate.anon_bytes - 2 * MiB, "tight")
    with Engine(tiny_model, engine=EngineSettings(n_threads=2, load_mode="fit"), budget=budget) as e:
        rep = e.load()
        assert rep.n_ctx < 2048 and rep.n_ctx % 256 == 0
        assert rep.estimate.anon_bytes <= budget.bytes
        assert "largest that fits" in rep.n_ctx_reason


# ------------------------------------------------------------------------------- residency, unload


def test_residency_and_warmup(tiny_model: Path, tmp_path: Path) -> None:
    model = tmp_path / "copy.gguf"
    model.write_bytes(tiny_model.read_bytes())
    engine = _engine(model)
    assert all(r.fraction == 1.0 for r in engine.residency())  # just written: in the page cache
    fd = os.open(model, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    cold = engine.residency()
    assert [r.index for r in cold] == [0, 1]
    assert all(0.0 <= r.fraction <= 1.0 and r.nbytes > 0 for r in cold)
    if any(r.fraction > 0 for r in cold):
        pytest.skip("the kernel kept the pages despite POSIX_FADV_DONTNEED; cannot observe a cold file")
    engine.warmup(progress=False)
    assert all(r.fraction == 1.0 and r.resident_bytes == r.nbytes for r in engine.residency())


# Only in the emulated board of packaging/prove-arm64.sh, never on hardware: qemu-user (bookworm's 7.2) keeps about
# 230 KiB of anonymous memory for every thread that has exited (800 Python threads started and joined: RssAnon
# +187 MiB under qemu-user, +0.03 MiB natively), and ggml built without OpenMP (the aarch64 bundle) starts its
# worker threads for each graph it computes, so RssAnon grows with every token there and unload cannot give it back.
@pytest.mark.skipif(qemu_user_emulated(), reason="qemu-user keeps ~230 KiB of RssAnon per exited thread; ggml "
                    "without OpenMP starts threads per graph: RssAnon is not the engine's there")  # fmt: skip
def test_unload_frees_memory_and_allows_reload(tiny_model: Path) -> None:
    engine = _engine(tiny_model, n_ctx=2048)
    before = proc_status().rss_anon
    engine.load()
    engine.generate(GenerationRequest("warm up the buffers " * 20, max_tokens=8))
    loaded = proc_status().rss_anon
    engine.unload()
    after = proc_status().rss_anon
    print(f"tiny: RssAnon before {before / MiB:.1f} MiB, loaded {loaded / MiB:.1f} MiB, unloaded {after / MiB:.1f} MiB")
    assert not engine.loaded
    assert loaded - before > 2 * MiB
    assert after - before < 0.25 * (loaded - before)
    with pytest.raises(EngineError):
        engine.generate(GenerationRequest("hi", max_tokens=2))
    engine.load()
    assert engine.generate(GenerationRequest("hi", max_tokens=2)).stats.completion_tokens >= 1
    engine.unload()


@pytest.mark.slow
def test_fast_mode_repacks_and_unload_gives_it_back(qwen05_model: Path) -> None:
    from agent.models.gguf_info import read_model_info

    info = read_model_info(qwen05_model)
    rss = {}
    for mode in ("fit", "fast"):
        engine = _engine(qwen05_model, n_ctx=512, load_mode=mode)
        before = proc_status().rss_anon
        rep = engine.load()
        rss[mode] = rep.after.rss_anon - before
        engine.unload()
        rss[mode + "_left"] = proc_status().rss_anon - before
    print({k: f"{v / MiB:.1f} MiB" for k, v in rss.items()}, f"repackable {info.repackable_bytes / MiB:.1f} MiB")
    # use_extra_bufts=False really keeps the weights out of anonymous memory
    assert rss["fast"] - rss["fit"] > 0.9 * info.repackable_bytes
    assert rss["fit"] < 0.25 * info.weights_bytes
    # and unload returns it (malloc_trim after close)
    assert rss["fast_left"] < 8 * MiB and rss["fit_left"] < 8 * MiB


def test_unload_while_generating_aborts_the_run(tiny_engine: Engine, tiny_model: Path) -> None:
    engine = _engine(tiny_model, n_ctx=2048, max_tokens_limit=1500)
    engine.load()
    results = []
    at_token = threading.Event()
    release = threading.Event()

    def on_token(i: int, _t: str) -> None:
        if i == 0:
            at_token.set()
            release.wait(30)

    t = threading.Thread(
        target=lambda: results.append(engine.generate(GenerationRequest("go", max_tokens=1500), on_token=on_token))
    )
    t.start()
    assert at_token.wait(30)
    unloader = threading.Thread(target=engine.unload)
    unloader.start()
    # unload() marks the engine closing before it waits for the generation lock
    assert engine._closing.wait(30)
    release.set()
    t.join(30)
    unloader.join(30)
    # "aborted", not "canceled": the job did not ask to stop, so the runner requeues it.
    assert results and results[0].finish_reason == "aborted"
    assert not engine.loaded


@pytest.mark.slow
def test_cli_generate_streams_and_ctrl_c_cancels(qwen05_model: Path) -> None:
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agent",
            "generate",
            "--model",
            str(qwen05_model),
            "--prompt",
            "Once upon a time",
            "--max-tokens",
            "1000",
            "--ctx",
            "2048",
            "--mode",
            "fit",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    first = proc.stdout.read1(64)  # returns as soon as the first streamed text arrives
    assert first
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    text = err.decode()
    assert proc.returncode == 130, text[-2000:]
    assert "finish canceled" in text
    # 1000 tokens take seconds: the run stopped long before that
    import re

    n = int(re.search(r", (\d+) tokens in \d+ ms", text).group(1))  # type: ignore[union-attr]
    assert 1 <= n < 1000
