"""Progress of long operations (model load and warm-up, synth, downloads, swap-file creation).

One helper, ``progress(...)``, that every long operation uses: a tqdm bar when a person watches
(stderr is a terminal and the process does not run under systemd), periodic INFO log lines
otherwise (the journal gets "warm-up: 40 % (96.0 of 240.0 MiB), 1.2 s" every few seconds, never a
bar full of carriage returns), and nothing when the caller turns it off.

The choice is a pure function of the stream and the environment (``choose_mode``), so it is
tested without a terminal.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import IO, Literal, Protocol

from tqdm import tqdm

Mode = Literal["bar", "log", "off"]

log = logging.getLogger("agent.progress")


class ProgressBar(Protocol):
    """What ``progress`` returns: a tqdm bar, a ``LogProgress`` or one that shows nothing."""

    def update(self, n: float = 1) -> object: ...

    def set_postfix_str(self, text: str, /, refresh: bool = False) -> object: ...  # tqdm names it s

    def close(self) -> object: ...

    def __enter__(self) -> ProgressBar: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None, /
    ) -> None: ...


def under_systemd(environ: Mapping[str, str] | None = None) -> bool:
    """systemd sets JOURNAL_STREAM for a service whose stderr goes to the journal."""
    env = os.environ if environ is None else environ
    return bool(env.get("JOURNAL_STREAM"))


def choose_mode(
    stream: IO[str] | None = None, environ: Mapping[str, str] | None = None, *, enabled: bool = True
) -> Mode:
    """bar: a person is watching a terminal; log: a service or a pipe (lines every few seconds); off."""
    if not enabled:
        return "off"
    stream = sys.stderr if stream is None else stream
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    return "bar" if tty and not under_systemd(environ) else "log"


def _amount(n: float, unit: str) -> str:
    if unit == "B":
        for size, name in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
            if n >= size:
                return f"{n / size:.1f} {name}"
        return f"{n:.0f} B"
    return f"{n:g} {unit}".rstrip()


class LogProgress:
    """Progress as INFO log lines: at most one every ``interval_s`` seconds, and one at the end."""

    def __init__(
        self,
        total: float | None,
        desc: str,
        *,
        unit: str = "B",
        interval_s: float = 5.0,
        logger: logging.Logger = log,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.n = 0.0
        self._interval = interval_s
        self._log = logger
        self._clock = clock
        self._start = self._last = clock()
        self._postfix = ""
        self.lines = 0

    def update(self, n: float = 1) -> None:
        self.n += n
        now = self._clock()
        if now - self._last >= self._interval:
            self._last = now
            self._emit(now)

    def set_postfix_str(self, text: str, refresh: bool = False) -> None:
        self._postfix = text

    def _emit(self, now: float, done: bool = False) -> None:
        took = now - self._start
        if self.total:
            pct = 100.0 * self.n / self.total
            what = f"{pct:.0f} % ({_amount(self.n, self.unit)} of {_amount(self.total, self.unit)})"
        else:
            what = _amount(self.n, self.unit)
        tail = f" [{self._postfix}]" if self._postfix and not done else ""
        self._log.info("%s: %s%s, %.1f s", self.desc, "done, " + what if done else what, tail, took)
        self.lines += 1

    def close(self) -> None:
        self._emit(self._clock(), done=True)

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.close()


class _Off:
    n = 0.0

    def update(self, n: float = 1) -> None:
        self.n += n

    def set_postfix_str(self, text: str, refresh: bool = False) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _Off:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def progress(
    total: float | None,
    desc: str,
    *,
    unit: str = "B",
    enabled: bool = True,
    mode: Mode | None = None,
    interval_s: float = 5.0,
    stream: IO[str] | None = None,
    logger: logging.Logger = log,
) -> ProgressBar:
    """A context manager with ``update(n)`` and ``set_postfix_str(text)``: a tqdm bar, log lines or nothing
    (``mode`` forces one; default: ``choose_mode``). ``unit="B"`` scales bytes to KiB/MiB/GiB."""
    mode = mode or choose_mode(stream, enabled=enabled)
    if mode == "off":
        return _Off()
    if mode == "log":
        return LogProgress(total, desc, unit=unit, interval_s=interval_s, logger=logger)

    scale = dict(unit_scale=True, unit_divisor=1024) if unit == "B" else {}
    bar: ProgressBar = tqdm(total=total, desc=desc, unit=unit, file=stream or sys.stderr, leave=False, **scale)
    return bar
