"""`edge-agent status`: is the daemon running, what it serves, its queue, memory and shadow.

Reads the state file the daemon keeps and the job store (read-only); no broker needed.
"""

from __future__ import annotations

import argparse
import json
import sys

from agent.cli.config_cmd import add_config_option, settings_from
from agent.errors import EXIT_FAILURE, EXIT_OK


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("status", help="is the daemon running, its model, queue, memory, last telemetry (no broker)")
    add_config_option(s)
    s.add_argument("--json", action="store_true", help="print one JSON document")
    s.add_argument("--jobs", type=int, default=5, help="how many of the last jobs to show (default 5)")
    s.set_defaults(handler=_status)


def _status(args: argparse.Namespace) -> int:
    from agent.ops.status import collect_status, render_status

    doc = collect_status(settings_from(args), last_jobs=args.jobs)
    if args.json:
        json.dump(doc, sys.stdout, indent=2)
        print()
    else:
        print(render_status(doc))
    # Exit 1 when the daemon is known to be down or hung: scripts can use it as a health check.
    return EXIT_OK if doc["daemon"]["verdict"] in ("running", "unknown") else EXIT_FAILURE
