"""Facts about the board, for the shadow's reported state.

Owns the readers of what an operator needs to judge a board from afar: agent and llama.cpp
versions, board profile, CPU model and the instruction-set features llama.cpp's kernels use (NEON
dotprod and i8mm on ARM; AVX2, AVX-512 on x86), MemTotal, the own memory cgroup limit, whether PSI
is there, the swap devices, and free disk in the models folder. Every reader takes its path, so
tests use fixture files (an ARM /proc/cpuinfo among them). ``ServingModel`` describes the model in
force; the daemon's model supervisor fills it in.

llama.cpp's version is read from the installed package's metadata: importing llama_cpp would load
the shared library (tens of MB) just to print a version.
"""

from __future__ import annotations

import os
import platform
import shutil
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from agent import __version__
from agent.system.memory import cgroup_memory, meminfo, psi_memory

# /proc/cpuinfo "Features" (ARM) and "flags" (x86) names that matter to llama.cpp's CPU kernels,
# with the name reported. ARM: NEON (asimd on arm64, neon on armv7), dotprod (asimddp: the Q4_0/Q8_0
# dot kernels and weight repacking, Pi 5 yes, Pi 4 no), i8mm (int8 matrix multiply), SVE, fp16
# arithmetic (asimdhp). x86: the AVX family and the VNNI / AMX int8 extensions.
_ARM_FEATURES = {
    "neon": "neon", "asimd": "neon", "asimddp": "dotprod", "i8mm": "i8mm", "sve": "sve", "sve2": "sve2",
    "asimdhp": "fp16", "bf16": "bf16",
}  # fmt: skip
_X86_FEATURES = {
    "sse3": "sse3", "ssse3": "ssse3", "avx": "avx", "avx2": "avx2", "fma": "fma", "f16c": "f16c",
    "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512_vnni": "avx512_vnni", "avx512_bf16": "avx512_bf16",
    "avx_vnni": "avx_vnni", "amx_int8": "amx_int8",
}  # fmt: skip
# ARM "CPU part" numbers of the cores on Raspberry Pi boards and their close relatives.
_ARM_PARTS = {
    "0xd03": "Cortex-A53", "0xd04": "Cortex-A35", "0xd05": "Cortex-A55", "0xd07": "Cortex-A57",
    "0xd08": "Cortex-A72", "0xd09": "Cortex-A73", "0xd0a": "Cortex-A75", "0xd0b": "Cortex-A76",
    "0xd0d": "Cortex-A77", "0xd41": "Cortex-A78", "0xd46": "Cortex-A510", "0xd47": "Cortex-A710",
    "0xb76": "ARM1176",
}  # fmt: skip


class CpuInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(description="CPU or board model as /proc/cpuinfo names it.")
    cores: int = Field(ge=0, description="Processors listed in /proc/cpuinfo.")
    features: list[str] = Field(description="Instruction-set features llama.cpp uses that this CPU has.")


class SwapDevice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Device or file (from /proc/swaps).")
    type: str = Field(description="partition or file.")
    size_bytes: int = Field(ge=0, description="Size, bytes.")
    used_bytes: int = Field(ge=0, description="In use, bytes.")
    priority: int = Field(description="Swap priority (higher is used first; zram is usually 100).")


class BoardFacts(BaseModel):
    """What the board is: reported under ``board`` in the shadow."""

    model_config = ConfigDict(extra="forbid")

    agent_version: str = Field(description="edge-agent version.")
    llama_cpp_python: str | None = Field(description="Installed llama-cpp-python version (null: not installed).")
    board: str = Field(description="Board profile (device.board).")
    machine: str = Field(description="CPU architecture (uname -m): aarch64, armv7l, x86_64.")
    cpu: CpuInfo = Field(description="CPU model, cores and llama.cpp-relevant features.")
    mem_total_bytes: int = Field(ge=0, description="MemTotal, bytes.")
    cgroup_limit_bytes: int | None = Field(
        description="The agent's memory cgroup limit, bytes; null: none or no controller."
    )
    cgroup_note: str | None = Field(
        description="Why there is no cgroup reading (the memory controller is off), else null."
    )
    psi: bool = Field(description="Memory pressure stall information (/proc/pressure/memory) is available.")
    psi_note: str | None = Field(description="Why PSI is unavailable (Raspberry Pi kernels need psi=1), else null.")
    swap: list[SwapDevice] = Field(description="Active swap devices (/proc/swaps).")
    models_free_bytes: int | None = Field(description="Free disk space in device.models_dir, bytes; null: unreadable.")


