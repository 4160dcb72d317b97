"""`edge-agent fleet list|rollout|status`: see a fleet, and roll a model out to it in waves.

``list`` reads every device's retained status and shadow document from the broker. ``rollout``
points devices at a new model wave by wave through their shadows, advances on each wave's success,
aborts past the failure threshold and then puts every device it changed back on its previous model;
its state lives in a local SQLite file (``--db``), so ``rollout --resume ID`` continues it after
Ctrl-C or a crash. ``status`` reads that file only. The broker comes from the config file (``-c``),
as for `edge-agent shadow`. docs/operations.md explains the whole procedure.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from agent.cli.config_cmd import add_broker_options, add_group, settings_from
from agent.errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, ModelError

if TYPE_CHECKING:
    # Imported where they are used, as the handlers do: the operator's fleet modules and
    # cryptography cost every other command's start-up.
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from agent.operator.fleet.client import FleetClient
    from agent.operator.fleet.plan import Target
    from agent.operator.fleet.store import Rollout, RolloutStore

INTERRUPTED = 130


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    fsub = add_group(sub, "fleet", "list a fleet's devices; roll a model out in waves with automatic rollback")

    ls = fsub.add_parser("list", help="devices from their retained status and shadow documents")
    _broker(ls)
    ls.add_argument("--group", help="only devices whose reported fleet.groups holds GROUP")
    ls.add_argument("--devices", metavar="GLOB", help="only device ids matching GLOB (e.g. 'pi-*')")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(handler=_list)

    r = fsub.add_parser(
        "rollout",
        help="point devices at a new model, wave by wave; abort and restore past the failure threshold",
        description="Each device gets model.path/sha256 (and url/size) through its shadow; a wave advances when all "
        "its devices succeeded (the model is in force and passed the device's canary) or failed, within "
        "--max-failures. Devices that do not answer count as pending until --timeout-per-wave, then as failed. "
        "On abort every device the rollout changed is put back on its previous model.",
    )
    _broker(r)
    r.add_argument(
        "--model",
        metavar="PATH|URL",
        help="the model file name in the boards' models folder, or an http(s) URL the boards download it from",
    )
    r.add_argument(
        "--path", metavar="NAME", help="with a URL: the file name on the boards (default: the URL's last part)"
    )
    r.add_argument("--sha256", metavar="HEX", help="the file's SHA-256 (64 hex digits); required")
    r.add_argument(
        "--size", type=int, metavar="BYTES", help="the file's size: boards check free space before downloading"
    )
    who = r.add_mutually_exclusive_group()
    who.add_argument("--devices", metavar="GLOB", help="device ids matching GLOB (e.g. 'pi-*'), in id order")
    who.add_argument("--group", help="devices whose reported fleet.groups holds GROUP")
    r.add_argument("--waves", default="5%,15%,80%", help="shares of the devices per wave (default 5%%,15%%,80%%)")
    r.add_argument(
        "--max-failures",
        default="10%",
        help="failures tolerated: a share of the finished devices (10%%) or a count (2); past it the "
        "rollout aborts (default 10%%)",
    )
    r.add_argument(
        "--min-devices",
        type=int,
        default=3,
        help="finished devices needed before the share is checked mid-wave (default 3)",
    )
    r.add_argument(
        "--timeout-per-wave",
        type=float,
        default=1800.0,
        metavar="S",
        help="seconds a wave may take, downloads included (default 1800)",
    )
    r.add_argument(
        "--signature",
        type=Path,
        metavar="SIGFILE",
        help="the model's signed manifest (FILE.sig from `edge-agent model sign`), sent as model.signature: boards "
        "that trust operator keys load only a model signed for its exact bytes",
    )
    r.add_argument(
        "--key",
        type=Path,
        metavar="PRIVATE_KEY",
        help="sign every update and restore with this operator private key (`edge-agent keys generate`), as "
        "`shadow set --key` does: boards that trust operator keys refuse unsigned model changes (403); "
        "give it again with --resume",
    )
    r.add_argument("--wait", action="store_true", help="run until the rollout ends (else: start it and return)")
    r.add_argument("--resume", metavar="ID", help="continue rollout ID (after Ctrl-C, a crash, or without --wait)")
    r.add_argument("--json", action="store_true", help="no progress bar; print the rollout as JSON at the end")
    r.add_argument(
        "--db", type=Path, default=None, help="the rollout record (default ~/.local/state/edge-agent/rollouts.db)"
    )
    r.add_argument(
        "--reply-timeout", type=float, default=5.0, help="seconds to wait for the devices' replies (default 5)"
    )
    r.set_defaults(handler=_rollout)

    st = fsub.add_parser("status", help="a rollout's state from the local record (no broker); no ID: list rollouts")
    st.add_argument("id", nargs="?", help="the rollout id")
    st.add_argument("--db", type=Path, default=None, help="the rollout record")
    st.add_argument("--json", action="store_true", help="print JSON")
    st.set_defaults(handler=_status)


def _broker(p: argparse.ArgumentParser) -> None:
    add_broker_options(p)
    p.add_argument("--prefix", help="the topic prefix of the fleet (default: mqtt.prefix of the config)")


def _client(args: argparse.Namespace) -> FleetClient:
    from agent.operator.fleet.client import FleetClient

    return FleetClient(settings_from(args), prefix=args.prefix, connect_timeout=args.connect_timeout)


def _store(args: argparse.Namespace) -> RolloutStore:
    from agent.operator.fleet.store import RolloutStore, default_path

    return RolloutStore(args.db or default_path())


# --------------------------------------------------------------------------------------------
# list


def _list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.sync()
        infos = [client.info(d) for d in client.select(pattern=args.devices, group=args.group)]
    if args.json:
        json.dump([i.as_dict() for i in infos], sys.stdout, indent=2)
        print()
        return EXIT_OK
    if not infos:
        print("no devices (none has published a status or shadow document with this prefix on this broker)")
        return EXIT_OK
    now = time.time()
    rows = [("DEVICE", "STATE", "MODEL", "SHA256", "AGENT", "SHADOW", "LEVEL", "GROUPS", "FLEET JOBS", "LAST SEEN")]
    for i in infos:
        rows.append(
            (
                i.device,
                i.state or "-",
                i.model or "-",
                (i.sha256 or "-")[:12],
                i.agent_version or "-",
                "-" if i.shadow_version is None else f"v{i.shadow_version}/{i.applied_version}",
                i.level or "-",
                ",".join(i.groups) or "-",
                _fleet_jobs(i.fleet_jobs),
                _ago(now, i.last_seen),
            )
        )
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=False)).rstrip())
    for i in infos:
        if i.problem:
            print(f"{i.device}: model.path: {i.problem}")
    return EXIT_OK


def _fleet_jobs(load: dict[str, Any] | None) -> str:
    """Its mqtt.fleet_group and load: 'kitchen: 1 free, 0 queued, 42 tok/s', or '-' outside a fleet."""
    if not load:
        return "-"
    ms = load.get("ms_per_token")
    speed = f", {1000 / ms:.0f} tok/s" if isinstance(ms, int | float) and ms > 0 else ""
    state = "held" if load.get("held") else f"{load.get('free', 0)} free"
    return f"{load.get('group', '?')}: {state}, {load.get('queued', 0)} queued{speed}"


def _ago(now: float, t: float | None) -> str:
    if t is None:
        return "-"
    s = max(0.0, now - t)
    return f"{s:.0f}s ago" if s < 120 else f"{s / 60:.0f}m ago" if s < 7200 else f"{s / 3600:.1f}h ago"


# --------------------------------------------------------------------------------------------
# rollout


def _target(args: argparse.Namespace) -> Target:
    from agent.operator.fleet.plan import PlanError, Target

    if not args.model or not args.sha256:
        raise PlanError("a new rollout needs --model PATH|URL and --sha256 HEX (or --resume ID)")
    if not re.fullmatch(r"[0-9a-f]{64}", args.sha256):
        raise PlanError(f"--sha256 takes 64 lower-case hex digits, got {args.sha256!r}")
    if args.size is not None and args.size < 1:
        raise PlanError("--size must be a positive number of bytes")
    if re.match(r"https?://", args.model, re.I):
        name = args.path or unquote(urlsplit(args.model).path.rsplit("/", 1)[-1])
        if not name or "/" in name or name.startswith("."):
            raise PlanError(f"cannot take a file name from {args.model!r}: give --path NAME")
        if urlsplit(args.model).username:
            raise PlanError(
                "no credentials in the URL: they would be published in the shadow; the boards read "
                "theirs from the model_download_token credential"
            )
        return Target(path=name, sha256=args.sha256, url=args.model, size=args.size, signature=_signature(args, name))
    if args.path:
        raise PlanError("--path goes with a URL in --model")
    return Target(path=args.model, sha256=args.sha256, size=args.size, signature=_signature(args, args.model))


def _signature(args: argparse.Namespace, name: str) -> str | None:
    """The text of --signature, once it is seen to be a manifest for this file name and sha256 (the boards
    verify the signature itself; this catches the wrong file before anything is sent)."""
    from agent.operator.fleet.plan import PlanError
    from agent.signing import MAX_MANIFEST_BYTES, MODEL_FORMAT

    if args.signature is None:
        return None
    try:
        text: str = args.signature.read_text()
        data = json.loads(text)
    except (OSError, ValueError) as e:
        raise PlanError(f"--signature {args.signature}: cannot read a manifest: {e}") from None
    signed = data.get("signed") if isinstance(data, dict) else None
    if len(text) > MAX_MANIFEST_BYTES or data.get("format") != MODEL_FORMAT or not isinstance(signed, dict):
        raise PlanError(
            f"--signature {args.signature} is not a model manifest ({MODEL_FORMAT}, `edge-agent model sign`)"
        )
    if signed.get("file") != name or signed.get("sha256") != args.sha256:
        raise PlanError(
            f"--signature {args.signature} signs {signed.get('file')!r} with sha256 {str(signed.get('sha256'))[:16]}..., "
            f"not {name!r} with --sha256 {args.sha256[:16]}..."
        )
    return text.strip()


def _key(args: argparse.Namespace) -> Ed25519PrivateKey | None:
    from agent.signing import load_private_key

    return load_private_key(args.key) if args.key is not None else None


def _rollout(args: argparse.Namespace) -> int:
    from agent.operator.fleet.plan import PlanError, Policy, Threshold, parse_waves
    from agent.operator.fleet.rollout import RolloutDriver

    try:
        key = _key(args)
        if args.resume:
            if args.model or args.sha256 or args.devices or args.group or args.signature:
                raise PlanError(
                    "--resume ID continues a recorded rollout: give no --model, --sha256, --signature, --devices or "
                    "--group with it"
                )
            target = policy = None
        else:
            target = _target(args)
            if not (args.devices or args.group):
                raise PlanError("choose the devices: --devices GLOB or --group GROUP")
            if args.min_devices < 1 or args.timeout_per_wave <= 0:
                raise PlanError("--min-devices must be at least 1 and --timeout-per-wave positive")
            policy = Policy(
                parse_waves(args.waves), Threshold.parse(args.max_failures), args.min_devices, args.timeout_per_wave
            )
    except (PlanError, ModelError) as e:
        print(f"edge-agent: {e}", file=sys.stderr)
        return EXIT_USAGE
    store = _store(args)
    bar = _Progress(enabled=not args.json and sys.stderr.isatty())
    rid: str | None = args.resume
    try:
        with _client(args) as client:
            client.sync()
            driver = RolloutDriver(store, client, reply_timeout_s=args.reply_timeout, on_progress=bar.update, key=key)
            if rid is None:
                selection = f"--devices {args.devices}" if args.devices else f"--group {args.group}"
                devices = client.select(pattern=args.devices, group=args.group)
                if not devices:
                    print(f"edge-agent: no device matches {selection} (see `edge-agent fleet list`)", file=sys.stderr)
                    return EXIT_FAILURE
                assert target is not None and policy is not None  # a new rollout (not --resume) has both
                r = driver.create(target, policy, devices, selection)
                rid = r.id
                if not args.json:
                    print(
                        f"rollout {r.id}: {target.path} to {len(devices)} device(s) in {r.waves()} wave(s) "
                        f"{_wave_text(r)}; record: {store.path}",
                        file=sys.stderr,
                    )
            else:
                r = store.load(rid)
                if r.spec.prefix != client.prefix:
                    print(
                        f"edge-agent: rollout {rid} runs on prefix {r.spec.prefix!r}; give --prefix {r.spec.prefix}",
                        file=sys.stderr,
                    )
                    return EXIT_USAGE
                if (why := _resume_key_problem(r.spec.key_id, key)) is not None:
                    print(f"edge-agent: rollout {rid} {why}", file=sys.stderr)
                    return EXIT_USAGE
            r = driver.run(rid, wait=args.wait)
    except KeyboardInterrupt:
        bar.close()
        print(
            f"\ninterrupted; the rollout is recorded. Continue it with: edge-agent fleet rollout --resume {rid} --wait",
            file=sys.stderr,
        )
        return INTERRUPTED
    finally:
        store.close()
    bar.close()
    return _report(r, args.json)


def _resume_key_problem(recorded: str | None, key: Ed25519PrivateKey | None) -> str | None:
    """A resumed rollout signs with the key it started with, or stays unsigned."""
    from agent.signing import key_id

    given = key_id(key.public_key()) if key is not None else None
    if recorded == given:
        return None
    if recorded is None:
        return "was started unsigned: resume it without --key"
    return f"signs with key {recorded}: give that key with --key" + (f" (this one is {given})" if given else "")


def _report(r: Rollout, as_json: bool) -> int:
    if as_json:
        json.dump(r.as_dict(), sys.stdout, indent=2)
        print()
    else:
        print(render_status(r))
    if r.state == "succeeded":
        return EXIT_OK
    if r.state in ("running", "aborting"):
        if not as_json:
            print(
                f"still {r.state}: `edge-agent fleet rollout --resume {r.id}` continues it (add --wait to follow "
                "it to the end)",
                file=sys.stderr,
            )
        return EXIT_OK
    return EXIT_FAILURE


def _wave_text(r: Rollout) -> str:
    sizes = [sum(1 for d in r.devices if d.wave == w) for w in range(r.waves())]
    return "(" + " + ".join(str(n) for n in sizes) + ")"


class _Progress:
    """A tqdm bar over the devices that finished, on a terminal only."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self._bar: Any = None  # a tqdm bar (tqdm has no type information)

    def update(self, r: Rollout) -> None:
        if not self.enabled:
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=len(r.devices), unit="dev", file=sys.stderr, dynamic_ncols=True)
        c = r.counts()
        done = c.get("succeeded", 0) + c.get("failed", 0) + c.get("restored", 0) + c.get("restore_failed", 0)
        self._bar.n = done
        self._bar.set_description(f"{r.state} wave {max(r.wave, 0) + 1}/{r.waves()}")
        self._bar.set_postfix_str(", ".join(f"{k} {v}" for k, v in sorted(c.items())))
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


