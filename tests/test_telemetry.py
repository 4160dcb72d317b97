"""The telemetry sampler, its field declaration, events, the table and `edge-agent telemetry`.

Real /proc and /sys of this machine where it has them; fixture trees (tests/fixtures/system/) for
the boards it is not: a stock Pi 4 (no PSI, no memory cgroup, no swap), a Pi 5 with both enabled,
a memory limit, zram and throttling flags, a cgroup v1 hybrid system, an x86 server with a swap file.
"""

from __future__ import annotations

import json
import shutil
from datetime import UTC
from pathlib import Path

import pytest

from agent.cli import main
from agent.system.memory import proc_faults, vmstat
from agent.telemetry import AgentState, Sampler, Telemetry, field_meta
from agent.telemetry.events import Event, EventKind, spool_dropped_event, throttling_event
from agent.telemetry.fields import GROUPS
from agent.telemetry.heat import HeatReader, decode
from agent.telemetry.table import format_value, render
from tests.helpers import Clock

FIXTURES = Path(__file__).parent / "fixtures" / "system"
MiB = 1024 * 1024


def board(tmp_path: Path, name: str) -> Path:
    """A writable copy of a fixture tree (tests change counters between readings)."""
    dst = tmp_path / name
    shutil.copytree(FIXTURES / name, dst)
    return dst


# ------------------------------------------------------------------------------- the declaration


def test_every_field_is_declared_with_a_unit_group_and_description():
    meta = field_meta()
    assert [m[0] for m in meta] == list(Telemetry.model_fields)
    for name, unit, group, desc in meta:
        assert group in GROUPS, f"{name}: group {group!r} is not one of {list(GROUPS)}"
        assert desc.endswith("."), f"{name}: describe it in a sentence"
        if name.endswith("_bytes"):
            assert unit == "bytes", name
        if name.endswith("_pct") or name.startswith(("psi_", "cgroup_psi_")):
            assert unit == "%", name
        if name.endswith("_per_s"):
            assert unit.endswith("/s"), name


def test_the_issue_readings_are_all_there():
    wanted = {
        "mem_total_bytes", "mem_available_bytes", "swap_total_bytes", "swap_used_bytes", "swap_in_bytes_per_s",
        "swap_out_bytes_per_s", "psi_some_avg10", "psi_some_avg60", "psi_full_avg10", "psi_full_avg60",
        "cgroup_psi_some_avg10", "cgroup_psi_full_avg60", "cgroup_limit_bytes", "cgroup_usage_bytes",
        "cgroup_high_bytes", "rss_anon_bytes", "rss_file_bytes", "vm_swap_bytes", "major_faults_per_s",
        "model_resident_pct", "kv_cache_bytes", "kv_cache_fill_pct", "queue_depth", "jobs_running",
        "last_job_tokens_per_s", "governor_level", "store_writable", "soc_temp_c", "cpu_freq_mhz",
        "throttled_flags", "under_voltage", "throttled", "soft_temp_limit",
    }  # fmt: skip
    assert wanted <= set(Telemetry.model_fields)


def test_telemetry_doc_is_generated_from_the_declaration():
    from agent.telemetry import doc

    text = doc.DOC.read_text(encoding="utf-8")
    assert doc.render(text) == text, "docs/telemetry.md is out of date: run python -m agent.telemetry.doc"
    for name in Telemetry.model_fields:
        assert f"`{name}`" in text
    for kind in EventKind:
        assert f"`{kind.value}`" in text


# ------------------------------------------------------------------------------- this machine


def test_a_reading_of_this_machine():
    s = Sampler("dev-1")
    t = s.sample(now=1_700_000_000.0)
    assert t.device_id == "dev-1" and t.ts.tzinfo == UTC and t.ts.timestamp() == 1_700_000_000.0
    assert t.mem_total_bytes > t.mem_available_bytes > 0
    assert 0 < t.mem_available_pct <= 100
    assert t.rss_anon_bytes > MiB and t.rss_file_bytes > 0
    assert t.swap_in_bytes_per_s is None and t.major_faults_per_s is None  # first reading: no rates yet
    # whatever this kernel lacks is null and named, never zero
    assert ("psi" in t.unavailable) == (t.psi_some_avg10 is None)
    assert ("cgroup_memory" in t.unavailable) == (t.cgroup_version is None)
    assert set(t.unavailable) == set(s.unavailable) and all(s.unavailable.values())
    second = s.sample()
    assert second.swap_in_bytes_per_s is not None and second.swap_in_bytes_per_s >= 0
    assert second.major_faults_per_s is not None and second.major_faults_per_s >= 0
    json.loads(second.to_payload())


