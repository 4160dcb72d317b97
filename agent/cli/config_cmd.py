"""`edge-agent config validate|show|schema`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from agent.config import Settings, load_settings, masked_dump
from agent.errors import EXIT_FAILURE, ConfigError


def add_config_option(p: argparse.ArgumentParser) -> None:
    """The --config option every command that reads settings shares."""
    p.add_argument(
        "-c",
        "--config",
        type=Path,
        default=None,
        help="TOML settings file (default: /etc/edge-agent/config.toml if present, else built-in defaults); "
        "EDGE_AGENT__SECTION__KEY environment variables override it",
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="validate, show and describe the configuration")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)

    v = csub.add_parser("validate", help="validate one or more TOML files; exit 1 if any is invalid")
    v.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    v.set_defaults(handler=_validate)

    s = csub.add_parser("show", help="print the effective configuration (secrets masked) as JSON")
    add_config_option(s)
    s.set_defaults(handler=_show)

    sc = csub.add_parser("schema", help="print the JSON Schema of the configuration")
    sc.set_defaults(handler=_schema)

    d = csub.add_parser("docs", help="print the configuration reference (Markdown; docs/configuration.md)")
    d.set_defaults(handler=_docs)


def _validate(args: argparse.Namespace) -> int:
    failed = 0
    for path in args.paths:
        try:
            load_settings(path, environ={})
        except ConfigError as e:
            failed += 1
            print(f"INVALID {e}", file=sys.stderr)
        else:
            print(f"ok      {path}")
    return EXIT_FAILURE if failed else 0


def _show(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    json.dump(masked_dump(settings), sys.stdout, indent=2)
    print()
    return 0


def _schema(args: argparse.Namespace) -> int:
    json.dump(Settings.model_json_schema(), sys.stdout, indent=2)
    print()
    return 0


def _docs(args: argparse.Namespace) -> int:
    from agent.config.reference import render_markdown

    sys.stdout.write(render_markdown())
    return 0
