"""Benchmark: what memory telemetry costs the board.

Run:  .venv/bin/python tests/benchmarks/bench_telemetry.py [--seconds 60] [--spool-rows 5000] [--json]

1. The sampler at a 1 s interval for --seconds: CPU time of the sampling thread over wall time (CPU %),
   and time per reading (p50 / p99 / max). Baseline in the same run: psutil's memory_full_info(), the
   usual way to get USS/swap per process, which reads /proc/self/smaps, with a model-sized file
   (--model-mb, default 620 MB, TinyLlama-1.1B Q4_0's size) mapped and resident, as the daemon has it;
   and a bare read of /proc/self/status, the floor.
2. The model residency reading (mincore over the whole file), which the sampler takes every
   telemetry.residency_interval_s: time per reading on the same file.
3. The spool's write cost with real reading payloads: time per add() (offline, below the bound; at the
   bound, where each add also drops the oldest reading), bytes written to the disk per spooled reading
   (/proc/self/io write_bytes: WAL, checkpoints and the database), file size over payload bytes, and the
   drain rate (pending + delivered, 50 at a time). synchronous=NORMAL (what the spool uses) against
   FULL (what the job store uses) in the same run.
4. RssAnon a daemon pays for the telemetry modules (a child process, before and after importing them).

Not collected by pytest (the file name does not start with test_).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

MiB = 1024 * 1024


def _pcts(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {
        "p50_us": round(statistics.median(xs) * 1e6, 1),
        "p99_us": round(xs[min(len(xs) - 1, int(len(xs) * 0.99))] * 1e6, 1),
        "max_us": round(xs[-1] * 1e6, 1),
        "n": len(xs),
    }


def _model_file(size_mb: int, folder: Path) -> Path:
    """A file of the model's size, written once and read into the page cache (resident, like loaded weights)."""
    path = folder / f"model-{size_mb}mb.bin"
    if not path.exists() or path.stat().st_size != size_mb * MiB:
        chunk = os.urandom(MiB)
        with open(path, "wb") as f:
            for _ in range(size_mb):
                f.write(chunk)
    return path


