"""What this ARM CPU can do as the kernel tells the process (the HWCAP words of the auxiliary vector, read
with getauxval), and which of ggml's CPU variants llama.cpp loaded.

The features come from HWCAP, not /proc/cpuinfo: on a board both agree, but under qemu-user (the emulated
board of packaging/prove-arm64.sh) /proc/cpuinfo is the host's x86 file while getauxval answers for the
emulated CPU (QEMU_CPU=cortex-a72 ...). The names are the kernel's, as /proc/cpuinfo spells them.
"""

from __future__ import annotations

import ctypes
import platform
import re

AT_HWCAP = 16
AT_HWCAP2 = 26
# arch/arm64/include/uapi/asm/hwcap.h: the bits llama.cpp's ARM kernels care about.
_HWCAP = {1 << 0: "fp", 1 << 1: "asimd", 1 << 9: "fphp", 1 << 10: "asimdhp", 1 << 12: "asimdrdm",
          1 << 20: "asimddp", 1 << 22: "sve"}  # fmt: skip
_HWCAP2 = {1 << 1: "sve2", 1 << 13: "i8mm", 1 << 14: "bf16", 1 << 23: "sme"}
# ggml's runtime-selected CPU backends (GGML_BACKEND_DL + GGML_CPU_ALL_VARIANTS) are separate libraries.
_VARIANT = re.compile(r"/libggml-cpu-([A-Za-z0-9_.]+)\.so\b")


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def decode_hwcap(hwcap: int, hwcap2: int) -> set[str]:
    return {name for bit, name in _HWCAP.items() if hwcap & bit} | {
        name for bit, name in _HWCAP2.items() if hwcap2 & bit
    }


def hwcap_flags(machine: str | None = None) -> set[str] | None:
    """The aarch64 feature flags of this process's CPU; None on other machines or without getauxval."""
    if (machine or platform.machine()) != "aarch64":
        return None
    try:
        getauxval = ctypes.CDLL(None).getauxval
    except (OSError, AttributeError):
        return None
    getauxval.argtypes = [ctypes.c_ulong]
    getauxval.restype = ctypes.c_ulong
    return decode_hwcap(getauxval(AT_HWCAP), getauxval(AT_HWCAP2))


def qemu_user_emulated(machine: str | None = None, cpuinfo: str | None = None) -> bool:
    """True when this aarch64 process runs under qemu-user on an x86 host (the emulated board of
    packaging/prove-arm64.sh): the machine is aarch64 while /proc/cpuinfo is an x86 file (qemu-user passes
    the host's through for aarch64 guests: Debian bookworm's qemu 7.2). A real ARM board's /proc/cpuinfo has
    "CPU implementer" and no x86 "vendor_id"/"flags" lines, so this is never true on one."""
    if (machine or platform.machine()) != "aarch64":
        return False
    if cpuinfo is None and (cpuinfo := _read("/proc/cpuinfo")) is None:
        return False
    x86 = re.search(r"^(vendor_id|flags)\s*:", cpuinfo, re.M) is not None
    return x86 and re.search(r"^CPU implementer\s*:", cpuinfo, re.M) is None


def llama_cpu_variant(maps: str | None = None) -> str | None:
    """The ggml CPU variant loaded into this process (armv8.2_2 ...), from /proc/self/maps; None when
    llama.cpp is a single build (one libggml-cpu.so) or not loaded."""
    if maps is None and (maps := _read("/proc/self/maps")) is None:
        return None
    found = _VARIANT.search(maps)
    return found.group(1) if found else None
