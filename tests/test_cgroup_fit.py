"""Memory readings and budgets (agent.system.memory), and the acceptance tests: the 0.5B model
served in fit mode inside a memory cgroup whose limit is 60 % of the model file, and the real
Gemma file planned automatically (mode and context) under the same kind of limit.

The cgroup test needs root and a memory controller (v1 or v2); it skips with the reason
otherwise. It drops the model file from the page cache first, so every page the child reads is
charged to the child's cgroup, not found already cached and charged elsewhere.
"""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.config.sections import MemorySettings
from agent.engine.residency import layer_residency
from agent.models.gguf_info import read_model_info
from agent.system.memory import (
    CgroupMemory,
    MemInfo,
    MiB,
    PeakSampler,
    cgroup_memory,
    meminfo,
    proc_status,
    psi_memory,
    resolve_budget,
)

REPO = Path(__file__).resolve().parents[1]
EDGE_AGENT = [sys.executable, "-m", "agent"]


# ------------------------------------------------------------------------------- readers


def _touched_anonymous(size: int) -> mmap.mmap:
    """``size`` bytes of new anonymous memory, every page written: RssAnon grows by exactly that,
    whatever malloc kept from earlier frees (a bytearray may reuse those, or be untouched pages)."""
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # private: RssAnon, not RssShmem
    for off in range(0, size, mmap.PAGESIZE):
        m[off] = 1
    return m


def test_proc_status_reads_this_process() -> None:
    st = proc_status()
    assert st.rss_anon > 1 * MiB and st.rss_file > 0 and st.vm_hwm >= st.rss_anon
    blob = _touched_anonymous(32 * MiB)
    assert proc_status().rss_anon - st.rss_anon > 30 * MiB
    blob.close()


def test_meminfo_and_psi_parse(tmp_path: Path) -> None:
    mi = meminfo()
    assert mi.mem_total > mi.mem_available > 0
    psi = tmp_path / "memory"
    psi.write_text(
        "some avg10=1.50 avg60=0.20 avg300=0.00 total=12345\nfull avg10=0.50 avg60=0.00 avg300=0.00 total=99\n"
    )
    p = psi_memory(psi)
    assert p.available and p.some_avg10 == 1.5 and p.full_total_us == 99
    missing = psi_memory(tmp_path / "nope")
    assert not missing.available and "psi=1" in (missing.reason or "")


def _fake_proc(tmp: Path, cgroup_lines: str, mounts: list[str]) -> Path:
    proc = tmp / "proc" / "1"
    proc.mkdir(parents=True)
    (proc / "cgroup").write_text(cgroup_lines)
    (proc / "mountinfo").write_text("\n".join(mounts) + "\n")
    return tmp / "proc"


