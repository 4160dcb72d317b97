"""`edge-agent config validate|show|schema|docs`, and what every command shares: the -c option, the ACTION of a group.

Which settings a command reads: ``-c FILE``; else /etc/edge-agent/config.toml when it exists; else
the settings the last `run --demo` of this user recorded (agent.app.demo.recorded_demo), so the
operator commands find the demo daemon as the README shows them; else the built-in defaults.
``resolve_config`` decides it once per command line; handlers load with ``settings_from``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.config import Settings, load_settings, masked_dump
from agent.errors import EXIT_FAILURE, EXIT_USAGE, ConfigError, ModelError


def add_config_option(p: argparse.ArgumentParser, *, demo_fallback: bool = True) -> None:
    """The --config option every command that reads settings shares. ``demo_fallback``: without
    -c and without /etc/edge-agent/config.toml, read the demo's recorded settings (not for `run`)."""
    p.add_argument(
        "-c",
        "--config",
        type=Path,
        default=None,
        help="TOML settings file (default: /etc/edge-agent/config.toml if present, else the settings of the "
        "last `run --demo`, else built-in defaults); EDGE_AGENT__SECTION__KEY environment variables override it",
    )
    p.set_defaults(config_overrides=None, demo_fallback=demo_fallback)


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def add_broker_options(p: argparse.ArgumentParser, *, device: bool = False) -> None:
    """What every command that talks to a board over the broker shares: --config, --connect-timeout and,
    with ``device``, --device."""
    add_config_option(p)
    if device:
        p.add_argument("--device", help="target device id (default: device.id of the config)")
    p.add_argument("--connect-timeout", type=float, default=10.0, help="seconds to reach the broker (default 10)")


def add_group(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help: str
) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    """``edge-agent NAME ACTION``: a command group, whose actions each set their own handler."""
    p = sub.add_parser(name, help=help)
    return p.add_subparsers(dest=f"{name}_command", metavar="ACTION", required=True)


def resolve_config(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> None:
    """No -c and no /etc/edge-agent/config.toml: point ``args.config`` at the demo's profile and
    ``args.config_overrides`` at what locates the demo, and say so on stderr. Else nothing changes."""
    from agent import config
    from agent.app.demo import recorded_demo

    if getattr(args, "config", None) is not None or not getattr(args, "demo_fallback", False):
        return
    if any(p.is_file() for p in config.DEFAULT_CONFIG_PATHS):
        return
    record = recorded_demo(environ)
    if record is None:
        return
    args.config, args.config_overrides = record.config, record.overrides(environ)
    if record.running:
        what = f"the settings of the running demo (pid {record.pid}; {record.path})"
    else:
        what = f"the demo's profile {record.config} (the demo of {record.path} has stopped)"
    print(f"edge-agent: no -c and no {config.DEFAULT_CONFIG_PATHS[0]}: using {what}", file=sys.stderr)


def settings_from(args: argparse.Namespace, overrides: Mapping[str, Any] | None = None) -> Settings:
    """The settings a command reads (``resolve_config``), with ``overrides`` of its own on top."""
    merged: dict[str, Any] = {}
    for layer in (getattr(args, "config_overrides", None) or {}, overrides or {}):
        for section, values in layer.items():
            merged[section] = {**merged.get(section, {}), **values}
    return load_settings(args.config, overrides=merged or None)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    csub = add_group(sub, "config", "validate, show and describe the configuration")

    v = csub.add_parser(
        "validate",
        help="validate one or more TOML files; exit 1 if any is invalid (a missing model file is a warning)",
    )
    v.add_argument("paths", nargs="*", type=Path, metavar="PATH")
    v.add_argument(
        "-c",
        "--config",
        type=Path,
        action="append",
        default=[],
        dest="config_files",
        metavar="FILE",
        help="a file to validate, as with the other commands (repeatable; same as PATH)",
    )
    v.set_defaults(handler=_validate)

    s = csub.add_parser("show", help="print the effective configuration (secrets masked) as JSON")
    add_config_option(s)
    s.set_defaults(handler=_show)

    sc = csub.add_parser("schema", help="print the JSON Schema of the configuration")
    sc.set_defaults(handler=_schema)

    d = csub.add_parser("docs", help="print the configuration reference (Markdown; docs/configuration.md)")
    d.set_defaults(handler=_docs)


def _validate(args: argparse.Namespace) -> int:
    paths = [*args.config_files, *args.paths]
    if not paths:
        print("edge-agent: config validate: name the file: `config validate FILE` or `-c FILE`", file=sys.stderr)
        return EXIT_USAGE
    failed = 0
    for path in paths:
        try:
            settings = load_settings(path, environ={})
        except ConfigError as e:
            failed += 1
            print(f"INVALID {e}", file=sys.stderr)
            continue
        print(f"ok      {path}")
        if (warning := _model_warning(settings)) is not None:
            print(f"warning {path}: {warning}", file=sys.stderr)
    return EXIT_FAILURE if failed else 0


def _model_warning(settings: Settings) -> str | None:
    """Why the daemon could not load the configured model as things stand, or None. A warning, not
    an invalid config: the file may be copied, or downloaded from model.url, before the start."""
    try:
        path = settings.model_file()
    except ModelError as e:
        detail = str(e)
    else:
        if path.is_file():
            return None
        detail = f"{path}: no such file"
    if settings.model.url is not None:
        return f"model file not there yet ({detail}); the daemon downloads it from model.url"
    return (
        f"model file missing: {detail}; the daemon will not start until it is there "
        f"(copy it into {settings.device.models_dir}, or fix model.path)"
    )


def _show(args: argparse.Namespace) -> int:
    settings = settings_from(args)
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