def test_major_faults_are_counted_when_dropped_file_pages_are_read_back(tmp_path):
    # The mmap'd model's case: pages the kernel dropped are read back from disk as major faults.
    import mmap
    import os

    path = tmp_path / "weights.bin"
    with open(path, "wb") as f:
        f.write(os.urandom(8 * MiB))
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # clean pages: dropped from the page cache
        mono = Clock(1000.0)
        s = Sampler("dev", monotonic=mono)
        s.sample()
        before = proc_faults().major
        with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as m:
            sum(m[i] for i in range(0, len(m), mmap.PAGESIZE))
        faults = proc_faults().major - before
        mono.t += 2.0
        t = s.sample()
    finally:
        os.close(fd)
    assert faults >= 1
    assert t.major_faults_per_s is not None and t.major_faults_per_s >= faults / 2.0
    assert vmstat().pgmajfault >= faults


# ------------------------------------------------------------------------------- fixture boards


def test_stock_pi4_without_psi_memory_cgroup_or_swap(tmp_path):
    t = Sampler("pi4", root=board(tmp_path, "pi4-stock")).sample()
    assert t.mem_total_bytes == 1893320 * 1024 and t.rss_anon_bytes == 41000 * 1024
    assert t.psi_some_avg10 is None and t.cgroup_version is None and t.cgroup_limit_bytes is None
    assert t.swap_total_bytes == 0
    assert set(t.unavailable) == {"psi", "cgroup_memory", "cgroup_psi", "swap"}
    assert (t.soc_temp_c, t.cpu_freq_mhz, t.throttled_flags, t.throttled) == (61.8, 1500.0, 0, False)


def test_pi5_with_memory_cgroup_psi_zram_and_throttling(tmp_path):
    s = Sampler("pi5", root=board(tmp_path, "pi5-throttled"))
    t = s.sample()
    assert (t.cgroup_version, t.cgroup_limit_bytes, t.cgroup_high_bytes) == (2, 1677721600, 1468006400)
    assert t.cgroup_usage_bytes == 1400000000 and t.cgroup_working_set_bytes == 1400000000 - 500000000
    assert t.cgroup_peak_bytes == 1600000000
    assert (t.psi_some_avg10, t.psi_full_avg60) == (12.5, 1.0)
    assert (t.cgroup_psi_some_avg10, t.cgroup_psi_full_avg10) == (20.0, 5.5)
    assert t.swap_used_bytes == (2022500 - 1900000) * 1024 and t.vm_swap_bytes == 2048 * 1024
    assert t.throttled_flags == 0x50005 and t.under_voltage and t.throttled
    assert not t.freq_capped and not t.soft_temp_limit
    assert t.unavailable == [] and s.unavailable == {}


def test_cgroup_v1_hybrid_reads_limit_soft_limit_and_unified_pressure(tmp_path):
    t = Sampler("v1", root=board(tmp_path, "v1-hybrid")).sample()
    assert (t.cgroup_version, t.cgroup_limit_bytes, t.cgroup_high_bytes) == (1, 419430400, 367001600)
    assert t.cgroup_working_set_bytes == 360000000 - 200000000  # total_inactive_file, hierarchical
    assert t.cgroup_psi_some_avg10 == 1.5  # memory.pressure from the unified tree
    assert {"thermal", "cpufreq", "throttling", "swap"} == set(t.unavailable)


def test_x86_server_unlimited_cgroup_swap_file_per_cpu_frequency(tmp_path):
    t = Sampler("srv", root=board(tmp_path, "v2-nolimit-swapfile")).sample()
    assert t.cgroup_version == 2 and t.cgroup_limit_bytes is None and t.cgroup_high_bytes is None
    assert t.soc_temp_c == 45.0  # x86_pkg_temp preferred to acpitz
    assert t.cpu_freq_mhz == 3400.0  # the highest of the CPUs
    assert t.unavailable == ["throttling"]


