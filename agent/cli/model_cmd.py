"""`edge-agent model inspect|synth`: look inside a GGUF file, and write synthetic ones.

``inspect`` reads only the header (agent.models.gguf_info) and asks the engine's estimator what
loading it would cost; it never loads the model, so it is safe on a board that is short of memory.
``synth`` writes a preset model with random 4-bit weights (agent.models.synth).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.config.sections import EngineSettings
from agent.errors import EXIT_OK, ModelError

if TYPE_CHECKING:
    from agent.models.gguf_info import ModelInfo

# The estimate defaults are the daemon's own, so `inspect` without options shows what it would plan.
_ENGINE_DEFAULTS = EngineSettings()
_KV_TYPES = ("f16", "q8_0", "q4_0")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model", help="inspect GGUF models and write synthetic ones")
    msub = p.add_subparsers(dest="model_command", metavar="ACTION", required=True)

    i = msub.add_parser(
        "inspect",
        help="show a GGUF file's shapes, quantisation, layer byte ranges and memory estimate (does not load it)",
    )
    i.add_argument("file", type=Path, metavar="FILE")
    i.add_argument(
        "--ctx",
        type=_positive_int,
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
        type=_positive_int,
        default=_ENGINE_DEFAULTS.n_batch,
        help=f"prompt batch size for the estimate, tokens (default: {_ENGINE_DEFAULTS.n_batch})",
    )
    i.add_argument("--type-k", choices=_KV_TYPES, default=_ENGINE_DEFAULTS.type_k, help="KV cache key type")
    i.add_argument("--type-v", choices=_KV_TYPES, default=_ENGINE_DEFAULTS.type_v, help="KV cache value type")
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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _inspect(args: argparse.Namespace) -> int:
    from agent.models.gguf_info import check_quantization, read_model_info

    info = read_model_info(args.file)
    try:
        check_quantization(info, allow_non_4bit=args.allow_non_4bit)
    except ModelError as e:
        raise ModelError(f"{e} (to inspect it anyway: --allow-non-4bit)", code=e.code) from None

    # Lazy: the estimator belongs to the engine, and importing it should not slow `model synth`.
    from agent.engine.estimate import estimate_memory

    n_ctx = args.ctx or min(info.n_ctx_train or _ENGINE_DEFAULTS.auto_ctx_max, _ENGINE_DEFAULTS.auto_ctx_max)
    est = estimate_memory(
        info, n_ctx=n_ctx, mode=args.mode, n_batch=args.n_batch, type_k=args.type_k, type_v=args.type_v
    )
    settings = {"n_ctx": n_ctx, "mode": args.mode, "n_batch": args.n_batch, "type_k": args.type_k, "type_v": args.type_v}
    if args.json:
        doc = {
            "model": info.as_dict(),
            "estimate": {
                "settings": settings,
                "components": est.as_dict(),
                "anon_bytes": est.anon_bytes,
                "file_bytes": est.file_bytes,
            },
        }
        json.dump(doc, sys.stdout, indent=2)
        print()
    else:
        print(_report(info, settings, est.as_dict(), est.anon_bytes, est.file_bytes))
    return EXIT_OK


def _report(info: ModelInfo, settings: dict[str, Any], components: dict[str, Any], anon: int, file_backed: int) -> str:
    lines: list[str] = []

    def row(label: str, text: str) -> None:
        lines.append(f"{label:<11}{text}")

    row("model", info.name)
    row("file", str(info.path))
    row("", f"{_size(info.file_size)}, GGUF v{info.gguf_version}, {info.tensor_count} tensors, data from byte {info.data_offset}")
    row("arch", f"{info.architecture}, {info.n_layer} layers, embedding {info.n_embd}, feed-forward {info.n_ff}")
    row("attention", f"{info.n_head} heads, {info.n_head_kv} KV heads, head size {info.head_dim}"
        + (f" (values {info.head_dim_v})" if info.head_dim_v != info.head_dim else ""))
    row("vocabulary", f"{info.n_vocab} tokens" + (", output tied to token_embd" if info.tied_embeddings else ""))
    row("context", f"trained for {info.n_ctx_train} tokens")
    share = 100.0 * info.four_bit_bytes / info.weights_bytes if info.weights_bytes else 0.0
    row("weights", f"{_size(info.weights_bytes)}, {info.n_params / 1e6:.1f} M parameters, "
        f"{share:.1f}% in 4-bit or smaller types ({'4-bit' if info.is_4bit else 'NOT 4-bit'})")
    first = True
    for type_name, s in info.quant_summary.items():
        row("types" if first else "", f"{type_name:<8}{s['count']:>5} tensors {_size(s['bytes']):>12}")
        first = False
    row("repack", f"{_size(info.repackable_bytes)} copied into anonymous memory in fast mode (upper bound; "
        "CPU dependent)")

    first = True
    for r in info.layers:
        row("layers" if first else "", f"blk.{r.index:<4} bytes {r.offset:>12} - {r.end:<12} {_size(r.nbytes):>12}")
        first = False
    first = True
    for r in info.other_ranges:
        row("other" if first else "", f"{r.name:<24} bytes {r.offset:>12} - {r.end:<12} {_size(r.nbytes):>12}")
        first = False

    lines.append("")
    lines.append(
        f"memory estimate: n_ctx {settings['n_ctx']}, mode {settings['mode']}, n_batch {settings['n_batch']}, "
        f"KV {settings['type_k']}/{settings['type_v']}"
    )
    for name, value in components.items():
        lines.append(f"  {name:<22}{_size(value) if isinstance(value, int) else value:>12}")
    lines.append(f"  {'anonymous (RAM/swap)':<22}{_size(anon):>12}")
    lines.append(f"  {'file-backed (mmap)':<22}{_size(file_backed):>12}")
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
    from agent.models.synth import sha256_file, synth_model

    out: Path = args.out
    if out.exists() and not args.force:
        raise ModelError(f"{out} exists; pass --force to replace it", code="model_exists")
    if not out.parent.is_dir():
        raise ModelError(f"folder {out.parent} does not exist; create it first", code="model_write_failed")
    # A bar on a terminal; piped or under systemd, progress lines every few seconds (agent.ops.progress),
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
    print(f"sha256 {sha256_file(out)}")
    print(f"time   {elapsed:.1f} s")
    return EXIT_OK
