"""The `edge-agent` command: a dispatcher over one module per command group.

Each module in COMMAND_MODULES exposes ``register(subparsers)``; each handler takes the parsed
arguments and returns an exit code. Project errors become one line on stderr and exit 1
(or EXIT_CANNOT_START where a handler says the daemon cannot start).

Imports inside handlers are deliberate (costly): every command module is imported to build the parser,
so a handler imports what only its command needs (llama.cpp, the daemon, the stores, the MQTT client),
and `edge-agent status` or `--help` do not load the rest.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from agent import __version__
from agent.errors import EXIT_FAILURE, EXIT_USAGE, EdgeAgentError

COMMAND_MODULES = (
    "agent.cli.config_cmd",
    "agent.cli.model_cmd",
    "agent.cli.generate_cmd",
    "agent.cli.daemon_cmd",
    "agent.cli.shadow_cmd",
    "agent.cli.fleet_cmd",
    "agent.cli.telemetry_cmd",
    "agent.cli.swap_cmd",
    "agent.cli.ops_cmd",
    "agent.cli.status_cmd",
    "agent.cli.keys_cmd",
    "agent.cli.bundle_cmd",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-agent",
        description="A dependable MQTT worker for a 4-bit GGUF LLM on small boards.",
    )
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def setup_logging(verbose: int) -> None:
    """Text logs on stderr (no timestamps under journald, secrets masked); the daemon switches to
    service.log_format once it has read its settings (agent.ops.logs.configure_from_settings)."""
    from agent.ops.logs import configure_logging

    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    configure_logging(level, "text", stream=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        from agent.cli.config_cmd import resolve_config

        resolve_config(args)  # no -c: /etc/edge-agent/config.toml, else the demo's, else the defaults
        return int(args.handler(args) or 0)
    except EdgeAgentError as e:
        print(f"edge-agent: error [{e.code}]: {e}", file=sys.stderr)
        return e.exit_code if e.exit_code is not None else EXIT_FAILURE
    except KeyboardInterrupt:
        print("edge-agent: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_USAGE
