"""`edge-agent run`, `edge-agent submit`, `edge-agent jobs list|show|cancel`."""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.cli.config_cmd import add_broker_options, add_config_option, add_group, positive_int, settings_from
from agent.codes import JobStatus
from agent.config import Settings
from agent.errors import EXIT_CANNOT_START, EXIT_FAILURE, EXIT_USAGE, EdgeAgentError

if TYPE_CHECKING:
    from agent.jobs.store import JobStore


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    r = sub.add_parser("run", help="run the daemon (what systemd starts)")
    add_config_option(r, demo_fallback=False)
    r.add_argument(
        "--demo",
        action="store_true",
        help="embedded defaults: firmware-config/dev.toml, a generated demo model, a private broker if none runs",
    )
    r.set_defaults(handler=_run)

    s = sub.add_parser("submit", help="publish a job to a device and print its statuses and result")
    add_broker_options(s, device=True)
    s.add_argument("prompt")
    s.add_argument(
        "--fleet",
        action="store_true",
        help="publish to the fleet topic ({prefix}/fleet/jobs/submit) instead: one board of the group runs it; with "
        "--wait or --stream, follow it to that board (printing the pieces of the board that holds it) and send it "
        "again by the fleet rules (docs/protocol.md, Fleet jobs)",
    )
    s.add_argument("--job-id", help="job id (default: a new unique id)")
    s.add_argument("--max-tokens", type=int, default=64)
    s.add_argument("--temperature", type=float)
    s.add_argument("--seed", type=int)
    s.add_argument("--stop", action="append", help="stop sequence (repeatable)")
    s.add_argument("--priority", type=int)
    s.add_argument("--timeout", type=float, dest="timeout_s", help="job timeout_s on the device")
    s.add_argument("--wait", action="store_true", help="wait for the result and print it")
    s.add_argument("--stream", action="store_true", help="ask for token streaming and print the pieces")
    s.add_argument("--chat", action="store_true", help="send a chat job: the prompt is the user's message")
    s.add_argument("--system", help="system message of a chat job (implies --chat)")
    fmt = s.add_mutually_exclusive_group()
    fmt.add_argument("--json-object", action="store_true", help="constrain the answer to one JSON object")
    fmt.add_argument(
        "--json-schema",
        metavar="SCHEMA",
        type=_schema_arg,
        help="constrain the answer to a JSON Schema: a file, or the schema inline",
    )
    s.add_argument("--wait-timeout", type=float, default=300.0, help="seconds to wait for the result (default 300)")
    s.add_argument("--json", action="store_true", help="print the result message as JSON")
    s.add_argument(
        "--resend-after",
        type=float,
        default=30.0,
        help="with --wait/--stream: send the job again (same job id: it never runs twice) when the device said "
        "nothing about it for this many seconds, then after twice as long, ... (default 30; 0: never)",
    )
    s.set_defaults(handler=_submit)

    jsub = add_group(sub, "jobs", "read the local job store")
    jl = jsub.add_parser("list", help="recent jobs, newest first")
    add_config_option(jl)
    jl.add_argument(
        "--status",
        type=_status_arg,
        help=f"only this status ({', '.join(s.value for s in JobStatus)}; any case)",
    )
    jl.add_argument("--limit", type=positive_int, default=50, help="at most this many rows (default 50)")
    jl.set_defaults(handler=_jobs_list)
    js = jsub.add_parser("show", help="one job with its request and result, as JSON")
    add_config_option(js)
    js.add_argument("job_id")
    js.set_defaults(handler=_jobs_show)
    jc = jsub.add_parser("cancel", help="cancel a job through the broker (the daemon owns running jobs)")
    add_config_option(jc)
    jc.add_argument("job_id")
    jc.set_defaults(handler=_jobs_cancel)


def _settings(args: argparse.Namespace) -> Settings:
    return settings_from(args)


