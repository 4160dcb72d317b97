"""Log output: three formats (text, kv, json), journald awareness, and no secrets.

Owns the one handler on the root logger. ``configure_logging`` installs it; ``configure_from_settings``
applies ``service.log_format`` and registers the MQTT password as a secret once the settings are known.

- **journald**: under systemd (``JOURNAL_STREAM`` set) no timestamp is written (journald stamps every
  line) and each line starts with its syslog priority (``<3>`` error ... ``<7>`` debug), which journald
  strips and records, so ``journalctl -p warning -u edge-agent`` filters by level.
- **kv**: ``level=info logger=agent.jobs.runner msg="job done" job_id=abc`` plus any ``extra=`` fields.
- **json**: one object per line with the same keys.
- **Secrets**: every finished line, tracebacks included, goes through ``Masker``: the registered secret
  values (the MQTT password) wherever they appear, and by pattern, ``password=...``, ``"password": "..."``,
  ``Authorization: ...``, ``Bearer ...`` tokens and ``user:password@`` in URLs. Masking the formatted
  line, not the message, also catches arguments, ``extra`` fields and exception text.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import IO, Any, Literal

from agent.config import Settings

LogFormat = Literal["text", "kv", "json"]
MASK = "********"

# Attributes every LogRecord has; anything else on a record came from ``extra=`` and is a field.
_STANDARD = set(vars(logging.LogRecord("x", 0, "x", 0, "x", None, None))) | {"message", "asctime", "taskName"}

_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # Authorization: Bearer xyz / Authorization: Basic xyz (the whole credential)
    (re.compile(r"(?i)(authorization\s*[:=]\s*)(\"?)(?:bearer|basic|token)?\s*[^\s\",;]+"), r"\1\2" + MASK),
    (re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]+"), r"\1" + MASK),
    # "password": "x"  /  'password': 'x'  (JSON, Python reprs)
    (
        re.compile(
            r"(?i)([\"'](?:password|passwd|secret|token|api_key|access_token|authorization)[\"']\s*:\s*)([\"'])(?:\\.|(?!\2).)*\2"
        ),
        r"\1\2" + MASK + r"\2",
    ),
    # password=x  password: x  (key=value, command lines, URLs' query strings)
    (
        re.compile(
            r"(?i)\b((?:mqtt_)?(?:password|passwd|secret|api_key|access_token|auth_token)\s*[=:]\s*)(?![\"'])[^\s,;&}\]\"'\\]+"
        ),
        r"\1" + MASK,
    ),
    # scheme://user:password@host
    (re.compile(r"(\b[a-z][a-z0-9+.-]*://[^:/@\s]+:)[^@\s/]+@"), r"\1" + MASK + "@"),
)


class Masker:
    """Replaces secrets in text: registered values (longest first) and the patterns above."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: set[str] = set()
        self.add(*secrets)

    def add(self, *secrets: str | None) -> None:
        for s in secrets:
            # A one- or two-character "secret" would mask ordinary text everywhere; such a password is
            # still hidden by the patterns where it appears as one.
            if s and len(s) >= 3:
                self._secrets.add(s)

    def __call__(self, text: str) -> str:
        for s in sorted(self._secrets, key=len, reverse=True):
            if s in text:
                text = text.replace(s, MASK)
        for pattern, repl in _PATTERNS:
            text = pattern.sub(repl, text)
        return text


_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


def _priority(levelno: int) -> int:
    for level in sorted(_PRIORITY, reverse=True):
        if levelno >= level:
            return _PRIORITY[level]
    return 7


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


def _kv_value(v: Any) -> str:
    text = v if isinstance(v, str) else json.dumps(v, default=str)
    if text == "" or any(c in text for c in ' ="\n\t'):
        return json.dumps(text)
    return text