class ServingModel(BaseModel):
    """The model in force: reported under ``serving`` in the shadow (filled in by the daemon)."""

    model_config = ConfigDict(extra="forbid")

    file: str = Field(description="Model file name, relative to device.models_dir.")
    sha256: str | None = Field(
        default=None,
        description="SHA-256 of the file in force: model.sha256 when that is set (the load checked it), else "
        "computed by the board in the background once per file (null until then: see sha256_pending).",
    )
    sha256_pending: bool = Field(
        default=False,
        description="The board is computing the file's SHA-256; the document is published again once it is known. "
        "False with a null sha256: the file could not be read, or is not the one loaded any more (replaced on disk).",
    )
    load_mode: Literal["fit", "fast"] = Field(
        description="How the weights are held: fit (file-backed) or fast (repacked)."
    )
    n_ctx: int = Field(ge=1, description="Context size in force, tokens.")
    load_ms: float | None = Field(default=None, ge=0, description="How long the load took, ms.")
    loaded_at: float | None = Field(default=None, description="When it was loaded, epoch seconds.")
    swap_ms: float | None = Field(
        default=None,
        ge=0,
        description="The model change that brought it in: letting running jobs finish or preempting them, "
        "unloading the previous model, loading this one, ms. Null for the model loaded at start.",
    )
    preempted: int | None = Field(default=None, ge=0, description="Jobs that model change preempted (requeued).")


class Pressure(BaseModel):
    """The memory governor's state: reported under ``pressure`` in the shadow (docs/governor.md)."""

    model_config = ConfigDict(extra="forbid")

    level: Literal["ok", "warn", "critical"] = Field(description="The governor's level.")
    action: str | None = Field(
        default=None,
        description="The strongest action in force (hold_unfit, shrink_context, preempt, unload), or null.",
    )
    rung: int = Field(
        default=0, ge=0, le=4, description="How far up the ladder of actions: 0 (none) to 4 (model unloaded)."
    )
    reasons: list[str] = Field(
        default_factory=list, description="The signals that hold the level above ok, with their values."
    )
    missing: list[str] = Field(
        default_factory=list, description="Signals this board lacks (psi, cgroup_memory, cgroup_limit)."
    )


class DownloadReport(BaseModel):
    """The current or last model download (model.url), reported under ``download``."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="The model file being fetched, in device.models_dir.")
    url: str = Field(description="Where from, without user info or query string.")
    state: Literal["checking", "downloading", "retrying", "verifying", "done", "failed"] = Field(
        description="checking: hashing what is already there; retrying: waiting after a failed attempt (the partial "
        "file is kept); done: verified and in the models folder; failed: see message."
    )
    bytes: int = Field(ge=0, description="Bytes in the partial (or final) file.")
    total: int | None = Field(default=None, ge=0, description="The file's size, bytes (null: not known yet).")
    fetched: int = Field(ge=0, description="Bytes received from the network by this download (resumed bytes excluded).")
    attempts: int = Field(ge=0, description="HTTP requests made (1 + retries).")
    rate_bps: int | None = Field(default=None, ge=0, description="Recent transfer rate, bytes per second.")
    eta_s: float | None = Field(default=None, ge=0, description="Estimated time left, seconds.")
    message: str | None = Field(default=None, description="Why the last attempt failed, or why the download failed.")


class CanaryReport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    passed: bool = Field(description="Whether the model passed the canary.")
    reason: str | None = Field(description="Why it failed; null when it passed.")
    output: str = Field(description="What the model answered (cut to 200 characters).")
    tokens: int = Field(ge=0, description="Tokens generated.")
    took_ms: float = Field(ge=0, description="How long the canary ran, ms.")
    finish_reason: str | None = Field(default=None, description="stop, length, timeout ...")


class ModelChangeReport(BaseModel):
    """How the last model change ended, reported under ``model_change``."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="The model file the change asked for.")
    sha256: str | None = Field(description="The checksum it asked for (model.sha256).")
    outcome: Literal["applied", "canary_failed", "load_failed"] = Field(
        description="applied: in force (and passed the canary, when one is configured); canary_failed / load_failed: "
        "the previous model was loaded again by itself."
    )
    message: str | None = Field(description="Why it was refused; null when applied.")
    at: float = Field(description="When it ended, epoch seconds.")
    took_ms: float = Field(ge=0, description="The whole change: quiesce, unload, load, canary (and rollback), ms.")
    preempted: int = Field(ge=0, description="Jobs it preempted (requeued).")
    canary: CanaryReport | None = Field(description="The canary's result; null: no canary configured.")
    rollback_ms: float | None = Field(description="From the failure to the previous model serving again, ms.")
    rolled_back: bool | None = Field(description="Whether the previous model serves again (null when applied).")


