"""`edge-agent generate`: load the model with the engine's memory plan, run one prompt, stream it.

A local diagnostic: it shows what the daemon would do on this board (mode, context, estimate,
measured memory, speed). ``--model FILE`` may point anywhere, because the person at the console
chose the file; without it the configured model.path is used and must lie inside
device.models_dir, as for the daemon (which never takes a path from outside).

Ctrl-C cancels the generation through the engine's abort callback (finish_reason 'canceled',
exit 130); a second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

from agent.cli.config_cmd import add_config_option, settings_from

EXIT_CANCELED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C

T = TypeVar("T")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "generate",
        help="load the model and generate text for one prompt (diagnostic: mode, memory, speed)",
        description="Load the model with the same memory plan as the daemon and stream one completion.",
    )
    add_config_option(p)
    p.add_argument(
        "--model",
        type=Path,
        default=None,
        metavar="FILE",
        help="GGUF file to load (any path; default: model.path inside device.models_dir)",
    )
    p.add_argument("--prompt", required=True, help="prompt text ('-' reads it from stdin)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens to generate at most (default 128)")
    p.add_argument(
        "--mode", choices=["auto", "fit", "fast"], default=None, help="load mode (default: engine.load_mode)"
    )
    p.add_argument(
        "--ctx", type=_ctx_arg, default=None, help="context size in tokens or 'auto' (default: engine.n_ctx)"
    )
    p.add_argument("--batch", type=int, default=None, help="prompt batch size (default: engine.n_batch)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: engine.n_threads)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default 0)")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop sequence (repeatable)")
    p.add_argument(
        "--timeout", type=float, default=None, metavar="SECONDS", help="stop after this long (finish_reason timeout)"
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="load even when the estimate exceeds the memory budget (the kernel may OOM-kill the process)",
    )
    p.add_argument("--warmup", action="store_true", help="read every layer's pages after load (progress on stderr)")
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object (text, stats, mode, n_ctx, estimate, measured memory) instead of streaming",
    )
    p.set_defaults(handler=_generate)


def _ctx_arg(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of tokens or 'auto', got {text!r}") from None


def _overrides(args: argparse.Namespace) -> dict[str, dict[str, int | str]]:
    # One prompt: plan and load one slot, not the daemon's engine.max_parallel (whose 'auto' takes
    # as many as the budget allows, each with a KV cache of its own).
    eng: dict[str, int | str] = {"max_parallel": 1}
    if args.mode is not None:
        eng["load_mode"] = args.mode
    if args.ctx is not None:
        eng["n_ctx"] = args.ctx
    if args.batch is not None:
        eng["n_batch"] = args.batch
    if args.threads is not None:
        eng["n_threads"] = args.threads
    if args.max_tokens > 0:
        # The limit guards the daemon against remote requests; here the operator asks directly.
        eng["max_tokens_limit"] = args.max_tokens
    return {"engine": eng}


def _generate(args: argparse.Namespace) -> int:
    from agent.engine import Engine, GenerationRequest
    from agent.system.memory import proc_status

    settings = settings_from(args, _overrides(args))
    model = args.model.expanduser().resolve() if args.model is not None else settings.model_file()
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    engine = Engine(
        model,
        engine=settings.engine,
        memory=settings.memory,
        allow_non_4bit=settings.model.allow_non_4bit,
        force=args.force,
    )
    report = engine.load()
    try:
        print(f"edge-agent: {report.summary()}", file=sys.stderr)
        for note in report.notes:
            print(f"edge-agent: note: {note}", file=sys.stderr)
        if args.warmup:
            ms = engine.warmup(progress=True)
            print(f"edge-agent: warm-up {ms:.0f} ms", file=sys.stderr)

        req = GenerationRequest(
            prompt=prompt,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            stop=list(args.stop),
        )
        cancel = threading.Event()
        deadline = time.monotonic() + args.timeout if args.timeout else None

        def on_token(_index: int, text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()

        result, error = _run_cancellable(
            lambda: engine.generate(req, on_token=None if args.json else on_token, cancel=cancel, deadline=deadline),
            cancel,
        )
        if error is not None:
            raise error
        assert result is not None  # the worker returned without an error: it has the result
        after = proc_status()
        if args.json:
            doc = {**result.as_dict(), **report.as_dict()}
            doc["memory"]["after_run"] = after.as_dict()
            doc["memory"]["peak_rss_anon"] = result.stats.peak_rss_anon
            json.dump(doc, sys.stdout, indent=2)
            print()
        else:
            print()
            s = result.stats
            print(
                f"edge-agent: finish {result.finish_reason}; {s.prompt_tokens} prompt tokens in {s.prompt_ms:.0f} ms, "
                f"{s.completion_tokens} tokens in {s.generation_ms:.0f} ms ({s.tokens_per_s:.1f} tok/s); "
                f"peak RssAnon {s.peak_rss_anon / 2**20:.0f} MiB, RssFile {after.rss_file / 2**20:.0f} MiB",
                file=sys.stderr,
            )
        return EXIT_CANCELED if result.finish_reason == "canceled" else 0
    finally:
        engine.unload()


def _run_cancellable(fn: Callable[[], T], cancel: threading.Event) -> tuple[T | None, BaseException | None]:
    """Run ``fn`` on a worker thread; the first SIGINT sets ``cancel`` (the engine stops at its next
    abort check), a second one raises KeyboardInterrupt here as usual."""
    out: dict[str, Any] = {}  # "result": what fn returned (a T), "error": what it raised

    def work() -> None:
        try:
            out["result"] = fn()
        except BaseException as e:  # noqa: BLE001  handed back to the main thread
            out["error"] = e

    def on_sigint(_signum: int, _frame: FrameType | None) -> None:
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.set()

    worker = threading.Thread(target=work, name="generate", daemon=True)
    previous = (
        signal.signal(signal.SIGINT, on_sigint) if threading.current_thread() is threading.main_thread() else None
    )
    try:
        worker.start()
        # The wait is interruptible: CPython runs the SIGINT handler in this thread meanwhile.
        worker.join()
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    return out.get("result"), out.get("error")
