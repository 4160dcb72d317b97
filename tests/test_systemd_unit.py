"""The shipped systemd unit: it parses, its command exists, and its exposure score stays low."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "edge-agent.service"

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")


@pytest.fixture
def unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this checkout's console script (verify checks that it exists)."""
    exe = Path(sys.executable).with_name("edge-agent")
    assert exe.exists(), "the project is not installed in this environment"
    text = UNIT.read_text().replace("/opt/edge-agent/.venv/bin/edge-agent", str(exe))
    out = tmp_path / "edge-agent.service"
    out.write_text(text)
    return out


def test_unit_verifies(unit: Path):
    p = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_unit_exposure_score_is_low(unit: Path):
    p = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(unit)], capture_output=True, text=True
    )
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", p.stdout + p.stderr)
    if m is None:
        pytest.skip(f"this systemd-analyze cannot score units offline: {p.stderr.strip()[:200]}")
    print(f"systemd-analyze security: {m.group(1)}")
    assert float(m.group(1)) <= 2.0


def test_unit_runs_the_documented_command_and_does_not_crash_loop_on_bad_config():
    text = UNIT.read_text()
    assert "ExecStart=/opt/edge-agent/.venv/bin/edge-agent run --config /etc/edge-agent/config.toml" in text
    assert "RestartPreventExitStatus=78" in text  # agent.errors.EXIT_CANNOT_START
    assert "Type=notify" in text and "WatchdogSec=" in text
