"""Whether the job store takes writes, told once per change.

Every part that writes the store (intake, the runner, the outbox, retention) reports a failed write
here instead of logging it. The first failure flips the state to unwritable: one log line, one
callback (the daemon pauses intake, publishes its device status). While unwritable, the main loop
re-checks the store at a bounded interval (``JobStore.probe``: a free-space margin and a real
write); the first success flips it back: one log line, one callback (the daemon takes jobs again
and reconnects, so the broker redelivers what was left unacknowledged). Nothing here logs per
message or per second.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol, TypeVar

from agent.errors import StoreError

T = TypeVar("T")

log = logging.getLogger(__name__)


class Probe(Protocol):
    def probe(self, min_free_bytes: int = 0, now: float | None = None) -> None: ...


class StoreHealth:
    def __init__(
        self,
        store: Probe,
        *,
        recheck_s: Callable[[], float],
        min_free_bytes: Callable[[], int],
        on_change: Callable[[bool], None] = lambda writable: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``recheck_s`` and ``min_free_bytes`` are read at each use (live settings)."""
        self._store = store
        self._recheck_s = recheck_s
        self._min_free_bytes = min_free_bytes
        self._on_change = on_change
        self._clock = clock
        self._lock = threading.Lock()
        self._writable = threading.Event()
        self._writable.set()
        self._since: float | None = None
        self._last_check = 0.0
        self.last_error: StoreError | None = None

    def listen(self, on_change: Callable[[bool], None]) -> None:
        """Who is told each change (``on_change(writable)``), when that part is built after this one."""
        self._on_change = on_change

    @property
    def writable(self) -> bool:
        return self._writable.is_set()

    def wait_writable(self, timeout: float | None = None) -> bool:
        return self._writable.wait(timeout)

    def failed(self, error: StoreError) -> None:
        """A write failed (any thread). A store that was closed on purpose is not a health change."""
        if error.code == "store_closed":
            return
        with self._lock:
            self.last_error = error
            if not self._writable.is_set():
                log.debug("job store still unwritable: %s", error)
                return
            self._writable.clear()
            self._since = self._last_check = self._clock()
        log.error(
            "job store unwritable [%s]: %s. Taking no new jobs (they stay at the broker unacknowledged); "
            "checking again every %gs",
            error.code,
            error,
            self._recheck_s(),
        )
        self._notify(False)

    def run(self, write: Callable[[], T]) -> T | None:
        """Run a store write (main loop chores: retention); a ``StoreError`` marks the store
        unwritable, is told once like any other, and returns None."""
        try:
            return write()
        except StoreError as e:
            self.failed(e)
            return None

    def recheck(self, *, force: bool = False) -> bool:
        """Main loop: while unwritable, probe the store when the interval has passed (or ``force``).
        Returns True when this call found it writable again."""
        with self._lock:
            if self._writable.is_set():
                return False
            now = self._clock()
            if not force and now - self._last_check < self._recheck_s():
                return False
            self._last_check = now
        try:
            self._store.probe(self._min_free_bytes())
        except StoreError as e:
            with self._lock:
                self.last_error = e
            log.debug("job store still unwritable: %s", e)
            return False
        with self._lock:
            since, self._since = self._since, None
            self.last_error = None
            self._writable.set()
        log.warning("job store writable again after %.0fs: taking jobs again", self._clock() - (since or now))
        self._notify(True)
        return True

    def _notify(self, writable: bool) -> None:
        try:
            self._on_change(writable)
        except Exception:  # noqa: BLE001  a faulty listener must not break the caller's write path
            log.exception("store health listener failed")


__all__ = ["StoreHealth"]
