"""The offline aarch64 bundle (packaging/): its manifest and install.sh's refusals, and the HWCAP reading
doctor's cpu check uses on ARM. Fast and local: a small fake bundle, no wheels built, nothing installed.
The proof on an emulated arm64 board is tests/test_bundle_arm64.py (opt-in)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from agent.ops.doctor import check_cpu
from agent.system import cpu

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(shutil.which("sha256sum") is None, reason="needs coreutils' sha256sum")


def _bundle_module():
    spec = importlib.util.spec_from_file_location("edge_agent_bundle", REPO / "packaging" / "bundle.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    """A bundle as bundle.py lays it out, with stand-in wheels, and its manifest."""
    root = tmp_path / "edge-agent-0.1.0-aarch64-py311"
    (root / "wheels").mkdir(parents=True)
    (root / "wheels" / "numpy-2.0.0-cp311-cp311-manylinux_2_17_aarch64.whl").write_bytes(os.urandom(4096))
    (root / "wheels" / "edge_agent-0.1.0-py3-none-any.whl").write_bytes(b"PK stand-in")
    (root / "requirements.txt").write_text("numpy==2.0.0\n")
    shutil.copytree(REPO / "systemd", root / "systemd")
    shutil.copytree(REPO / "firmware-config", root / "firmware-config")
    text = (REPO / "packaging" / "install.sh").read_text().replace("@PYTHON@", "3.11").replace("@VERSION@", "0.1.0")
    (root / "install.sh").write_text(text)
    _bundle_module().write_manifest(root)
    return root


def _install(bundle: Path, prefix: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(bundle / "install.sh"), "--prefix", str(prefix), "--no-service"],
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip


def test_manifest_lists_every_file_and_verifies(bundle: Path) -> None:
    mod = _bundle_module()
    listed = [line.split("  ", 1)[1] for line in (bundle / "MANIFEST.sha256").read_text().splitlines()]
    assert listed == mod.bundle_files(bundle)
    assert "install.sh" in listed and "wheels/numpy-2.0.0-cp311-cp311-manylinux_2_17_aarch64.whl" in listed
    assert mod.verify_manifest(bundle) == []
    # sha256sum reads the same file: the board checks it with coreutils alone.
    subprocess.run(["sha256sum", "--strict", "--quiet", "-c", "MANIFEST.sha256"], cwd=bundle, check=True)


@pytest.mark.parametrize("tamper", ["changed", "missing", "extra", "install.sh"])
def test_install_refuses_a_tampered_bundle_before_writing_anything(bundle: Path, tmp_path: Path, tamper: str) -> None:
    wheel = bundle / "wheels" / "numpy-2.0.0-cp311-cp311-manylinux_2_17_aarch64.whl"
    if tamper == "changed":
        data = bytearray(wheel.read_bytes())
        data[1000] ^= 1
        wheel.write_bytes(bytes(data))
    elif tamper == "missing":
        wheel.unlink()
    elif tamper == "extra":
        (bundle / "wheels" / "evil-1.0-py3-none-any.whl").write_bytes(b"PK")
    else:  # the installer itself, after the manifest check it would run
        with open(bundle / "install.sh", "a") as f:
            f.write("\ntouch /tmp/pwned\n")
    problems = _bundle_module().verify_manifest(bundle)
    assert len(problems) == 1 and problems[0].startswith({"changed": "changed", "missing": "missing", "extra": "extra",
                                                          "install.sh": "changed"}[tamper])  # fmt: skip
    prefix = tmp_path / "opt" / "edge-agent"
    p = _install(bundle, prefix)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "nothing was installed" in p.stderr
    assert not prefix.exists() and not prefix.parent.exists()


@pytest.mark.skipif(os.uname().machine == "aarch64", reason="on aarch64 the intact bundle would go on installing")
def test_intact_bundle_on_another_machine_says_what_to_run_instead(bundle: Path, tmp_path: Path) -> None:
    prefix = tmp_path / "opt" / "edge-agent"
    p = _install(bundle, prefix)
    assert p.returncode == 1
    assert "all files match" in p.stdout
    assert "for 64-bit ARM (aarch64)" in p.stderr and "32-bit Raspberry Pi OS (armhf) is not supported" in p.stderr
    assert "Raspberry Pi OS (64-bit)" in p.stderr
    assert not prefix.exists()


def test_platform_tags_cover_bookworm_glibc_and_the_cross_built_wheel() -> None:
    platforms = _bundle_module().PLATFORMS
    assert "manylinux2014_aarch64" in platforms and "manylinux_2_17_aarch64" in platforms
    assert "manylinux_2_28_aarch64" in platforms and "manylinux_2_36_aarch64" in platforms  # numpy 2.x: 2_28
    assert "manylinux_2_37_aarch64" not in platforms  # bookworm's glibc is 2.36
    assert "linux_aarch64" in platforms


# ------------------------------------------------------------------------------ HWCAP and the CPU variant

HWCAP_FP, HWCAP_ASIMD, HWCAP_ASIMDHP, HWCAP_ASIMDDP = 1 << 0, 1 << 1, 1 << 10, 1 << 20
HWCAP2_I8MM = 1 << 13
X86_CPUINFO = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) CPU @ 2.20GHz\nflags\t\t: fpu sse avx2 fma\n"
LLAMA_A76 = "CPU : NEON = 1 | ARM_FMA = 1 | FP16_VA = 1 | DOTPROD = 1 | LLAMAFILE = 1 | REPACK = 1 |"


def test_decode_hwcap_names_the_kernel_flags() -> None:
    a72 = cpu.decode_hwcap(HWCAP_FP | HWCAP_ASIMD, 0)
    assert a72 == {"fp", "asimd"}
    a76 = cpu.decode_hwcap(HWCAP_FP | HWCAP_ASIMD | HWCAP_ASIMDHP | HWCAP_ASIMDDP, 0)
    assert {"asimddp", "asimdhp"} <= a76 and "i8mm" not in a76
    assert "i8mm" in cpu.decode_hwcap(HWCAP_ASIMD, HWCAP2_I8MM)


def test_hwcap_is_only_read_on_aarch64() -> None:
    assert cpu.hwcap_flags("x86_64") is None
    if os.uname().machine == "aarch64":
        flags = cpu.hwcap_flags()
        assert flags is not None and "asimd" in flags


def test_llama_cpu_variant_from_the_process_maps() -> None:
    maps = ("7f0000-7f1000 r-xp 00000000 fe:01 123 /opt/edge-agent/.venv/lib/python3.11/site-packages/llama_cpp/lib/"
            "libggml-base.so\n7f2000-7f3000 r-xp 00000000 fe:01 124 /opt/edge-agent/.venv/lib/python3.11/"
            "site-packages/llama_cpp/lib/libggml-cpu-armv8.2_2.so\n")  # fmt: skip
    assert cpu.llama_cpu_variant(maps) == "armv8.2_2"
    assert cpu.llama_cpu_variant("7f0000-7f1000 r-xp 0 fe:01 1 /x/llama_cpp/lib/libggml-cpu.so\n") is None


def test_doctor_takes_arm_features_from_hwcap_not_the_emulators_cpuinfo() -> None:
    # Under qemu-user /proc/cpuinfo is the x86 host's: HWCAP is the emulated Cortex-A76's.
    hwcap = cpu.decode_hwcap(HWCAP_FP | HWCAP_ASIMD | HWCAP_ASIMDHP | HWCAP_ASIMDDP, 0)
    c = check_cpu("aarch64", X86_CPUINFO, LLAMA_A76, hwcap=hwcap, variant="armv8.2_2")
    assert c.status == "OK", c
    assert "Intel" not in c.summary
    assert "HWCAP: asimd, asimddp, asimdhp" in c.summary and "dotprod" in c.summary
    assert "CPU variant armv8.2_2" in c.summary
    assert "llama.cpp build: ARM_FMA, DOTPROD, FP16_VA, NEON" in c.summary  # "CPU : NEON = 1 | ...": NEON too


def test_doctor_a72_on_the_plain_variant_is_a_warning_with_nothing_to_fix() -> None:
    hwcap = cpu.decode_hwcap(HWCAP_FP | HWCAP_ASIMD, 0)
    c = check_cpu("aarch64", "processor\t: 0\nCPU part\t: 0xd08\n", "CPU : NEON = 1 | ARM_FMA = 1 |", hwcap=hwcap,
                  variant="armv8.0_1")  # fmt: skip
    assert c.status == "WARN" and "Cortex-A72" in c.summary and "no dotprod" in c.summary
    assert c.fix is not None and "picked the variant for this CPU" in c.fix
