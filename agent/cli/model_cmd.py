"""`edge-agent model inspect|synth`: look inside a GGUF file, and write synthetic ones.

``inspect`` reads the header (agent.models.gguf_info), says whether and by which rule the file is
4-bit, and plans what loading it would cost: by default the engine's exact plan (llama.cpp's own
buffer sizes from a no-alloc probe, and the weights this CPU repacks), or with ``--header-only``
(or where llama.cpp is not importable) the header-only estimate; the output says which. It never
loads the weights, so it is safe on a board that is short of memory.
``synth`` writes a preset model with random 4-bit weights (agent.models.synth).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.cli.config_cmd import add_group, positive_int
from agent.cli.keys_cmd import register_sign
from agent.config.sections import EngineSettings
from agent.errors import EXIT_OK, ConfigError, ModelError

if TYPE_CHECKING:
    from agent.engine.estimate import MemoryEstimate
    from agent.models.gguf_info import ModelInfo

# The estimate defaults are the daemon's own, so `inspect` without options shows what it would plan.
_ENGINE_DEFAULTS = EngineSettings()
_KV_TYPES = ("f16", "q8_0", "q4_0")
_REPACK_NOTE = "fast mode on this CPU: "  # agent.engine.llamacpp.ExactSizer's note


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    msub = add_group(sub, "model", "inspect GGUF models and write synthetic ones")

    i = msub.add_parser(
        "inspect",
        help="show a GGUF file's shapes, quantisation, layer byte ranges and memory estimate (does not load it)",
    )
    i.add_argument("file", type=Path, metavar="FILE")
    i.add_argument(
        "--ctx",
        type=positive_int,
        default=None,
        help=f"context size for the estimate, tokens (default: the training context, at most "
        f"{_ENGINE_DEFAULTS.auto_ctx_max})",
    )
    i.add_argument(
        "--mode",
        choices=("fit", "fast"),
        default="fit",
        help="fit: weights stay file-backed; fast: weights repacked into anonymous memory (default: fit)",
    )
    i.add_argument(
        "--n-batch",
        type=positive_int,
        default=_ENGINE_DEFAULTS.n_batch,
        help=f"prompt batch size for the estimate, tokens (default: {_ENGINE_DEFAULTS.n_batch})",
    )
    i.add_argument("--type-k", choices=_KV_TYPES, default=_ENGINE_DEFAULTS.type_k, help="KV cache key type")
    i.add_argument(
        "--type-v",
        choices=_KV_TYPES,
        default=_ENGINE_DEFAULTS.type_v,
        help="KV cache value type (other than f16 needs --flash-attn)",
    )
    i.add_argument(
        "--flash-attn",
        action="store_true",
        default=_ENGINE_DEFAULTS.flash_attn,
        help="plan with flash attention (engine.flash_attn)",
    )
    i.add_argument(
        "--header-only",
        action="store_true",
        help="estimate from the header alone, without asking llama.cpp (no probe; repacking as an upper bound)",
    )
    i.add_argument("--json", action="store_true", help="print one JSON document instead of the report")
    i.add_argument(
        "--allow-non-4bit",
        action="store_true",
        help="inspect a model that is not 4-bit instead of refusing it (config: model.allow_non_4bit)",
    )
    i.set_defaults(handler=_inspect)

    from agent.models.synth import PRESETS

    s = msub.add_parser(
        "synth",
        help="write a synthetic model with a real model's shapes and random 4-bit weights",
        description="Presets: " + "; ".join(f"{k}: {v.description}" for k, v in PRESETS.items()),
    )
    s.add_argument("--preset", required=True, choices=list(PRESETS), help="model shape to write")
    s.add_argument("out", type=Path, metavar="OUT.gguf")
    s.add_argument("--seed", type=int, default=0, help="random seed; the same preset and seed give identical bytes")
    s.add_argument("--force", action="store_true", help="replace OUT if it exists")
    s.set_defaults(handler=_synth)
    register_sign(msub)


def _inspect(args: argparse.Namespace) -> int:
    from agent.models.gguf_info import check_quantization, read_model_info

    if args.type_v != "f16" and not args.flash_attn:
        raise ConfigError("--type-v other than f16 needs --flash-attn (llama.cpp requirement)")
    info = read_model_info(args.file)
    try:
        check_quantization(info, allow_non_4bit=args.allow_non_4bit)
    except ModelError as e:
        raise ModelError(f"{e} (to inspect it anyway: --allow-non-4bit)", code=e.code) from None

    # Lazy: the estimator belongs to the engine, and importing it should not slow `model synth`.
    from agent.engine.estimate import Serving, estimate_memory

    n_ctx = args.ctx or min(info.n_ctx_train or _ENGINE_DEFAULTS.auto_ctx_max, _ENGINE_DEFAULTS.auto_ctx_max)
    serving = Serving(args.n_batch, args.type_k, args.type_v, args.flash_attn)
    plan_notes: list[str] = []
    est = None
    if args.header_only:
        plan_notes.append("--header-only: llama.cpp was not asked")
    else:
        try:
            from agent.engine import llamacpp
        except (ImportError, OSError) as e:
            plan_notes.append(f"llama.cpp is not importable here ({e}): header-only estimate")
        else:
            try:
                with llamacpp.ExactSizer(
                    args.file,
                    info,
                    n_batch=args.n_batch,
                    type_k=args.type_k,
                    type_v=args.type_v,
                    flash_attn=args.flash_attn,
                ) as sizer:
                    est = estimate_memory(info, dataclasses.replace(serving, sizer=sizer), n_ctx=n_ctx, mode=args.mode)
                plan_notes += sizer.notes + [f"asking llama.cpp took {sizer.elapsed_ms():.0f} ms"]
            except RuntimeError as e:
                plan_notes.append(
                    f"llama.cpp cannot load this file ({e}): header-only estimate; the engine will refuse it"
                )
    if est is None:
        est = estimate_memory(info, serving, n_ctx=n_ctx, mode=args.mode)
    settings = {
        "n_ctx": n_ctx,
        "mode": args.mode,
        "n_batch": args.n_batch,
        "type_k": args.type_k,
        "type_v": args.type_v,
        "flash_attn": args.flash_attn,
    }
    if args.json:
        doc = {
            "model": info.as_dict(),
            "estimate": {
                "source": est.source,
                "notes": plan_notes + list(est.notes),
                "settings": settings,
                "components": est.as_dict(),
                "anon_bytes": est.anon_bytes,
                "file_bytes": est.file_bytes,
            },
        }
        json.dump(doc, sys.stdout, indent=2)
        print()
    else:
        print(_report(info, settings, est, plan_notes))
    return EXIT_OK


def _report(info: ModelInfo, settings: dict[str, Any], est: MemoryEstimate, plan_notes: list[str]) -> str:
    lines: list[str] = []

    def row(label: str, text: str) -> None:
        lines.append(f"{label:<11}{text}")

    row("model", info.name)
    row("file", str(info.path))
    row(
        "",
        f"{_size(info.file_size)}, GGUF v{info.gguf_version}, {info.tensor_count} tensors, data from byte {info.data_offset}",
    )
    row("arch", f"{info.architecture}, {info.n_layer} layers, embedding {info.n_embd}, feed-forward {info.n_ff}")
    row(
        "attention",
        f"{info.n_head} heads, {info.n_head_kv} KV heads, head size {info.head_dim}"
        + (f" (values {info.head_dim_v})" if info.head_dim_v != info.head_dim else ""),
    )
    row("vocabulary", f"{info.n_vocab} tokens" + (", output tied to token_embd" if info.tied_embeddings else ""))
    row("context", f"trained for {info.n_ctx_train} tokens")
    share = 100.0 * info.four_bit_bytes / info.weights_bytes if info.weights_bytes else 0.0
    row(
        "weights",
        f"{_size(info.weights_bytes)}, {info.n_params / 1e6:.1f} M parameters, "
        f"{share:.1f}% in 4-bit or smaller types"
        + (f", general.file_type {info.quant.file_type}" if info.quant.file_type else ""),
    )
    q = info.quant
    row("4-bit", f"{'yes' if q.is_4bit else 'NO'} (rule: {q.rule}): {q.reason}")
    first = True
    for type_name, s in info.quant_summary.items():
        row("types" if first else "", f"{type_name:<8}{s['count']:>5} tensors {_size(s['bytes']):>12}")
        first = False
    row(
        "repack",
        f"at most {_size(info.repackable_bytes)} copied into anonymous memory in fast mode (the header's "
        "upper bound over CPUs)",
    )
    for note in plan_notes:
        if note.startswith(_REPACK_NOTE):
            row("", f"on this CPU: {note.removeprefix(_REPACK_NOTE)}")

    first = True
    for r in info.layers:
        row("layers" if first else "", f"blk.{r.index:<4} bytes {r.offset:>12} - {r.end:<12} {_size(r.nbytes):>12}")
        first = False
    first = True
    for t in info.other_ranges:
        row("other" if first else "", f"{t.name:<24} bytes {t.offset:>12} - {t.end:<12} {_size(t.nbytes):>12}")
        first = False

    lines.append("")
    lines.append(
        f"memory ({est.source_text}): n_ctx {est.n_ctx}, mode {settings['mode']}, n_batch {settings['n_batch']}, "
        f"KV {settings['type_k']}/{settings['type_v']}" + (", flash attention" if settings["flash_attn"] else "")
    )
    for name, value in est.as_dict().items():
        lines.append(f"  {name:<22}{_size(value):>12}")
    lines.append(f"  {'anonymous (RAM/swap)':<22}{_size(est.anon_bytes):>12}")
    lines.append(f"  {'file-backed (mmap)':<22}{_size(est.file_bytes):>12}")
    for note in [n for n in plan_notes if not n.startswith(_REPACK_NOTE)] + list(est.notes):
        lines.append(f"  note: {note}")
    return "\n".join(lines)


def _size(n: int) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    if n >= 2**10:
        return f"{n / 2**10:.1f} KiB"
    return f"{n} B"


def _synth(args: argparse.Namespace) -> int:
    from agent.models.synth import synth_model
    from agent.system.files import file_sha256

    out: Path = args.out
    if out.exists() and not args.force:
        raise ModelError(f"{out} exists; pass --force to replace it", code="model_exists")
    if not out.parent.is_dir():
        raise ModelError(f"folder {out.parent} does not exist; create it first", code="model_write_failed")
    # A bar on a terminal; piped or under systemd, progress lines every few seconds (agent.system.progress),
    # shown even without -v: writing a 600 MB model takes a while on a board.
    logging.getLogger("agent.progress").setLevel(logging.INFO)
    start = time.monotonic()
    try:
        synth_model(args.preset, out, seed=args.seed, progress=True)
    except OSError as e:
        raise ModelError(f"cannot write {out}: {e.strerror or e}", code="model_write_failed") from None
    elapsed = time.monotonic() - start
    size = out.stat().st_size
    print(f"path   {out.resolve()}")
    print(f"size   {size} bytes ({_size(size)})")
    print(f"sha256 {file_sha256(out)}")
    print(f"time   {elapsed:.1f} s")
    return EXIT_OK
