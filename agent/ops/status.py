"""`edge-agent status`: the board at a glance, from local files only (no broker).

Owns ``collect_status`` (the state file the daemon keeps, agent.app.state, and the job store opened
read-only) and ``render_status`` (the text). Works with the daemon stopped and the broker down: what
the daemon last wrote is shown with how old it is, and the queue comes from the store itself.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from agent.app.state import liveness, read_state, state_path
from agent.config import Settings
from agent.errors import EdgeAgentError
from agent.jobs.store import JobStore

LAST_JOBS = 5
MiB = 1024 * 1024


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _store_summary(settings: Settings, limit: int) -> dict[str, Any]:

    path = settings.store.path
    if path is None or not path.exists():
        return {"path": str(path), "error": "no job store yet (the daemon has not run with this state folder)"}
    try:
        store = JobStore.from_settings(settings.store, readonly=True)
    except EdgeAgentError as e:
        return {"path": str(path), "error": str(e)}
    try:
        counts = store.counts()
        jobs = store.list_jobs(limit=limit)
        queued = store.queued()
    except EdgeAgentError as e:
        return {"path": str(path), "error": str(e)}
    finally:
        store.close()
    waiting: dict[str, int] = {}
    for r in queued:
        waiting[r.waiting_for or "nothing yet"] = waiting.get(r.waiting_for or "nothing yet", 0) + 1
    return {
        "path": str(path),
        "counts": counts,
        "waiting": waiting,
        "next_waits": [
            {
                "job_id": r.job_id,
                "waiting_for": r.waiting_for,
                "since": _iso(r.waiting_since),
                "detail": r.waiting_detail,
            }
            for r in queued[:limit]
            if r.waiting_for
        ],
        "last_jobs": [
            {
                "job_id": r.job_id,
                "status": r.status.value,
                "created_at": _iso(r.created_at),
                "finished_at": _iso(r.finished_at),
                "error_code": r.error_code,
                "delivered": r.delivered,
                "tokens_per_s": (r.outcome.timings.tokens_per_s if r.outcome and r.outcome.timings else None),
                "waiting_for": r.waiting_for,
            }
            for r in jobs
        ],
    }


def collect_status(
    settings: Settings, *, now: float | None = None, last_jobs: int = LAST_JOBS, **liveness_readers: Any
) -> dict[str, Any]:
    """Everything `status` shows, as JSON data. ``liveness_readers`` (alive=, start_ticks=) are for tests."""
    now = time.time() if now is None else now
    snap, problem = read_state(state_path(settings))
    out: dict[str, Any] = {"device_id": settings.device.id, "now": _iso(now)}
    if snap is None:
        out["daemon"] = {"running": False, "verdict": "unknown", "detail": problem}
    else:
        verdict, detail = liveness(snap, now, **liveness_readers)
        out["daemon"] = {
            "running": verdict == "running",
            "verdict": verdict,
            "detail": detail,
            "state": snap.state,
            "pid": snap.pid,
            "since": _iso(snap.started_at),
            "uptime_s": round(now - snap.started_at, 1) if verdict in ("running", "stale") else None,
            "ready_at": _iso(snap.ready_at),
            "start_to_ready_s": round(snap.ready_at - snap.started_at, 2) if snap.ready_at else None,
            "state_updated": _iso(snap.updated_at),
            "state_age_s": round(now - snap.updated_at, 1),
            "agent_version": snap.agent_version,
            "config": snap.config_path,
            "broker_connected": snap.broker_connected,
            "store_writable": snap.store_writable,
            "intake_paused": snap.intake_paused,
        }
        out["model"] = snap.model.model_dump() if snap.model else None
        out["memory"] = {"level": snap.memory_level, "action": snap.memory_action}
        out["telemetry"] = snap.telemetry
        out["shadow"] = {"version": snap.shadow_version, "applied_version": snap.shadow_applied_version}
        out["running_jobs"] = snap.running
    out["configured_model"] = str(settings.model.path)
    out["store"] = _store_summary(settings, last_jobs)
    return out


def _duration(s: float) -> str:
    s = int(s)
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    if s < 172800:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} days {s % 86400 // 3600} h"


def _mib(n: Any) -> str:
    return f"{n / MiB:.0f} MiB" if isinstance(n, (int, float)) else "-"


def render_status(doc: dict[str, Any]) -> str:
    lines: list[str] = []

    def row(label: str, text: str) -> None:
        lines.append(f"{label:<10} {text}")

    d = doc["daemon"]
    if d["verdict"] == "unknown":
        row("daemon", f"not known to be running: {d['detail']}")
    else:
        if d["verdict"] == "stopped":
            row("daemon", f"{d['detail']} at {d['state_updated']}")  # its own last word: "stopped cleanly"
        else:
            head = {"running": "running", "stale": "NOT RESPONDING", "gone": "NOT RUNNING"}[d["verdict"]]
            since = f" since {d['since']} (up {_duration(d['uptime_s'])})" if d.get("uptime_s") is not None else ""
            row("daemon", "; ".join(dict.fromkeys((f"{head}{since}", d["state"], d["detail"]))))
        if d["start_to_ready_s"] is not None:
            row(
                "",
                f"ready at {d['ready_at']} ({d['start_to_ready_s']:.1f} s after start); edge-agent {d['agent_version']}",
            )
        row(
            "",
            f"broker {'connected' if d['broker_connected'] else 'NOT connected'}; store "
            f"{'writable' if d['store_writable'] else 'UNWRITABLE'}; intake {'PAUSED' if d['intake_paused'] else 'open'}; "
            f"state written {d['state_age_s']:.0f} s ago",
        )
    m = doc.get("model")
    if m:
        row(
            "model",
            f"{m['path']}: {m['mode']} mode, n_ctx {m['n_ctx']}, {m['slots']} slot(s), "
            f"{m.get('n_threads') or '?'} threads; loaded in {m.get('load_ms') or 0:.0f} ms; plan "
            f"{_mib(m.get('anon_estimate_bytes'))} anonymous of budget {_mib(m.get('budget_bytes'))}",
        )
    else:
        row("model", f"none loaded (configured: {doc['configured_model']})")
    st = doc["store"]
    if "error" in st:
        row("queue", st["error"])
    else:
        c = st["counts"]
        running = doc.get("running_jobs") or []
        row(
            "queue",
            f"{c.get('QUEUED', 0)} queued, {c.get('IN_PROGRESS', 0)} in progress"
            + (f" ({', '.join(running)})" if running else "")
            + "; finished: "
            + ", ".join(f"{k} {v}" for k, v in c.items() if k not in ("QUEUED", "IN_PROGRESS") and v),
        )
        if st.get("waiting"):
            row("", "waiting for: " + ", ".join(f"{k} {v}" for k, v in sorted(st["waiting"].items())))
        for w in st.get("next_waits") or []:
            row(
                "",
                f"{w['job_id'][:36]:<36} QUEUED      waiting for {w['waiting_for']} since {w['since']}: {w['detail']}",
            )
        for j in st["last_jobs"]:
            speed = f" {j['tokens_per_s']:.1f} tok/s" if j.get("tokens_per_s") else ""
            err = f" {j['error_code']}" if j.get("error_code") else ""
            row(
                "",
                f"{j['job_id'][:36]:<36} {j['status']:<11} {j['created_at']}{err}{speed}"
                + ("" if j["delivered"] or j["status"] in ("QUEUED", "IN_PROGRESS") else " (result not delivered yet)"),
            )
    mem = doc.get("memory") or {}
    t = doc.get("telemetry") or {}
    if mem or t:
        level = mem.get("level") or "-"
        action = f", action {mem['action']}" if mem.get("action") else ""
        psi = t.get("psi_some_avg10")
        row(
            "memory",
            f"level {level}{action}; available {_mib(t.get('mem_available_bytes'))}, agent RssAnon "
            f"{_mib(t.get('rss_anon_bytes'))}, RssFile {_mib(t.get('rss_file_bytes'))}; PSI some10 "
            f"{'-' if psi is None else f'{psi:.1f} %'}",
        )
    if t:
        last_speed = t.get("last_job_tokens_per_s")
        row(
            "telemetry",
            f"last reading {t.get('ts', '-')}; queue {t.get('queue_depth', '-')}; last job "
            f"{'-' if last_speed is None else f'{last_speed:.1f}'} tok/s",
        )
    sh = doc.get("shadow") or {}
    if sh:
        row(
            "shadow",
            "no shadow"
            if sh.get("version") is None
            else f"version {sh['version']}, applied {sh.get('applied_version')}",
        )
    return "\n".join(lines)