def _run(args: argparse.Namespace) -> int:
    import logging

    from agent.app.daemon import Daemon

    if not logging.getLogger().isEnabledFor(logging.INFO):
        logging.getLogger().setLevel(logging.INFO)  # a service logs its life cycle to the journal
    broker = None
    try:
        if args.demo:
            from agent.app.demo import DEV_PROFILE, demo_settings, ensure_demo_model

            settings = demo_settings()
            ensure_demo_model(settings)
            config_path = DEV_PROFILE
        else:
            settings = _settings(args)
            config_path = args.config
        from agent.ops.logs import configure_from_settings

        configure_from_settings(settings)  # service.log_format; the broker password masked in every line
        if settings.service.demo_broker:
            from agent.app.demo import ensure_broker

            broker = ensure_broker(settings)
        daemon = Daemon(settings, config_path=config_path)
    except EdgeAgentError as e:
        print(f"edge-agent: cannot start [{e.code}]: {e}", file=sys.stderr)
        if broker is not None:
            broker.terminate()
        return EXIT_CANNOT_START
    if args.demo:
        from agent.app.demo import record_demo

        # Where the operator commands without -c find this demo (status, jobs, doctor, shadow show ...).
        record_demo(settings)
        print(
            f"edge-agent demo: device '{settings.device.id}' on {settings.mqtt.host}:{settings.mqtt.port}. "
            "Try, in another terminal:\n  .venv/bin/edge-agent submit 'The capital of France is' --wait --stream\n"
            "  .venv/bin/edge-agent status; .venv/bin/edge-agent jobs list",
            file=sys.stderr,
        )
    try:
        return daemon.serve()
    except EdgeAgentError as e:
        if e.exit_code != EXIT_CANNOT_START:
            raise
        # The model, the memory budget or the store: one line that says what to fix, and the exit
        # status that makes systemd stop restarting (RestartPreventExitStatus=78).
        print(f"edge-agent: cannot start [{e.code}]: {e}", file=sys.stderr)
        return EXIT_CANNOT_START
    finally:
        if broker is not None:
            broker.terminate()
            broker.wait(timeout=10)


def _submit(args: argparse.Namespace) -> int:
    from agent.operator.jobs import JobClient

    settings = _settings(args)
    request: dict[str, Any] = {"max_tokens": args.max_tokens}
    if args.chat or args.system is not None:
        system = [{"role": "system", "content": args.system}] if args.system is not None else []
        request.update(kind="chat", messages=[*system, {"role": "user", "content": args.prompt}])
    else:
        request["prompt"] = args.prompt
    if args.json_object:
        request["response_format"] = {"type": "json_object"}
    elif args.json_schema is not None:
        request["response_format"] = {"type": "json_schema", "schema": args.json_schema}
    for key in ("temperature", "seed", "stop", "priority", "timeout_s"):
        if getattr(args, key) is not None:
            request[key] = getattr(args, key)
    if args.stream:
        request["stream"] = True
    args.job_id = args.job_id or uuid.uuid4().hex
    if (invalid := _invalid(args.job_id, request)) is not None:
        print(f"edge-agent: not sent: {invalid}", file=sys.stderr)
        return EXIT_USAGE
    last: dict[str, Any] = {}

    def on_status(status: dict[str, Any]) -> None:
        last.update(status=status)
        reason = f" {status['reason']}: {status.get('message')}" if status.get("reason") else ""
        waiting = f" (waiting for {status['waiting_for']})" if status.get("waiting_for") else ""
        print(f"[{status['status']}]{reason}{waiting}", file=sys.stderr)

    if args.fleet:
        return _submit_fleet(args, settings, request, on_status)
    device = args.device or settings.device.id
    with JobClient(settings, device_id=device, connect_timeout=args.connect_timeout) as client:
        job_id = client.submit(request, job_id=args.job_id)
        print(f"submitted {job_id} to {client.topics.submit}", file=sys.stderr)
        if not (args.wait or args.stream):
            return 0
        if (obstacle := client.obstacle()) is not None:
            print(f"note: {obstacle}; waiting up to {args.wait_timeout:g} s anyway", file=sys.stderr)
        result = client.follow(
            job_id,
            timeout=args.wait_timeout,
            on_status=on_status,
            on_piece=(lambda p: print(p["text"], end="", flush=True)) if args.stream else None,
            resend_after_s=args.resend_after or None,
            on_resend=lambda waited: print(
                f"[no answer from the device after {waited:.0f} s: job {job_id} sent again, same id]", file=sys.stderr
            ),
        )
        if result is None:
            why = client.silence_reason(last.get("status")).replace("JOB_ID", job_id)
            print(f"\nno result within {args.wait_timeout:g} s: {why}", file=sys.stderr)
            return EXIT_FAILURE
    return _show(args, result)


