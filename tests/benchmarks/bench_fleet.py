"""Benchmark: fleet jobs shared by boards of unequal speed (issue 18, point 7). Not a test.

Run:  .venv/bin/python tests/benchmarks/bench_fleet.py [--mode paced|cgroup] [--jobs 24] [--tokens 48]
          [--speeds 200,50] [--cpu 100,25] [--preset qwen-0.5b] [--kill-after 0] [--lease 6]
          [--no-share]

Two modes, both real daemons in one ``mqtt.fleet_group`` on a private Mosquitto:

- ``paced`` (default, any user): daemons in this process on the tiny synthetic model, each board's
  tokens paced to ``--speeds`` tokens/s (a fake engine speed over the real engine).
- ``cgroup`` (root, cgroup v1 or v2 cpu controller): ``edge-agent run`` child processes on the
  ``--preset`` synthetic model (qwen-0.5b: real shapes, random 4-bit weights), board i limited by a
  CPU cgroup to ``--cpu`` percent of one core (100: no limit). The issue's acceptance set-up is
  ``--mode cgroup --cpu 100,25``.

``--jobs`` jobs of ``--tokens`` tokens are published at once to the fleet topic by a submitter that
keeps the fleet rule (agent/operator/fleet_jobs.py: it sends a job again when the board holding it
has been away for its lease). Printed: which board ran each job and how many were handed over, the
makespan (publish to the last result), each board's measured speed (its tokens over the time its runs
cover, parallel runs counted once),
the ideal makespan those speeds allow (all tokens over the sum of the speeds) and the ratio.
``--model FILE``: any GGUF instead of the synthetic model (the real Gemma 3 270M, for instance).
``--kill-after N``: the first board is killed for good (SIGKILL, or its connection cut in-process)
once N results arrived; every job must still end once, on the other board. ``--no-share``: boards
keep every job dealt to them (mqtt.fleet_share false): today's round-robin for comparison.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from agent.config import load_settings  # noqa: E402
from agent.models.synth import synth_model  # noqa: E402
from agent.operator.fleet_jobs import FleetJobs  # noqa: E402
from tests.broker import BrokerClient, MosquittoBroker  # noqa: E402
from tests.daemon_harness import DaemonProcess, InProcessDaemon, wait_online, write_daemon_config  # noqa: E402
from tests.helpers import Paced  # noqa: E402


class CpuCgroup:
    """A CPU cgroup limiting its processes to ``percent`` of one core (v1 cpu controller, or v2)."""

    def __init__(self, name: str, percent: int) -> None:
        v1 = Path("/sys/fs/cgroup/cpu")
        self.v2 = not v1.is_dir()
        self.path = (Path("/sys/fs/cgroup") if self.v2 else v1) / name
        self.path.mkdir(exist_ok=True)
        quota = percent * 1000
        if self.v2:
            (self.path / "cpu.max").write_text(f"{quota} 100000")
        else:
            (self.path / "cpu.cfs_period_us").write_text("100000")
            (self.path / "cpu.cfs_quota_us").write_text(str(quota))

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def remove(self) -> None:
        parent = self.path.parent / "cgroup.procs"
        for pid in (self.path / "cgroup.procs").read_text().split():
            try:
                parent.write_text(pid)
            except OSError:
                pass
        self.path.rmdir()


def _covered(spans: list[tuple[float, float]]) -> float:
    """The length of the union of the spans."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("paced", "cgroup"), default="paced")
    ap.add_argument("--jobs", type=int, default=24)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--speeds", default="200,50", help="paced: tokens/s of each board, comma-separated")
    ap.add_argument("--cpu", default="100,25", help="cgroup: percent of one core for each board (100: no limit)")
    ap.add_argument("--preset", default="qwen-0.5b", help="cgroup: the synthetic model preset")
    ap.add_argument("--model", type=Path, help="any GGUF file instead of the synthetic model (e.g. Gemma 3 270M)")
    ap.add_argument("--kill-after", type=int, default=0)
    ap.add_argument("--slots", default="1", help="engine.max_parallel of the boards (1-16, or auto)")
    ap.add_argument("--lease", type=float, default=6.0, help="mqtt.fleet_lease_s of the boards")
    ap.add_argument("--no-share", action="store_true", help="mqtt.fleet_share false: keep what the broker deals")
    ap.add_argument("--verbose", action="store_true", help="log each hand-off and give-back")
    args = ap.parse_args()
    if args.verbose:
        logging.basicConfig(format="%(relativeCreated)8.0f ms %(threadName)s %(name)s: %(message)s")
        logging.getLogger("agent.jobs.fleet").setLevel(logging.INFO)
    tmp = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    broker = MosquittoBroker(tmp / "broker").start()
    inproc: list[InProcessDaemon] = []
    procs: list[DaemonProcess] = []
    groups: list[CpuCgroup] = []
    mqtt = {"fleet_group": "bench", "fleet_lease_s": args.lease, "fleet_share": not args.no_share}
    try:
        cloud = BrokerClient(broker, client_id="bench-cloud").connect()
        cloud.subscribe("edge/+/status")
        if args.mode == "paced":
            model = args.model or synth_model("tiny", tmp / "tiny.gguf")
            boards = [float(x) for x in args.speeds.split(",")]
        else:
            model = args.model or synth_model(args.preset, tmp / f"{args.preset}.gguf")
            boards = [float(x) for x in args.cpu.split(",")]
        configs = []
        for i, _ in enumerate(boards):
            configs.append(
                write_daemon_config(
                    tmp / f"board{i}",
                    broker,
                    model,
                    device_id=f"board{i}",
                    mqtt=mqtt,
                    engine={
                        "max_tokens_limit": 4096,
                        "n_ctx": 512,
                        "max_parallel": args.slots if args.slots == "auto" else int(args.slots),
                    },
                    telemetry={"interval_s": 3600},
                )  # fmt: skip
            )
        for i, (cfg, x) in enumerate(zip(configs, boards, strict=True)):
            if args.mode == "paced":
                inproc.append(InProcessDaemon(cfg, engine_wrapper=lambda e, s=x: Paced(e, s)).start())  # type: ignore[misc]
            else:
                proc = DaemonProcess(cfg).start()
                procs.append(proc)
                if x < 100:
                    group = CpuCgroup(f"bench-fleet-board{i}", int(x))
                    groups.append(group)
                    group.add(proc.pid)
            wait_online(cloud, f"board{i}", timeout=600)
        settings = load_settings(configs[0])
        with FleetJobs(settings, resend_after_s=60) as fleet:
            t0 = time.monotonic()
            ids = [
                fleet.submit(
                    {"prompt": "Once upon a time", "max_tokens": args.tokens, "seed": n}, job_id=f"fleet-{n:03d}"
                )
                for n in range(args.jobs)
            ]
            ended: dict[str, float] = {}
            killed = False

            def on_result(job_id: str, _res: dict[str, Any]) -> None:
                nonlocal killed
                ended[job_id] = time.monotonic() - t0
                if args.kill_after and not killed and len(ended) >= args.kill_after:
                    killed = True
                    if procs:
                        procs[0].kill()
                    else:  # a hard stop: the connection is cut (the will fires), no goodbye
                        inproc[0].daemon.parts.transport._client.socket().close()  # noqa: SLF001
                        inproc[0].daemon.request_stop()
                    print(f"board0 killed after {len(ended)} results")

            results = fleet.wait(ids, timeout=600, on_result=on_result)
            resends, duplicates, handoffs = list(fleet.resends), fleet.duplicates, len(fleet.handed)
            ran_on = {j: fleet.jobs[j].ran_on for j in results}
        makespan = max(ended.values()) if ended else float("nan")
        per_board: dict[str, list[dict[str, Any]]] = {}
        for job_id, res in results.items():
            per_board.setdefault(str(ran_on[job_id]), []).append(res)
        measured = {}
        for board, rs in sorted(per_board.items()):
            # Busy: the time its runs cover (overlapping runs of parallel slots counted once), each run
            # ending when its result arrived and lasting its prompt + generation time.
            runs = [
                (
                    ended[r["job_id"]] - (r["timings"]["prompt_ms"] + r["timings"]["generation_ms"]) / 1000,
                    ended[r["job_id"]],
                )
                for r in rs
                if r["timings"]
            ]
            busy = _covered(runs)
            toks = sum(r["usage"]["completion_tokens"] for r in rs if r["usage"])
            measured[board] = toks / busy if busy else 0.0
            print(f"{board}: {len(rs)} jobs, {toks} tokens in {busy:.1f} s busy: {measured[board]:.1f} tok/s")
        total_tokens = sum(r["usage"]["completion_tokens"] for rs in per_board.values() for r in rs if r["usage"])
        ideal = total_tokens / sum(measured.values()) if measured else float("nan")
        print(
            f"hand-offs: {handoffs}; resends: {len(resends)} ({'; '.join(f'{j}: {why}' for j, why in resends[:5])}); duplicate results: {duplicates}"
        )
        print(
            f"jobs ended {len(results)}/{args.jobs}; makespan {makespan:.1f} s; ideal {ideal:.1f} s; "
            f"ratio {makespan / ideal:.2f}x"
        )
    finally:
        for d in inproc:
            try:
                d.stop(timeout=60)
            except Exception as e:  # a killed board: its thread may already be gone
                print(f"stopping a board: {e}")
        for p in procs:
            if p.alive():
                p.terminate()
        for g in groups:
            g.remove()
        broker.stop()
        if os.environ.get("BENCH_KEEP"):
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