def test_rates_need_two_readings_and_survive_a_counter_reset(tmp_path):
    root = board(tmp_path, "pi5-throttled")
    mono = Clock(1000.0)
    s = Sampler("pi5", root=root, monotonic=mono)
    first = s.sample()
    assert (first.swap_in_bytes_per_s, first.swap_out_bytes_per_s, first.major_faults_per_s) == (None, None, None)
    page = __import__("mmap").PAGESIZE
    vm = (root / "proc/vmstat").read_text()
    (root / "proc/vmstat").write_text(vm.replace("pswpin 1000", "pswpin 1500").replace("pswpout 5000", "pswpout 5100"))
    st = (root / "proc/self/stat").read_text()
    (root / "proc/self/stat").write_text(st.replace(" 90000 0 4000 ", " 90000 0 4250 "))
    mono.t += 5.0
    second = s.sample()
    assert second.swap_in_bytes_per_s == 500 * page / 5.0
    assert second.swap_out_bytes_per_s == 100 * page / 5.0
    assert second.major_faults_per_s == 50.0
    # counters that went backwards (a wrapped or reset counter): no rate rather than a negative one
    (root / "proc/vmstat").write_text(vm.replace("pswpin 1000", "pswpin 10").replace("pswpout 5000", "pswpout 5200"))
    mono.t += 5.0
    third = s.sample()
    assert third.swap_in_bytes_per_s is None and third.swap_out_bytes_per_s == 100 * page / 5.0


def test_agent_state_and_kv_fill_come_from_the_callback(tmp_path):
    state = AgentState(model_loaded=True, kv_cache_bytes=64 * MiB, kv_cache_size_tokens=2048, kv_cache_used_tokens=512,
                       queue_depth=3, jobs_running=1, running_job="j-1", last_job_tokens_per_s=7.5,
                       governor_level="warn", governor_action="hold_unfit", store_writable=True, spool_rows=0,
                       spool_dropped=0)  # fmt: skip
    t = Sampler("pi4", root=board(tmp_path, "pi4-stock"), agent_state=lambda: state).sample()
    assert t.kv_cache_fill_pct == 25.0 and t.queue_depth == 3 and t.running_job == "j-1"
    assert (t.governor_level, t.governor_action, t.store_writable) == ("warn", "hold_unfit", True)


def test_model_residency_is_read_at_the_lower_rate_and_again_on_a_model_change(tmp_path):
    calls: list[float] = []
    loaded = {"v": True}

    def residency() -> float:
        calls.append(mono.t)
        return 42.0

    mono = Clock(1000.0)
    s = Sampler("pi4", root=board(tmp_path, "pi4-stock"), agent_state=lambda: AgentState(model_loaded=loaded["v"]),
                residency=residency, residency_interval_s=60, monotonic=mono)  # fmt: skip
    for _ in range(6):  # 0, 15, 30, 45, 60, 75 s
        assert s.sample().model_resident_pct == 42.0
        mono.t += 15
    assert calls == [1000.0, 1060.0]
    loaded["v"] = False
    assert s.sample().model_resident_pct is None
    loaded["v"] = True
    assert s.sample().model_resident_pct == 42.0 and len(calls) == 3  # a (re)load is read at once


def test_a_failing_residency_reading_reports_null(tmp_path):
    def broken() -> float:
        raise OSError("model file replaced")

    s = Sampler("pi4", root=board(tmp_path, "pi4-stock"), agent_state=lambda: AgentState(model_loaded=True),
                residency=broken)  # fmt: skip
    assert s.sample().model_resident_pct is None


def test_the_cgroup_is_found_again_when_it_moves(tmp_path):
    root = board(tmp_path, "pi5-throttled")
    s = Sampler("pi5", root=root)
    assert s.sample().cgroup_limit_bytes == 1677721600
    # systemd moved the service into another slice: its old directory is gone
    old = root / "sys/fs/cgroup/system.slice/edge-agent.service"
    new = root / "sys/fs/cgroup/agent.slice/edge-agent.service"
    new.parent.mkdir(parents=True)
    old.rename(new)
    (new / "memory.max").write_text("1000000000\n")
    (root / "proc/self/cgroup").write_text("0::/agent.slice/edge-agent.service\n")
    assert s.sample().cgroup_limit_bytes == 1000000000