def _show(args: argparse.Namespace, result: dict[str, Any]) -> int:
    """The result: its text on stdout (or the whole message with --json), the summary on stderr."""
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        if args.stream:
            print()
        elif result.get("text") is not None:
            print(result["text"])
        for line in result_summary(result):
            print(line, file=sys.stderr)
    return 0 if result["status"] == "SUCCEEDED" else EXIT_FAILURE


def _submit_fleet(
    args: argparse.Namespace, settings: Settings, request: dict[str, Any], on_status: Callable[[dict[str, Any]], None]
) -> int:
    """`submit --fleet`: one board of the group runs it, wherever the boards hand it."""
    from agent.operator.fleet_jobs import FleetJobs

    job_id = args.job_id  # known before connecting: --stream subscribes to its pieces
    with FleetJobs(
        settings,
        resend_after_s=args.resend_after or 1e9,
        connect_timeout=args.connect_timeout,
        stream_of=[job_id] if args.stream else (),
    ) as fleet:
        fleet.submit(request, job_id=job_id)
        print(f"submitted {job_id} to {fleet.topic}", file=sys.stderr)
        if not fleet.takers():
            print(
                "note: no board online says it takes fleet jobs (no retained status with a fleet group under "
                f"{settings.mqtt.prefix}/+/status): set mqtt.fleet_group on the boards; a fleet job published "
                "while no board is subscribed is dropped by the broker",
                file=sys.stderr,
            )
        if not (args.wait or args.stream):
            print(
                "note: without --wait nothing sends the job again if the board that takes it dies (docs/protocol.md, "
                "Fleet jobs)",
                file=sys.stderr,
            )
            return 0

        def on_board_status(device: str, status: dict[str, Any]) -> None:
            on_status({**status, "status": f"{status['status']} on {device}"})

        def on_resend(resent: str, why: str) -> None:
            print(f"[{why}: job {resent} sent again to the fleet topic, same id]", file=sys.stderr)

        result = fleet.wait(
            [job_id],
            args.wait_timeout,
            on_status=on_board_status,
            on_resend=on_resend,
            on_piece=(lambda _device, p: print(p["text"], end="", flush=True)) if args.stream else None,
        ).get(job_id)
    if result is None:
        print(f"\nno result within {args.wait_timeout:g} s from any board of the fleet", file=sys.stderr)
        return EXIT_FAILURE
    return _show(args, result)


def result_summary(result: dict[str, Any]) -> list[str]:
    """What `submit --wait` prints on stderr under the text: the error, if any, then one line of what
    is known (finish reason, token counts, durations); fields a result does not carry are left out."""
    lines = []
    if err := result.get("error"):
        lines.append(f"{result['status']} {err.get('code')}: {err.get('message')}")
    parts = [result["status"]]
    if result.get("finish_reason"):
        parts.append(f"finish={result['finish_reason']}")
    u, t = result.get("usage") or {}, result.get("timings") or {}
    for key, label in (("prompt_tokens", "prompt_tokens"), ("completion_tokens", "completion_tokens")):
        if u.get(key) is not None:
            parts.append(f"{label}={u[key]}")
    for key, label in (("queue_ms", "queue"), ("prompt_ms", "prompt_eval"), ("generation_ms", "generation")):
        if t.get(key) is not None:
            parts.append(f"{label}={t[key]:.0f}ms")
    if t.get("tokens_per_s") is not None:
        parts.append(f"{t['tokens_per_s']:.1f} tok/s")
    if len(parts) > 1 or not lines:
        lines.append(" ".join(parts))
    return lines


def _schema_arg(value: str) -> Any:
    """--json-schema: inline JSON when it starts with '{', else a file holding it (a usage error otherwise)."""
    try:
        text = value if value.lstrip().startswith("{") else Path(value).read_text(encoding="utf-8")
        return json.loads(text)
    except (OSError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"{value!r}: not a JSON Schema file or inline JSON object: {e}") from None


