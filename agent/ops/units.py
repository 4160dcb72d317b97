"""The systemd units for one board: rendered from the shipped units in systemd/, with the memory
limits of the board profile and the model's memory plan.

Owns the limits formula (``memory_limits``, pure) and the rendering (``render_units``, ``drop_in``).
Every unit file in the units folder is rendered (the main unit, and the swap oneshot and path units
where they exist); only the main unit gets memory limits. The shipped files stay the defaults: the
install paths in them (``/opt/edge-agent/.venv/bin/edge-agent``) are replaced by the real ones.

The formula (docs/operations.md, "Memory limits"):

    budget   B = memory.budget_mb, or with "auto" MemTotal (of the board: --ram-mb) - memory.reserve_mb
    margin   m = max(16 MiB, 5 % of B)
    MemoryMax  = B
    MemoryHigh = min(B, max(B - m, A + m))     A = the plan's anonymous memory for --model

MemoryMax is the budget itself, so an explicit ``budget_mb`` and ``budget_mb = "auto"`` (which reads
the cgroup limit back) plan against the same number. MemoryHigh sits a margin below it: above it the
kernel reclaims the cgroup's page cache first (the model's file-backed weights, re-read later: slower,
never an OOM kill) and throttles anonymous growth, which the cgroup's memory.pressure shows before the
hard limit is reached. It never goes below what the plan counts on (A + m), so a model planned close to
its budget is not throttled in normal work. A model whose plan does not fit the budget is refused.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from agent import __version__
from agent.config import Settings
from agent.engine.plan import PlanInputs
from agent.engine.plan import plan as plan_load
from agent.errors import ConfigError
from agent.system.memory import Budget, MiB, meminfo

REPO = Path(__file__).resolve().parents[2]
DEFAULT_UNITS_DIR = REPO / "systemd"
PROFILES_DIR = REPO / "firmware-config"
MAIN_UNIT = "edge-agent.service"
SHIPPED_EXEC = "/opt/edge-agent/.venv/bin/edge-agent"
UNIT_SUFFIXES = (".service", ".path", ".timer", ".socket")
MIN_MARGIN = 16 * MiB


@dataclass(frozen=True)
class PlanSummary:
    """What the engine's plan said about the model at the profile's settings."""

    model: str
    mode: str
    n_ctx: int
    anon_bytes: int
    file_bytes: int
    mode_reason: str
    n_ctx_reason: str


@dataclass(frozen=True)
class MemoryLimits:
    budget: Budget
    margin_bytes: int
    high_bytes: int
    max_bytes: int
    plan: PlanSummary | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def high(self) -> str:
        return f"{self.high_bytes // MiB}M"

    @property
    def max(self) -> str:
        return f"{self.max_bytes // MiB}M"

    def comment(self) -> list[str]:
        """Comment lines for the unit: where each number came from."""
        b = self.budget
        out = [
            f"# Memory limits for the budget {b.bytes // MiB} MiB ({b.source}), margin {self.margin_bytes // MiB} MiB:",
            "# MemoryMax = budget; MemoryHigh = min(budget, max(budget - margin, planned anonymous + margin)).",
        ]
        if self.plan is not None:
            p = self.plan
            out.append(
                f"# Plan for {p.model}: {p.mode} mode, n_ctx {p.n_ctx}, anonymous {p.anon_bytes / MiB:.0f} MiB, "
                f"file-backed weights in use {p.file_bytes / MiB:.0f} MiB."
            )
        out += [f"# Note: {n}" for n in self.notes]
        return out


def _round_up_mib(n: int) -> int:
    return -(-n // MiB) * MiB


def memory_limits(budget: Budget, plan: PlanSummary | None = None) -> MemoryLimits:
    """The formula in the module docstring. Pure."""
    b = budget.bytes // MiB * MiB
    if b < 2 * MIN_MARGIN:
        raise ConfigError(
            f"memory budget {budget.bytes / MiB:.0f} MiB is too small for a service limit (at least 32 MiB)"
        )
    margin = max(MIN_MARGIN, _round_up_mib(b * 5 // 100))
    high = b - margin
    notes: list[str] = []
    if plan is not None:
        if plan.anon_bytes > b:
            raise ConfigError(
                f"{plan.model}: the plan needs {plan.anon_bytes / MiB:.0f} MiB of anonymous memory, above the budget "
                f"{b // MiB} MiB: lower engine.n_ctx or engine.n_batch, use load_mode fit, or raise memory.budget_mb"
            )
        need = _round_up_mib(plan.anon_bytes + margin)
        if need > high:
            high = min(b, need)
            notes.append(
                f"the plan's anonymous memory comes within the margin of the budget: MemoryHigh raised to {high // MiB} MiB"
                + (" (= MemoryMax: no early reclaim)" if high == b else "")
            )
        if plan.anon_bytes + plan.file_bytes > high:
            notes.append(
                "anonymous memory and the weights in use do not both fit under MemoryHigh: the kernel will re-read "
                "weights from storage during generation (slower, not an OOM kill)"
            )
    return MemoryLimits(
        budget=budget,
        margin_bytes=margin,
        high_bytes=high,
        max_bytes=b,
        plan=plan,
        notes=tuple(budget.notes) + tuple(notes),
    )


# ------------------------------------------------------------------------------------ inputs


def resolve_profile(profile: str | Path) -> Path:
    """A board profile: a path to a TOML file, or a name in firmware-config/ (pi-4-2gb)."""
    p = Path(profile)
    if p.suffix == ".toml" or p.exists():
        if not p.is_file():
            raise ConfigError(f"profile {p}: no such file")
        return p
    candidate = PROFILES_DIR / f"{profile}.toml"
    if candidate.is_file():
        return candidate
    names = ", ".join(sorted(f.stem for f in PROFILES_DIR.glob("*.toml")))
    raise ConfigError(f"no board profile {profile!r}; choose one of {names}, or give a TOML file")


def profile_budget(settings: Settings, ram_bytes: int | None = None) -> Budget:
    """The budget the daemon will plan against on the board: budget_mb, or with 'auto' the board's
    RAM (``ram_bytes``, default this machine's MemTotal) less memory.reserve_mb."""
    mem = settings.memory
    if mem.budget_mb != "auto":
        return Budget(int(mem.budget_mb) * MiB, f"memory.budget_mb = {mem.budget_mb}")
    notes: list[str] = []
    if ram_bytes is None:
        ram_bytes = meminfo().mem_total
        notes.append("budget_mb is 'auto': sized for this machine's RAM; pass --ram-mb for another board")
    b = ram_bytes - int(mem.reserve_mb) * MiB
    if b <= 0:
        raise ConfigError(f"memory.reserve_mb {mem.reserve_mb} is not below the RAM {ram_bytes // MiB} MiB")
    return Budget(b, f"'auto': RAM {ram_bytes // MiB} MiB - memory.reserve_mb {mem.reserve_mb}", notes)


def plan_model(settings: Settings, model: Path, budget: Budget) -> PlanSummary:
    """The engine's own plan (agent.engine.plan: mode and context) for ``model`` at the profile's settings."""
    plan = plan_load(PlanInputs(Path(model), settings.engine, settings.memory, settings.model.allow_non_4bit, budget))
    est = plan.estimate
    return PlanSummary(
        model=Path(model).name,
        mode=plan.mode,
        n_ctx=plan.n_ctx,
        anon_bytes=est.anon_bytes,
        file_bytes=est.file_bytes,
        mode_reason=plan.mode_reason,
        n_ctx_reason=plan.n_ctx_reason,
    )


# ------------------------------------------------------------------------------------ rendering

_MEMORY_LINE = re.compile(r"^#?\s*Memory(High|Max)=.*$")


def render_unit(name: str, text: str, *, exec_path: str, limits: MemoryLimits | None = None, header: str = "") -> str:
    """One unit: the shipped text with the install path replaced, and for the main unit the memory limits
    in place of the commented examples (or added to [Service] when it has none)."""
    text = text.replace(SHIPPED_EXEC, exec_path)
    if name == MAIN_UNIT and limits is not None:
        lines = text.splitlines()
        out: list[str] = []
        placed = False
        for line in lines:
            if _MEMORY_LINE.match(line.strip()):
                if not placed:
                    out += limits.comment() + [f"MemoryHigh={limits.high}", f"MemoryMax={limits.max}"]
                    placed = True
                continue
            out.append(line)
        if not placed:
            i = next(i for i, line in enumerate(out) if line.strip() == "[Service]")
            out[i + 1 : i + 1] = limits.comment() + [f"MemoryHigh={limits.high}", f"MemoryMax={limits.max}"]
        text = "\n".join(out) + "\n"
    return (header + text) if header else text


def unit_files(units_dir: Path = DEFAULT_UNITS_DIR) -> list[Path]:
    files = (
        sorted(p for p in units_dir.iterdir() if p.suffix in UNIT_SUFFIXES and p.is_file())
        if units_dir.is_dir()
        else []
    )
    if not any(p.name == MAIN_UNIT for p in files):
        raise ConfigError(f"{units_dir}: no {MAIN_UNIT}; pass --units-dir with the systemd/ folder of edge-agent")
    return files


def render_units(
    limits: MemoryLimits | None, *, exec_path: str, units_dir: Path = DEFAULT_UNITS_DIR, command: str = ""
) -> dict[str, str]:
    """Every unit in ``units_dir``, rendered: {file name: text}."""
    header = f"# Rendered by edge-agent {__version__}" + (f": {command}" if command else "") + "\n"
    return {
        p.name: render_unit(p.name, p.read_text(), exec_path=exec_path, limits=limits, header=header)
        for p in unit_files(units_dir)
    }


def drop_in(limits: MemoryLimits, command: str = "") -> tuple[str, str]:
    """(relative path, text) of a drop-in that sets only the memory limits, for a unit installed as shipped."""
    body = [f"# Rendered by edge-agent {__version__}" + (f": {command}" if command else ""), "[Service]"]
    body += limits.comment() + [f"MemoryHigh={limits.high}", f"MemoryMax={limits.max}"]
    return f"{MAIN_UNIT}.d/50-memory.conf", "\n".join(body) + "\n"


def default_exec_path() -> str:
    """The edge-agent command of the running installation (the venv's console script)."""

    candidate = Path(sys.executable).with_name("edge-agent")
    return str(candidate) if candidate.exists() else SHIPPED_EXEC