# ------------------------------------------------------------------------------- heat


def test_rpi_volt_hwmon_gives_under_voltage_where_get_throttled_is_missing(tmp_path):
    root = tmp_path / "pi-hwmon"
    hw = root / "sys/class/hwmon/hwmon1"
    hw.mkdir(parents=True)
    (hw / "name").write_text("rpi_volt\n")
    (hw / "in0_lcrit_alarm").write_text("1\n")
    r = HeatReader(root).read()
    assert r.throttled_flags == 1 and decode(r.throttled_flags)["under_voltage"] is True
    assert "thermal" in r.reasons and "throttling" not in r.reasons


def test_unknown_flags_decode_to_null():
    assert decode(None) == {"under_voltage": None, "freq_capped": None, "throttled": None, "soft_temp_limit": None}
    assert decode(0x80008)["soft_temp_limit"] is True


# ------------------------------------------------------------------------------- events


def _reading(**kw) -> Telemetry:
    base = {"device_id": "pi", "ts": "2025-03-01T10:00:00Z"}
    return Telemetry.model_validate({**base, **kw})


def test_a_throttling_change_is_an_event_with_the_cost_next_to_it():
    before = _reading(throttled_flags=0, soc_temp_c=70.0)
    now = _reading(throttled_flags=0x50005, soc_temp_c=82.4, last_job_tokens_per_s=3.1)
    e = throttling_event(before, now)
    assert e is not None and e.kind == EventKind.throttling_changed
    assert e.details["started"] == ["under-voltage", "throttled"] and e.details["ended"] == []
    assert "82.4" in e.message and "3.1 tokens/s" in e.message
    assert e.readings == now
    assert throttling_event(now, now) is None  # no change, no event
    # only the history bits changed (16-19): not a change of the state now
    assert throttling_event(_reading(throttled_flags=0x5), _reading(throttled_flags=0x50005)) is None
    ended = throttling_event(now, _reading(throttled_flags=0x50000))
    assert ended is not None and ended.details["ended"] == ["under-voltage", "throttled"]
    assert throttling_event(None, _reading(throttled_flags=None)) is None  # a board without the flags


def test_spool_drop_event_and_payload_roundtrip():
    assert spool_dropped_event(0, 0, device_id="pi", ts=1.0) is None
    e = spool_dropped_event(12, 1, device_id="pi", ts=1_700_000_000.0)
    assert e is not None and e.details == {"readings": 12, "events": 1}
    again = Event.model_validate_json(e.to_payload())
    assert again == e
    assert json.loads(e.to_payload())["ts"].endswith("Z")


# ------------------------------------------------------------------------------- table and CLI


def test_values_are_formatted_by_their_unit():
    assert format_value(None, "bytes") == "-"
    assert format_value(3 * MiB + MiB // 2, "bytes") == "3.5 MiB"
    assert format_value(2048.0, "bytes/s") == "2.0 KiB/s"
    assert format_value(12.5, "%") == "12.5 %"
    assert format_value(True, "") == "yes"
    assert format_value(["psi", "swap"], "") == "psi, swap"


def test_the_table_shows_every_field_and_why_readings_are_missing(tmp_path):
    s = Sampler("pi4", root=board(tmp_path, "pi4-stock"))
    text = render(s.sample(), unavailable=s.unavailable)
    for name in Telemetry.model_fields:
        if name not in ("device_id", "ts"):
            assert name in text
    assert "cgroup_enable=memory" in text and "psi=1" in text


def test_cli_prints_a_table_and_json(capsys):
    assert main(["telemetry", "--window", "0"]) == 0
    out = capsys.readouterr().out
    assert "mem_available_bytes" in out and "System memory and swap" in out and "note:" in out
    assert main(["telemetry", "--watch", "--count", "2", "--interval", "0.05", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    first, second = (json.loads(x) for x in lines)
    assert first["swap_in_bytes_per_s"] is None and second["swap_in_bytes_per_s"] is not None
    Telemetry.model_validate(second)


def test_cli_rejects_a_bad_interval(capsys):
    with pytest.raises(SystemExit) as e:
        main(["telemetry", "--watch", "--interval", "0"])
    assert e.value.code == 2