def read_cpuinfo(path: Path | str = "/proc/cpuinfo", machine: str | None = None) -> CpuInfo:
    """CPU model, processor count and llama.cpp-relevant features from /proc/cpuinfo."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return CpuInfo(model=None, cores=os.cpu_count() or 0, features=[])
    machine = machine or platform.machine()
    cores = 0
    flags: set[str] = set()
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip(), value.strip()
        if key == "processor":
            cores += 1
        elif key in ("flags", "Features"):
            flags |= set(value.split())
        else:
            fields.setdefault(key, value)
    table = _X86_FEATURES if machine in ("x86_64", "i686", "i386") else _ARM_FEATURES
    features = list(dict.fromkeys(name for flag, name in table.items() if flag in flags))
    if machine == "aarch64" and "neon" not in features and "fp" in flags:
        features.insert(0, "neon")  # NEON is mandatory on ARMv8-A; some kernels list only "fp"
    model = fields.get("model name") or fields.get("Model")
    part = fields.get("CPU part")
    if part and part.lower() in _ARM_PARTS:
        core = _ARM_PARTS[part.lower()]
        model = f"{model} ({core})" if model and core not in model else (model or core)
    return CpuInfo(model=model, cores=cores, features=features)


def read_swaps(path: Path | str = "/proc/swaps") -> list[SwapDevice]:
    """Active swap devices; sizes in /proc/swaps are KiB."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines[1:]:
        parts = line.split()
        if len(parts) < 5:
            continue
        name = parts[0].replace("\\040", " ")
        try:
            out.append(
                SwapDevice(
                    name=name,
                    type=parts[1],
                    size_bytes=int(parts[2]) * 1024,
                    used_bytes=int(parts[3]) * 1024,
                    priority=int(parts[4]),
                )
            )
        except ValueError:
            continue
    return out


def free_bytes(folder: Path | str) -> int | None:
    """Free space for an unprivileged writer, rounded down to MiB so the report does not churn."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return None
    return free // 2**20 * 2**20


def llama_cpp_version() -> str | None:
    try:
        return version("llama_cpp_python")
    except PackageNotFoundError:
        return None


class FactsReader:
    """Reads BoardFacts. Paths are injectable for tests; the defaults are the running system's."""

    def __init__(
        self,
        *,
        board: str,
        models_dir: Path,
        proc_root: Path = Path("/proc"),
        machine: str | None = None,
    ) -> None:
        self.board = board
        self.models_dir = models_dir
        self.proc_root = proc_root
        self.machine = machine or platform.machine()
        # Read once: the CPU and the installed versions do not change while the daemon runs.
        self._cpu = read_cpuinfo(proc_root / "cpuinfo", self.machine)
        self._llama = llama_cpp_version()

    def board_facts(self) -> BoardFacts:
        cg = cgroup_memory(proc_root=self.proc_root)
        psi = psi_memory(self.proc_root / "pressure" / "memory")
        try:
            total = meminfo(self.proc_root / "meminfo").mem_total
        except (OSError, KeyError, ValueError):
            total = 0
        return BoardFacts(
            agent_version=__version__,
            llama_cpp_python=self._llama,
            board=self.board,
            machine=self.machine,
            cpu=self._cpu,
            mem_total_bytes=total,
            cgroup_limit_bytes=cg.limit,
            cgroup_note=None if cg.available else cg.reason,
            psi=psi.available,
            psi_note=psi.reason,
            swap=read_swaps(self.proc_root / "swaps"),
            models_free_bytes=free_bytes(self.models_dir),
        )


def reported_facts(
    board: BoardFacts,
    serving: ServingModel | None,
    *,
    download: dict[str, object] | None = None,
    model_change: dict[str, object] | None = None,
) -> dict[str, object]:
    """The facts part of reported: {"board", "serving", "download", "model_change"} as JSON values
    (the last two are left out while there is nothing to say)."""
    out: dict[str, object] = {
        "board": board.model_dump(mode="json"), "serving": serving.model_dump(mode="json") if serving else None,
    }  # fmt: skip
    if download is not None:
        out["download"] = DownloadReport.model_validate(download).model_dump(mode="json", exclude_none=True)
    if model_change is not None:
        out["model_change"] = ModelChangeReport.model_validate(model_change).model_dump(mode="json")
    return out


__all__ = [
    "BoardFacts",
    "Pressure",
    "CanaryReport",
    "DownloadReport",
    "ModelChangeReport",
    "CpuInfo",
    "FactsReader",
    "ServingModel",
    "SwapDevice",
    "free_bytes",
    "llama_cpp_version",
    "read_cpuinfo",
    "read_swaps",
    "reported_facts",
]