def test_cgroup_v1_effective_limit_usage_and_peak(tmp_path: Path) -> None:
    root = tmp_path / "memory"
    d = root / "svc" / "agent"
    d.mkdir(parents=True)
    (d / "memory.stat").write_text("cache 1\nhierarchical_memory_limit 419430400\n")
    (d / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    (d / "memory.usage_in_bytes").write_text("1000\n")
    (d / "memory.max_usage_in_bytes").write_text("2000\n")
    proc = _fake_proc(tmp_path, "4:memory:/svc/agent\n0::/\n", [f"35 31 0:32 / {root} rw - cgroup cgroup rw,memory"])
    cg = cgroup_memory(1, proc_root=proc)
    assert (cg.version, cg.limit, cg.usage, cg.peak) == (1, 419430400, 1000, 2000)
    # "no limit" in v1 is a huge number: reported as None
    (d / "memory.stat").write_text("hierarchical_memory_limit 9223372036854771712\n")
    assert cgroup_memory(1, proc_root=proc).limit is None


def test_cgroup_v2_limit_is_the_smallest_ancestor(tmp_path: Path) -> None:
    root = tmp_path / "cg2"
    d = root / "system.slice" / "agent.service"
    d.mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpu io memory pids\n")
    (root / "system.slice" / "memory.max").write_text("500000000\n")
    (d / "memory.max").write_text("max\n")
    (d / "memory.current").write_text("123\n")
    (d / "memory.peak").write_text("456\n")
    proc = _fake_proc(tmp_path, "0::/system.slice/agent.service\n", [f"30 23 0:26 / {root} rw - cgroup2 cgroup2 rw"])
    cg = cgroup_memory(1, proc_root=proc)
    assert (cg.version, cg.limit, cg.usage, cg.peak) == (2, 500000000, 123, 456)


def test_cgroup_without_memory_controller_says_why(tmp_path: Path) -> None:
    root = tmp_path / "cg2"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpu io pids\n")  # Raspberry Pi OS without cgroup_enable=memory
    proc = _fake_proc(tmp_path, "0::/\n", [f"30 23 0:26 / {root} rw - cgroup2 cgroup2 rw"])
    cg = cgroup_memory(1, proc_root=proc)
    assert not cg.available and "cgroup_enable=memory" in (cg.reason or "")


def test_resolve_budget_sources() -> None:
    mem = MemInfo(mem_total=1024 * MiB, mem_available=800 * MiB, mem_free=0, cached=0, swap_total=0, swap_free=0)
    explicit = resolve_budget(MemorySettings(budget_mb=300), mem=mem, cgroup=CgroupMemory(None, reason="x"))
    assert explicit.bytes == 300 * MiB and "budget_mb" in explicit.source
    limited = resolve_budget(MemorySettings(), mem=mem, cgroup=CgroupMemory(2, path="/a", limit=400 * MiB))
    assert limited.bytes == 400 * MiB and "cgroup v2 /a" in limited.source  # no reserve taken off a limit
    no_cg = resolve_budget(MemorySettings(reserve_mb=128), mem=mem, cgroup=CgroupMemory(None, reason="no controller"))
    assert no_cg.bytes == 896 * MiB and "MemTotal" in no_cg.source and any("no controller" in n for n in no_cg.notes)
    unlimited = resolve_budget(MemorySettings(reserve_mb=128), mem=mem, cgroup=CgroupMemory(1, path="/", limit=None))
    assert unlimited.bytes == 896 * MiB
    above_ram = resolve_budget(
        MemorySettings(reserve_mb=0), mem=mem, cgroup=CgroupMemory(1, path="/b", limit=8192 * MiB)
    )
    assert above_ram.bytes == 1024 * MiB and any("above MemTotal" in n for n in above_ram.notes)


def test_peak_sampler_sees_a_short_allocation_and_stops() -> None:
    base = proc_status().rss_anon
    sampler = PeakSampler(interval_s=0.01)
    with sampler:
        blob = _touched_anonymous(48 * MiB)
        sampler.sample()  # the peak is taken at the latest when the run ends; sample() is the same reading
        blob.close()
    assert sampler.peak_rss_anon - base > 40 * MiB
    assert sampler.samples >= 2
    assert not any(t.name == "peak-sampler" for t in threading.enumerate())


# ------------------------------------------------------------------------------- the cgroup run


@dataclass
class _Cgroup:
    """A memory cgroup created for one test and removed afterwards (v1 or v2)."""

    version: int
    path: Path

    @classmethod
    def create(cls, name: str, limit: int) -> _Cgroup:
        if os.geteuid() != 0:
            pytest.skip("needs root to create a memory cgroup")
        v1 = Path("/sys/fs/cgroup/memory")
        if (v1 / "memory.limit_in_bytes").exists():
            cg = cls(1, v1 / name)
            cg.path.mkdir()
            (cg.path / "memory.limit_in_bytes").write_text(str(limit))
            if (cg.path / "memory.memsw.limit_in_bytes").exists():
                # No swap either: the run must fit in the limit, not page anonymous memory out.
                (cg.path / "memory.memsw.limit_in_bytes").write_text(str(limit))
            return cg
        v2 = Path("/sys/fs/cgroup")
        controllers = (v2 / "cgroup.controllers").read_text().split() if (v2 / "cgroup.controllers").exists() else []
        if "memory" in controllers:
            if "memory" not in (v2 / "cgroup.subtree_control").read_text().split():
                try:
                    (v2 / "cgroup.subtree_control").write_text("+memory")
                except OSError as e:
                    pytest.skip(f"cannot enable the memory controller for child cgroups: {e}")
            cg = cls(2, v2 / name)
            cg.path.mkdir()
            (cg.path / "memory.max").write_text(str(limit))
            if (cg.path / "memory.swap.max").exists():
                (cg.path / "memory.swap.max").write_text("0")
            return cg
        pytest.skip("no memory cgroup controller (v1 or v2) on this kernel")

    def _read(self, name: str) -> str:
        return (self.path / name).read_text()

    @property
    def peak(self) -> int | None:
        f = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        return int(self._read(f)) if (self.path / f).exists() else None

    @property
    def oom_kills(self) -> int:
        f = "memory.oom_control" if self.version == 1 else "memory.events"
        for line in self._read(f).splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        return 0

    def reset_peak(self) -> None:
        if self.version == 1:
            (self.path / "memory.max_usage_in_bytes").write_text("0")
        elif (self.path / "memory.peak").exists():
            try:
                (self.path / "memory.peak").write_text("reset")  # kernel >= 6.12
            except OSError:
                pass

    def run(self, argv: list[str], timeout: float) -> subprocess.CompletedProcess:
        # The shell puts itself into the cgroup, then becomes the agent: nothing runs outside the
        # limit, and no preexec_fn is needed (unsafe with threads in the test process).
        script = f'echo $$ > {self.path / "cgroup.procs"} && exec "$@"'
        return subprocess.run(
            ["sh", "-c", script, "sh", *argv], capture_output=True, text=True, timeout=timeout, cwd=REPO
        )

    def remove(self) -> None:
        try:
            self.path.rmdir()
        except OSError:
            pass


def _drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.mark.slow
@pytest.mark.root
def test_qwen05_in_a_cgroup_of_60_percent_of_the_file(qwen05_model: Path, tmp_path: Path) -> None:
    info = read_model_info(qwen05_model)
    limit = info.file_size * 60 // 100
    cg = _Cgroup.create(f"edge-agent-test-{os.getpid()}", limit)
    model = qwen05_model
    try:
        common = [
            *EDGE_AGENT,
            "generate",
            "--model",
            str(model),
            "--prompt",
            "Hello there, how are you?",
            "--max-tokens",
            "16",
            "--json",
        ]
        results = {}
        for mode in ("fit", "auto"):
            _drop_from_page_cache(model)
            cached = sum(r.resident_bytes for r in layer_residency(model, info.layers))
            cg.reset_peak()
            proc = cg.run([*common, "--mode", mode], timeout=600)
            assert proc.returncode == 0, f"--mode {mode} failed ({proc.returncode}): {proc.stderr[-2000:]}"
            doc = json.loads(proc.stdout)
            results[mode] = doc
            peak = cg.peak
            print(
                f"\n--mode {mode}: chose {doc['mode']} n_ctx {doc['n_ctx']} ({doc['n_ctx_reason']}); "
                f"{doc['stats']['completion_tokens']} tokens at {doc['stats']['tokens_per_s']:.1f} tok/s; "
                f"cgroup peak {peak / MiB if peak else float('nan'):.1f} MiB of limit {limit / MiB:.1f} MiB "
                f"(file {info.file_size / MiB:.1f} MiB, {cached / MiB:.1f} MiB cached at start); "
                f"peak RssAnon {doc['memory']['peak_rss_anon'] / MiB:.1f} MiB, "
                f"RssFile after {doc['memory']['after_run']['rss_file'] / MiB:.1f} MiB; budget: {doc['budget']['source']}"
            )
            assert cached < 0.05 * info.weights_bytes  # the child's reads were charged to its cgroup
            assert doc["mode"] == "fit"
            assert doc["finish_reason"] == "length" and doc["stats"]["completion_tokens"] == 16
            assert f"cgroup v{cg.version}" in doc["budget"]["source"]
            assert doc["memory"]["peak_rss_anon"] < limit
            # It ran with less of the model in RAM than the model's size.
            assert doc["memory"]["after_run"]["rss_file"] < info.file_size
            if peak is not None:
                assert peak <= limit
            assert cg.oom_kills == 0
        assert "headroom" in results["auto"]["mode_reason"]

        # fast under the same limit: the estimate refuses it before loading anything.
        cg.reset_peak()
        proc = cg.run([*common, "--mode", "fast"], timeout=600)
        print(f"--mode fast: exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1][:300]}")
        assert proc.returncode == 1
        assert "[will_not_fit]" in proc.stderr and "cgroup" in proc.stderr
        assert cg.oom_kills == 0
        if cg.peak is not None:
            assert cg.peak < info.repackable_bytes  # refused before the repacked copy was made
    finally:
        cg.remove()


@pytest.mark.slow
@pytest.mark.root
@pytest.mark.skipif(
    os.environ.get("EDGE_AGENT_TEST_FORCED_OOM") != "1",
    reason="takes minutes (the kernel thrashes the page cache before it OOM-kills); set EDGE_AGENT_TEST_FORCED_OOM=1",
)
def test_forced_fast_mode_in_the_same_cgroup_is_oom_killed(qwen05_model: Path) -> None:
    info = read_model_info(qwen05_model)
    limit = info.file_size * 60 // 100
    cg = _Cgroup.create(f"edge-agent-test-oom-{os.getpid()}", limit)
    try:
        _drop_from_page_cache(qwen05_model)
        proc = cg.run(
            [
                *EDGE_AGENT,
                "generate",
                "--model",
                str(qwen05_model),
                "--prompt",
                "Hello",
                "--max-tokens",
                "16",
                "--mode",
                "fast",
                "--force",
                "--json",
            ],
            timeout=1800,
        )
        print(f"\n--mode fast --force: exit {proc.returncode}, cgroup oom_kill {cg.oom_kills}")
        assert proc.returncode in (-9, 137)
        assert cg.oom_kills >= 1
    finally:
        cg.remove()


@pytest.mark.slow
@pytest.mark.root
def test_real_model_planned_exactly_in_a_cgroup_of_60_percent_of_the_file(gemma_model: Path, tmp_path: Path) -> None:
    """The real Gemma 3 270M file with everything automatic (mode and context) under a hard limit
    of 60 % of its file: the exact plan sizes the context to the cgroup's budget, the run
    completes without an OOM kill, and the process stays inside the plan."""
    info = read_model_info(gemma_model)
    limit = info.file_size * 60 // 100
    cg = _Cgroup.create(f"edge-agent-test-gemma-{os.getpid()}", limit)
    try:
        _drop_from_page_cache(gemma_model)
        cg.reset_peak()
        proc = cg.run(
            # Few tokens: with the tied 170 MiB output matrix read for every token and 145 MiB for
            # everything, each token re-reads most of the file from storage (about 0.2-1 tok/s).
            [
                *EDGE_AGENT,
                "generate",
                "--model",
                str(gemma_model),
                "--prompt",
                "The capital of France is",
                "--max-tokens",
                "4",
                "--mode",
                "auto",
                "--ctx",
                "auto",
                "--json",
            ],
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        doc = json.loads(proc.stdout)
        est, peak_anon = doc["estimate"], doc["memory"]["peak_rss_anon"]
        print(
            f"\ngemma auto/auto in {limit / MiB:.1f} MiB: {doc['mode']} ({doc['mode_reason']}), n_ctx {doc['n_ctx']} "
            f"({doc['n_ctx_reason']}); plan {est['anon_bytes'] / MiB:.1f} MiB ({est['source']}, {doc['plan_ms']} ms), "
            f"peak RssAnon {peak_anon / MiB:.1f} MiB; cgroup peak {(cg.peak or 0) / MiB:.1f} MiB; "
            f"{doc['stats']['tokens_per_s']:.1f} tok/s; {doc['text']!r}"
        )
        assert est["source"] == "llama.cpp" and f"cgroup v{cg.version}" in doc["budget"]["source"]
        assert est["anon_bytes"] <= limit and doc["n_ctx"] >= 512
        assert doc["stats"]["completion_tokens"] == 4 and cg.oom_kills == 0
        # A short run does not fill the context, so it stays under the steady state the plan is for.
        assert peak_anon <= est["anon_bytes"]
    finally:
        cg.remove()


@pytest.mark.slow
@pytest.mark.root
def test_max_parallel_auto_in_a_cgroup_plans_the_slots_and_their_memory(qwen05_model: Path) -> None:
    """engine.max_parallel 'auto' under a memory cgroup: the plan takes as many slots as the
    budget allows at n_ctx each (fewer than the cap: the limit decides), every slot runs a job at
    once, and the measured peak RssAnon is within 10 % of the plan's anonymous memory."""
    limit = 300 * MiB
    cg = _Cgroup.create(f"edge-agent-test-slots-{os.getpid()}", limit)
    script = (
        "import json, sys, threading\n"
        "from agent.config.sections import EngineSettings\n"
        "from agent.engine import Engine, GenerationRequest\n"
        "from agent.system.memory import PeakSampler\n"
        "e = Engine(sys.argv[1], engine=EngineSettings(n_ctx=1024, n_batch=64, n_threads=2, load_mode='fit',\n"
        "           max_parallel='auto', auto_parallel_max=16, warmup=False))\n"
        "r = e.load()\n"
        "peak = PeakSampler(interval_s=0.02).start()\n"
        "out = []\n"
        "def one(i):\n"
        "    out.append(e.generate(GenerationRequest(f'Report {i}: ' + 'the pump ran fine. ' * 20, max_tokens=16,\n"
        "                                            temperature=0.0)))\n"
        "ts = [threading.Thread(target=one, args=(i,)) for i in range(r.slots)]\n"
        "[t.start() for t in ts]; [t.join() for t in ts]\n"
        "print(json.dumps({'slots': r.slots, 'reason': r.slots_reason, 'anon': r.estimate.anon_bytes,\n"
        "                  'peak': peak.stop(), 'budget': r.budget.source, 'together': max(x.stats.slots_in_use for x in out),\n"
        "                  'done': sum(x.stats.completion_tokens == 16 for x in out)}))\n"
    )
    try:
        _drop_from_page_cache(qwen05_model)
        cg.reset_peak()
        proc = cg.run([sys.executable, "-c", script, str(qwen05_model)], timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        doc = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"\nmax_parallel auto in {limit / MiB:.0f} MiB: {doc['slots']} slots ({doc['reason']}); plan "
              f"{doc['anon'] / MiB:.1f} MiB anonymous, peak RssAnon {doc['peak'] / MiB:.1f} MiB "
              f"({doc['peak'] / doc['anon']:.3f}x); {doc['together']} jobs decoded together; cgroup peak "
              f"{(cg.peak or 0) / MiB:.1f} MiB; budget: {doc['budget']}")  # fmt: skip
        assert f"cgroup v{cg.version}" in doc["budget"]
        assert 2 <= doc["slots"] < 16 and "the most that fit the budget" in doc["reason"]
        assert doc["done"] == doc["slots"] and doc["together"] >= 2
        assert abs(doc["peak"] - doc["anon"]) <= 0.10 * doc["anon"]
        assert cg.oom_kills == 0
    finally:
        cg.remove()
