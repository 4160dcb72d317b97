"""Swap: the pure plan, the desired-swap file between the daemon and root, and, as root, swap files
and zram devices created, resized and removed for real (files under a temporary folder), refused when
space or memory is short, and swap the agent did not create left alone. The systemd units verify.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.cli import main
from agent.config.sections import SwapSettings
from agent.system.memory import MemInfo
from agent.system.swap import (
    DESIRED_KEYS,
    Created,
    Desired,
    FileState,
    Record,
    SwapDevice,
    SwapError,
    SwapManager,
    World,
    desired_path,
    load_desired,
    plan,
    swaps,
    write_desired,
)

MiB = 1 << 20
GiB = 1 << 30
ROOT_DIR = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures" / "system"
BOOT = "11111111-2222-3333-4444-555555555555"


# ------------------------------------------------------------------------------- reading


def test_proc_swaps_parse_with_escaped_names():
    got = swaps(FIXTURES / "v2-nolimit-swapfile/proc/swaps")
    assert got == [SwapDevice("/swap file", "file", 2097148 * 1024, 97148 * 1024, -2)]
    assert swaps(FIXTURES / "pi4-stock/proc/swaps") == []
    assert swaps("/nonexistent/swaps") == []  # a kernel without swap support


def test_auto_sizes_follow_zram_generator_and_dphys_swapfile():
    d = Desired.from_settings(SwapSettings(policy="zram+file"), 1 * GiB)
    assert d.zram_bytes == 512 * MiB and d.file_bytes == 2 * GiB
    d = Desired.from_settings(SwapSettings(policy="zram+file"), 16 * GiB)
    assert d.zram_bytes == 4 * GiB and d.file_bytes == 2 * GiB
    d = Desired.from_settings(SwapSettings(policy="zram", zram_mb=300), 16 * GiB)
    assert d.zram_bytes == 300 * MiB and d.file_bytes == 0
    assert Desired.from_settings(SwapSettings(), 16 * GiB).zram_bytes == 0


def test_settings_refuse_a_policy_without_a_size_or_a_relative_path():
    with pytest.raises(ValueError):
        SwapSettings(policy="zram", zram_mb=0)
    with pytest.raises(ValueError):
        SwapSettings(policy="file", file_path=Path("swapfile"))


# ------------------------------------------------------------------------------- plan (pure)


def world(*, active=(), avail=800 * MiB, total=1024 * MiB, files=None, zram=True, swappiness=60) -> World:
    mem = MemInfo(mem_total=total, mem_available=avail, mem_free=0, cached=0, swap_total=0, swap_free=0)
    return World(tuple(active), mem, BOOT, swappiness, zram, "" if zram else "no zram module", files or {})


def desired(**kw) -> Desired:
    s = SwapSettings(**{"file_path": Path("/var/swap.edge-agent"), "file_keep_free_mb": 100, **kw})
    return Desired.from_settings(s, 1024 * MiB)


FREE = {"/var/swap.edge-agent": FileState(False, free_bytes=10 * GiB)}


def ops(steps):
    return [(s.op, s.target, s.refused is None) for s in steps]


def test_plan_creates_zram_then_the_file_from_nothing():
    steps = plan(desired(policy="zram+file", zram_mb=256, file_mb=512), Record(), world(files=FREE))
    assert ops(steps) == [("create_zram", "zram", True), ("create_file", "/var/swap.edge-agent", True)]
    assert (steps[0].size, steps[0].priority, steps[1].size, steps[1].priority) == (256 * MiB, 100, 512 * MiB, 10)


def ours(kind="file", path="/var/swap.edge-agent", size=512 * MiB, prio=10, boot=BOOT, inode=7):
    if kind == "zram":
        return Created("zram", path, size, prio, 0.0, boot_id=boot, zram_index=int(path[-1]))
    return Created("file", path, size, prio, 0.0, inode=inode, device=1)


def file_there(inode=7, free=10 * GiB, path="/var/swap.edge-agent"):
    return {path: FileState(True, inode, 1, True, free)}


def test_plan_has_nothing_to_do_when_it_matches():
    rec = Record([ours("zram", "/dev/zram1", 256 * MiB, 100), ours()])
    active = [
        SwapDevice("/dev/zram1", "partition", 256 * MiB, 0, 100),
        SwapDevice("/var/swap.edge-agent", "file", 512 * MiB, 0, 10),
    ]
    assert (
        plan(desired(policy="zram+file", zram_mb=256, file_mb=512), rec, world(active=active, files=file_there())) == []
    )


def test_plan_removes_what_the_policy_no_longer_wants():
    rec = Record([ours("zram", "/dev/zram1", 256 * MiB, 100), ours()])
    active = [
        SwapDevice("/dev/zram1", "partition", 256 * MiB, 0, 100),
        SwapDevice("/var/swap.edge-agent", "file", 512 * MiB, 0, 10),
    ]
    steps = plan(desired(policy="none", swappiness=None), rec, world(active=active, files=file_there()))
    assert ops(steps) == [("remove_zram", "/dev/zram1", True), ("remove_file", "/var/swap.edge-agent", True)]


def test_plan_resizes_by_removing_then_creating():
    active = [SwapDevice("/var/swap.edge-agent", "file", 512 * MiB, 0, 10)]
    steps = plan(desired(policy="file", file_mb=768), Record([ours()]), world(active=active, files=file_there()))
    assert ops(steps) == [("remove_file", "/var/swap.edge-agent", True), ("create_file", "/var/swap.edge-agent", True)]
    assert "resize 512 -> 768 MiB" in steps[0].reason


def test_plan_never_switches_off_while_memory_is_short():
    # 300 MiB used in the swap file; MemAvailable 400 MiB of 1 GiB: 100 MiB left after, floor 204 MiB
    active = [SwapDevice("/var/swap.edge-agent", "file", 512 * MiB, 300 * MiB, 10)]
    steps = plan(
        desired(policy="none", swappiness=None),
        Record([ours()]),
        world(active=active, avail=400 * MiB, files=file_there()),
    )
    assert ops(steps) == [("remove_file", "/var/swap.edge-agent", False)]
    assert "memory is short" in steps[0].refused and "100 MiB" in steps[0].refused
    # a resize is refused as a whole: the new file is not made while the old one must stay
    steps = plan(
        desired(policy="file", file_mb=768), Record([ours()]), world(active=active, avail=400 * MiB, files=file_there())
    )
    assert ops(steps) == [
        ("remove_file", "/var/swap.edge-agent", False),
        ("create_file", "/var/swap.edge-agent", False),
    ]
    # plenty of memory: allowed
    assert plan(desired(policy="none", swappiness=None), Record([ours()]),
                world(active=active, avail=900 * MiB, files=file_there()))[0].refused is None  # fmt: skip


def test_plan_refuses_a_file_without_room_or_one_it_did_not_create():
    short = {"/var/swap.edge-agent": FileState(False, free_bytes=550 * MiB)}
    steps = plan(desired(policy="file", file_mb=512), Record(), world(files=short))
    assert not ops(steps)[0][2] and "550 MiB free, 612 MiB needed" in steps[0].refused
    foreign = {"/var/swap.edge-agent": FileState(True, 99, 1, True, 10 * GiB)}
    steps = plan(desired(policy="file", file_mb=512), Record(), world(files=foreign))
    assert "not created by edge-agent" in steps[0].refused


def test_plan_forgets_records_that_no_longer_describe_its_swap():
    rec = Record([ours("zram", "/dev/zram1", 256 * MiB, 100, boot="old-boot"), ours(inode=7)])
    # after a reboot: the zram device is gone, the file is still ours but inactive
    steps = plan(desired(policy="zram+file", zram_mb=256, file_mb=512), rec, world(files=file_there(inode=7)))
    assert ops(steps) == [("forget", "/dev/zram1", True), ("create_zram", "zram", True),
                          ("activate_file", "/var/swap.edge-agent", True)]  # fmt: skip
    # someone replaced the file (another inode): forgotten and left alone, and not overwritten
    steps = plan(desired(policy="file", file_mb=512), Record([ours(inode=7)]), world(files=file_there(inode=8)))
    assert ops(steps)[0] == ("forget", "/var/swap.edge-agent", True)
    assert steps[1].op == "create_file" and "not created by edge-agent" in steps[1].refused


def test_plan_changes_priority_and_swappiness_and_reports_missing_zram():
    active = [SwapDevice("/var/swap.edge-agent", "file", 512 * MiB, 0, 5)]
    steps = plan(desired(policy="file", file_mb=512, swappiness=100), Record([ours(prio=5)]),
                 world(active=active, files=file_there()))  # fmt: skip
    assert ops(steps) == [("remove_file", "/var/swap.edge-agent", True), ("create_file", "/var/swap.edge-agent", True),
                          ("set_swappiness", "vm.swappiness", True)]  # fmt: skip
    steps = plan(desired(policy="zram", zram_mb=64), Record(), world(zram=False))
    assert steps[0].op == "create_zram" and steps[0].refused == "no zram module"


# ------------------------------------------------------------------------------- the desired file


def test_desired_file_round_trip_and_only_sizes_priorities_policy(tmp_path):
    wanted = SwapSettings(policy="zram", zram_mb=300, swappiness=120, file_path=Path("/elsewhere/swap"))
    path = write_desired(wanted, tmp_path)
    assert path == desired_path(tmp_path) and set(json.loads(path.read_text())) == DESIRED_KEYS
    inode = path.stat().st_ino
    assert write_desired(wanted, tmp_path).stat().st_ino == inode  # unchanged: not rewritten (no spurious apply)
    base = SwapSettings(file_path=Path("/var/swap.edge-agent"))
    merged = load_desired(path, base)
    assert (merged.policy, merged.zram_mb, merged.swappiness) == ("zram", 300, 120)
    assert merged.file_path == Path("/var/swap.edge-agent")  # never from the daemon
    assert load_desired(tmp_path / "absent.json", base) == base


@pytest.mark.parametrize(
    "content, message",
    [('{"file_path": "/etc/passwd"}', "only be set in the root configuration"),
     ('{"record_path": "/tmp/x"}', "only be set in the root configuration"),
     ('{"policy": "zram", "zram_mb": -5}', "invalid desired swap"), ("[1, 2]", "JSON object"),
     ("{not json", "not JSON"), ('{"policy": "x"}', "invalid desired swap"),
     ('{"policy": "' + "x" * 20000 + '"}', "larger than")],
)  # fmt: skip
def test_the_root_side_refuses_a_bad_desired_file(tmp_path, content, message):
    p = tmp_path / "swap-desired.json"
    p.write_text(content)
    with pytest.raises(SwapError) as e:
        load_desired(p, SwapSettings())
    assert message in str(e.value)
    assert "passwd" not in str(e.value) or "file_path" in str(e.value)


def test_a_symlinked_desired_file_is_refused(tmp_path):
    target = tmp_path / "secret"
    target.write_text('{"policy": "none"}')
    link = tmp_path / "swap-desired.json"
    link.symlink_to(target)
    with pytest.raises(SwapError, match="symlink"):
        load_desired(link, SwapSettings())


def test_record_round_trip_and_a_damaged_record(tmp_path):
    rec = Record([ours(), ours("zram", "/dev/zram3", 64 * MiB, 100)])
    path = tmp_path / "r" / "record.json"
    rec.save(path)
    assert (path.stat().st_mode & 0o777) == 0o600
    assert Record.load(path) == rec
    path.write_text("{broken")
    with pytest.raises(SwapError, match="cannot read the swap record"):
        Record.load(path)


def test_cli_dry_run_and_status_need_no_root(tmp_path, capsys, monkeypatch):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[swap]\npolicy = "file"\nfile_mb = 64\nfile_path = "{tmp_path}/swapfile"\nfile_keep_free_mb = 0\n'
                   f'record_path = "{tmp_path}/rec/record.json"\n')  # fmt: skip
    assert main(["swap", "apply", "-c", str(cfg), "--dry-run"]) == 0
    assert f"would create file {tmp_path}/swapfile" in capsys.readouterr().out
    assert not (tmp_path / "swapfile").exists()
    assert main(["swap", "status", "-c", str(cfg), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert all(not d["agent"] for d in status["devices"])
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert main(["swap", "apply", "-c", str(cfg)]) == 2
    assert "needs root" in capsys.readouterr().err


# ------------------------------------------------------------------------------- the units


UNITS = ("edge-agent-swap.service", "edge-agent-swap.path")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_swap_units_verify_and_the_service_is_hardened(tmp_path):
    exe = Path(sys.executable).with_name("edge-agent")
    for name in UNITS:
        text = (ROOT_DIR / "systemd" / name).read_text().replace("/opt/edge-agent/.venv/bin/edge-agent", str(exe))
        (tmp_path / name).write_text(text)
    p = subprocess.run(
        ["systemd-analyze", "verify", *(str(tmp_path / n) for n in UNITS)], capture_output=True, text=True
    )
    assert p.returncode == 0, p.stderr
    service = (ROOT_DIR / "systemd" / UNITS[0]).read_text()
    assert "swap apply --config /etc/edge-agent/config.toml --desired /var/lib/edge-agent/swap-desired.json" in service
    assert "PathChanged=/var/lib/edge-agent/swap-desired.json" in (ROOT_DIR / "systemd" / UNITS[1]).read_text()
    p = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(tmp_path / UNITS[0])],
                       capture_output=True, text=True)  # fmt: skip
    import re

    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", p.stdout + p.stderr)
    if m is None:
        pytest.skip("this systemd-analyze cannot score units offline")
    print(f"edge-agent-swap.service exposure: {m.group(1)}")
    assert float(m.group(1)) <= 3.0  # root with CAP_SYS_ADMIN: swapon needs it


# ------------------------------------------------------------------------------- for real, as root


def _can_swap() -> str | None:
    if os.geteuid() != 0:
        return "needs root (swapon)"
    if not Path("/proc/swaps").exists():
        return "this kernel has no swap support"
    for tool in ("mkswap", "swapon", "swapoff", "fallocate", "dd"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


root_swap = pytest.mark.skipif(_can_swap() is not None, reason=_can_swap() or "")


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[SwapManager]:
    """A manager with its record under tmp_path; whatever it created is switched off and removed at
    teardown, whether the test passed or not."""
    m = SwapManager(tmp_path / "rec" / "record.json")
    yield m
    try:
        rec = Record.load(m.record_path)
    except SwapError:
        rec = Record()
    for e in rec.entries:
        subprocess.run(["swapoff", e.path], capture_output=True)
        if e.kind == "zram" and e.zram_index is not None:
            m._zram_release(e.zram_index)
    for d in swaps():
        if d.path.startswith(str(tmp_path)):
            subprocess.run(["swapoff", d.path], capture_output=True)


def file_settings(tmp_path: Path, mb: int, **kw) -> SwapSettings:
    return SwapSettings(policy="file", file_mb=mb, file_path=tmp_path / "swapfile", file_keep_free_mb=0,
                        swappiness=None, **kw)  # fmt: skip


def active(path: Path | str) -> SwapDevice | None:
    return next((d for d in swaps() if d.path == str(path)), None)


@pytest.mark.root
@root_swap
def test_a_swap_file_is_created_resized_and_removed_for_real(tmp_path, manager):
    r = manager.apply(file_settings(tmp_path, 16))
    assert r.ok, r.as_dict()
    dev = active(tmp_path / "swapfile")
    assert dev is not None and dev.type == "file" and dev.priority == 10
    assert 15 * MiB < dev.size <= 16 * MiB  # the kernel leaves out the header page
    st = (tmp_path / "swapfile").stat()
    assert st.st_mode & 0o777 == 0o600 and st.st_size == 16 * MiB
    assert "fallocate" in r.outcomes[0].message
    assert manager.apply(file_settings(tmp_path, 16)).outcomes == []  # nothing to do
    status = manager.status()
    assert [d["agent"] for d in status["devices"] if d["path"] == str(tmp_path / "swapfile")] == [True]

    r = manager.apply(file_settings(tmp_path, 24, file_priority=7))
    assert r.ok and [o.step.op for o in r.outcomes] == ["remove_file", "create_file"]
    dev = active(tmp_path / "swapfile")
    assert dev is not None and dev.priority == 7 and 23 * MiB < dev.size <= 24 * MiB

    r = manager.apply(SwapSettings(policy="none", swappiness=None))
    assert r.ok and active(tmp_path / "swapfile") is None and not (tmp_path / "swapfile").exists()
    assert Record.load(manager.record_path).entries == []
    assert not list(tmp_path.glob(".swapfile*"))  # no temporary file left behind


@pytest.mark.root
@root_swap
def test_the_dd_fallback_makes_a_working_swap_file(tmp_path, manager):
    manager.force_dd = True
    r = manager.apply(file_settings(tmp_path, 9))
    assert r.ok and "(dd)" in r.outcomes[0].message
    assert active(tmp_path / "swapfile") is not None
    assert (tmp_path / "swapfile").stat().st_size == 9 * MiB


@pytest.mark.root
@root_swap
def test_refused_when_space_is_short(tmp_path, manager):
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(small)], check=True)
    try:
        s = SwapSettings(policy="file", file_mb=16, file_path=small / "swapfile", file_keep_free_mb=0, swappiness=None)
        r = manager.apply(s)
        assert not r.ok and r.outcomes[0].step.refused and "not enough free space" in r.outcomes[0].message
        assert not any(small.iterdir())  # nothing written
    finally:
        subprocess.run(["umount", str(small)], check=True)


@pytest.mark.root
@root_swap
def test_never_switched_off_while_memory_is_short_and_never_someone_elses(tmp_path, manager):
    assert manager.apply(file_settings(tmp_path, 8)).ok
    # Someone else's swap file next to it: made and enabled by hand.
    foreign = tmp_path / "foreign-swap"
    subprocess.run(["dd", "if=/dev/zero", f"of={foreign}", "bs=1M", "count=8", "status=none"], check=True)
    foreign.chmod(0o600)
    subprocess.run(["mkswap", str(foreign)], check=True, capture_output=True)
    subprocess.run(["swapon", str(foreign)], check=True)
    try:
        # This board's memory as the plan sees it: MemAvailable 5 % (the real /proc otherwise).
        fake = tmp_path / "proc"
        fake.mkdir()
        for name in ("swaps", "sys"):
            (fake / name).symlink_to(f"/proc/{name}")
        (fake / "meminfo").write_text("MemTotal: 1000000 kB\nMemAvailable: 50000 kB\nSwapTotal: 0 kB\nSwapFree: 0 kB\n")
        short = SwapManager(manager.record_path, proc_root=fake)
        r = short.apply(SwapSettings(policy="none", swappiness=None))
        assert not r.ok and "memory is short" in r.outcomes[0].message
        assert active(tmp_path / "swapfile") is not None  # still on
        # memory back: the agent's file goes, the foreign one stays
        r = manager.apply(SwapSettings(policy="none", swappiness=None))
        assert r.ok and [o.step.target for o in r.outcomes] == [str(tmp_path / "swapfile")]
        assert active(tmp_path / "swapfile") is None and active(foreign) is not None
        assert [d["agent"] for d in manager.status()["devices"] if d["path"] == str(foreign)] == [False]
    finally:
        subprocess.run(["swapoff", str(foreign)], capture_output=True)


@pytest.mark.root
@root_swap
def test_a_file_at_the_path_that_the_agent_did_not_create_is_left_alone(tmp_path, manager):
    (tmp_path / "swapfile").write_bytes(b"precious data")
    r = manager.apply(file_settings(tmp_path, 8))
    assert not r.ok and "not created by edge-agent" in r.outcomes[0].message
    assert (tmp_path / "swapfile").read_bytes() == b"precious data"


@pytest.mark.root
@pytest.mark.skipif(_can_swap() is not None or not Path("/sys/class/zram-control/hot_add").exists(),
                    reason=_can_swap() or "no zram module (zram-control)")  # fmt: skip
def test_zram_is_created_and_removed_for_real(tmp_path, manager):
    s = SwapSettings(policy="zram", zram_mb=8, zram_priority=90, swappiness=None)
    r = manager.apply(s)
    assert r.ok, r.as_dict()
    rec = Record.load(manager.record_path)
    assert len(rec.entries) == 1 and rec.entries[0].kind == "zram" and rec.entries[0].boot_id == manager.boot_id()
    dev = active(rec.entries[0].path)
    assert dev is not None and dev.priority == 90 and 7 * MiB < dev.size <= 8 * MiB
    r = manager.apply(SwapSettings(policy="none", swappiness=None))
    assert r.ok and active(rec.entries[0].path) is None
    assert not Path(f"/sys/block/zram{rec.entries[0].zram_index}").exists()  # hot-removed


@pytest.mark.skipif(
    shutil.which("setpriv") is None or os.geteuid() != 0, reason="needs root and setpriv to drop capabilities"
)
def test_status_without_the_right_to_read_the_record_still_lists_devices(tmp_path):
    rec = tmp_path / "rec"
    rec.mkdir(mode=0o700)
    Record([ours()]).save(rec / "record.json")
    os.chown(rec, 65534, 65534)  # someone else's folder: a process without CAP_DAC_* cannot enter it
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[swap]\nrecord_path = "{rec}/record.json"\n')
    p = subprocess.run(["setpriv", "--bounding-set=-all", "--inh-caps=-all", sys.executable, "-m", "agent", "swap",
                        "status", "-c", str(cfg)], capture_output=True, text=True, cwd=ROOT_DIR, timeout=60)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "only root may read the swap record" in p.stdout and "vm.swappiness" in p.stdout
