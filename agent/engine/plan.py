"""The memory plan: which load mode, context and number of slots a model gets on this board's budget.

Pure functions over one value of inputs (``PlanInputs``), so ``systemd render``, ``doctor`` and
``install`` plan without constructing an ``Engine``. The exact plan asks llama.cpp for its own sizes
(a no-alloc probe through ``agent.engine.llamacpp``, the seam); ``exact=False`` plans from the GGUF
header alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.codes import ErrorCode
from agent.config import Settings
from agent.config.sections import EngineSettings, MemorySettings
from agent.engine.estimate import (
    CTX_PAD,
    MemoryEstimate,
    Mode,
    Serving,
    choose_mode,
    estimate_memory,
    largest_ctx_that_fits,
    most_slots_that_fit,
    pad_ctx,
)
from agent.engine.types import LoadPlan
from agent.errors import EngineError, WillNotFit
from agent.models.gguf_info import ModelInfo, check_quantization, read_model_info
from agent.system.memory import Budget, MiB, resolve_budget


@dataclass(frozen=True)
class PlanInputs:
    """Everything a plan is made from. ``budget`` overrides memory.budget_mb (tests, the CLI);
    ``force`` plans even when nothing fits (the plan says so)."""

    model_path: Path
    engine: EngineSettings
    memory: MemorySettings
    allow_non_4bit: bool = False
    budget: Budget | None = None
    force: bool = False

    @classmethod
    def from_settings(cls, settings: Settings, **kw: Any) -> PlanInputs:
        """The daemon's plan inputs: the model from model.path, the engine and memory sections."""
        return cls(settings.model_file(), settings.engine, settings.memory, settings.model.allow_non_4bit, **kw)


def plan(inputs: PlanInputs, *, runtime_bytes: int | None = None, exact: bool = True) -> LoadPlan:
    """Decide mode and n_ctx for the current settings without loading anything. Raises
    WillNotFit when nothing fits the budget (unless forced), ModelError for a bad file,
    EngineError when llama.cpp cannot read the model.
    ``runtime_bytes``: the process's RssAnon now (default: the estimate's measured constant).
    ``exact`` (default): plan with llama.cpp's own sizes (a no-alloc probe of the model and this
    CPU's repacking, agent.engine.llamacpp.ExactSizer); False: the header-only estimate."""
    info = read_model_info(inputs.model_path)
    check_quantization(info, inputs.allow_non_4bit)
    if not exact:
        return plan_with(inputs, info, runtime_bytes, None)
    s = inputs.engine
    try:
        from agent.engine import llamacpp  # costly (loads llama.cpp): only the exact plan needs it

        sizer = llamacpp.ExactSizer(
            inputs.model_path, info, n_batch=s.n_batch, type_k=s.type_k, type_v=s.type_v, flash_attn=s.flash_attn
        )
    except RuntimeError as e:  # llama.cpp's refusal of the file, for any reason
        raise EngineError(f"llama.cpp cannot load {inputs.model_path}: {e}", code=ErrorCode.model_not_loaded) from e
    try:
        plan = plan_with(inputs, info, runtime_bytes, sizer)
    except RuntimeError as e:
        raise EngineError(f"llama.cpp cannot plan {inputs.model_path}: {e}", code=ErrorCode.model_not_loaded) from e
    finally:
        sizer.close()
    return dataclasses.replace(plan, probe_ms=sizer.elapsed_ms(), notes=plan.notes + tuple(sizer.notes))


