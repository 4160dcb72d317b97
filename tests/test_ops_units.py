"""`edge-agent systemd render`: the memory limits formula, rendering every shipped unit, and the rendered
units passing `systemd-analyze verify` and an exposure score of 2.0 or better."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.errors import ConfigError
from agent.ops.units import (
    DEFAULT_UNITS_DIR,
    MAIN_UNIT,
    SHIPPED_EXEC,
    PlanSummary,
    drop_in,
    memory_limits,
    render_unit,
    render_units,
)
from agent.system.memory import Budget, MiB

EXE = str(Path(sys.executable).with_name("edge-agent"))
EDGE_AGENT = [sys.executable, "-m", "agent"]
needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")


def _plan(anon_mib: float, file_mib: float = 100) -> PlanSummary:
    return PlanSummary("m.gguf", "fit", 1024, int(anon_mib * MiB), int(file_mib * MiB), "r", "r")


# ------------------------------------------------------------------------------------ the formula


def test_limits_without_a_model_sit_a_margin_below_the_budget():
    lim = memory_limits(Budget(1500 * MiB, "memory.budget_mb = 1500"))
    assert (lim.max, lim.high, lim.margin_bytes) == ("1500M", "1425M", 75 * MiB)  # 5 % of 1500
    small = memory_limits(Budget(300 * MiB, "x"))
    assert (small.max, small.high) == ("300M", "284M")  # the margin is at least 16 MiB


def test_limits_never_throttle_what_the_plan_counts_on():
    # anonymous 1450 MiB + margin 75 MiB is above budget - margin: MemoryHigh rises to hold it
    lim = memory_limits(Budget(1500 * MiB, "x"), _plan(1450))
    assert lim.high_bytes == 1500 * MiB and lim.max_bytes == 1500 * MiB
    assert any("MemoryHigh raised" in n for n in lim.notes)
    mid = memory_limits(Budget(1500 * MiB, "x"), _plan(1400, 10))
    assert mid.high_bytes == 1475 * MiB  # 1400 + 75, rounded up to a MiB


def test_limits_refuse_a_plan_over_the_budget_and_note_weights_that_will_be_reread():
    with pytest.raises(ConfigError, match="above the budget"):
        memory_limits(Budget(300 * MiB, "x"), _plan(301))
    lim = memory_limits(Budget(300 * MiB, "x"), _plan(80, 265))
    assert lim.high == "284M" and any("re-read weights" in n for n in lim.notes)


# ------------------------------------------------------------------------------------ rendering

SHIPPED = (DEFAULT_UNITS_DIR / MAIN_UNIT).read_text()


def test_render_replaces_the_examples_and_the_install_path():
    lim = memory_limits(Budget(700 * MiB, "memory.budget_mb = 700"))
    text = render_unit(MAIN_UNIT, SHIPPED, exec_path="/srv/ea/bin/edge-agent", limits=lim)
    assert "ExecStart=/srv/ea/bin/edge-agent run --config /etc/edge-agent/config.toml" in text
    assert SHIPPED_EXEC not in text
    assert re.findall(r"^MemoryHigh=.*$", text, re.M) == ["MemoryHigh=665M"]
    assert re.findall(r"^MemoryMax=.*$", text, re.M) == ["MemoryMax=700M"]
    assert "#MemoryHigh" not in text and "budget 700 MiB" in text
    # Everything else is the shipped unit, line for line.
    kept = [line for line in SHIPPED.splitlines() if not re.match(r"#?Memory(High|Max)=", line)]
    assert all(line.replace(SHIPPED_EXEC, "/srv/ea/bin/edge-agent") in text for line in kept)


def test_render_adds_limits_to_a_unit_without_examples():
    unit = "[Unit]\nDescription=x\n\n[Service]\nExecStart=/opt/edge-agent/.venv/bin/edge-agent run\n"
    text = render_unit(MAIN_UNIT, unit, exec_path="/x/edge-agent", limits=memory_limits(Budget(512 * MiB, "x")))
    lines = text.splitlines()
    i = lines.index("[Service]")
    assert "MemoryMax=512M" in lines[i:] and lines.index("MemoryMax=512M") > i


def test_every_unit_in_the_folder_is_rendered_and_only_the_main_unit_gets_limits(tmp_path: Path):
    # The swap oneshot and its path unit (the memory issue's branch ships them): rendered too.
    shutil.copy(DEFAULT_UNITS_DIR / MAIN_UNIT, tmp_path / MAIN_UNIT)
    (tmp_path / "edge-agent-swap.service").write_text(
        "[Service]\nType=oneshot\nExecStart=/opt/edge-agent/.venv/bin/edge-agent swap apply --desired "
        "/var/lib/edge-agent/swap-desired.json\n"
    )
    (tmp_path / "edge-agent-swap.path").write_text("[Path]\nPathChanged=/var/lib/edge-agent/swap-desired.json\n")
    (tmp_path / "README").write_text("not a unit")
    out = render_units(memory_limits(Budget(1024 * MiB, "x")), exec_path=EXE, units_dir=tmp_path, command="test")
    assert sorted(out) == ["edge-agent-swap.path", "edge-agent-swap.service", MAIN_UNIT]
    assert f"ExecStart={EXE} swap apply" in out["edge-agent-swap.service"]
    assert "Memory" not in out["edge-agent-swap.service"] and "MemoryMax=1024M" in out[MAIN_UNIT]
    assert all(t.startswith("# Rendered by edge-agent") for t in out.values())


def test_drop_in_holds_only_the_limits():
    name, text = drop_in(memory_limits(Budget(1500 * MiB, "x")))
    assert name == f"{MAIN_UNIT}.d/50-memory.conf"
    settings = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert settings == ["[Service]", "MemoryHigh=1425M", "MemoryMax=1500M"]


def test_cli_renders_from_a_profile_and_the_models_plan(tmp_path: Path, tiny_model: Path):
    p = subprocess.run([*EDGE_AGENT, "systemd", "render", "--profile", "pi-zero-2w", "--model", str(tiny_model),
                        "--out", str(tmp_path)], capture_output=True, text=True)  # fmt: skip
    assert p.returncode == 0, p.stderr
    text = (tmp_path / MAIN_UNIT).read_text()
    assert "MemoryMax=300M" in text and "MemoryHigh=284M" in text  # pi-zero-2w: budget_mb = 300
    assert "# Plan for tiny.gguf: fit mode" in text  # the engine's own plan (load_mode fit in that profile)
    assert f"ExecStart={EXE} run" in text
    p = subprocess.run([*EDGE_AGENT, "systemd", "render", "--profile", "pi-4-2gb", "--drop-in", "--out", str(tmp_path)],
                       capture_output=True, text=True)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "MemoryMax=1500M" in (tmp_path / f"{MAIN_UNIT}.d" / "50-memory.conf").read_text()


def test_cli_auto_budget_uses_the_boards_ram_and_refuses_unknown_profiles(tmp_path: Path):
    p = subprocess.run([*EDGE_AGENT, "systemd", "render", "--profile", "arm64-8gb", "--ram-mb", "8192", "--drop-in"],
                       capture_output=True, text=True)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "MemoryMax=7168M" in p.stdout  # 8192 - reserve_mb 1024
    bad = subprocess.run([*EDGE_AGENT, "systemd", "render", "--profile", "pi-9"], capture_output=True, text=True)
    assert bad.returncode == 1 and "no board profile 'pi-9'" in bad.stderr and "pi-4-2gb" in bad.stderr


def test_cli_refuses_a_model_that_does_not_fit_the_profile(tmp_path: Path, qwen05_model: Path):
    prof = tmp_path / "tiny-board.toml"
    prof.write_text('[engine]\nload_mode = "fit"\nn_ctx = 4096\n[memory]\nbudget_mb = 64\n')
    p = subprocess.run([*EDGE_AGENT, "systemd", "render", "--profile", str(prof), "--model", str(qwen05_model)],
                       capture_output=True, text=True)  # fmt: skip
    assert p.returncode == 1 and "will_not_fit" in p.stderr, p.stderr


# ------------------------------------------------------------------------------------ systemd-analyze


@pytest.fixture
def rendered(tmp_path: Path, tiny_model: Path) -> Path:
    out = tmp_path / "units"
    p = subprocess.run([*EDGE_AGENT, "systemd", "render", "--profile", "pi-4-2gb", "--model", str(tiny_model),
                        "--out", str(out)], capture_output=True, text=True)  # fmt: skip
    assert p.returncode == 0, p.stderr
    return out


@needs_analyze
def test_rendered_units_verify(rendered: Path):
    units = sorted(rendered.iterdir())
    assert [u.name for u in units] == sorted(
        p.name for p in DEFAULT_UNITS_DIR.iterdir() if p.suffix in (".service", ".path")
    )
    p = subprocess.run(["systemd-analyze", "verify", *map(str, units)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


@needs_analyze
def test_rendered_main_unit_exposure_score(rendered: Path):
    p = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(rendered / MAIN_UNIT)],
                       capture_output=True, text=True)  # fmt: skip
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", p.stdout + p.stderr)
    if m is None:
        pytest.skip(f"this systemd-analyze cannot score units offline: {p.stderr.strip()[:200]}")
    print(f"\nsystemd-analyze security --offline=true, rendered {MAIN_UNIT}: {m.group(1)}")
    assert float(m.group(1)) <= 2.0