class AgentFormatter(logging.Formatter):
    """One of the three formats; ``journald`` drops the timestamp and adds the syslog priority."""

    def __init__(self, fmt: LogFormat = "text", *, journald: bool = False, masker: Masker | None = None) -> None:
        super().__init__()
        if fmt not in ("text", "kv", "json"):
            raise ValueError(f"log format must be text, kv or json, not {fmt!r}")
        self.fmt = fmt
        self.journald = journald
        self.masker = masker or Masker()

    def _ts(self, record: logging.LogRecord) -> str:
        return datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        exc = self.formatException(record.exc_info) if record.exc_info else (record.exc_text or "")
        if record.stack_info:
            exc = (exc + "\n" if exc else "") + self.formatStack(record.stack_info)
        fields = _fields(record)
        level = record.levelname.lower()
        if self.fmt == "json":
            doc: dict[str, Any] = {} if self.journald else {"ts": self._ts(record)}
            doc.update(level=level, logger=record.name, msg=msg)
            for k, v in fields.items():
                doc.setdefault(k, v)
            if exc:
                doc["exc"] = exc
            line = json.dumps(doc, default=str, ensure_ascii=False)
        elif self.fmt == "kv":
            parts = [] if self.journald else [f"ts={self._ts(record)}"]
            parts += [f"level={level}", f"logger={record.name}", f"msg={_kv_value(msg)}"]
            parts += [f"{k}={_kv_value(v)}" for k, v in fields.items()]
            if exc:
                parts.append(f"exc={_kv_value(exc)}")
            line = " ".join(parts)
        else:
            head = "" if self.journald else self.formatTime(record, "%Y-%m-%d %H:%M:%S") + f",{int(record.msecs):03d} "
            line = f"{head}{record.levelname} {record.name}: {msg}"
            if fields:
                line += " " + " ".join(f"{k}={_kv_value(v)}" for k, v in fields.items())
            if exc:
                line += "\n" + exc
        line = self.masker(line)
        if self.journald:
            # journald reads the prefix on every line it receives: keep a traceback at the same level.
            prio = f"<{_priority(record.levelno)}>"
            line = "\n".join(prio + part for part in line.split("\n"))
        return line


class _AgentHandler(logging.StreamHandler[IO[str]]):
    """Marks the handler configure_logging installed, so it is replaced and never stacked."""


def journald_stream(environ: Mapping[str, str] | None = None, stream: IO[str] | None = None) -> bool:
    """True when ``stream`` (stderr) is connected to the journal: JOURNAL_STREAM names its device and
    inode (systemd.exec(5)); if the stream cannot be checked, the variable alone decides."""
    env = os.environ if environ is None else environ
    value = env.get("JOURNAL_STREAM")
    if not value:
        return False
    try:
        dev, ino = (int(x) for x in value.split(":"))
        st = os.fstat((stream or sys.stderr).fileno())
    except (ValueError, OSError, AttributeError):
        return True
    return (st.st_dev, st.st_ino) == (dev, ino)


def configure_logging(
    level: int = logging.WARNING,
    fmt: LogFormat = "text",
    *,
    stream: IO[str] | None = None,
    environ: Mapping[str, str] | None = None,
    secrets: Iterable[str] = (),
) -> logging.Handler:
    """Install (or replace) the agent's handler on the root logger; returns it."""
    stream = stream or sys.stderr
    root = logging.getLogger()
    old = next((h for h in root.handlers if isinstance(h, _AgentHandler)), None)
    masker = old.formatter.masker if old is not None and isinstance(old.formatter, AgentFormatter) else Masker()
    masker.add(*secrets)
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = _AgentHandler(stream)
    handler.setFormatter(AgentFormatter(fmt, journald=journald_stream(environ, stream), masker=masker))
    root.addHandler(handler)
    root.setLevel(level)
    return handler


def add_secrets(*values: str | None) -> None:
    """Mask these values in every line from now on (e.g. a password read after logging was set up)."""
    for h in logging.getLogger().handlers:
        if isinstance(h.formatter, AgentFormatter):
            h.formatter.masker.add(*values)


def configure_from_settings(
    settings: Settings, *, level: int | None = None, environ: Mapping[str, str] | None = None
) -> None:
    """The daemon's logging once its settings are loaded: service.log_format, the MQTT password masked.
    ``level`` None keeps the level in force."""
    password = settings.mqtt.password.get_secret_value() if settings.mqtt.password is not None else None
    root = logging.getLogger()
    configure_logging(
        root.level if level is None else level,
        settings.service.log_format,
        environ=environ,
        secrets=[password] if password else [],
    )
