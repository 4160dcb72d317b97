"""Benchmark: how fast the daemon takes jobs in, and the round-trip latency of a 1-token job.

Run:  .venv/bin/python tests/benchmarks/bench_daemon.py [--burst 500] [--jobs 200] [--json]

Starts a private mosquitto (tests.broker.MosquittoBroker, persistence off, in a temporary folder)
and `edge-agent run` as a child process on the tiny synthetic model, then measures:

(a) Intake burst: a peer publishes --burst jobs (max_tokens 1) at QoS 1 as fast as paho sends
    them. Measured from the first publish until the daemon's store holds all of them (a
    read-only SQLite reader counts the rows every 2 ms; a job is acknowledged to the broker
    only once stored), and until the peer has every result. QUEUED statuses are counted too,
    but they do not time the intake: statuses are not resent, and the daemon's outgoing queue
    (256 messages) overflows in such a burst, so most of them never leave the board.
(b) Latency: --jobs sequential 1-token jobs, each from just before the publish to the result
    arriving at the peer (p50, p99). Baseline in the same run, through the same broker: a plain
    MQTT echo (the peer publishes at QoS 1, a separate echo process republishes at QoS 1).

Each runs in variants:
- store.synchronous FULL (the default: an acknowledged job survives power loss) or NORMAL;
- TCP "default": the broker as shipped (mosquitto's set_tcp_nodelay false); "nodelay": mosquitto's
  set_tcp_nodelay true. The daemon always sets TCP_NODELAY on its socket (agent/mqtt/transport.py), and so
  do the benchmark's peers. Nagle's algorithm holds a small packet back until the previous one is
  acknowledged, and the receiver delays that ACK (up to 40 ms on Linux): with it on anywhere on the
  path, that wait dominates every round trip.
Not collected by pytest (the file name does not start with test_).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.broker import MosquittoBroker  # noqa: E402
from tests.daemon_harness import write_daemon_config  # noqa: E402

T = 60.0  # give-up deadline for any single wait

# The echo: another process, plain paho, republishes every request at QoS 1.
ECHO = (
    "import socket, sys\n"
    "import paho.mqtt.client as mqtt\n"
    "from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion\n"
    "host, port = sys.argv[1], int(sys.argv[2])\n"
    "c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id='bench-echo', protocol=MQTTProtocolVersion.MQTTv5)\n"
    "c.on_subscribe = lambda c, u, mid, rcs, p: print('ready', flush=True)\n"
    "c.on_connect = lambda c, u, f, rc, p: c.subscribe('bench/echo/req', 1)\n"
    "c.on_message = lambda c, u, m: c.publish('bench/echo/resp', m.payload, qos=1)\n"
    "c.connect(host, port, keepalive=30)\n"
    "c.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)\n"
    "c.loop_forever()\n"
)


class Peer:
    """A paho client that timestamps every message as it arrives (on paho's thread)."""

    def __init__(self, broker: MosquittoBroker, inflight: int = 20) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

        self.inbox: queue.Queue[tuple[float, Any]] = queue.Queue()
        self._ready: queue.Queue[Any] = queue.Queue()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-peer-{uuid.uuid4().hex[:8]}",
                        protocol=MQTTProtocolVersion.MQTTv5)  # fmt: skip
        c.max_inflight_messages_set(inflight)
        c.max_queued_messages_set(0)  # unlimited: a burst is queued in paho, sent as the window allows
        c.on_connect = lambda _c, _u, _f, rc, _p: self._ready.put(rc)
        c.on_subscribe = lambda _c, _u, mid, rcs, _p: self._ready.put(mid)
        c.on_message = lambda _c, _u, m: self.inbox.put((time.perf_counter(), m))
        c.connect(broker.host, broker.port, keepalive=30)
        c.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c.loop_start()
        rc = self._ready.get(timeout=T)
        assert not rc.is_failure, rc
        self.client = c

    def subscribe(self, *topics: str) -> None:
        for t in topics:
            self.client.subscribe(t, 1)
            self._ready.get(timeout=T)

    def next(self, timeout: float = T) -> tuple[float, Any]:
        return self.inbox.get(timeout=timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(values)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def job(job_id: str) -> bytes:
    return json.dumps({"job_id": job_id, "kind": "generate", "prompt": "Hello", "max_tokens": 1,
                       "temperature": 0}).encode()  # fmt: skip


def start_daemon(cfg: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT__")}
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "agent", "run", "-c", str(cfg)], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)  # fmt: skip


