"""Fetching one model file over HTTP(S): the only code that talks to a model server.

``download(source, link, ...)`` brings ``source.url`` to ``source.dest`` safely on a board with a
small card and a flaky link:

1. free space is checked before anything is fetched (the bytes still missing plus a margin);
2. the bytes go into a partial file next to the destination (same filesystem, so the rename is
   atomic), named after the expected sha256, so a download interrupted by a dropped link, a
   server restart or a daemon restart resumes where it stopped with an HTTP Range request;
3. the sha256 is computed while streaming (the bytes already in a partial file are hashed once
   when resuming), and a mismatch deletes the partial file;
4. only a verified file is renamed into place (fsync of the file and the folder first).

Attempts that fail on the network (refused, reset, cut mid-body, a timeout, HTTP 408/429/5xx) are
retried with a doubling wait; ``max_failures`` attempts in a row that bring no new byte give up.
Answers that will not change by retrying (401, 403, 404, a certificate the CA does not vouch for,
a file larger than announced, a checksum mismatch, too little space) fail at once.

The HTTP client is urllib3 (see pyproject.toml); its exceptions are converted here into
``DownloadError``. Credentials are sent over HTTPS only and never logged; URLs are logged without
their query string (object stores put signatures there).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
import shutil
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import urlsplit, urlunsplit

from agent import __version__
from agent.errors import EdgeAgentError
from agent.system.files import fsync_dir

if TYPE_CHECKING:
    # _hashlib (hashlib's OpenSSL backend) is absent from a CPython built without OpenSSL, and
    # urllib3 is costly to import: both are for the annotations only.
    from _hashlib import HASH

    from urllib3 import BaseHTTPResponse, HTTPHeaderDict

    from agent.config.sections import DownloadSettings

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_RANGE_UNSATISFIED = re.compile(r"bytes\s+\*/(\d+)")


class DownloadError(EdgeAgentError):
    """A download that failed. ``retryable``: another attempt may succeed (the link, the server's
    health); otherwise the same request fails the same way."""

    code = "download_failed"

    def __init__(self, message: str, *, code: str | None = None, retryable: bool = False) -> None:
        super().__init__(message, code=code)
        self.retryable = retryable


@dataclass(frozen=True)
class Source:
    url: str
    sha256: str
    dest: Path  # the final file, inside the models folder
    size: int | None = None  # announced size, bytes (None: the server's Content-Length)

    @property
    def partial(self) -> Path:
        """Where the bytes go until they are verified: hidden, and named after the checksum, so a
        different file for the same name never resumes from these bytes."""
        return self.dest.with_name(f".{self.dest.name}.{self.sha256[:16]}.partial")


@dataclass
class Progress:
    """What a download is doing, for reported state (bounded rate) and the log."""

    state: str  # checking | downloading | retrying | verifying | done | failed
    bytes: int = 0  # in the partial file (or the final one)
    total: int | None = None
    fetched: int = 0  # bytes received from the network by this run (resumed bytes excluded)
    rate_bps: float | None = None
    eta_s: float | None = None
    attempts: int = 0
    message: str | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"state": self.state, "bytes": self.bytes, "total": self.total, "fetched": self.fetched,
                               "attempts": self.attempts}  # fmt: skip
        if self.rate_bps is not None:
            out["rate_bps"] = round(self.rate_bps)
        if self.eta_s is not None:
            out["eta_s"] = round(self.eta_s, 1)
        if self.message:
            out["message"] = self.message
        return out


@dataclass(frozen=True)
class Result:
    path: Path
    fetched: int  # bytes received over the network by this call
    resumed_from: int  # bytes already in a partial file when it started
    attempts: int
    took_s: float
    already_there: bool = False


@dataclass
class RetryPolicy:
    min_s: float = 2.0
    max_s: float = 120.0
    max_failures: int = 12  # attempts in a row without a new byte


def redact(url: str) -> str:
    """The URL as it may be logged or reported: no user info, no query string."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


# --------------------------------------------------------------------------------------------
# The link (urllib3)


