"""The offline aarch64 bundle (packaging/): its manifest, its signature and install.sh's refusals, the
`edge-agent bundle` command, and the HWCAP reading doctor's cpu check uses on ARM. Fast and local: a small
fake bundle, no wheels built, nothing installed. The proof on an emulated arm64 board is
tests/test_bundle_arm64.py (opt-in)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

from agent.cli import bundle_cmd, main
from agent.ops.doctor import check_cpu
from agent.signing import generate_key
from agent.system import cpu

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(shutil.which("sha256sum") is None, reason="needs coreutils' sha256sum")


def _bundle_module() -> ModuleType:
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


def _install(
    bundle: Path, prefix: Path, *extra: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(bundle / "install.sh"), "--prefix", str(prefix), *extra, "--no-service"],
                          capture_output=True, text=True, timeout=60, check=False, env=env)  # fmt: skip


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


# ------------------------------------------------------------------------------ the signature (issue 20, point 4)

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="install.sh verifies with openssl")


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Two operator keys as `edge-agent keys generate` writes them: name -> (private key file, public key text)."""
    out = {}
    for name in ("operator", "other"):
        (tmp_path / "keys").mkdir(exist_ok=True)
        private = tmp_path / "keys" / name
        out[name] = (private, generate_key(private)[1])
    return out


def _sign(bundle: Path, private: Path) -> str:
    return str(_bundle_module().sign_manifest(bundle, private))


def test_signature_covers_the_manifest_and_names_its_key(bundle: Path, keys: dict[str, tuple[Path, str]]) -> None:
    mod = _bundle_module()
    (private, public), (_, other) = keys["operator"], keys["other"]
    kid = _sign(bundle, private)
    fields = (bundle / "MANIFEST.sha256.sig").read_text().split()
    assert fields[:2] == ["edge-agent/bundle-signature/v1", kid] and len(fields) == 3
    assert mod.verify_signature(bundle, [public]) is None
    assert mod.verify_signature(bundle, [other, public]) is None  # rotation: either trusted key
    assert "does not trust" in str(mod.verify_signature(bundle, [other]))
    assert "MANIFEST.sha256.sig" not in mod.bundle_files(bundle)  # signed after the manifest, not listed in it
    assert mod.verify_manifest(bundle) == []
    with open(bundle / "MANIFEST.sha256", "a") as f:
        f.write(f"{'0' * 64}  wheels/evil-1.0-py3-none-any.whl\n")
    assert "does not verify" in str(mod.verify_signature(bundle, [public]))


@needs_openssl
@pytest.mark.skipif(os.uname().machine == "aarch64", reason="on aarch64 the intact bundle would go on installing")
@pytest.mark.parametrize("given", ["text", "file", "two keys"])
def test_install_accepts_the_trusted_signature_then_checks_the_files(
    bundle: Path, tmp_path: Path, keys: dict[str, tuple[Path, str]], given: str
) -> None:
    (private, public), (_, other) = keys["operator"], keys["other"]
    kid = _sign(bundle, private)
    prefix = tmp_path / "opt" / "edge-agent"
    trusted = {"text": ["--trusted-key", public], "file": [f"--trusted-key={private}.pub"],
               "two keys": ["--trusted-key", other, "--trusted-key", public]}[given]  # fmt: skip
    p = _install(bundle, prefix, *trusted)
    assert f"MANIFEST.sha256 is signed by trusted key {kid}" in p.stdout, p.stdout + p.stderr
    assert "all files match" in p.stdout  # then the manifest; it stops only at the x86 machine check
    assert "for 64-bit ARM (aarch64)" in p.stderr and not prefix.exists()


@needs_openssl
@pytest.mark.parametrize("attack", ["unsigned", "wrong key", "manifest edited", "wheel and manifest", "signature altered",
                                    "signature truncated", "signature of another bundle", "garbage"])  # fmt: skip