def bench_sampler(seconds: float, model: Path) -> dict[str, Any]:
    import psutil

    from agent.system.memory import proc_status
    from agent.telemetry import AgentState, Sampler

    state = AgentState(model_loaded=True, queue_depth=0, jobs_running=0, store_writable=True, spool_rows=0,
                       spool_dropped=0, governor_level="ok")  # fmt: skip
    with open(model, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        # Touch every page through the mapping: RssFile holds the model, as with llama.cpp's mmap.
        sum(mm[i] for i in range(0, len(mm), mmap.PAGESIZE))
        sampler = Sampler("bench", agent_state=lambda: state)
        sampler.sample()
        times: list[float] = []
        cpu0, wall0 = time.thread_time(), time.monotonic()
        next_at = wall0
        while time.monotonic() - wall0 < seconds:
            next_at += 1.0
            t0 = time.perf_counter()
            sampler.sample()
            times.append(time.perf_counter() - t0)
            time.sleep(max(0.0, next_at - time.monotonic()))
        cpu, wall = time.thread_time() - cpu0, time.monotonic() - wall0
        # Per-reading time over many back-to-back readings, for a steadier figure than 60 samples give.
        burst = []
        for _ in range(2000):
            t0 = time.perf_counter()
            sampler.sample()
            burst.append(time.perf_counter() - t0)
        proc = psutil.Process()
        smaps = []
        for _ in range(50):
            t0 = time.perf_counter()
            proc.memory_full_info()
            smaps.append(time.perf_counter() - t0)
        status = []
        for _ in range(2000):
            t0 = time.perf_counter()
            proc_status()
            status.append(time.perf_counter() - t0)
        rss_file = proc_status().rss_file
    return {
        "interval_s": 1.0,
        "seconds": round(wall, 1),
        "readings": len(times),
        "cpu_pct_at_1s": round(100.0 * cpu / wall, 3),
        "per_reading_at_1s": _pcts(times),
        "per_reading_burst": _pcts(burst),
        "baseline_psutil_memory_full_info_smaps": _pcts(smaps),
        "baseline_proc_self_status_only": _pcts(status),
        "rss_file_mib_during": round(rss_file / MiB, 1),
    }


def bench_residency(model: Path) -> dict[str, Any]:
    from agent.engine.residency import layer_residency
    from agent.models.gguf_info import LayerRange

    size = model.stat().st_size
    n = 22  # TinyLlama's layer count over the same bytes
    layers = [LayerRange(index=i, offset=i * (size // n), nbytes=size // n) for i in range(n)]
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        res = layer_residency(model, layers)
        times.append(time.perf_counter() - t0)
    resident = sum(r.resident_bytes for r in res) / max(1, sum(r.nbytes for r in res))
    return {"model_mb": size // MiB, "layers": n, "resident_pct": round(100 * resident, 1), "per_reading": _pcts(times)}


def _write_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    return 0


def bench_spool(rows: int, folder: Path, synchronous: str) -> dict[str, Any]:
    from agent.telemetry import AgentState, Sampler
    from agent.telemetry.spool import TelemetrySpool

    sampler = Sampler("pi-kitchen-0001", agent_state=lambda: AgentState(model_loaded=True, queue_depth=2, jobs_running=1,
                      running_job="job-000123", last_job_tokens_per_s=8.4, governor_level="ok", store_writable=True,
                      spool_rows=0, spool_dropped=0))  # fmt: skip
    sampler.sample()
    payloads = [sampler.sample().to_payload() for _ in range(50)]
    topic = "edge/pi-kitchen-0001/telemetry"
    path = folder / f"telemetry-{synchronous}.db"
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    s = TelemetrySpool(path, max_rows=rows)
    s._conn.execute(f"PRAGMA synchronous = {synchronous}")  # the variant under test
    os.sync()
    w0 = _write_bytes()
    below = []
    for i in range(rows):
        t0 = time.perf_counter()
        s.add("reading", topic, payloads[i % 50], ts=float(i))
        below.append(time.perf_counter() - t0)
    s._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    os.sync()
    written = _write_bytes() - w0
    payload_bytes = s.stats().bytes
    file_bytes = path.stat().st_size
    at_bound = []
    for i in range(rows, rows + 1000):
        t0 = time.perf_counter()
        s.add("reading", topic, payloads[i % 50], ts=float(i))
        at_bound.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    drained = 0
    while s.rows:
        batch = s.pending(50)
        s.delivered([b.key for b in batch])
        drained += len(batch)
    drain_s = time.perf_counter() - t0
    st = s.stats()
    s.close()
    return {
        "synchronous": synchronous,
        "rows": rows,
        "payload_bytes_per_reading": round(sum(map(len, payloads)) / len(payloads)),
        "add_below_bound": _pcts(below),
        "adds_per_s": round(rows / sum(below)),
        "add_at_bound_dropping_oldest": _pcts(at_bound),
        "disk_bytes_written_per_reading": round(written / rows),
        "file_over_payload": round(file_bytes / payload_bytes, 2),
        "drain_per_s": round(drained / drain_s),
        "dropped": st.dropped_readings,
    }


_RSS_CHILD = """
import sys, json
sys.path.insert(0, {repo!r})
from agent.system.memory import proc_status
import agent.config  # the daemon imports settings anyway
before = proc_status().rss_anon
import agent.telemetry, agent.telemetry.spool, agent.telemetry.uplink, agent.telemetry.events, agent.governor
from agent.telemetry import Sampler
s = Sampler("x"); s.sample(); s.sample()
after = proc_status().rss_anon
print(json.dumps({{"rss_anon_before_mib": round(before / 2**20, 1), "rss_anon_after_mib": round(after / 2**20, 1)}}))
"""


def bench_import_rss() -> dict[str, Any]:
    p = subprocess.run(
        [sys.executable, "-c", _RSS_CHILD.format(repo=str(REPO))], capture_output=True, text=True, check=True
    )
    d = json.loads(p.stdout)
    d["added_mib"] = round(d["rss_anon_after_mib"] - d["rss_anon_before_mib"], 1)
    return d


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="sampler run at 1 s interval (default 60)")
    ap.add_argument("--model-mb", type=int, default=620, help="size of the mapped model-like file (default 620)")
    ap.add_argument("--spool-rows", type=int, default=5000, help="readings written to the spool (default 5000)")
    ap.add_argument("--dir", type=Path, default=None, help="folder for the files (default: a temporary folder)")
    ap.add_argument("--json", action="store_true", help="print one JSON document")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        model = _model_file(args.model_mb, folder)
        out = {
            "sampler": bench_sampler(args.seconds, model),
            "residency": bench_residency(model),
            "spool": [bench_spool(args.spool_rows, folder, sync) for sync in ("NORMAL", "FULL")],
            "import_rss": bench_import_rss(),
        }
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    s = out["sampler"]
    print(f"sampler at 1 s for {s['seconds']} s: {s['readings']} readings, CPU {s['cpu_pct_at_1s']} % of one core")
    print(f"  per reading at 1 s: p50 {s['per_reading_at_1s']['p50_us']} us, p99 {s['per_reading_at_1s']['p99_us']} us")
    print(
        f"  per reading, 2000 back to back: p50 {s['per_reading_burst']['p50_us']} us, p99 {s['per_reading_burst']['p99_us']} us"
    )
    b = s["baseline_psutil_memory_full_info_smaps"]
    print(f"  baseline psutil memory_full_info (smaps; {s['rss_file_mib_during']} MiB mapped and resident): "
          f"p50 {b['p50_us']} us = {b['p50_us'] / s['per_reading_burst']['p50_us']:.1f}x a whole reading")  # fmt: skip
    print(f"  baseline /proc/self/status alone: p50 {s['baseline_proc_self_status_only']['p50_us']} us")
    r = out["residency"]
    print(f"residency (mincore over {r['model_mb']} MB, {r['layers']} layers, {r['resident_pct']} % resident): "
          f"p50 {r['per_reading']['p50_us'] / 1000:.2f} ms")  # fmt: skip
    for sp in out["spool"]:
        print(f"spool synchronous={sp['synchronous']}: {sp['rows']} readings of {sp['payload_bytes_per_reading']} B; "
              f"add p50 {sp['add_below_bound']['p50_us']} us p99 {sp['add_below_bound']['p99_us']} us "
              f"({sp['adds_per_s']}/s); at the bound p50 {sp['add_at_bound_dropping_oldest']['p50_us']} us; "
              f"{sp['disk_bytes_written_per_reading']} B written to disk per reading; file {sp['file_over_payload']}x "
              f"the payload; drain {sp['drain_per_s']}/s")  # fmt: skip
    i = out["import_rss"]
    print(
        f"telemetry + governor modules: RssAnon +{i['added_mib']} MiB ({i['rss_anon_before_mib']} -> {i['rss_anon_after_mib']})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
