"""Board facts for reported (agent.shadow.facts), read from fixture /proc trees."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent import __version__
from agent.shadow.facts import FactsReader, ServingModel, read_cpuinfo, read_swaps, reported_facts

# /proc/cpuinfo of a Raspberry Pi 5 (Cortex-A76, 64-bit Raspberry Pi OS), first and last cores.
PI5_CPUINFO = """\
processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x4
CPU part\t: 0xd0b
CPU revision\t: 1

processor\t: 1
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x4
CPU part\t: 0xd0b
CPU revision\t: 1

processor\t: 2
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU part\t: 0xd0b

processor\t: 3
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU part\t: 0xd0b

Revision\t: d04170
Serial\t\t: 00000000aabbccdd
Model\t\t: Raspberry Pi 5 Model B Rev 1.0
"""

# A Raspberry Pi 4 (Cortex-A72): no dotprod, so llama.cpp has no fast int8 dot kernels there.
PI4_CPUINFO = """\
processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x0
CPU part\t: 0xd08
CPU revision\t: 3

Hardware\t: BCM2835
Revision\t: c03114
Model\t\t: Raspberry Pi 4 Model B Rev 1.4
"""

# A Pi Zero 2 W on 32-bit Raspberry Pi OS (armv7l): NEON is listed as "neon".
ZERO2_ARMV7_CPUINFO = """\
processor\t: 0
model name\t: ARMv7 Processor rev 4 (v7l)
BogoMIPS\t: 38.40
Features\t: half thumb fastmult vfp edsp neon vfpv3 tls vfpv4 idiva idivt vfpd32 lpae evtstrm crc32
CPU implementer\t: 0x41
CPU architecture: 7
CPU part\t: 0xd03

Model\t\t: Raspberry Pi Zero 2 W Rev 1.0
"""

X86_CPUINFO = """\
processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8488C
flags\t\t: fpu vme sse sse2 ssse3 fma cx16 sse4_1 sse4_2 avx f16c avx2 avx512f avx512bw avx512_vnni avx_vnni amx_int8 amx_tile

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8488C
flags\t\t: fpu vme sse sse2 ssse3 fma cx16 sse4_1 sse4_2 avx f16c avx2 avx512f avx512bw avx512_vnni avx_vnni amx_int8 amx_tile
"""

SWAPS = """\
Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority
/dev/zram0                              partition\t1015804\t\t1024\t\t100
/var/swap                               file\t\t102396\t\t0\t\t-2
"""

MEMINFO = "MemTotal:        8245392 kB\nMemFree:         7000000 kB\nMemAvailable:    7500000 kB\n"
PSI = "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"


@pytest.mark.parametrize(
    "text, machine, model, cores, features",
    [
        (PI5_CPUINFO, "aarch64", "Raspberry Pi 5 Model B Rev 1.0 (Cortex-A76)", 4, ["neon", "dotprod", "fp16"]),
        (PI4_CPUINFO, "aarch64", "Raspberry Pi 4 Model B Rev 1.4 (Cortex-A72)", 1, ["neon"]),
        (ZERO2_ARMV7_CPUINFO, "armv7l", "ARMv7 Processor rev 4 (v7l) (Cortex-A53)", 1, ["neon"]),
        (
            X86_CPUINFO,
            "x86_64",
            "Intel(R) Xeon(R) Platinum 8488C",
            2,
            ["ssse3", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8"],
        ),
    ],
)
def test_cpuinfo(tmp_path: Path, text, machine, model, cores, features):
    f = tmp_path / "cpuinfo"
    f.write_text(text)
    info = read_cpuinfo(f, machine)
    assert (info.model, info.cores, info.features) == (model, cores, features)


def test_swaps(tmp_path: Path):
    (tmp_path / "swaps").write_text(SWAPS)
    devices = read_swaps(tmp_path / "swaps")
    assert [(d.name, d.type, d.size_bytes, d.used_bytes, d.priority) for d in devices] == [
        ("/dev/zram0", "partition", 1015804 * 1024, 1024 * 1024, 100),
        ("/var/swap", "file", 102396 * 1024, 0, -2),
    ]
    assert read_swaps("/nonexistent/swaps") == []


def fake_proc(root: Path, *, psi: bool) -> Path:
    (root / "self").mkdir(parents=True)
    (root / "cpuinfo").write_text(PI5_CPUINFO)
    (root / "meminfo").write_text(MEMINFO)
    (root / "swaps").write_text(SWAPS)
    # cgroup v2 unified hierarchy mounted, but without the memory controller (Raspberry Pi OS default).
    cg = root / "cgroupfs"
    cg.mkdir()
    (cg / "cgroup.controllers").write_text("cpuset cpu io pids\n")
    (root / "self" / "cgroup").write_text("0::/\n")
    (root / "self" / "mountinfo").write_text(f"30 1 0:26 / {cg} rw,nosuid - cgroup2 cgroup2 rw\n")
    if psi:
        (root / "pressure").mkdir()
        (root / "pressure" / "memory").write_text(PSI)
    return root


def test_board_facts_of_a_pi5_without_psi_and_memory_cgroup(tmp_path: Path):
    proc = fake_proc(tmp_path / "proc", psi=False)
    models = tmp_path / "models"
    models.mkdir()
    facts = FactsReader(board="pi5-8gb", models_dir=models, proc_root=proc, machine="aarch64").board_facts()
    assert facts.agent_version == __version__ and facts.board == "pi5-8gb" and facts.machine == "aarch64"
    assert facts.llama_cpp_python == "0.3.36"
    assert facts.cpu.features == ["neon", "dotprod", "fp16"] and facts.cpu.cores == 4
    assert facts.mem_total_bytes == 8245392 * 1024
    assert facts.cgroup_limit_bytes is None and "cgroup_enable=memory" in (facts.cgroup_note or "")
    assert facts.psi is False and "psi=1" in (facts.psi_note or "")
    assert [d.name for d in facts.swap] == ["/dev/zram0", "/var/swap"]
    assert facts.models_free_bytes is not None and facts.models_free_bytes % 2**20 == 0


def test_psi_present_and_a_missing_models_folder(tmp_path: Path):
    proc = fake_proc(tmp_path / "proc", psi=True)
    facts = FactsReader(board="b", models_dir=tmp_path / "gone", proc_root=proc, machine="aarch64").board_facts()
    assert facts.psi is True and facts.psi_note is None and facts.models_free_bytes is None


def test_reported_facts_are_json_and_small(tmp_path: Path):
    proc = fake_proc(tmp_path / "proc", psi=False)
    board = FactsReader(board="pi5-8gb", models_dir=tmp_path, proc_root=proc, machine="aarch64").board_facts()
    serving = ServingModel(file="qwen2.5-0.5b-q4_0.gguf", sha256="a" * 64, load_mode="fit", n_ctx=2048,
                           load_ms=812.5, loaded_at=1.7e9)  # fmt: skip
    out = reported_facts(board, serving)
    text = json.dumps(out)
    assert json.loads(text)["serving"]["n_ctx"] == 2048
    # Facts share the 8 KB state with desired: they must leave most of it to operators.
    assert len(text) < 2048, len(text)
    assert reported_facts(board, None)["serving"] is None


def test_the_running_system_can_be_read(tmp_path: Path):
    facts = FactsReader(board="generic", models_dir=tmp_path).board_facts()
    assert facts.mem_total_bytes > 0 and facts.cpu.cores >= 1
