"""`edge-agent install` / `uninstall` in a throw-away root: every step, idempotence, a dry run that
changes nothing, and never a systemctl call for another root. The machine's own /etc is not touched."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import load_settings
from agent.ops.install import (
    CONFIG_FILE,
    CREDENTIAL_FILE,
    Context,
    InstallOptions,
    Systemctl,
    plan_install,
    plan_uninstall,
    run_steps,
)
from agent.ops.units import DEFAULT_UNITS_DIR, PROFILES_DIR

EDGE_AGENT = [sys.executable, "-m", "agent"]
EXE = str(Path(sys.executable).with_name("edge-agent"))

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="install sets owners (chown) and creates a user: needs root"),
]


def _tree(root: Path) -> dict[str, tuple[str, int, int]]:
    """Every path under root with its mode and owner: to show a run changed nothing."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = (stat.filemode(st.st_mode), st.st_uid, st.st_mtime_ns)
    return out


class Recorder:
    """Context.run that records commands and runs only systemd-sysusers/userdel/groupdel for the root."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, argv: list[str]) -> subprocess.CompletedProcess:
        self.calls.append(argv)
        assert argv[0] != "systemctl", "systemctl must never run for another root"
        return subprocess.run(argv, capture_output=True, text=True, check=False)


def _options(tiny_model: Path, tmp_path: Path, **kw) -> InstallOptions:
    pw = tmp_path / "pw"
    pw.write_text("hunter2-secret\n")
    base = dict(profile=PROFILES_DIR / "pi-4-2gb.toml", exec_path=EXE, units_dir=DEFAULT_UNITS_DIR, model=tiny_model,
                device_id="pi-kitchen", mqtt_host="broker.lan", mqtt_password_file=pw)  # fmt: skip
    base.update(kw)
    return InstallOptions(**base)


def _uid(root: Path, name: str) -> int:
    for line in (root / "etc/passwd").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split(":")[2])
    raise AssertionError(f"{name} not in {root}/etc/passwd")


def test_dry_run_prints_every_step_and_changes_nothing(tmp_path: Path, tiny_model: Path):
    root = tmp_path / "root"
    root.mkdir()
    p = subprocess.run([*EDGE_AGENT, "install", "--profile", "pi-4-2gb", "--root", str(root), "--model", str(tiny_model),
                        "--dry-run"], capture_output=True, text=True)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert list(root.iterdir()) == []
    lines = p.stdout.splitlines()
    for what in ("user and group edge-agent", "config folder /etc/edge-agent", "state folder /var/lib/edge-agent",
                 "models folder", "model tiny.gguf", "config /etc/edge-agent/config.toml", "mqtt_password",
                 "unit /etc/systemd/system/edge-agent.service (MemoryHigh=1425M MemoryMax=1500M)",
                 "systemctl daemon-reload", "systemctl enable"):  # fmt: skip
        assert any(what in line for line in lines), what
    assert all(line.startswith(("would ", "skipped (--root)")) for line in lines), lines


def test_install_in_a_throwaway_root_then_again_changes_nothing(tmp_path: Path, tiny_model: Path):
    root = tmp_path / "root"
    root.mkdir()
    run = Recorder()
    ctx = Context(root=root, run=run)
    out: list[str] = []
    run_steps(plan_install(_options(tiny_model, tmp_path)), ctx, out.append)
    assert [c[0] for c in run.calls] == ["systemd-sysusers"] and "--root" in run.calls[0]

    uid = _uid(root, "edge-agent")
    cfg = root / "etc/edge-agent/config.toml"
    cred = root / "etc/edge-agent/mqtt_password"
    unit = root / "etc/systemd/system/edge-agent.service"
    state = root / "var/lib/edge-agent"
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o640 and cfg.stat().st_uid == 0
    assert stat.S_IMODE(cred.stat().st_mode) == 0o600 and cred.read_text() == "hunter2-secret\n"
    assert stat.S_IMODE(state.stat().st_mode) == 0o750 and state.stat().st_uid == uid
    assert (state / "models" / "tiny.gguf").read_bytes() == tiny_model.read_bytes()
    assert (state / "models").stat().st_uid == uid
    assert "MemoryMax=1500M" in unit.read_text() and f"ExecStart={EXE} run" in unit.read_text()
    assert "hunter2" not in cfg.read_text()  # the password goes to the credential only

    # The config is the profile (its comments kept) plus the options, and valid as the daemon reads it.
    text = cfg.read_text()
    assert "# Raspberry Pi 4 Model B, 2 GB RAM" in text
    s = load_settings(cfg, environ={})
    assert (s.device.id, s.device.board, s.mqtt.host) == ("pi-kitchen", "pi-4-2gb", "broker.lan")
    assert str(s.device.state_dir) == "/var/lib/edge-agent" and str(s.model.path) == "tiny.gguf"
    assert s.model.sha256 is not None and s.memory.budget_mb == 1500
    assert any(line.startswith("skipped (--root)") and "daemon-reload" in line for line in out)

    # Edited by hand, then installed again: nothing changes, the edit is kept.
    cfg.write_text(text.replace('host = "broker.lan"', 'host = "other.lan"'))
    before = _tree(root)
    out.clear()
    run_steps(plan_install(_options(tiny_model, tmp_path)), ctx, out.append)
    assert _tree(root) == before
    assert {line.split()[0] for line in out} <= {"exists", "unchanged", "kept", "skipped"}, out
    assert [c[0] for c in run.calls] == ["systemd-sysusers"]  # the user existed: not created again

    # --replace-config takes the profile again.
    run_steps(plan_install(_options(tiny_model, tmp_path, replace_config=True)), ctx, out.append)
    assert 'host = "broker.lan"' in cfg.read_text()


def test_without_a_password_file_an_empty_credential_is_created_and_an_existing_one_kept(
    tmp_path: Path, tiny_model: Path
):
    root = tmp_path / "root"
    root.mkdir()
    ctx = Context(root=root, run=Recorder())
    opts = _options(tiny_model, tmp_path, mqtt_password_file=None, model=None)
    run_steps(plan_install(opts), ctx, lambda line: None)
    cred = root / "etc/edge-agent/mqtt_password"
    assert cred.read_bytes() == b""  # LoadCredential= fails the unit on a missing file
    cred.write_text("set-later\n")
    run_steps(plan_install(opts), ctx, lambda line: None)
    assert cred.read_text() == "set-later\n"


def test_uninstall_keeps_data_unless_purged(tmp_path: Path, tiny_model: Path):
    root = tmp_path / "root"
    root.mkdir()
    p = subprocess.run([*EDGE_AGENT, "install", "--profile", "pi-zero-2w", "--root", str(root), "--model", str(tiny_model)],
                       capture_output=True, text=True)  # fmt: skip
    assert p.returncode == 0, p.stderr
    (root / "etc/systemd/system/edge-agent.service.d").mkdir()
    (root / "etc/systemd/system/edge-agent.service.d/50-memory.conf").write_text("[Service]\n")
    p = subprocess.run([*EDGE_AGENT, "uninstall", "--root", str(root)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert not (root / "etc/systemd/system/edge-agent.service").exists()
    assert not (root / "etc/systemd/system/edge-agent.service.d").exists()
    assert (root / "etc/edge-agent/config.toml").exists() and (root / "var/lib/edge-agent/models/tiny.gguf").exists()
    assert "--purge removes them" in p.stderr
    p = subprocess.run([*EDGE_AGENT, "uninstall", "--root", str(root), "--purge"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert not (root / "etc/edge-agent").exists() and not (root / "var/lib/edge-agent").exists()
    assert (
        "edge-agent:" not in (root / "etc/passwd").read_text() and "edge-agent:" not in (root / "etc/group").read_text()
    )
    again = subprocess.run([*EDGE_AGENT, "uninstall", "--root", str(root), "--purge"], capture_output=True, text=True)
    assert again.returncode == 0 and all(
        line.split()[0] in ("absent", "skipped") for line in again.stdout.splitlines()
    ), again.stdout


def test_systemctl_is_never_run_for_another_root(tmp_path: Path):
    calls: list[list[str]] = []
    ctx = Context(root=tmp_path, run=lambda argv: calls.append(argv))  # type: ignore[arg-type,return-value]
    for step in plan_uninstall(["edge-agent.service"]):
        if isinstance(step, Systemctl):
            assert step.apply(ctx) == "skipped (--root)"
    assert calls == []


def test_paths_are_the_units_own():
    # The unit reads its config and credential from here, and its StateDirectory is edge-agent.
    unit = (DEFAULT_UNITS_DIR / "edge-agent.service").read_text()
    assert f"--config {CONFIG_FILE}" in unit and f"mqtt_password:{CREDENTIAL_FILE}" in unit
    assert "StateDirectory=edge-agent" in unit