def plan_with(inputs: PlanInputs, info: ModelInfo, runtime_bytes: int | None, sizer: Any) -> LoadPlan:
    s = inputs.engine
    budget = inputs.budget or resolve_budget(inputs.memory)
    serving = Serving(s.n_batch, s.type_k, s.type_v, s.flash_attn, runtime_bytes=runtime_bytes, sizer=sizer)
    headroom = float(inputs.memory.headroom_pct)
    mode: Mode
    if s.n_ctx == "auto":
        cap = min(s.auto_ctx_max, info.n_ctx_train or s.auto_ctx_max)
        cap_note = f"engine.auto_ctx_max {s.auto_ctx_max}" + (
            f", training context {info.n_ctx_train}" if info.n_ctx_train and info.n_ctx_train < s.auto_ctx_max else ""
        )
        if s.load_mode == "auto":
            choice = choose_mode(info, serving, budget_bytes=budget.bytes, headroom_pct=headroom, n_ctx=cap)
            mode, mode_reason = choice.mode, choice.reason + f" at n_ctx {pad_ctx(cap)}"
        else:
            mode, mode_reason = s.load_mode, "engine.load_mode"
        # An automatic context leaves page cache for the weights inference keeps reading (up to
        # half the budget): a KV cache that squeezes them out makes every token re-read the
        # model from storage. If that leaves no context at all, it still leaves the headroom:
        # a cgroup charges the page cache and kernel memory too, and a process whose anonymous
        # memory fills its limit while every token re-reads the weights gets OOM-killed (the
        # real Gemma file planned at 98 % of a 145 MiB limit was; at 91 % it ran). Only if even that
        # leaves nothing is the whole budget used.
        file_share = min(estimate_memory(info, serving, n_ctx=CTX_PAD, mode=mode).file_bytes, budget.bytes // 2)
        headroom_share = int(budget.bytes * headroom / 100)
        ctx, ctx_reason = None, ""
        for reserve, why in (
            (file_share, f"less {file_share / MiB:.0f} MiB of page cache for the weights"),
            (headroom_share, f"less memory.headroom_pct ({headroom:g} %): no room for the weights' page cache"),
            (0, "(no room left for the weights' page cache or the headroom)"),
        ):
            ctx = largest_ctx_that_fits(info, serving, budget.bytes - reserve, mode, cap=cap)
            if ctx is not None:
                ctx_reason = f"auto: the largest that fits the budget {why}"
                break
        if ctx is None:
            if not inputs.force:
                est = estimate_memory(info, serving, n_ctx=CTX_PAD, mode=mode)
                raise WillNotFit(will_not_fit(est, budget, f"even the smallest context ({CTX_PAD})"))
            ctx = CTX_PAD
            ctx_reason = "auto: the smallest context (forced: even it does not fit the budget)"
        n_ctx = ctx
        if ctx >= max(CTX_PAD, cap // CTX_PAD * CTX_PAD):
            ctx_reason = f"auto: the cap ({cap_note})"
        else:
            ctx_reason += f" (cap: {cap_note})"
    else:
        n_ctx = pad_ctx(int(s.n_ctx))
        ctx_reason = "engine.n_ctx" + (f" {s.n_ctx} rounded up to a multiple of 256" if n_ctx != s.n_ctx else "")
        if s.load_mode == "auto":
            choice = choose_mode(info, serving, budget_bytes=budget.bytes, headroom_pct=headroom, n_ctx=n_ctx)
            mode, mode_reason = choice.mode, choice.reason
        else:
            mode, mode_reason = s.load_mode, "engine.load_mode"
    slots, slots_reason = _plan_slots(inputs, info, serving, mode, n_ctx, budget)
    est = estimate_memory(info, dataclasses.replace(serving, slots=slots), n_ctx=n_ctx, mode=mode)
    if est.anon_bytes > budget.bytes and not inputs.force:
        what = f"n_ctx {n_ctx}" + (f" x {slots} slots (engine.max_parallel)" if slots > 1 else "")
        raise WillNotFit(will_not_fit(est, budget, what))
    return LoadPlan(mode, mode_reason, n_ctx, ctx_reason, est, budget, info, slots=slots, slots_reason=slots_reason)


def _plan_slots(
    inputs: PlanInputs, info: ModelInfo, serving: Serving, mode: Mode, n_ctx: int, budget: Budget
) -> tuple[int, str]:
    """How many jobs are decoded together: engine.max_parallel, or with 'auto' as many as fit
    the budget at n_ctx each (leaving the weights their page cache, as an automatic context
    does), up to engine.auto_parallel_max."""
    s = inputs.engine
    if s.max_parallel != "auto":
        return int(s.max_parallel), "engine.max_parallel"
    cap = s.auto_parallel_max
    file_share = min(estimate_memory(info, serving, n_ctx=n_ctx, mode=mode).file_bytes, budget.bytes // 2)
    headroom_share = int(budget.bytes * float(inputs.memory.headroom_pct) / 100)
    for reserve in (max(file_share, headroom_share), headroom_share, 0):
        best = most_slots_that_fit(info, serving, budget.bytes - reserve, mode, n_ctx=n_ctx, cap=cap)
        if best is not None:
            break
    best = best or 1
    if best >= cap:
        return best, f"auto: the cap (engine.auto_parallel_max {cap})"
    return best, f"auto: the most that fit the budget at n_ctx {n_ctx} each (cap {cap})"


def will_not_fit(est: MemoryEstimate, budget: Budget, what: str) -> str:
    msg = (
        f"will not fit: {what} needs {est.anon_bytes / MiB:.0f} MiB of anonymous memory, the budget is "
        f"{budget.bytes / MiB:.0f} MiB ({budget.source}). Estimate: {est.describe()}. "
    )
    if est.mode == "fast":
        msg += "Use load_mode 'fit' or 'auto' (weights stay in the file cache), or a smaller n_ctx."
    else:
        msg += "Lower engine.n_ctx or engine.n_batch, use a smaller model, or raise memory.budget_mb."
    return msg
