"""`edge-agent systemd render`, `install`, `uninstall`, `doctor`: the board as a service.

The logic is in agent.ops (units, install, doctor); this module reads the arguments and prints.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from agent.cli.config_cmd import add_config_option, add_group
from agent.errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE

if TYPE_CHECKING:
    from agent.ops.units import MemoryLimits


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from agent.ops.units import DEFAULT_UNITS_DIR

    ssub = add_group(sub, "systemd", "render the systemd units for a board profile and a model")
    r = ssub.add_parser(
        "render",
        help="write the units (main, and the swap units when present) with MemoryHigh/MemoryMax from the profile "
        "and the model's memory plan; or only a drop-in with the limits",
        description="MemoryMax = the budget (memory.budget_mb, or RAM - memory.reserve_mb with 'auto'); "
        "MemoryHigh = min(budget, max(budget - margin, planned anonymous memory + margin)), margin = max(16 MiB, "
        "5 % of the budget). See docs/operations.md.",
    )
    _profile_options(r)
    r.add_argument("--out", type=Path, help="folder to write the files to (default: print them)")
    r.add_argument(
        "--drop-in",
        action="store_true",
        help="only edge-agent.service.d/50-memory.conf with the limits, for a unit installed as shipped",
    )
    r.set_defaults(handler=_render)

    i = sub.add_parser("install", help="install as a systemd service (root): user, folders, config, credential, units")
    _profile_options(i)
    i.add_argument(
        "--root",
        type=Path,
        default=Path("/"),
        help="install under this folder instead of / (an image, a test); systemctl is not run then",
    )
    i.add_argument("--dry-run", action="store_true", help="print each step and what it would do; change nothing")
    i.add_argument("--device-id", help="device.id in the config (default: the hostname)")
    i.add_argument("--mqtt-host", help="mqtt.host in the config")
    i.add_argument("--mqtt-port", type=int, help="mqtt.port in the config")
    i.add_argument("--mqtt-username", help="mqtt.username in the config")
    i.add_argument(
        "--mqtt-password-file",
        type=Path,
        help="file holding the broker password: copied to /etc/edge-agent/mqtt_password (0600), never into the config",
    )
    i.add_argument(
        "--replace-config",
        action="store_true",
        help="rewrite /etc/edge-agent/config.toml from the profile even if it exists (default: keep it)",
    )
    i.add_argument("--now", dest="start", action="store_true", help="also (re)start the service")
    i.set_defaults(handler=_install)

    u = sub.add_parser("uninstall", help="stop and remove the service (root); --purge also removes config, state, user")
    u.add_argument("--root", type=Path, default=Path("/"), help="act under this folder instead of /")
    u.add_argument("--dry-run", action="store_true", help="print each step; change nothing")
    u.add_argument(
        "--purge",
        action="store_true",
        help="also remove /etc/edge-agent, /var/lib/edge-agent (jobs and models) and the user",
    )
    u.add_argument("--units-dir", type=Path, default=DEFAULT_UNITS_DIR, help="the shipped units (to know their names)")
    u.set_defaults(handler=_uninstall)

    d = sub.add_parser("doctor", help="check this board: config, model, memory, broker, kernel, disk, service, CPU")
    add_config_option(d)
    d.add_argument("--json", action="store_true", help="print the checks as JSON")
    d.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the broker (default 5)")
    d.add_argument(
        "--no-sha256", dest="sha256", action="store_false", help="skip hashing the model file (slow on an SD card)"
    )
    d.set_defaults(handler=_doctor)


def _profile_options(p: argparse.ArgumentParser) -> None:
    from agent.ops.units import DEFAULT_UNITS_DIR

    p.add_argument(
        "--profile", required=True, help="board profile: a name in firmware-config/ (pi-4-2gb) or a TOML file"
    )
    p.add_argument("--model", type=Path, help="the GGUF model the board will serve: its memory plan sets the limits")
    p.add_argument(
        "--ram-mb",
        type=int,
        help="the board's RAM, MiB, for profiles with memory.budget_mb 'auto' (default: this machine's)",
    )
    p.add_argument(
        "--exec", dest="exec_path", help="the edge-agent command on the board (default: this installation's)"
    )
    p.add_argument("--units-dir", type=Path, default=DEFAULT_UNITS_DIR, help="the shipped units (default: %(default)s)")


def _command_line() -> str:
    return "edge-agent " + " ".join(sys.argv[1:])


def _limits(args: argparse.Namespace) -> tuple[Path, MemoryLimits]:
    from agent.config import load_settings
    from agent.ops.units import memory_limits, plan_model, profile_budget, resolve_profile  # loads pydantic models

    profile = resolve_profile(args.profile)
    settings = load_settings(profile, environ={})
    budget = profile_budget(settings, args.ram_mb * 1024 * 1024 if args.ram_mb else None)
    plan = plan_model(settings, args.model, budget) if args.model else None
    return profile, memory_limits(budget, plan)


def _render(args: argparse.Namespace) -> int:
    from agent.ops.units import default_exec_path, drop_in, render_units

    _, limits = _limits(args)
    if args.drop_in:
        files = dict([drop_in(limits, _command_line())])
    else:
        files = render_units(
            limits, exec_path=args.exec_path or default_exec_path(), units_dir=args.units_dir, command=_command_line()
        )
    if args.out is None:
        for name, text in files.items():
            print(f"# ---- {name}")
            print(text)
    else:
        for name, text in files.items():
            target = args.out / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
            print(f"wrote {target}", file=sys.stderr)
    print(
        f"MemoryHigh={limits.high} MemoryMax={limits.max} (budget {limits.budget.bytes // 2**20} MiB, "
        f"{limits.budget.source})",
        file=sys.stderr,
    )
    for note in limits.notes:
        print(f"note: {note}", file=sys.stderr)
    return EXIT_OK


def _check_root(args: argparse.Namespace) -> int | None:
    if not args.dry_run and args.root.resolve() == Path("/") and os.geteuid() != 0:
        print(
            "edge-agent: install and uninstall change /etc and /var: run as root (or --dry-run, or --root DIR)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    return None


def _install(args: argparse.Namespace) -> int:
    from agent.ops.install import Context, InstallOptions, plan_install, run_steps
    from agent.ops.units import default_exec_path, resolve_profile

    if (code := _check_root(args)) is not None:
        return code
    opts = InstallOptions(
        profile=resolve_profile(args.profile),
        exec_path=args.exec_path or default_exec_path(),
        units_dir=args.units_dir,
        model=args.model,
        device_id=args.device_id,
        mqtt_host=args.mqtt_host,
        mqtt_port=args.mqtt_port,
        mqtt_username=args.mqtt_username,
        mqtt_password_file=args.mqtt_password_file,
        ram_mb=args.ram_mb,
        replace_config=args.replace_config,
        start=args.start,
        command=_command_line(),
    )
    steps = plan_install(opts)
    ctx = Context(root=args.root, dry_run=args.dry_run)
    print(f"{'dry run: ' if args.dry_run else ''}installing edge-agent under {args.root}", file=sys.stderr)
    run_steps(steps, ctx)
    if not args.dry_run:
        print("next: check the board with `edge-agent doctor -c /etc/edge-agent/config.toml`", file=sys.stderr)
    return EXIT_OK


def _uninstall(args: argparse.Namespace) -> int:
    from agent.ops.install import Context, plan_uninstall, run_steps
    from agent.ops.units import MAIN_UNIT, unit_files

    if (code := _check_root(args)) is not None:
        return code
    names = [p.name for p in unit_files(args.units_dir)]
    names = [n for n in names if n != MAIN_UNIT] + [MAIN_UNIT]
    ctx = Context(root=args.root, dry_run=args.dry_run)
    run_steps(plan_uninstall(names, purge=args.purge), ctx)
    if not args.purge:
        print(
            "kept: /etc/edge-agent (config, credential), /var/lib/edge-agent (jobs, models) and the user; "
            "--purge removes them",
            file=sys.stderr,
        )
    return EXIT_OK


def _doctor(args: argparse.Namespace) -> int:
    from agent.cli.config_cmd import settings_from
    from agent.ops.doctor import run_doctor

    report = run_doctor(
        args.config, load=lambda _path: settings_from(args), broker_timeout=args.timeout, check_sha=args.sha256
    )
    if args.json:
        json.dump(report.as_dict(), sys.stdout, indent=2)
        print()
    else:
        print(report.render())
    return EXIT_FAILURE if report.failed else EXIT_OK
