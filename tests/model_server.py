"""A real model server for tests: Python's http.server on the loopback address, with Range
support, optional TLS (a throwaway CA from trustme) and an optional bearer token.

It counts what it really sends (body bytes per file, every request with its Range header), and it
can be stopped in the middle of a transfer: ``cut_after(n)`` lets ``n`` more body bytes out, then
drops the connection and stops listening, as a server that goes down mid-download; ``cut`` is set
when that happened, and ``start()`` brings it back on the same port.
"""

from __future__ import annotations

import http.server
import re
import shutil
import socket
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


@dataclass
class Request:
    path: str
    range: str | None
    authorization: str | None
    status: int = 0
    sent: int = 0


@dataclass
class Counters:
    requests: list[Request] = field(default_factory=list)
    body_bytes: dict[str, int] = field(default_factory=dict)


class ModelServer:
    def __init__(self, folder: Path, *, tls: Any = None, token: str | None = None, chunk: int = 16 * 1024) -> None:
        """``tls``: a trustme.CA (the server gets a certificate for 127.0.0.1 from it)."""
        self.folder = folder
        self.token = token
        self.chunk = chunk
        self.counters = Counters()
        self.cut = threading.Event()
        self.ignore_range = False  # answer 200 with the whole file, as a server without Range support
        self._lock = threading.Lock()
        self._budget: int | None = None
        self._ctx: ssl.SSLContext | None = None
        if tls is not None:
            self._ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.issue_cert("127.0.0.1").configure_cert(self._ctx)
        self.port = _free_port()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self._cutting: threading.Thread | None = None  # the cut's stop, on a thread of its own

    @property
    def base_url(self) -> str:
        return f"{'https' if self._ctx else 'http'}://127.0.0.1:{self.port}"

    def url(self, name: str) -> str:
        return f"{self.base_url}/{name}"

    def sent(self, name: str) -> int:
        with self._lock:
            return self.counters.body_bytes.get(name, 0)

    def requests(self, name: str | None = None) -> list[Request]:
        with self._lock:
            return [r for r in self.counters.requests if name is None or r.path == f"/{name}"]

    def add(self, src: Path, name: str | None = None) -> str:
        shutil.copyfile(src, self.folder / (name or src.name))
        return self.url(name or src.name)

    # ------------------------------------------------------------------ life cycle

    def start(self) -> ModelServer:
        """Listen (again). After a cut, once the cut's stop has run: else that stop would take down the
        server started here instead of the one it cut."""
        if self._cutting is not None:
            self._cutting.join()
            self._cutting = None
        server = self

        class Handler(_Handler):
            owner = server

        httpd = _Server(("127.0.0.1", self.port), Handler, bind_and_activate=False)
        httpd.allow_reuse_address = True
        httpd.daemon_threads = True
        httpd.server_bind()
        httpd.server_activate()
        if self._ctx is not None:
            httpd.socket = self._ctx.wrap_socket(httpd.socket, server_side=True)
        self._httpd = httpd
        self.cut.clear()
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()

    def cut_after(self, n: int) -> None:
        """Let ``n`` more body bytes out, then drop the connection and stop the server."""
        with self._lock:
            self._budget = n

    def _take(self, want: int) -> tuple[int, bool]:
        """How many of ``want`` bytes may go out, and whether the cut happens after them."""
        with self._lock:
            if self._budget is None:
                return want, False
            give = min(want, self._budget)
            self._budget -= give
            cut = self._budget <= 0
            if cut:
                self._budget = None
            return give, cut

    def _do_cut(self) -> None:
        def stop() -> None:
            self.stop()
            self.cut.set()

        self._cutting = threading.Thread(target=stop, daemon=True)
        self._cutting.start()

    def __enter__(self) -> ModelServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that drop a connection (a cut, a canceled download) are part of the tests


class _Handler(http.server.BaseHTTPRequestHandler):
    owner: ModelServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002  quiet in tests
        pass

    def do_GET(self) -> None:  # noqa: N802
        o = self.owner
        rec = Request(self.path, self.headers.get("Range"), self.headers.get("Authorization"))
        with o._lock:
            o.counters.requests.append(rec)
        name = self.path.lstrip("/")
        f = o.folder / name
        if o.token is not None and rec.authorization != f"Bearer {o.token}":
            return self._plain(rec, 401, b"no or wrong token\n")
        if "/" in name or not f.is_file():
            return self._plain(rec, 404, b"not found\n")
        size = f.stat().st_size
        start, end = 0, size - 1
        status = 200
        if rec.range is not None and not o.ignore_range:
            m = _RANGE.match(rec.range)
            if m is None:
                return self._plain(rec, 400, b"bad range\n")
            start = int(m.group(1))
            end = int(m.group(2)) if m.group(2) else size - 1
            if start >= size:
                rec.status = 416
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        rec.status = status
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        with open(f, "rb") as fh:
            fh.seek(start)
            left = end - start + 1
            while left > 0:
                block = fh.read(min(o.chunk, left))
                give, cut = o._take(len(block))
                if give:
                    self.wfile.write(block[:give])
                    self.wfile.flush()
                    rec.sent += give
                    with o._lock:
                        o.counters.body_bytes[name] = o.counters.body_bytes.get(name, 0) + give
                left -= give
                if cut and left > 0:
                    o._do_cut()  # before the client can see the drop: a start() it causes waits for this stop
                    self.close_connection = True
                    try:
                        self.connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    return

    def _plain(self, rec: Request, status: int, body: bytes) -> None:
        rec.status = status
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
