"""`edge-agent telemetry [--watch] [--json]`: the current readings, without a broker or a daemon.

Takes readings with the daemon's own sampler (agent.telemetry.Sampler). Values only the daemon
knows (queue, KV cache, governor level) show as '-'. Rates need two readings: a single reading
waits --window seconds for a second one (0: no rates).
"""

from __future__ import annotations

import argparse
import sys
import time

from agent.cli.config_cmd import add_config_option, settings_from


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "telemetry",
        help="print the current memory, pressure and heat readings (no broker needed)",
        description="Print the readings the daemon publishes on {root}/telemetry, taken now by this command. "
        "Values only the running daemon knows (queue, KV cache, governor level) show as '-'.",
    )
    add_config_option(p)
    p.add_argument("--json", action="store_true", help="one JSON document per reading (the MQTT payload)")
    p.add_argument(
        "--watch", action="store_true", help="keep printing a reading every --interval seconds (Ctrl-C stops)"
    )
    p.add_argument("--interval", type=_positive, default=2.0, help="seconds between readings with --watch (default 2)")
    p.add_argument("--count", type=int, default=None, help="with --watch: stop after this many readings")
    p.add_argument(
        "--window",
        type=_non_negative,
        default=1.0,
        help="without --watch: seconds between the two readings that give the rates (default 1; 0: no rates)",
    )
    p.add_argument("--describe", action="store_true", help="add each field's description to the table")
    p.set_defaults(handler=_telemetry)


def _positive(text: str) -> float:
    v = float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return v


def _non_negative(text: str) -> float:
    v = float(text)
    if v < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return v


def _telemetry(args: argparse.Namespace) -> int:
    from agent.governor.policy import GovernorState, Signals, step
    from agent.telemetry import Sampler
    from agent.telemetry.table import render

    settings = settings_from(args)
    sampler = Sampler(settings.device.id, residency_interval_s=settings.telemetry.residency_interval_s)

    def show(first: bool) -> None:
        t = sampler.sample()
        if args.json:
            print(t.model_dump_json(), flush=True)
            return
        # The level this reading alone gives (the daemon's also weighs how long PSI has been high).
        _, decision = step(GovernorState(), Signals.from_reading(t), time.time(), settings.governor)
        t = t.model_copy(update={"governor_level": decision.level.name})
        if args.watch and sys.stdout.isatty():
            print("\033[H\033[J", end="")
        print(render(t, describe=args.describe, unavailable=sampler.unavailable))
        notes = []
        if first and args.watch:
            notes.append("rates (/s) appear from the second reading")
        if decision.missing:
            notes.append("the governor works without: " + ", ".join(decision.missing))
        notes.append("governor_level here is this reading's alone; '-' is known only to the running daemon")
        print("\n" + "\n".join(f"note: {n}" for n in notes), flush=True)

    if not args.watch:
        if args.window > 0:
            sampler.sample()
            time.sleep(args.window)
        show(first=args.window == 0)
        return 0
    n = 0
    try:
        while args.count is None or n < args.count:
            if n:
                time.sleep(args.interval)
                if not args.json:
                    print()
            show(first=n == 0)
            n += 1
    except KeyboardInterrupt:
        pass
    return 0
