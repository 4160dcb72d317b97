"""Benchmark: fleet jobs shared by boards of unequal speed (issue 18, point 7). Not a test.

Run:  .venv/bin/python tests/benchmarks/bench_fleet.py [--jobs 24] [--tokens 48] [--speeds 200,50]
          [--kill-after 0]

Boards are real daemons (agent.app.daemon, in this process) on a private Mosquitto, all in one
mqtt.fleet_group, on the tiny synthetic model; each board's speed is set by pacing its engine's tokens
(``--speeds`` tokens/s per board: "the fake engine with set speeds" of the issue; CPU cgroups would need
root and a real model). ``--jobs`` jobs of ``--tokens`` tokens are published at once to the fleet topic.
Printed: which board ran each job, the makespan (publish to the last result), each board's measured
speed (its jobs x tokens over its busy time), the ideal makespan those speeds allow (all jobs' tokens
over the sum of the speeds) and the ratio. ``--kill-after N``: the first board's daemon is stopped
hard (its network connection dropped, no clean stop) once N results arrived; the jobs it held are
then counted as lost or late.

What it shows today (round-robin dealing, acknowledgement on store): docs/mqtt-transport.md, "Fleet
jobs by each board's speed".
"""

from __future__ import annotations

import argparse
import json
import queue
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from agent.models.synth import synth_model  # noqa: E402
from tests.broker import BrokerClient, MosquittoBroker  # noqa: E402
from tests.daemon_harness import InProcessDaemon, wait_online, write_daemon_config  # noqa: E402


class Paced:
    """The real engine, its tokens paced to ``tokens_per_s`` (a board of that speed)."""

    def __init__(self, engine: Any, tokens_per_s: float) -> None:
        object.__setattr__(self, "_engine", engine)
        object.__setattr__(self, "_delay", 1.0 / tokens_per_s)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def generate(self, req: Any, *, on_token: Any = None, **kw: Any) -> Any:
        def paced(index: int, text: str) -> None:
            time.sleep(self._delay)  # the board's compute time for this token (a set speed, not a wait)
            if on_token is not None:
                on_token(index, text)

        return self._engine.generate(req, on_token=paced, **kw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=24)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--speeds", default="200,50", help="tokens/s of each board, comma-separated")
    ap.add_argument("--kill-after", type=int, default=0)
    args = ap.parse_args()
    speeds = [float(x) for x in args.speeds.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    broker = MosquittoBroker(tmp / "broker").start()
    daemons: list[InProcessDaemon] = []
    try:
        model = synth_model("tiny", tmp / "tiny.gguf")
        results: queue.Queue[tuple[float, str, dict[str, Any]]] = queue.Queue()
        with BrokerClient(broker, client_id="bench-cloud") as cloud:
            cloud.subscribe("edge/+/status")
            for i, speed in enumerate(speeds):
                cfg = write_daemon_config(
                    tmp / f"board{i}", broker, model, device_id=f"board{i}",
                    mqtt={"fleet_group": "bench"}, engine={"max_tokens_limit": 4096},
                    telemetry={"interval_s": 3600},
                )  # fmt: skip
                d = InProcessDaemon(cfg, engine_wrapper=lambda e, s=speed: Paced(e, s)).start()  # type: ignore[misc]
                daemons.append(d)
                wait_online(cloud, f"board{i}", timeout=60)
            watcher = BrokerClient(broker, client_id="bench-results").connect()
            watcher.client.on_message = lambda _c, _u, m: results.put(
                (time.monotonic(), m.topic.split("/")[1], json.loads(m.payload))
            )
            watcher.subscribe("edge/+/jobs/+/result")
            t0 = time.monotonic()
            for n in range(args.jobs):
                payload = {"job_id": f"fleet-{n:03d}", "kind": "generate", "prompt": "Hello", "max_tokens": args.tokens}
                cloud.publish("edge/fleet/jobs/submit", json.dumps(payload).encode())
            seen: dict[str, tuple[float, str, dict[str, Any]]] = {}
            killed = False
            while len(seen) < args.jobs:
                try:
                    at, board, res = results.get(timeout=120)
                except queue.Empty:
                    print(f"no result for 120 s: {args.jobs - len(seen)} jobs never ended (lost)")
                    break
                seen.setdefault(res["job_id"], (at, board, res))
                if args.kill_after and not killed and len(seen) >= args.kill_after:
                    killed = True
                    # A hard stop: the connection is cut (the will fires), the daemon never says goodbye.
                    daemons[0].daemon.parts.transport._client.socket().close()  # noqa: SLF001
                    daemons[0].daemon.request_stop()
                    print(f"board0 killed after {len(seen)} results")
            watcher.close()
        makespan = max(at for at, _, _ in seen.values()) - t0 if seen else float("nan")
        per_board: dict[str, list[dict[str, Any]]] = {}
        for _, board, res in seen.values():
            per_board.setdefault(board, []).append(res)
        measured = {}
        for board, rs in sorted(per_board.items()):
            busy = sum((r["timings"]["prompt_ms"] + r["timings"]["generation_ms"]) / 1000 for r in rs if r["timings"])
            toks = sum(r["usage"]["completion_tokens"] for r in rs if r["usage"])
            measured[board] = toks / busy if busy else 0.0
            print(f"{board}: {len(rs)} jobs, {toks} tokens in {busy:.1f} s busy: {measured[board]:.0f} tok/s")
        total_tokens = sum(r["usage"]["completion_tokens"] for rs in per_board.values() for r in rs if r["usage"])
        ideal = total_tokens / sum(measured.values()) if measured else float("nan")
        print(
            f"jobs {len(seen)}/{args.jobs}; makespan {makespan:.1f} s; ideal {ideal:.1f} s; ratio {makespan / ideal:.2f}x"
        )
    finally:
        for d in daemons:
            try:
                d.stop(timeout=60)
            except Exception as e:  # a killed board: its thread may already be gone
                print(f"stopping a board: {e}")
        broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
