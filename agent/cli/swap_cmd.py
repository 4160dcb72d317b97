"""`edge-agent swap status|apply`: the swap devices and the agent's part in them.

``status`` lists every active swap device and marks the ones the agent created (needs root to read
the record; without it, devices are listed unmarked). ``apply`` is the privileged part: run as root
by systemd/edge-agent-swap.service (at boot, and by edge-agent-swap.path when the daemon writes a
new desired-swap file). It reads the swap settings from the root configuration, takes the daemon's
desired values (sizes, priorities, policy; never paths) from --desired, and creates, resizes or
removes the agent's zram device and swap file. Exit 1 when a step was refused or failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from agent.cli.config_cmd import add_config_option, add_group, settings_from
from agent.config import Settings
from agent.errors import EXIT_FAILURE, EXIT_USAGE

if TYPE_CHECKING:
    from agent.system.swap import SwapManager

MiB = 1024 * 1024


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ssub = add_group(sub, "swap", "list swap devices; apply the swap policy (root)")

    st = ssub.add_parser("status", help="list every swap device and mark the agent's")
    add_config_option(st)
    st.add_argument("--json", action="store_true", help="one JSON document")
    st.set_defaults(handler=_status)

    ap = ssub.add_parser(
        "apply",
        help="create, resize or remove the agent's swap to match swap.* (root; run by edge-agent-swap.service)",
    )
    add_config_option(ap, demo_fallback=False)  # a root service's command: its own -c, never a user's demo
    ap.add_argument(
        "--desired",
        type=Path,
        default=None,
        metavar="FILE",
        help="the daemon's desired-swap file ({device.state_dir}/swap-desired.json); its values override the "
        "configuration's, except paths",
    )
    ap.add_argument("--dry-run", action="store_true", help="print the plan without changing anything (no root needed)")
    ap.add_argument("--json", action="store_true", help="one JSON document")
    ap.set_defaults(handler=_apply)


def _manager(settings: Settings) -> SwapManager:
    from agent.system.swap import SwapManager

    return SwapManager(settings.swap.record_path)


def _status(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    status = _manager(settings).status()
    if args.json:
        json.dump(status, sys.stdout, indent=2)
        print()
        return 0
    devices = status["devices"]
    if not devices:
        print("no swap is active")
    else:
        print(f"{'device':<32} {'kind':<9} {'size':>10} {'used':>10} {'prio':>5}  agent")
        for d in devices:
            print(
                f"{d['path']:<32} {d['kind']:<9} {d['size'] / MiB:>7.0f} MiB {d['used'] / MiB:>6.0f} MiB "
                f"{d['priority']:>5}  {'yes' if d['agent'] else 'no'}"
            )
    for e in status["inactive_records"]:
        print(f"recorded but not active: {e['path']} ({e['kind']}, {e['size'] // MiB} MiB)")
    print(f"vm.swappiness {status['swappiness']}; wanted: swap.policy {settings.swap.policy!r}")
    if status["note"]:
        print(f"note: {status['note']}")
    return 0


def _apply(args: argparse.Namespace) -> int:
    from agent.system.swap import is_root, load_desired

    settings = settings_from(args)
    swap = settings.swap if args.desired is None else load_desired(args.desired, settings.swap)
    if not args.dry_run and not is_root():
        print(
            "edge-agent: swap apply needs root (swapon, zram, vm.swappiness); it runs as the "
            "edge-agent-swap.service unit. --dry-run shows the plan.",
            file=sys.stderr,
        )
        return EXIT_USAGE
    result = _manager(settings).apply(swap, dry_run=args.dry_run)
    if args.json:
        json.dump(result.as_dict(), sys.stdout, indent=2)
        print()
    else:
        if not result.outcomes:
            print(f"nothing to do: swap matches swap.policy {swap.policy!r}")
        for o in result.outcomes:
            mark = "ok     " if o.done else "REFUSED" if o.step.refused else "FAILED "
            print(f"{mark} {o.message}")
    return 0 if result.ok else EXIT_FAILURE