def wait_online(peer: Peer, device: str) -> None:
    deadline = time.monotonic() + T
    while time.monotonic() < deadline:
        _, m = peer.next(deadline - time.monotonic())
        if m.topic == f"edge/{device}/status" and not m.retain and json.loads(m.payload)["state"] == "online":
            return
    raise TimeoutError(f"{device} did not come online")


def burst(peer: Peer, device: str, n: int, db_path: Path) -> dict[str, Any]:
    """Publish n jobs at once; time until the store holds all n (a read-only reader polls the
    SQLite file every 2 ms), until the peer saw n QUEUED statuses, and until it saw n results."""
    ids = [f"burst-{i:05d}" for i in range(n)]
    queued: set[str] = set()
    results: set[str] = set()
    stored_at: list[float] = []
    done = threading.Event()

    def count_rows() -> None:
        db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
        try:
            while not done.wait(0.002):  # sampling period, not synchronisation
                if db.execute("SELECT count(*) FROM jobs WHERE job_id LIKE 'burst-%'").fetchone()[0] >= n:
                    stored_at.append(time.perf_counter())
                    return
        finally:
            db.close()

    counter = threading.Thread(target=count_rows, daemon=True)
    t0 = time.perf_counter()
    counter.start()
    for i in ids:
        peer.client.publish(f"edge/{device}/jobs/submit", job(i), qos=1)
    t_queued = t_results = None
    deadline = time.monotonic() + T
    while len(results) < n:
        try:
            at, m = peer.next(max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise TimeoutError(f"burst on {device}: {len(queued)} QUEUED, {len(results)} results of {n} "
                               f"after {time.perf_counter() - t0:.0f} s") from None  # fmt: skip
        job_id, leaf = m.topic.split("/")[-2:]
        if leaf == "status" and json.loads(m.payload)["status"] == "QUEUED":
            queued.add(job_id)
            if len(queued) == n:
                t_queued = at - t0
        elif leaf == "result":
            results.add(job_id)
            if len(results) == n:
                t_results = at - t0
    counter.join(T)
    done.set()
    assert stored_at and t_results is not None
    t_stored = stored_at[0] - t0
    return {"n": n, "all_stored_s": t_stored, "stored_per_s": n / t_stored, "queued_seen": len(queued),
            "all_queued_seen_s": t_queued, "all_results_s": t_results, "completed_per_s": n / t_results}  # fmt: skip


def latency_jobs(peer: Peer, device: str, n: int, prefix: str) -> tuple[list[float], list[dict]]:
    out, timings = [], []
    for i in range(n):
        job_id = f"{prefix}-{i:05d}"
        topic = f"edge/{device}/jobs/{job_id}/result"
        t0 = time.perf_counter()
        peer.client.publish(f"edge/{device}/jobs/submit", job(job_id), qos=1)
        while True:
            at, m = peer.next()
            if m.topic == topic:
                break
        data = json.loads(m.payload)
        assert data["status"] == "SUCCEEDED", data
        out.append((at - t0) * 1000)
        timings.append(data["timings"])
    return out, timings


def latency_echo(peer: Peer, n: int, size: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        peer.client.publish("bench/echo/req", b"x" * size, qos=1)
        while True:
            at, m = peer.next()
            if m.topic == "bench/echo/resp":
                break
        out.append((at - t0) * 1000)
    return out


def run_variant(broker: MosquittoBroker, work: Path, model: Path, synchronous: str, tcp: str,
                args: argparse.Namespace, echo_ms: list[float]) -> dict[str, Any]:  # fmt: skip
    device = f"bench-{synchronous.lower()}-{tcp}"
    cfg = write_daemon_config(work / device, broker, model, device_id=device,
                              store={"queue_max": args.burst + 10, "synchronous": synchronous},
                              engine={"max_tokens_limit": 16, "n_threads": 1},
                              telemetry={"interval_s": 3600})  # fmt: skip
    peer = Peer(broker, inflight=args.inflight)
    peer.subscribe(f"edge/{device}/status", f"edge/{device}/jobs/+/status", f"edge/{device}/jobs/+/result")
    print(f"{device}: latency, then burst", file=sys.stderr)
    proc = start_daemon(cfg, work / f"{device}.log")
    try:
        wait_online(peer, device)
        # A few jobs first: the model's first evaluation and SQLite's first writes are not what is measured.
        latency_jobs(peer, device, 3, "warm")
        lat, timings = latency_jobs(peer, device, args.jobs, "lat")
        b = burst(peer, device, args.burst, work / device / "state" / "jobs.db")
        resent = sum(int(line.split("resent ")[1].split()[0]) for line in
                     (work / f"{device}.log").read_text().splitlines() if "resent " in line)  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        peer.close()
    inner = {k: statistics.median(t[k] for t in timings) for k in ("queue_ms", "prompt_ms", "generation_ms")}
    return {
        "synchronous": synchronous,
        "tcp": tcp,
        "burst": {**b, "results_resent": resent},
        "job_ms": {"p50": pct(lat, 50), "p99": pct(lat, 99), "max": max(lat)},
        "echo_ms": {"p50": pct(echo_ms, 50), "p99": pct(echo_ms, 99), "max": max(echo_ms)},
        "ratio_p50": pct(lat, 50) / pct(echo_ms, 50),
        "ratio_p99": pct(lat, 99) / pct(echo_ms, 99),
        "daemon_timings_median_ms": inner,
    }


def table(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    rows = [
        "| store synchronous | TCP | burst: all stored | jobs stored/s | QUEUED statuses seen | burst: all results "
        "| jobs completed/s | 1-token job p50 / p99 | MQTT echo p50 / p99 | job / echo p50, p99 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        b, j, e = r["burst"], r["job_ms"], r["echo_ms"]
        rows.append(
            f"| {r['synchronous']} | {r['tcp']} | {b['all_stored_s']:.2f} s | {b['stored_per_s']:.0f} "
            f"| {b['queued_seen']} of {b['n']} | {b['all_results_s']:.2f} s ({b['results_resent']} resent) "
            f"| {b['completed_per_s']:.0f} | {j['p50']:.1f} / {j['p99']:.1f} ms | {e['p50']:.1f} / {e['p99']:.1f} ms "
            f"| {r['ratio_p50']:.1f}x, {r['ratio_p99']:.1f}x |"
        )
    inner = [
        f"- {r['synchronous']}, {r['tcp']}: inside the daemon, median per latency job: queue "
        f"{r['daemon_timings_median_ms']['queue_ms']:.1f} ms, prompt {r['daemon_timings_median_ms']['prompt_ms']:.2f} ms, "
        f"generation {r['daemon_timings_median_ms']['generation_ms']:.2f} ms"
        for r in results
    ]
    head = f"burst of {args.burst} jobs; latency over {args.jobs} sequential jobs and {args.jobs} echoes"
    return "\n".join(rows + ["", head, *inner])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--burst", type=int, default=500, help="jobs in the intake burst (default 500)")
    ap.add_argument("--jobs", type=int, default=200, help="sequential jobs for the latency (default 200)")
    ap.add_argument("--inflight", type=int, default=20, help="the peer's QoS 1 window (paho's default 20)")
    ap.add_argument("--sync", default="FULL,NORMAL", help="store synchronous modes to run (default FULL,NORMAL)")
    ap.add_argument(
        "--tcp",
        default="default,nodelay",
        help="broker variants to run: default (mosquitto as shipped), nodelay (set_tcp_nodelay true)",
    )
    ap.add_argument("--json", action="store_true", help="print the measurements as JSON too")
    args = ap.parse_args(argv)

    from agent.models.synth import synth_model

    results = []
    with tempfile.TemporaryDirectory(prefix="bench-daemon-") as tmp:
        work = Path(tmp)
        model = synth_model("tiny", work / "tiny.gguf")
        for tcp in args.tcp.split(","):
            extra = "set_tcp_nodelay true" if tcp == "nodelay" else ""
            broker = MosquittoBroker(work / f"broker-{tcp}", persistence=False, extra_conf=extra).start()
            echo = subprocess.Popen([sys.executable, "-c", ECHO, broker.host, str(broker.port)],
                                    stdout=subprocess.PIPE, text=True)  # fmt: skip
            try:
                assert echo.stdout is not None and echo.stdout.readline().strip() == "ready"
                peer = Peer(broker)
                peer.subscribe("bench/echo/resp")
                latency_echo(peer, 3, 160)
                echo_ms = latency_echo(peer, args.jobs, 160)  # 160 bytes: about a submit payload's size
                peer.close()
                for mode in args.sync.split(","):
                    results.append(run_variant(broker, work, model, mode.strip().upper(), tcp, args, echo_ms))
            finally:
                echo.terminate()
                echo.wait(timeout=10)
                broker.stop()
    print(table(results, args))
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
