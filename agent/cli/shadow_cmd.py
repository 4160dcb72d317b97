"""`edge-agent shadow get|set|show`: read and change a board's desired state, see what it runs.

``get`` and ``set`` go through the broker (agent.operator.shadow); ``show`` reads the board's own
shadow.db and needs no broker. The table shows, per setting, what operators asked for (desired),
what is in force (reported) and the state: in sync, applying, pending (accepted, nothing acts on it
yet) or FAILED with the reason.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from agent.cli.config_cmd import add_broker_options, add_config_option, add_group, settings_from
from agent.config import Settings
from agent.errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE

_WIDTH = 26


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ssub = add_group(sub, "shadow", "read and change a board's desired state (the device shadow)")

    g = ssub.add_parser("get", help="print desired, reported and delta of a board, through the broker")
    _common(g)
    g.add_argument("--all", action="store_true", help="list every run-time setting, not only the ones desired names")
    g.add_argument("--json", action="store_true", help="print the shadow document as JSON")
    g.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        help="seconds to wait for the board's answer before showing its retained document (default 5)",
    )
    g.set_defaults(handler=_get)

    s = ssub.add_parser(
        "set",
        help="send a desired-state update: KEY=VALUE ... (KEY=null removes a key)",
        description='Values are read as JSON when they parse (512, true, "512", null), else as text; keys that '
        "only hold text (model.path, engine.load_mode) always take the text as it is, unless it is null.",
    )
    _common(s)
    s.add_argument(
        "assignments",
        nargs="*",
        metavar="KEY=VALUE",
        type=_assignment,
        help="a dotted run-time setting and its value, e.g. engine.n_ctx=512 intake.paused=true",
    )
    s.add_argument(
        "--reset", action="store_true", help="remove every desired key: the board goes back to its config file"
    )
    s.add_argument(
        "--version",
        type=int,
        default=None,
        metavar="N",
        help="only if the document is at version N (else the board refuses with 409)",
    )
    s.add_argument(
        "--wait",
        action="store_true",
        help="also wait until the board has applied it; exit 0 when applied, 1 when a key failed",
    )
    s.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the board's reply (default 10)")
    s.add_argument(
        "--wait-timeout",
        type=float,
        default=300.0,
        help="with --wait: seconds to wait for the apply, a model swap included (default 300)",
    )
    s.add_argument(
        "--key",
        type=Path,
        default=None,
        metavar="KEY",
        help="sign the update with this operator private key (`edge-agent keys generate`): needed for model.* and "
        "the other guarded keys on boards that trust operator keys; without --version the document's current "
        "version is read first",
    )
    s.add_argument(
        "--sign-valid-s",
        type=float,
        default=600.0,
        help="with --key: seconds the signed update stays valid (default 600)",
    )
    s.add_argument(
        "--retain",
        action="store_true",
        help="publish the update retained, for a board that has never connected (it applies it once and clears it)",
    )
    s.add_argument("--json", action="store_true", help="print the reply (and with --wait the document) as JSON")
    s.set_defaults(handler=_set)

    sh = ssub.add_parser("show", help="print this board's shadow from its local state (no broker needed)")
    add_config_option(sh)
    sh.add_argument("--all", action="store_true", help="list every run-time setting")
    sh.add_argument("--json", action="store_true", help="print the stored document as JSON")
    sh.set_defaults(handler=_show)


def _common(p: argparse.ArgumentParser) -> None:
    add_broker_options(p, device=True)


def _assignment(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    parts = key.split(".")
    if not sep or len(parts) < 2 or not all(parts):
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with a dotted key, e.g. engine.n_ctx=512; got {text!r}")
    if raw == "null":
        return key, None
    if _text_only(key) and not raw.startswith('"'):
        return key, raw
    try:
        return key, json.loads(raw)
    except ValueError:
        return key, raw


def _text_only(key: str) -> bool:
    """Whether the setting holds only text (or null), so '0123' must stay a string."""
    from agent.shadow.desired import section_models

    section, _, name = key.partition(".")
    model = section_models().get(section)
    if model is None or name not in model.model_fields:
        return False
    prop = model.model_json_schema()["properties"][name]
    types = {p.get("type") for p in prop.get("anyOf", [prop])}
    return types <= {"string", "null"}


def _nest(assignments: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    seen: set[str] = set()
    for key, value in assignments:
        if key in seen:
            raise _Usage(f"{key} is given twice")
        seen.add(key)
        *path, leaf = key.split(".")
        node = out
        for part in path:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise _Usage(f"{key} conflicts with {'.'.join(path)}")
            node = child
        if isinstance(node.get(leaf), dict):
            raise _Usage(f"{key} conflicts with the keys below it")
        node[leaf] = value
    return out


class _Usage(Exception):
    pass


def _settings(args: argparse.Namespace) -> tuple[Settings, str]:
    settings = settings_from(args)
    return settings, getattr(args, "device", None) or settings.device.id


# --------------------------------------------------------------------------------------------


def _get(args: argparse.Namespace) -> int:
    from agent.operator.shadow import ShadowClient

    settings, device = _settings(args)
    with ShadowClient(settings, device_id=device, connect_timeout=args.connect_timeout) as client:
        doc, source = client.get(args.timeout)
    if args.json:
        json.dump(doc, sys.stdout, indent=2)
        print()
        return EXIT_OK
    where = (
        "from the device"
        if source == "device"
        else (
            "the retained document: the device is offline"
            if client.device_state == "offline"
            else "the retained document: the device's 'online' status is stale (not renewed before it expired: "
            "the board, or the broker node it was on, is gone)"
            if client.device_state == "stale"
            else "the retained document: the device did not answer"
        )
    )
    print(render(doc, device=device, source=where, all_keys=args.all))
    return EXIT_OK


def _set(args: argparse.Namespace) -> int:
    from agent.operator.shadow import ShadowClient

    if bool(args.assignments) == args.reset:
        print("edge-agent: give KEY=VALUE assignments, or --reset alone", file=sys.stderr)
        return EXIT_USAGE
    try:
        desired = None if args.reset else _nest(args.assignments)
    except _Usage as e:
        print(f"edge-agent: {e}", file=sys.stderr)
        return EXIT_USAGE
    settings, device = _settings(args)
    wanted = (
        "reset to the config file" if args.reset else ", ".join(f"{k}={json.dumps(v)}" for k, v in args.assignments)
    )
    started = time.monotonic()
    with ShadowClient(settings, device_id=device, connect_timeout=args.connect_timeout) as client:
        version, signature = args.version, None
        if args.key is not None:
            from agent.signing import iso, load_private_key, sign_update

            if version is None:  # a signature holds for one version only: replays are refused
                version = int(client.get(args.timeout)[0].get("version", 0))
            signature = sign_update(
                desired,
                device=device,
                version=version,
                key=load_private_key(args.key),
                expires=iso(time.time() + args.sign_valid_s),
            )
        kind, reply = client.update(
            desired, version=version, timeout=args.timeout, retain=args.retain, signature=signature
        )
        if kind == "sent":
            if args.retain and not args.wait:
                print(f"published retained: {device} applies it when it connects ({wanted})")
                return EXIT_OK
            print(
                f"edge-agent: {device} did not answer within {args.timeout:g} s; the broker keeps the update for it "
                "and it is applied when the device connects",
                file=sys.stderr,
            )
            return EXIT_FAILURE
        assert reply is not None
        if kind == "rejected":
            if args.json:
                _print_json({"reply": reply})
            errors = reply.get("errors") or {}
            if errors:  # the message lists them too; one line per key reads better
                print(f"rejected {reply.get('code')}, nothing changed:", file=sys.stderr)
                for key, why in sorted(errors.items()):
                    print(f"  {key}: {why}", file=sys.stderr)
            else:
                print(f"rejected {reply.get('code')}: {reply.get('message')}", file=sys.stderr)
            return EXIT_FAILURE
        version = reply["version"]
        if not args.json:
            print(f"accepted: version {version} ({wanted})")
        if not args.wait:
            if args.json:
                _print_json({"reply": reply})
            return EXIT_OK
        if not args.json:
            print(f"waiting for {device} to apply version {version} ...", file=sys.stderr)
        doc = client.wait_applied(version, args.wait_timeout)
    if doc is None:
        if args.json:
            _print_json({"reply": reply, "applied": False})
        print(
            f"edge-agent: {device} did not finish applying version {version} within {args.wait_timeout:g} s",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    verdict = judge(doc, reply["state"]["desired"], None if args.reset else [k for k, _ in args.assignments])
    if args.json:
        _print_json({"reply": reply, "applied": not verdict["failed"], "errors": verdict["failed"], "document": doc})
    else:
        for key, note in verdict["pending"].items():
            print(f"note: {key}: {note}")
        for key, later in verdict["superseded"].items():
            print(f"note: {key} was changed again by version {later} before it was applied")
    if verdict["failed"]:
        for key, why in verdict["failed"].items():
            print(f"failed: {key}: {why}", file=sys.stderr)
        return EXIT_FAILURE
    if not args.json:
        print(f"applied: version {version} in {time.monotonic() - started:.1f} s")
    return EXIT_OK


def judge(doc: dict[str, Any], desired_sent: dict[str, Any], keys: list[str] | None) -> dict[str, dict[str, Any]]:
    """For the keys an update set (None: every key, after a reset): which failed (with why), which
    are pending (with the note), and which a later update changed again."""
    from agent.config.tree import flatten

    state = doc.get("state", {})
    reported = state.get("reported", {})
    errors = reported.get("errors") or {}
    pending = reported.get("pending") or {}
    now_desired = flatten(state.get("desired", {}))
    sent = flatten(desired_sent)
    out: dict[str, dict[str, Any]] = {"failed": {}, "pending": {}, "superseded": {}}
    for key in keys if keys is not None else [*errors, *pending]:
        if key in sent and key in now_desired and now_desired[key] != sent[key]:
            out["superseded"][key] = doc.get("version")
        elif key in errors:
            out["failed"][key] = errors[key]
        elif key in pending:
            out["pending"][key] = pending[key]
    return out


def _show(args: argparse.Namespace) -> int:
    from agent.shadow.messages import document_message
    from agent.shadow.store import ShadowStore

    settings = settings_from(args)
    with ShadowStore.from_settings(settings, readonly=True) as store:
        stored = store.load()
    doc = json.loads(document_message(stored, time.time()).to_payload())
    if args.json:
        _print_json(doc)
        return EXIT_OK
    print(render(doc, device=settings.device.id, source=f"stored on this board ({store.path})", all_keys=args.all))
    return EXIT_OK


def _print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2)
    print()


# --------------------------------------------------------------------------------------------
# The table


def render(doc: dict[str, Any], *, device: str, source: str, all_keys: bool = False) -> str:
    """desired, reported and state per setting, then the board's facts."""
    from agent.config.tree import flatten
    from agent.shadow.messages import REPORTED_EXTRAS

    state = doc.get("state", {})
    desired = flatten(state.get("desired", {}))
    reported_all = state.get("reported", {})
    reported = flatten({k: v for k, v in reported_all.items() if k not in REPORTED_EXTRAS})
    delta = flatten(state.get("delta", {}))
    errors = reported_all.get("errors") or {}
    pending = reported_all.get("pending") or {}
    applied = reported_all.get("applied_version")
    lines = [
        f"device {device}  version {doc.get('version', 0)}"
        + (f"  applied {applied}" if applied is not None else "")
        + f"  as of {doc.get('ts', '?')}  ({source})",
        "",
    ]
    named = [k for k in reported if all_keys or k in desired or k in errors or k in pending]
    named += [k for k in desired if k not in reported]
    rows = [("KEY", "DESIRED", "REPORTED", "STATE")]
    for key in named:
        if key in errors:
            st = f"FAILED: {errors[key]}"
        elif key in delta:
            st = "applying"
        elif key in pending:
            st = f"pending: {pending[key]}"
        elif key in desired:
            st = "in sync"
        else:
            st = ""
        rows.append(
            (key, _cell(desired[key]) if key in desired else "-", _cell(reported[key]) if key in reported else "-", st)
        )
    if len(rows) == 1:
        lines.append("nothing desired: the board runs its config file")
    else:
        w0 = max(len(r[0]) for r in rows)
        w1 = min(_WIDTH, max(len(r[1]) for r in rows))
        w2 = min(_WIDTH, max(len(r[2]) for r in rows))
        for r in rows:
            lines.append(f"{r[0]:<{w0}}  {r[1]:<{w1}}  {r[2]:<{w2}}  {r[3]}".rstrip())
    hidden = len(reported) - len([k for k in named if k in reported])
    if hidden > 0:
        lines.append(
            f"({hidden} other run-time settings are not in desired: the config file's values; --all lists them)"
        )
    lines += _facts(reported_all)
    return "\n".join(lines)


