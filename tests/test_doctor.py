"""`edge-agent doctor`: each check with fixtures (kernel files, cpuinfo, systemctl answers), and the
broken boards the issue names, for real: a bad config, a missing model, a broker that is down (or
refuses the password), a store that cannot be written. Every FAIL carries its one-line fix and makes
the command exit 1."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from agent.config import Settings, load_settings
from agent.ops import doctor as d
from agent.system.memory import CgroupMemory, MemInfo, PsiMemory
from tests.broker import MosquittoBroker, free_port
from tests.daemon_harness import to_toml

EDGE_AGENT = [sys.executable, "-m", "agent"]
MiB = 1024 * 1024
FIXTURES = Path(__file__).parent / "fixtures" / "doctor"


# ------------------------------------------------------------------------------------ a board


def write_config(folder: Path, model_file: Path, *, port: int, **over: dict) -> Path:
    models = folder / "models"
    models.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_file, models / "model.gguf")
    data = {
        "device": {"id": "doc-a", "state_dir": str(folder / "state"), "models_dir": str(models)},
        "mqtt": {"host": "127.0.0.1", "port": port},
        "model": {"path": "model.gguf"},
        "engine": {"n_ctx": 512, "load_mode": "fit"},
        "memory": {"budget_mb": 512},
    }
    for k, v in over.items():
        data.setdefault(k, {}).update(v)
    (folder / "state").mkdir(exist_ok=True)
    path = folder / "config.toml"
    path.write_text(to_toml(data))
    return path


def doctor(config: Path, *extra: str) -> tuple[int, dict]:
    p = subprocess.run([*EDGE_AGENT, "doctor", "-c", str(config), "--json", "--timeout", "3", *extra],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    return p.returncode, json.loads(p.stdout)


def by_name(doc: dict) -> dict[str, dict]:
    return {c["name"]: c for c in doc["checks"]}


def test_a_healthy_board_has_no_fail(tmp_path: Path, tiny_model: Path, broker: MosquittoBroker):
    cfg = write_config(tmp_path, tiny_model, port=broker.port)
    code, doc = doctor(cfg)
    checks = by_name(doc)
    assert code == 0 and doc["ok"], [c for c in doc["checks"] if c["status"] == "FAIL"]
    for name in ("config", "model", "memory plan", "broker", "store", "disk (store)", "clock"):
        assert checks[name]["status"] == "OK", checks[name]
    assert "fits: fit mode" in checks["memory plan"]["summary"] and "n_ctx 512" in checks["memory plan"]["summary"]
    assert checks["model sha256"]["status"] == "WARN"  # not configured: says how to set it
    assert "sha256sum" in checks["model sha256"]["fix"]


def test_text_output_shows_status_name_and_fix(tmp_path: Path, tiny_model: Path):
    cfg = write_config(tmp_path, tiny_model, port=free_port())
    p = subprocess.run([*EDGE_AGENT, "doctor", "-c", str(cfg), "--timeout", "2"], capture_output=True, text=True)
    assert p.returncode == 1
    broker_line = next(line for line in p.stdout.splitlines() if line.startswith("FAIL") and "broker" in line)
    fix_line = p.stdout.splitlines()[p.stdout.splitlines().index(broker_line) + 1]
    assert fix_line.strip().startswith("fix: start the broker")
    last = p.stdout.rstrip().splitlines()[-1]
    assert last.startswith(tuple("0123456789")) and " OK, " in last and " FAIL" in last and not last.endswith(" 0 FAIL")


# ------------------------------------------------------------------------------------ the four failures


def test_bad_config_fails_with_the_key_and_the_fix(tmp_path: Path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[engine]\nn_ctx = "huge"\n[mqtt]\nprot = 1883\n')
    code, doc = doctor(cfg)
    c = by_name(doc)["config"]
    assert code == 1 and c["status"] == "FAIL"
    assert "engine.n_ctx" in c["summary"] and "mqtt.prot" in c["summary"]
    assert "edge-agent config validate" in c["fix"]
    assert by_name(doc)["model"]["status"] == "SKIP"


def test_missing_model_fails_with_where_to_put_it(tmp_path: Path, tiny_model: Path, broker: MosquittoBroker):
    cfg = write_config(tmp_path, tiny_model, port=broker.port, model={"path": "gone.gguf"})
    code, doc = doctor(cfg)
    c = by_name(doc)["model"]
    assert code == 1 and c["status"] == "FAIL" and "gone.gguf" in c["summary"]
    assert str(tmp_path / "models") in c["fix"] and "copy the GGUF model" in c["fix"]
    assert by_name(doc)["memory plan"]["status"] == "SKIP"


def test_broker_down_fails_with_the_fix(tmp_path: Path, tiny_model: Path):
    port = free_port()  # nothing listens here
    cfg = write_config(tmp_path, tiny_model, port=port)
    code, doc = doctor(cfg)
    c = by_name(doc)["broker"]
    assert code == 1 and c["status"] == "FAIL"
    assert f"127.0.0.1:{port}" in c["summary"] and "refused" in c["summary"]
    assert c["fix"].startswith("start the broker, or fix mqtt.host / mqtt.port")


def test_broker_refusing_the_password_names_the_credential(tmp_path: Path, tiny_model: Path, broker_factory):
    b = broker_factory("auth", passwords={"dev": "right"}, allow_anonymous=False)
    cfg = write_config(tmp_path, tiny_model, port=b.port, mqtt={"username": "dev", "password": "wrong"})
    code, doc = doctor(cfg)
    c = by_name(doc)["broker"]
    assert code == 1 and c["status"] == "FAIL" and "not authorised" in c["summary"]
    assert "mqtt_password" in c["fix"]
    assert "wrong" not in json.dumps(doc)  # the password is never printed


def test_unwritable_store_fails_with_the_fix(
    tmp_path: Path, tiny_model: Path, broker: MosquittoBroker, readonly_dir: Path
):
    cfg = write_config(tmp_path, tiny_model, port=broker.port, store={"path": str(readonly_dir / "jobs.db")})
    code, doc = doctor(cfg)
    c = by_name(doc)["store"]
    assert code == 1 and c["status"] == "FAIL"
    assert "not writable" in c["summary"]
    assert "Read-only file system" in c["summary"] or "Permission denied" in c["summary"]
    assert "chown -R edge-agent" in c["fix"] and "df -h" in c["fix"]


def test_sha256_mismatch_fails(tmp_path: Path, tiny_model: Path):
    cfg = write_config(tmp_path, tiny_model, port=free_port(), model={"sha256": "0" * 64})
    s = load_settings(cfg, environ={})
    c = d.check_sha256(s)
    assert c.status == "FAIL" and "does not match" in c.summary and "copy the model again" in c.fix


def test_a_model_over_the_budget_fails_with_the_settings_to_change(tmp_path: Path, qwen05_model: Path):
    cfg = write_config(tmp_path, qwen05_model, port=free_port(), memory={"budget_mb": 40},
                       engine={"n_ctx": 4096, "load_mode": "fit"})  # fmt: skip
    c = d.check_fit(load_settings(cfg, environ={}))
    assert c.status == "FAIL" and "will not fit" in c.summary and "engine.n_ctx" in c.fix


# ------------------------------------------------------------------------------------ checks on fixtures

S = Settings()


def test_psi_missing_says_how_to_enable_it_on_a_pi():
    c = d.check_psi(PsiMemory(False, reason="no /proc/pressure"), "console=tty1 root=/dev/mmcblk0p2 psi=0")
    assert c.status == "WARN" and "psi=0" in c.summary
    assert "psi=1" in c.fix and "/boot/firmware/cmdline.txt" in c.fix
    assert d.check_psi(PsiMemory(True, some_avg10=2.5), None).status == "OK"


def test_memory_cgroup_missing_says_how_to_enable_it():
    c = d.check_cgroup(CgroupMemory(None, reason="the kernel has no memory cgroup controller"), "cgroup_disable=memory",
                       of_service=True)  # fmt: skip
    assert c.status == "WARN" and "cgroup_disable=memory" in c.summary
    assert "cgroup_enable=memory cgroup_memory=1" in c.fix
    unlimited = d.check_cgroup(CgroupMemory(2, path="/system.slice/edge-agent.service"), None, of_service=True)
    assert unlimited.status == "WARN" and "systemd render" in unlimited.fix
    ok = d.check_cgroup(CgroupMemory(2, path="/x", limit=1500 * MiB, usage=300 * MiB), None, of_service=True)
    assert ok.status == "OK" and "1500 MiB" in ok.summary


def _mem(swap_total: int = 0, swap_free: int = 0) -> MemInfo:
    return MemInfo(mem_total=2048 * MiB, mem_available=1024 * MiB, mem_free=0, cached=0, swap_total=swap_total,
                   swap_free=swap_free)  # fmt: skip


def test_swap_against_the_policy():
    zram = S.model_copy(update={"swap": S.swap.model_copy(update={"policy": "zram"})})
    c = d.check_swap(zram, _mem(), "Filename Type Size Used Priority\n")
    assert c.status == "WARN" and "edge-agent-swap" in c.fix
    swaps = "Filename\tType\tSize\tUsed\tPriority\n/dev/zram0 partition 1048572 0 100\n"
    assert d.check_swap(zram, _mem(1024 * MiB, 1024 * MiB), swaps).status == "OK"
    assert d.check_swap(S, _mem(), "Filename\n").status == "OK"  # policy none, no swap
    full = d.check_swap(zram, _mem(1024 * MiB, 10 * MiB), swaps)
    assert full.status == "WARN" and "almost full" in full.summary


def test_cpu_cortex_a72_says_what_is_missing():
    cpuinfo = (FIXTURES / "cpuinfo-pi4").read_text()
    c = d.check_cpu("aarch64", cpuinfo, "CPU : NEON = 1 | ARM_FMA = 1 | LLAMAFILE = 1 | REPACK = 1 |")
    assert c.status == "WARN" and "Cortex-A72" in c.summary and "no dotprod, no i8mm" in c.summary
    pi5 = d.check_cpu("aarch64", (FIXTURES / "cpuinfo-pi5").read_text(), "CPU : NEON = 1 | DOTPROD = 1 |")
    assert pi5.status == "OK" and "Cortex-A76" in pi5.summary and "dotprod" in pi5.summary


def test_cpu_build_with_features_the_cpu_lacks_fails():
    c = d.check_cpu(
        "aarch64", (FIXTURES / "cpuinfo-pi4").read_text(), "CPU : NEON = 1 | DOTPROD = 1 | MATMUL_INT8 = 1 |"
    )
    assert (
        c.status == "FAIL"
        and "DOTPROD" in c.summary
        and "MATMUL_INT8" in c.summary
        and "illegal instruction" in c.summary
    )
    assert "GGML_NATIVE" in c.fix


def test_cpu_armv7_and_x86_without_avx2():
    v7 = d.check_cpu(
        "armv7l",
        "processor : 0\nFeatures : half thumb fastmult vfp edsp neon vfpv3 tls vfpv4\nCPU part : 0xd03\n",
        None,
    )
    assert v7.status == "WARN" and "64-bit" in v7.summary and "dotprod" in v7.summary and "Cortex-A53" in v7.summary
    old = d.check_cpu(
        "x86_64", "model name : Old CPU\nflags : fpu sse sse2 pni ssse3 avx\n", "CPU : SSE3 = 1 | AVX = 1 |"
    )
    assert old.status == "WARN" and "no AVX2" in old.summary
    r = d.Readers()  # on aarch64 the features come from HWCAP: under qemu-user /proc/cpuinfo is the host's
    this = d.check_cpu(r.machine(), r.cpuinfo(), r.llama_info(), hwcap=r.hwcap(), variant=r.llama_variant())
    assert this.status in ("OK", "WARN")  # this machine runs the tests, so its build runs here


def test_clock_checks():
    tls = S.model_copy(
        update={"mqtt": S.mqtt.model_copy(update={"tls": S.mqtt.tls.model_copy(update={"enabled": True})})}
    )
    assert d.check_clock(S, 0.0, None).status == "FAIL"  # 1970: a board without RTC and without time sync
    c = d.check_clock(tls, d.CLOCK_FLOOR + 86400, False)
    assert c.status == "WARN" and "set-ntp" in c.fix and "TLS" in c.fix
    assert d.check_clock(S, d.CLOCK_FLOOR + 86400, True).status == "OK"


def _systemctl(stdout: str):
    return lambda args: SimpleNamespace(returncode=0, stdout=stdout, stderr="")


def test_service_states():
    none = d.check_service(lambda args: None, None)
    assert none.status == "WARN" and "systemd is not running here" in none.summary
    missing = d.check_service(_systemctl("LoadState=not-found\nActiveState=inactive\n"), None)
    assert missing.status == "WARN" and "edge-agent install" in missing.fix
    cannot = d.check_service(
        _systemctl("LoadState=loaded\nActiveState=failed\nSubState=failed\nExecMainStatus=78\n"), None
    )
    assert cannot.status == "FAIL" and "exit 78" in cannot.fix
    up = d.check_service(_systemctl("LoadState=loaded\nActiveState=active\nSubState=running\nUnitFileState=enabled\n"
                                    "NRestarts=0\n"), "daemon running: pid 42")  # fmt: skip
    assert up.status == "OK" and "pid 42" in up.summary


def test_disk_below_the_store_minimum_fails(tmp_path: Path):
    s = S.model_copy(update={"device": S.device.model_copy(update={"state_dir": tmp_path, "models_dir": tmp_path}),
                             "store": S.store.model_copy(update={"path": tmp_path / "jobs.db"})})  # fmt: skip
    checks = d.check_disk(s, lambda p: 512 * 1024, model_size=100 * MiB)
    assert checks[0].status == "FAIL" and "store.min_free_kb" in checks[0].summary
    assert checks[1].status == "WARN" and "cannot be delivered" in checks[1].summary
