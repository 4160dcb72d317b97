"""The memory governor for real: the daemon (qwen-0.5b preset, fit mode) and a memory hog in one
memory cgroup while jobs are queued (issue 9's pressure test).

The daemon must move to critical, take its actions in order (hold, shrink, preempt, unload) and
publish them as events, not be OOM-killed, and once the hog is gone reload the model and finish
every queued job exactly once. Beside it, in the same run: llama-cpp-python with its defaults under
the same hog and the same limit (OOM-killed or stalled). Needs root and a memory cgroup.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest

from agent.jobs.store import JobStore
from agent.mqtt.topics import Topics
from tests.broker import BrokerClient, MosquittoBroker
from tests.daemon_harness import ROOT, wait_online, write_daemon_config
from tests.test_cgroup_fit import _Cgroup, _drop_from_page_cache

pytestmark = [pytest.mark.root, pytest.mark.slow]

MiB = 1024 * 1024
LIMIT = 450 * MiB
HOG = 200 * MiB  # with the model in fit mode, well over the limit; with the model unloaded, well under it
DEV = "dev-mem"
T = Topics("edge", DEV)
JOBS = [f"mem-{i}" for i in range(6)]

HOG_SCRIPT = """
import os, signal, sys, time
open("/proc/self/oom_score_adj", "w").write("1000")  # if the kernel must kill, the hog goes first
chunks = []
for _ in range(int(sys.argv[1]) // 16):
    chunks.append(bytearray(16 * 1024 * 1024))  # zero-filled: every page touched
    time.sleep(0.02)
print("holding", flush=True)
signal.sigwait({signal.SIGTERM})
"""


def in_cgroup(cg: _Cgroup, argv: list[str], **kw) -> subprocess.Popen:
    script = f'echo $$ > {cg.path / "cgroup.procs"} && exec "$@"'
    return subprocess.Popen(["sh", "-c", script, "sh", *argv], cwd=ROOT, **kw)


def start_hog(cg: _Cgroup) -> subprocess.Popen:
    hog = in_cgroup(cg, [sys.executable, "-c", HOG_SCRIPT, str(HOG // MiB)], stdout=subprocess.PIPE, text=True)
    assert hog.stdout is not None and hog.stdout.readline().strip() == "holding"
    return hog


class Seen:
    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.events: list[dict] = []
        self.results: dict[str, list[bytes]] = defaultdict(list)

    def on(self, msg) -> None:
        with self.cond:
            if msg.topic == T.events:
                self.events.append(json.loads(msg.payload))
            elif msg.topic.endswith("/result"):
                self.results[msg.topic.split("/")[3]].append(bytes(msg.payload))
            self.cond.notify_all()

    def wait(self, what: str, pred, timeout: float) -> None:
        with self.cond:
            assert self.cond.wait_for(pred, timeout), f"{what} not within {timeout}s; events: {self.events}"

    def actions(self) -> list[str]:
        with self.cond:
            return [e["action"] for e in self.events if e["kind"] == "action"]


def test_the_governor_protects_the_daemon_and_its_jobs_under_a_memory_hog(
    qwen05_model: Path, broker: MosquittoBroker, tmp_path: Path
) -> None:
    cg = _Cgroup.create(f"edge-agent-pressure-{os.getpid()}", LIMIT)
    cfg = write_daemon_config(
        tmp_path / "d", broker, qwen05_model, device_id=DEV,
        engine={"n_ctx": 512, "n_threads": 2, "n_batch": 64, "load_mode": "fit"},
        memory={"budget_mb": "auto"},
        governor={"enabled": True, "interval_s": 0.5, "cool_down_s": 2, "recover_s": 4, "psi_hold_s": 2},
        telemetry={"interval_s": 5},
        priority={"nice": 0, "oom_score_adj": 0},
    )  # fmt: skip
    seen = Seen()
    daemon = hog = None
    log = open(tmp_path / "daemon.log", "wb")
    try:
        with BrokerClient(broker) as peer:
            peer.client.on_message = lambda c, u, m: (seen.on(m), peer.messages.put(m))
            for topic in (T.events, T.result_filter, T.device_status):
                peer.subscribe(topic)
            env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT__")}
            # Page cache is charged to whoever reads a page first: drop the model's, so the daemon's
            # reads of its weights are charged to its cgroup, as on a board.
            _drop_from_page_cache(cfg.parent / "models" / "model.gguf")  # the daemon's copy
            daemon = in_cgroup(cg, [sys.executable, "-m", "agent", "run", "-c", str(cfg)], stdout=log,
                               stderr=subprocess.STDOUT, env=env)  # fmt: skip
            wait_online(peer, DEV, timeout=120)
            for job_id in JOBS:
                body = {"job_id": job_id, "kind": "generate", "prompt": f"Tell a story about {job_id}.",
                        "max_tokens": 16, "temperature": 0.0, "seed": 1}  # fmt: skip
                peer.publish(T.submit, json.dumps(body).encode())
            hog = start_hog(cg)
            t_hog = time.monotonic()
            seen.wait("the model unloaded under pressure", lambda: "unload" in seen.actions(), 180)
            t_unload = time.monotonic()
            assert daemon.poll() is None, "the daemon died"
            hog.send_signal(signal.SIGTERM)
            assert hog.wait(30) in (0, -signal.SIGTERM)
            seen.wait("every queued job's result", lambda: all(seen.results.get(j) for j in JOBS), 300)
            t_done = time.monotonic()
            assert daemon.poll() is None, "the daemon died"
            seen.wait("the model reloaded and the hold released", lambda: "release_hold" in seen.actions(), 120)
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(60) == 0
        oom_kills_daemon_phase = cg.oom_kills
    finally:
        for p in (hog, daemon):
            if p is not None and p.poll() is None:
                p.kill()
        log.close()
    levels = [(e["previous_level"], e["level"]) for e in seen.events if e["kind"] == "level_changed"]
    assert any(lvl == "critical" for _, lvl in levels), levels
    actions = seen.actions()
    assert actions[:4] == ["hold_unfit", "shrink_context", "preempt", "unload"], actions
    assert actions.index("reload") < actions.index("release_hold"), actions
    assert all(e.get("readings") for e in seen.events if e["kind"] in ("action", "level_changed"))
    with JobStore(cfg.parent / "state" / "jobs.db", readonly=True) as store:
        for job_id in JOBS:
            r = store.get(job_id)
            assert r.status.value == "SUCCEEDED" and len(set(seen.results[job_id])) == 1, (job_id, r.status)
    print(f"\nedge-agent under the hog: critical and unloaded {t_unload - t_hog:.1f}s after the hog started, "
          f"all {len(JOBS)} jobs done {t_done - t_unload:.1f}s after it ended; cgroup oom_kill {oom_kills_daemon_phase}; "
          f"events: {levels} {actions}")  # fmt: skip

    # Beside it: llama-cpp-python with its defaults, the same limit, the same hog.
    cg.remove()
    base = _Cgroup.create(f"edge-agent-pressure-base-{os.getpid()}", LIMIT)
    hog = start_hog(base)
    try:
        code = (f"import llama_cpp; l = llama_cpp.Llama({str(qwen05_model)!r}, n_ctx=512, n_threads=2, verbose=False); "
                "print(l('Tell a story.', max_tokens=48)['usage'])")  # fmt: skip
        p = in_cgroup(base, [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = p.communicate(timeout=120)
            outcome = "OOM-killed" if p.returncode in (-9, 137) else f"exit {p.returncode}"
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            outcome = "stalled (no result within 120 s)"
        hog_fate = "OOM-killed" if hog.poll() in (-9, 137) else "alive"
        print(f"llama-cpp-python defaults under the same hog and limit: {outcome}; the hog {hog_fate}; "
              f"cgroup oom_kill {base.oom_kills}")  # fmt: skip
        # Without the governor something in the cgroup is killed (the hog is the kernel's first choice:
        # oom_score_adj 1000), or the run stalls; with it, nothing was killed.
        assert base.oom_kills >= 1 or outcome.startswith("stalled"), (outcome, hog_fate)
    finally:
        hog.kill()
        hog.wait()
        base.remove()
    assert oom_kills_daemon_phase == 0
