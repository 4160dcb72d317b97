"""Every reason the daemon cannot start exits 78 (EX_CONFIG, the unit's RestartPreventExitStatus)
with one line that says what to fix, never a traceback: systemd must not restart it forever.

Each case runs `edge-agent run -c CONFIG` as systemd does, against a broker that is never needed
(the daemon stops before it connects)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from agent.errors import EXIT_CANNOT_START
from agent.system.memory import MiB, meminfo
from tests.broker import MosquittoBroker
from tests.daemon_harness import ROOT, write_daemon_config


def run(config: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT__")}
    return subprocess.run([sys.executable, "-m", "agent", "run", "-c", str(config)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def cannot_start_line(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == EXIT_CANNOT_START, (p.returncode, p.stderr[-3000:])
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("edge-agent: cannot start")]
    assert len(lines) == 1, p.stderr[-3000:]
    return lines[0]


def test_bad_settings(tmp_path: Path, broker: MosquittoBroker, tiny_model: Path) -> None:
    cfg = write_daemon_config(tmp_path, broker, tiny_model, engine={"n_ctx": 512, "n_threads": 1, "n_batchh": 8})
    line = cannot_start_line(run(cfg))
    assert "[config_invalid]" in line and "engine.n_batchh" in run(cfg).stderr


def test_reserve_at_or_above_memtotal(tmp_path: Path, broker: MosquittoBroker, tiny_model: Path) -> None:
    reserve = meminfo().mem_total // MiB + 1
    cfg = write_daemon_config(tmp_path, broker, tiny_model, memory={"budget_mb": "auto", "reserve_mb": reserve})
    line = cannot_start_line(run(cfg))
    assert "[config_invalid]" in line and "memory.reserve_mb" in line and "lower memory.reserve_mb" in line


def test_missing_model(tmp_path: Path, broker: MosquittoBroker, tiny_model: Path) -> None:
    cfg = write_daemon_config(tmp_path, broker, tiny_model, model={"path": "nope.gguf"})
    line = cannot_start_line(run(cfg))
    assert "[model_not_found]" in line and "nope.gguf" in line


def test_model_over_the_budget(tmp_path: Path, broker: MosquittoBroker, tiny_model: Path) -> None:
    cfg = write_daemon_config(tmp_path, broker, tiny_model, memory={"budget_mb": 32})
    line = cannot_start_line(run(cfg))
    assert "[will_not_fit]" in line and "budget" in line


def test_model_sha256_mismatch(tmp_path: Path, broker: MosquittoBroker, tiny_model: Path) -> None:
    cfg = write_daemon_config(tmp_path, broker, tiny_model, model={"path": "model.gguf", "sha256": "0" * 64})
    line = cannot_start_line(run(cfg))
    assert "[model_sha256_mismatch]" in line and "model.sha256" in line


def test_damaged_store(tmp_path: Path, broker: MosquittoBroker, tiny_model: Path) -> None:
    cfg = write_daemon_config(tmp_path, broker, tiny_model)
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "jobs.db").write_bytes(b"this is not a database" * 100)
    line = cannot_start_line(run(cfg))
    assert "[store_corrupt]" in line and "move jobs.db" in line


def test_state_folder_not_writable(
    tmp_path: Path, broker: MosquittoBroker, tiny_model: Path, readonly_dir: Path
) -> None:
    """A read-only tmpfs as root (root ignores modes), a 0555 folder otherwise."""
    cfg = write_daemon_config(tmp_path, broker, tiny_model, device={"state_dir": str(readonly_dir)})
    line = cannot_start_line(run(cfg))
    assert "[store_" in line, line


def test_state_folder_on_a_file(tmp_path: Path, broker: MosquittoBroker, tiny_model: Path) -> None:
    cfg = write_daemon_config(tmp_path, broker, tiny_model)
    (tmp_path / "state").write_text("a file where the state folder should be")
    line = cannot_start_line(run(cfg))
    assert "[store_error]" in line and "device.state_dir" in line