# --------------------------------------------------------------------------------------------
# status


def _status(args: argparse.Namespace) -> int:
    store = _store(args)
    try:
        if args.id is None:
            items = store.list()
            if args.json:
                json.dump(
                    [{"id": i, "created_at": t, "state": s, "model": m} for i, t, s, m in items], sys.stdout, indent=2
                )
                print()
            elif not items:
                print(f"no rollouts in {store.path}")
            else:
                for i, t, s, m in items:
                    print(f"{i}  {time.strftime('%Y-%m-%d %H:%M', time.localtime(t))}  {s:<9}  {m}")
            return EXIT_OK
        r = store.load(args.id)
    finally:
        store.close()
    if args.json:
        json.dump(r.as_dict(), sys.stdout, indent=2)
        print()
    else:
        print(render_status(r))
    return EXIT_OK


def render_status(r: Rollout) -> str:
    t = r.spec.target
    p = r.spec.policy
    lines = [
        f"rollout {r.id}: {r.state}" + (f" ({r.reason})" if r.reason else ""),
        f"model     {t.path}  sha256 {t.sha256[:16]}...{'  from ' + t.url if t.url else ''}"
        + ("  with its signed manifest" if t.signature else ""),
        f"updates   signed by key {r.spec.key_id}" if r.spec.key_id else "updates   unsigned (no --key)",
        f"policy    waves {','.join(f'{w:g}%' for w in p.waves)}  max failures {p.max_failures}  min devices "
        f"{p.min_devices}  timeout per wave {p.timeout_per_wave_s:g} s  ({r.spec.selection})",
        f"progress  wave {max(r.wave, 0) + 1} of {r.waves()}  "
        + ", ".join(f"{k} {v}" for k, v in sorted(r.counts().items())),
        "",
    ]
    rows = [("DEVICE", "WAVE", "STATE", "DETAIL")]
    for d in r.devices:
        rows.append((d.device, str(d.wave + 1), d.state, (d.message or "")[:160]))
    widths = [max(len(x[c]) for x in rows) for c in range(3)]
    for row in rows:
        lines.append("  ".join(v.ljust(w) for v, w in zip(row[:3], widths, strict=False)) + "  " + row[3])
    return "\n".join(line.rstrip() for line in lines)