def test_install_with_a_trusted_key_refuses_a_bad_signature_before_writing_anything(
    bundle: Path, tmp_path: Path, keys: dict[str, tuple[Path, str]], attack: str
) -> None:
    mod = _bundle_module()
    (private, public), (other_private, _) = keys["operator"], keys["other"]
    sig = bundle / "MANIFEST.sha256.sig"
    if attack == "wrong key":
        _sign(bundle, other_private)
    elif attack == "signature of another bundle":
        other = tmp_path / "other-bundle"
        shutil.copytree(bundle, other)
        (other / "requirements.txt").write_text("numpy==1.0.0\n")
        mod.write_manifest(other)
        _sign(other, private)
        shutil.copy2(other / "MANIFEST.sha256.sig", sig)
    elif attack != "unsigned":
        _sign(bundle, private)
        fmt, kid, b64 = sig.read_text().split()
        if attack == "manifest edited":  # a line removed: the sha256 check alone would pass without that file
            lines = (bundle / "MANIFEST.sha256").read_text().splitlines(keepends=True)
            (bundle / "MANIFEST.sha256").write_text("".join(lines[1:]))
        elif attack == "wheel and manifest":  # what someone who can rewrite the bundle but has no key does
            wheel = bundle / "wheels" / "numpy-2.0.0-cp311-cp311-manylinux_2_17_aarch64.whl"
            wheel.write_bytes(b"PK evil")
            mod.write_manifest(bundle)
            assert mod.verify_manifest(bundle) == []
        elif attack == "signature altered":
            b64 = ("A" if b64[0] != "A" else "B") + b64[1:]
            sig.write_text(f"{fmt} {kid} {b64}\n")
        elif attack == "signature truncated":
            sig.write_text(f"{fmt} {kid} {b64[:40]}\n")
        else:
            sig.write_text("not a signature\n")
    prefix = tmp_path / "opt" / "edge-agent"
    p = _install(bundle, prefix, "--trusted-key", public)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "Nothing was installed." in p.stderr, p.stderr
    assert "all files match" not in p.stdout  # refused before the manifest check, and before any write
    assert not prefix.exists() and not prefix.parent.exists()
    reason = {"unsigned": "it is not signed", "wrong key": "which is not a trusted key",
              "signature truncated": "not the base64 of 64 bytes", "garbage": "is not one line"}  # fmt: skip
    assert reason.get(attack, "does not verify") in p.stderr, p.stderr


def test_install_without_a_key_says_the_signature_was_not_checked(
    bundle: Path, tmp_path: Path, keys: dict[str, tuple[Path, str]]
) -> None:
    kid = _sign(bundle, keys["operator"][0])
    p = _install(bundle, tmp_path / "opt" / "edge-agent")
    assert f"the bundle is signed (key {kid}); not checked: no --trusted-key given" in p.stdout


def test_install_refuses_a_malformed_trusted_key(
    bundle: Path, tmp_path: Path, keys: dict[str, tuple[Path, str]]
) -> None:
    _sign(bundle, keys["operator"][0])
    for bad, says in (("ed25519:AAAA", "not an Ed25519 public key"), (str(tmp_path / "nope.pub"), "nor a file")):
        p = _install(bundle, tmp_path / "opt" / "edge-agent", "--trusted-key", bad)
        assert p.returncode == 1 and says in p.stderr, p.stderr
        assert not (tmp_path / "opt").exists()


# ------------------------------------------------------------------------------ edge-agent bundle


def test_bundle_command_is_packaging_bundle_py(capsys: pytest.CaptureFixture[str]) -> None:
    assert bundle_cmd.bundle_script() == REPO / "packaging" / "bundle.py"
    with pytest.raises(SystemExit) as e:
        main(["bundle", "--help"])  # reaches bundle.py's own parser: its options, under the command's name
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: edge-agent bundle") and "--demo-model" in out and "--key KEY" in out
    with pytest.raises(SystemExit) as e:
        main(["bundle", "--python", "2.7"])
    assert e.value.code == 2 and "invalid choice: '2.7'" in capsys.readouterr().err


def test_bundle_command_from_an_installed_wheel_says_to_use_a_checkout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    site = tmp_path / "site-packages" / "agent"
    site.mkdir(parents=True)
    assert bundle_cmd.bundle_script(site) is None
    monkeypatch.setattr(bundle_cmd, "bundle_script", lambda: None)
    assert main(["bundle", "--demo-model"]) == 1
    assert "runs from a checkout of the repository" in capsys.readouterr().err


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


PI4_CPUINFO = ("processor\t: 0\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU implementer\t: 0x41\n"
               "CPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n")  # fmt: skip


def test_qemu_user_is_told_from_a_board_by_the_hosts_cpuinfo() -> None:
    assert cpu.qemu_user_emulated("aarch64", X86_CPUINFO)  # the emulated board: aarch64 with the host's x86 file
    assert not cpu.qemu_user_emulated("aarch64", PI4_CPUINFO)  # a Raspberry Pi 4
    assert not cpu.qemu_user_emulated("aarch64", "")  # nothing to go on: not emulated, so the tests stay strict
    assert not cpu.qemu_user_emulated("x86_64", X86_CPUINFO)