def _cell(v: Any) -> str:
    text = json.dumps(v) if not isinstance(v, str) else v
    return text if len(text) <= _WIDTH else text[: _WIDTH - 3] + "..."


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def _facts(reported: dict[str, Any]) -> list[str]:
    out: list[str] = []
    board = reported.get("board")
    if isinstance(board, dict):
        cpu = board.get("cpu") or {}
        out.append("")
        out.append(
            f"board     {board.get('board')}  {board.get('machine')}  {cpu.get('model') or '?'}  "
            f"{cpu.get('cores')} cores  features: {' '.join(cpu.get('features') or []) or 'none'}"
        )
        limit = board.get("cgroup_limit_bytes")
        cg = _size(limit) if limit is not None else ("none" if not board.get("cgroup_note") else "no memory cgroup")
        out.append(
            f"memory    MemTotal {_size(board.get('mem_total_bytes'))}  cgroup limit {cg}  "
            f"PSI {'yes' if board.get('psi') else 'no'}"
        )
        swaps = board.get("swap") or []
        out.append(
            "swap      "
            + ("; ".join(f"{s['name']} {_size(s['size_bytes'])} prio {s['priority']}" for s in swaps) or "none")
        )
        out.append(f"disk      {_size(board.get('models_free_bytes'))} free in the models folder")
        out.append(
            f"versions  edge-agent {board.get('agent_version')}  llama-cpp-python {board.get('llama_cpp_python')}"
        )
    serving = reported.get("serving")
    if isinstance(serving, dict):
        took = f"  loaded in {serving['load_ms']:.0f} ms" if serving.get("load_ms") is not None else ""
        out.append(f"serving   {serving.get('file')}  {serving.get('load_mode')}  n_ctx {serving.get('n_ctx')}{took}")
    return out
