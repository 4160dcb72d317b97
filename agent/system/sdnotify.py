"""systemd's notify protocol (READY, STATUS, WATCHDOG, STOPPING): a datagram to $NOTIFY_SOCKET.

Twenty lines are clearer than a dependency; the one package on PyPI for it is unmaintained since 2017.
Outside systemd (no NOTIFY_SOCKET) every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        addr = env.get("NOTIFY_SOCKET", "")
        # An abstract socket is written with a leading '@'.
        self._addr = "\0" + addr[1:] if addr.startswith("@") else addr
        usec = env.get("WATCHDOG_USEC", "")
        self.watchdog_interval_s = int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 else None

    @property
    def enabled(self) -> bool:
        return bool(self._addr)

    def notify(self, *lines: str) -> None:
        if not self._addr:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto("\n".join(lines).encode(), self._addr)
        except OSError as e:  # systemd gone or socket not writable: not worth dying for
            log.debug("sd_notify failed: %s", e)

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.notify(f"STATUS={status}")

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")

    def stopping(self) -> None:
        self.notify("STOPPING=1")

    @contextmanager
    def keepalive(self) -> Iterator[None]:
        """Keep the watchdog fed from a helper thread while the main loop waits on something long
        it knows about (a model change waits for running jobs up to service.shutdown_grace_s)."""
        done = threading.Event()
        period = max(1.0, (self.watchdog_interval_s or 5.0) / 2)

        def ping() -> None:
            while not done.wait(period):
                self.watchdog()

        t = threading.Thread(target=ping, name="edge-agent-keepalive", daemon=True)
        t.start()
        try:
            yield
        finally:
            done.set()
            t.join()