class HttpLink:
    """An HTTP(S) client for model files: TLS with the system CAs or ``ca_file``, the configured
    timeouts, an optional bearer token or basic auth (HTTPS only), no automatic retries (the
    caller retries with resume). Built from ``agent.config.sections.DownloadSettings``."""

    def __init__(
        self,
        *,
        ca_file: Path | None = None,
        token: str | None = None,
        basic: tuple[str, str] | None = None,
        connect_timeout_s: float = 15.0,
        read_timeout_s: float = 60.0,
    ) -> None:
        import urllib3  # costly: only a download needs the HTTP client

        self._urllib3 = urllib3
        try:
            ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        except (OSError, ssl.SSLError) as e:
            raise DownloadError(
                f"download.ca_file {ca_file}: cannot be read as a CA bundle: {e}", code="download_tls"
            ) from None
        self._auth: dict[str, str] = {}
        if token:
            self._auth["Authorization"] = f"Bearer {token}"
        elif basic:
            raw = f"{basic[0]}:{basic[1]}".encode()
            self._auth["Authorization"] = "Basic " + base64.b64encode(raw).decode()
        self._pool = urllib3.PoolManager(
            num_pools=2,
            ssl_context=ctx,
            timeout=urllib3.Timeout(connect=connect_timeout_s, read=read_timeout_s),
            retries=urllib3.Retry(total=False, redirect=5, raise_on_redirect=True),
            headers={"User-Agent": _user_agent()},
        )

    @classmethod
    def from_settings(cls, s: DownloadSettings) -> HttpLink:
        """From a DownloadSettings."""
        basic = (s.username, s.password.get_secret_value()) if s.username and s.password else None
        return cls(
            ca_file=s.ca_file,
            token=s.token.get_secret_value() if s.token else None,
            basic=basic,
            connect_timeout_s=s.connect_timeout_s,
            read_timeout_s=s.read_timeout_s,
        )

    def get(self, url: str, start: int) -> Response:
        """GET ``url`` from byte ``start`` (a Range request when start > 0). The body is streamed."""
        headers = {"Accept-Encoding": "identity"}  # byte offsets must be of the file itself
        if start > 0:
            headers["Range"] = f"bytes={start}-"
        if self._auth and url.lower().startswith("https://"):
            headers.update(self._auth)
        try:
            resp = self._pool.request("GET", url, headers=headers, preload_content=False, redirect=True)
        except self._urllib3.exceptions.HTTPError as e:
            raise _convert(e, url) from None
        return Response(resp, self._urllib3, url)

    def close(self) -> None:
        self._pool.clear()


class Response:
    """One streamed answer; ``chunks()`` converts urllib3's errors."""

    def __init__(self, resp: BaseHTTPResponse, urllib3: ModuleType, url: str) -> None:
        self._resp = resp
        self._urllib3 = urllib3
        self._url = url
        self.status: int = resp.status
        self.headers: HTTPHeaderDict = resp.headers

    def chunks(self) -> Iterator[bytes]:
        try:
            yield from self._resp.stream(CHUNK, decode_content=False)
        except self._urllib3.exceptions.HTTPError as e:
            raise _convert(e, self._url) from None
        except OSError as e:
            raise DownloadError(f"reading from {redact(self._url)} failed: {e}", retryable=True) from None

    def close(self) -> None:
        self._resp.release_conn()
        self._resp.close()


def _convert(e: Exception, url: str) -> DownloadError:
    import urllib3  # costly: only a download needs the HTTP client

    where = redact(url)
    reason = getattr(e, "reason", None) or e
    if isinstance(e, urllib3.exceptions.SSLError) or isinstance(reason, ssl.SSLError):
        return DownloadError(
            f"TLS with {where} failed: {reason} (a CA other than the system's goes in download.ca_file)",
            code="download_tls",
        )
    if isinstance(e, urllib3.exceptions.MaxRetryError) and "redirect" in str(e).lower():
        return DownloadError(f"{where}: too many redirects", code="download_http")
    if isinstance(e, urllib3.exceptions.LocationParseError):
        return DownloadError(f"{where}: not a usable URL: {e}", code="download_http")
    return DownloadError(f"{where}: {type(reason).__name__}: {_short(reason)}", retryable=True)


def _short(e: object) -> str:
    text = str(e)
    # urllib3 repeats the connection object's repr: keep the reason.
    return text.split(": ", 1)[-1] if "Connection" in text and ": " in text else text


def _user_agent() -> str:

    return f"edge-agent/{__version__}"


# --------------------------------------------------------------------------------------------
# The download