def _invalid(job_id: str, request: dict[str, Any]) -> str | None:
    """What the device would refuse in this job whatever its limits (types, ranges, the job id), checked
    before sending; None when only the device can tell (the size limits of its settings)."""
    from agent.jobs.protocol import InvalidJob, parse_submit

    payload = json.dumps({"job_id": job_id, "kind": "generate", **request}).encode()
    try:
        parse_submit(payload, max_prompt_bytes=2**40, max_tokens_limit=2**31)
    except InvalidJob as e:
        return f"the job is invalid [{e.code}]: {e.message}"
    return None


def _open_store(settings: Settings) -> JobStore:
    from agent.jobs.store import JobStore

    return JobStore.from_settings(settings.store, readonly=True)


def _ts(epoch: float | None) -> str:
    if not epoch:
        return "-"
    return datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")


def _status_arg(text: str) -> JobStatus:
    try:
        return JobStatus(text.upper())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a job status; one of {', '.join(s.value for s in JobStatus)}"
        ) from None


def _jobs_list(args: argparse.Namespace) -> int:
    """The store's jobs and, as RELEASED, the fleet jobs this board let go of (not in its jobs any more),
    newest first."""
    status: JobStatus | None = args.status
    store = _open_store(_settings(args))
    try:
        rows = [] if status is JobStatus.RELEASED else store.list_jobs(status=status, limit=args.limit)
        handoffs = store.list_handoffs(limit=args.limit) if status in (None, JobStatus.RELEASED) else []
        counts = store.counts()
    finally:
        store.close()
    lines = [
        (
            r.created_at,
            f"{r.job_id:<36} {r.status:<12} {r.attempt:>3} {r.priority:>4} {_ts(r.created_at):<19} "
            f"{'yes' if r.delivered else 'no':<5} {r.error_code or ''}",
        )
        for r in rows
    ]
    for h in handoffs:
        priority = h.request.get("priority", 0) if isinstance(h.request, dict) else 0
        where = f"handed to {h.to}" if h.to else "given back"
        lines.append(
            (h.at, f"{h.job_id:<36} {'RELEASED':<12} {'-':>3} {priority!s:>4} {_ts(h.at):<19} {'-':<5} {where}")
        )
    lines.sort(key=lambda line: line[0], reverse=True)
    print(f"{'JOB ID':<36} {'STATUS':<12} {'ATT':>3} {'PRI':>4} {'CREATED (UTC)':<19} {'DELIV':<5} ERROR")
    for _, line in lines[: args.limit]:
        print(line)
    print("totals: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), file=sys.stderr)
    return 0


def _jobs_show(args: argparse.Namespace) -> int:
    store = _open_store(_settings(args))
    try:
        rec = store.get(args.job_id)
        handoff = store.get_handoff(args.job_id) if rec is None else None
    finally:
        store.close()
    if handoff is not None:  # a fleet job this board let go of (docs/protocol.md, Fleet jobs)
        where = f"handed to {handoff.to}" if handoff.to else "given back (away from the broker for half the lease)"
        at = datetime.fromtimestamp(handoff.at, UTC).isoformat(timespec="seconds")
        shown = {"job_id": handoff.job_id, "status": "RELEASED", "handed_to": handoff.to, "released_at": at}
        print(json.dumps({**shown, "request": handoff.request}, indent=2))
        print(f"RELEASED at {at}: {where}; this board does not run it", file=sys.stderr)
        return 0
    if rec is None:
        print(f"edge-agent: no job {args.job_id!r} in the store", file=sys.stderr)
        return EXIT_FAILURE
    print(json.dumps(rec.as_dict(), indent=2, default=str))
    return 0


def _jobs_cancel(args: argparse.Namespace) -> int:
    from agent.operator.jobs import JobClient

    settings = _settings(args)
    with JobClient(settings, device_id=settings.device.id) as client:
        client.cancel(args.job_id)
    print(f"cancel sent for {args.job_id}; the daemon publishes CANCELED if it was queued or running", file=sys.stderr)
    return 0