def check_space(folder: Path, missing: int, margin: int) -> None:
    """Raise DownloadError (download_no_space) unless ``folder`` has ``missing`` + ``margin`` bytes free."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError as e:
        raise DownloadError(f"cannot read free space in {folder}: {e.strerror}", code="download_no_space") from None
    if free < missing + margin:
        raise DownloadError(
            f"not enough space in {folder}: {_mb(missing)} to fetch + {_mb(margin)} margin (download.free_margin_mb), "
            f"{_mb(free)} free; remove unused models (model.keep_previous) or enlarge the disk",
            code="download_no_space",
        )


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


class _Rate:
    """Bytes per second over the last few seconds (what an ETA on a flaky link needs)."""

    def __init__(self, clock: Callable[[], float], window_s: float = 10.0) -> None:
        self._clock = clock
        self._window = window_s
        self._marks: list[tuple[float, int]] = []

    def add(self, total: int) -> float | None:
        now = self._clock()
        self._marks.append((now, total))
        while len(self._marks) > 2 and now - self._marks[0][0] > self._window:
            self._marks.pop(0)
        t0, b0 = self._marks[0]
        return (total - b0) / (now - t0) if now - t0 >= 0.2 else None


@dataclass
class _State:
    """Where the partial file stands; every attempt moves it forward, even one that fails midway."""

    have: int
    h: HASH
    total: int | None


def download(
    source: Source,
    link: HttpLink,
    *,
    margin: int = 64 * 2**20,
    retry: RetryPolicy | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    cancel: threading.Event | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Result:
    """Bring ``source`` to ``source.dest``; see the module's text. Raises DownloadError (with the
    partial file kept for a resume, except after a checksum mismatch), or DownloadError
    ``download_canceled`` when ``cancel`` is set."""
    retry = retry or RetryPolicy()
    cancel = cancel or threading.Event()
    report = on_progress or (lambda p: None)
    t0 = clock()
    where = redact(source.url)
    progress = Progress("checking", total=source.size)
    report(progress)
    if source.dest.is_file() and _sha256(source.dest, cancel) == source.sha256:
        _discard(source.partial)
        progress.state, progress.bytes = "done", source.dest.stat().st_size
        report(progress)
        return Result(source.dest, 0, 0, 0, clock() - t0, already_there=True)

    h = hashlib.sha256()
    have = 0
    if source.partial.exists():
        have = source.partial.stat().st_size
        if source.size is not None and have > source.size:
            _discard(source.partial)
            have = 0
        else:
            h = _hash_file(source.partial, cancel)
    resumed_from = have
    if source.size is not None:
        check_space(source.dest.parent, source.size - have, margin)

    st = _State(have, h, source.size)
    progress = Progress("downloading", bytes=have, total=st.total)
    try:
        _fetch(source, link, st, margin, retry, progress, report, cancel, clock)
    except BaseException:
        if source.partial.exists() and source.partial.stat().st_size == 0:
            _discard(source.partial)  # nothing came: leave no empty file behind
        raise
    h, attempts = st.h, progress.attempts

    progress.state, progress.rate_bps, progress.eta_s = "verifying", None, None
    report(progress)
    digest = h.hexdigest()
    if digest != source.sha256:
        _discard(source.partial)
        progress.state = "failed"
        progress.message = f"sha256 {digest} does not match {source.sha256}"
        report(progress)
        raise DownloadError(
            f"{where}: the file's sha256 is {digest}, not {source.sha256} as model.sha256 says; the download was "
            "deleted (check the URL and the checksum)",
            code="download_checksum_mismatch",
        )
    os.replace(source.partial, source.dest)
    fsync_dir(source.dest.parent)
    progress.state = "done"
    report(progress)
    took = clock() - t0
    log.info(
        "downloaded %s to %s: %d bytes fetched (%d resumed) in %d attempt(s), %.1fs",
        where,
        source.dest.name,
        progress.fetched,
        resumed_from,
        attempts,
        took,
    )
    return Result(source.dest, progress.fetched, resumed_from, attempts, took)


def _fetch(
    source: Source,
    link: HttpLink,
    st: _State,
    margin: int,
    retry: RetryPolicy,
    progress: Progress,
    report: Callable[[Progress], None],
    cancel: threading.Event,
    clock: Callable[[], float],
) -> None:
    """Attempts until the partial file holds the whole body, with growing waits between failed ones."""
    where = redact(source.url)
    rate = _Rate(clock)
    failures = 0
    with open(source.partial, "ab") as out:
        while True:
            if cancel.is_set():
                raise DownloadError(f"download of {where} canceled", code="download_canceled")
            progress.attempts += 1
            before = progress.fetched
            try:
                _attempt(source, link, out, st, margin, progress, rate, report, cancel)
            except DownloadError as e:
                out.flush()
                if e.code == "download_canceled" or not e.retryable:
                    progress.state, progress.message = "failed", str(e)
                    report(progress)
                    raise
                failures = 0 if progress.fetched > before else failures + 1
                if failures >= retry.max_failures:
                    progress.state, progress.message = "failed", str(e)
                    report(progress)
                    raise DownloadError(
                        f"gave up after {failures} attempts in a row without progress: {e} ({_mb(st.have)} kept in "
                        f"{source.partial.name}; the next try resumes)",
                        code=e.code,
                        retryable=False,
                    ) from None
                delay = min(retry.max_s, retry.min_s * 2 ** max(0, failures - 1))
                log.warning("download: %s; retrying in %.1fs from byte %d", e, delay, st.have)
                progress.state, progress.message, progress.rate_bps, progress.eta_s = "retrying", str(e), None, None
                report(progress)
                if cancel.wait(delay):
                    raise DownloadError(f"download of {where} canceled", code="download_canceled") from None
                progress.state, progress.message = "downloading", None
                continue
            break
        out.flush()
        os.fsync(out.fileno())


def _attempt(
    source: Source,
    link: HttpLink,
    out: BinaryIO,
    st: _State,
    margin: int,
    progress: Progress,
    rate: _Rate,
    report: Callable[[Progress], None],
    cancel: threading.Event,
) -> None:
    """One GET from byte ``st.have``; returns once the body is complete. ``st`` follows every byte
    written, so an attempt cut midway leaves it where the partial file ends."""
    where = redact(source.url)
    resp = link.get(source.url, st.have)
    try:
        status = resp.status
        if status == 416:
            m = _RANGE_UNSATISFIED.match(resp.headers.get("Content-Range", ""))
            if m and int(m.group(1)) == st.have:
                st.total = st.have  # the partial file already holds every byte
                return
            _start_over(out, st, progress)
            raise DownloadError(
                f"{where}: the server refused to resume from byte {st.have}; starting over", retryable=True
            )
        if status in (408, 429) or status >= 500:
            raise DownloadError(f"{where}: HTTP {status} {_reason(resp)}", code="download_http", retryable=True)
        if status not in (200, 206):
            raise DownloadError(
                f"{where}: HTTP {status} {_reason(resp)}{_hint(status, source.url)}", code="download_http"
            )
        if status == 206:
            m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
            if m is None or int(m.group(1)) != st.have:
                raise DownloadError(
                    f"{where}: the server answered a range from another offset "
                    f"({resp.headers.get('Content-Range')!r}, asked {st.have})",
                    retryable=True,
                )
            server_total = int(m.group(3)) if m.group(3) != "*" else None
        else:
            if st.have:
                log.info("download of %s: the server does not resume (HTTP 200 to a Range request); from byte 0", where)
                _start_over(out, st, progress)
            length = resp.headers.get("Content-Length")
            server_total = int(length) if length and length.isdigit() else None
        if server_total is not None:
            if source.size is not None and server_total != source.size:
                raise DownloadError(
                    f"{where}: the server's file has {server_total} bytes, model.size says {source.size}",
                    code="download_size_mismatch",
                )
            if st.total is None:
                check_space(source.dest.parent, server_total - st.have, margin)
            st.total = server_total
        progress.total = st.total
        for chunk in resp.chunks():
            if cancel.is_set():
                raise DownloadError(f"download of {where} canceled", code="download_canceled")
            if st.total is not None and st.have + len(chunk) > st.total:
                raise DownloadError(
                    f"{where}: the server sent more than {st.total} bytes", code="download_size_mismatch"
                )
            out.write(chunk)
            st.h.update(chunk)
            st.have += len(chunk)
            progress.bytes, progress.fetched = st.have, progress.fetched + len(chunk)
            r = rate.add(progress.fetched)
            if r is not None:
                progress.rate_bps = r
                progress.eta_s = (st.total - st.have) / r if st.total is not None and r > 0 else None
            report(progress)
        if st.total is not None and st.have < st.total:
            raise DownloadError(f"{where}: the connection ended at byte {st.have} of {st.total}", retryable=True)
        if st.total is None:
            st.total = st.have
    finally:
        resp.close()


def _start_over(out: BinaryIO, st: _State, progress: Progress) -> None:
    out.flush()
    out.truncate(0)  # the file is opened for appending: the next write lands at byte 0
    st.have, st.h = 0, hashlib.sha256()
    progress.bytes = 0


def _reason(resp: Response) -> str:
    return getattr(resp._resp, "reason", "") or ""


def _hint(status: int, url: str) -> str:
    if status in (401, 403):
        if url.lower().startswith("http://"):
            return " (credentials are only sent over https)"
        return " (check the model_download_token or model_download_username/password credential)"
    if status in (404, 410):
        return " (check model.url)"
    return ""


def _hash_file(path: Path, cancel: threading.Event) -> HASH:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            if cancel.is_set():
                raise DownloadError("download canceled", code="download_canceled")
            h.update(block)
    return h


def _sha256(path: Path, cancel: threading.Event) -> str:
    digest: str = _hash_file(path, cancel).hexdigest()
    return digest


def _discard(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


__all__ = [
    "DownloadError",
    "HttpLink",
    "Progress",
    "Result",
    "RetryPolicy",
    "Source",
    "check_space",
    "download",
    "redact",
]
