"""Model delivery on the board: getting the file desired state names into the models folder, and
keeping the folder within bounds.

Owns the one background download (agent/models/download.py does the transfer) and the record of
the models the agent delivered, ``{device.state_dir}/models.json``. The daemon's main loop never
waits for a download: the live-settings path asks ``ensure(source)`` and gets ``ready``,
``fetching`` (with progress) or ``failed`` at once; the download runs on its own thread, tells the
daemon when it ends (``on_done``: reconcile again, the file is there or the failure is known) and,
at most every ``download.progress_interval_s``, that there is progress to report
(``on_progress``).

Space: after a model change, downloaded models other than the one in force are removed beyond
``model.keep_previous`` (most recently in force first, so the previous model stays for a rollback).
Only files the agent downloaded itself are ever removed; never the file in force, the config
file's model, or a file named in desired state (``protected()``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from agent.models.download import DownloadError, HttpLink, Progress, RetryPolicy, Source, download, redact
from agent.system.files import atomic_write

log = logging.getLogger(__name__)

RECORD = "models.json"
# The note under reported.pending while a model downloads (the figures are in reported.download:
# a note that changed with every progress report would churn the shadow's metadata).
_FETCHING = "downloading {name} (progress under reported.download)"


@dataclass(frozen=True)
class Status:
    state: Literal["ready", "fetching", "failed"]
    message: str = ""


@dataclass(frozen=True)
class Entry:
    """One file in the record."""

    sha256: str | None
    size: int
    mtime_ns: int
    downloaded: bool  # fetched by the agent (only those are ever removed)
    last_used: float  # epoch seconds it was last in force (0: never)
    url: str | None = None  # redacted


def choose_removals(record: dict[str, Entry], in_force: str, protected: Iterable[str], keep_previous: int) -> list[str]:
    """Pure: the downloaded files to delete so that at most ``keep_previous`` of them remain besides
    the one in force, keeping the most recently used (the previous model first)."""
    keep = {in_force, *protected}
    candidates = sorted(
        (name for name, e in record.items() if e.downloaded and name not in keep),
        key=lambda n: (record[n].last_used, n),
        reverse=True,
    )
    return candidates[keep_previous:]


class ModelDelivery:
    def __init__(
        self,
        *,
        models_dir: Path,
        state_dir: Path,
        settings: Callable[[], Any],
        protected: Callable[[], Iterable[Path]] = lambda: (),
        on_done: Callable[[], None] = lambda: None,
        on_progress: Callable[[], None] = lambda: None,
        link: Callable[[Any], HttpLink] = HttpLink.from_settings,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        """``settings()`` returns the DownloadSettings in force; ``protected()`` the model paths that
        must never be removed (the config file's, desired's)."""
        self.models_dir = models_dir.expanduser().resolve()
        self._record_path = state_dir / RECORD
        self._settings = settings
        self._protected = protected
        self._on_done = on_done
        self._on_progress = on_progress
        self._link = link
        self._clock = clock
        self._wall = wall
        self._lock = threading.Lock()
        self._job: _Job | None = None
        self._progress_pending = False
        self._last_progress = float("-inf")

    def follow(self, *, protected: Callable[[], Iterable[Path]], on_done: Callable[[], None]) -> None:
        """``protected`` and ``on_done`` (see ``__init__``) from a part built after this one (the shadow)."""
        self._protected, self._on_done = protected, on_done

    # ------------------------------------------------------------------ main loop

    def ensure(self, path: Path, *, url: str, sha256: str, size: int | None) -> Status:
        """Whether the model file ``path`` (resolved, inside the models folder) is there to load.
        Starts or follows its download from ``url``; never blocks on the network."""
        src = Source(url=url, sha256=sha256, dest=path, size=size)
        with self._lock:
            job = self._job
            if job is not None and job.source == src:
                if job.error is not None:
                    return Status("failed", f"{job.error.code}: {job.error}")
                if job.done:
                    return Status("ready")
                return Status("fetching", _FETCHING.format(name=path.name))
        if self._known_good(path, sha256):
            return Status("ready")
        self._start(src)
        return Status("fetching", _FETCHING.format(name=path.name))

    def cancel(self) -> None:
        """Desired no longer names a file to download: stop the running download, if any."""
        with self._lock:
            job = self._job
        if job is not None and not job.done and job.error is None:
            log.info("model delivery: %s is no longer wanted; download canceled", job.source.dest.name)
            job.cancel.set()

    def progress(self) -> dict[str, Any] | None:
        """The current (or last) download, for reported state: path, url, state, bytes, total, rate, ETA."""
        with self._lock:
            job = self._job
            if job is None:
                return None
            out = {"path": job.source.dest.name, "url": redact(job.source.url), **job.progress.as_dict()}
            if job.error is not None:
                out["state"], out["message"] = "failed", f"{job.error.code}: {job.error}"
            return out

    def take_progress(self) -> bool:
        """True (once) when there is progress to report; at most every download.progress_interval_s,
        except the start and the end of a download, which are always reported."""
        with self._lock:
            due, self._progress_pending = self._progress_pending, False
            return due

    def after_change(self, in_force: Path, keep_previous: int) -> list[str]:
        """After a model change: note ``in_force`` as used now, then remove downloaded models beyond
        ``keep_previous``. Returns the names removed."""
        record = self._read()
        name = self._name(in_force)
        if name is None:
            return []
        old = record.get(name)
        st = _stat(in_force)
        record[name] = Entry(
            old.sha256 if old else None,
            st[0] if st else 0,
            st[1] if st else 0,
            old.downloaded if old else False,
            self._wall(),
            old.url if old else None,
        )
        protected = {n for p in self._protected() if (n := self._name(self._resolve(p))) is not None}
        removed = []
        for victim in choose_removals(record, name, protected, keep_previous):
            try:
                (self.models_dir / victim).unlink()
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("model delivery: cannot remove %s: %s", victim, e.strerror)
                continue
            del record[victim]
            removed.append(victim)
            log.info("model delivery: removed %s (model.keep_previous = %d)", victim, keep_previous)
        self._write(record)
        return removed

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel a running download (its partial file stays for the next start) and wait for it."""
        with self._lock:
            job = self._job
        if job is not None:
            job.cancel.set()
            if job.thread is not None:
                job.thread.join(timeout)

    # ------------------------------------------------------------------ the download thread

    def _start(self, src: Source) -> None:
        with self._lock:
            old = self._job
            job = _Job(src)
            self._job = job
            self._progress_pending = True
        if old is not None and not old.done:
            old.cancel.set()  # the thread ends at its next chunk; desired moved on
        job.thread = threading.Thread(target=self._run, args=(job, old), name="model-download", daemon=True)
        job.thread.start()

    def _run(self, job: _Job, previous: _Job | None) -> None:
        if previous is not None and previous.thread is not None:
            previous.thread.join()
            if previous.error is not None and previous.error.code == "download_canceled":
                _unlink(previous.source.partial)  # abandoned: its bytes are not worth the card's space
        s = self._settings()
        log.info("model delivery: fetching %s from %s", job.source.dest.name, redact(job.source.url))
        try:
            link = self._link(s)
            try:
                result = download(
                    job.source,
                    link,
                    margin=s.free_margin_mb * 2**20,
                    retry=RetryPolicy(s.retry_min_s, s.retry_max_s, s.max_failures),
                    on_progress=lambda p: self._progress(job, p, s.progress_interval_s),
                    cancel=job.cancel,
                    clock=self._clock,
                )
            finally:
                link.close()
        except DownloadError as e:
            with self._lock:
                job.error = e
                self._progress_pending = True
            if e.code != "download_canceled":
                log.error("model delivery: %s: %s", job.source.dest.name, e)
        except Exception as e:  # noqa: BLE001  a bug here must surface as a failed download, not a dead thread
            log.exception("model delivery: %s failed", job.source.dest.name)
            with self._lock:
                job.error = DownloadError(f"{type(e).__name__}: {e}")
                self._progress_pending = True
        else:
            st = _stat(result.path)
            name = self._name(result.path)
            if name is not None and st is not None:
                record = self._read()
                old = record.get(name)
                record[name] = Entry(
                    job.source.sha256,
                    st[0],
                    st[1],
                    not result.already_there or bool(old and old.downloaded),
                    old.last_used if old else 0.0,
                    redact(job.source.url),
                )
                self._write(record)
            with self._lock:
                job.done = True
                self._progress_pending = True
        if job.error is None or job.error.code != "download_canceled":
            self._on_done()

    def _progress(self, job: _Job, p: Progress, interval_s: float) -> None:
        now = self._clock()
        with self._lock:
            job.progress = Progress(**vars(p))
            if p.state in ("downloading", "verifying", "retrying") and now - self._last_progress < interval_s:
                return
            self._last_progress = now
            self._progress_pending = True
        self._on_progress()

    # ------------------------------------------------------------------ the record

    def _known_good(self, path: Path, sha256: str) -> bool:
        """The file is there and is the one the record says was verified with this checksum."""
        name = self._name(path)
        st = _stat(path)
        if name is None or st is None:
            return False
        e = self._read().get(name)
        return e is not None and e.sha256 == sha256 and (e.size, e.mtime_ns) == st

    def _resolve(self, p: Path) -> Path:
        p = Path(p).expanduser()
        return (p if p.is_absolute() else self.models_dir / p).resolve()

    def _name(self, path: Path) -> str | None:
        try:
            return str(path.resolve().relative_to(self.models_dir))
        except ValueError:
            return None

    def _read(self) -> dict[str, Entry]:
        try:
            data = json.loads(self._record_path.read_text())
            return {name: Entry(**e) for name, e in data.get("files", {}).items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError) as e:
            log.warning("model delivery: %s is unreadable (%s); starting a new record", self._record_path, e)
            return {}

    def _write(self, record: dict[str, Entry]) -> None:
        try:
            atomic_write(
                self._record_path, json.dumps({"files": {n: vars(e) for n, e in sorted(record.items())}}, indent=1)
            )
        except OSError as e:  # the record only saves hashing and decides removals: losing a write loses little
            log.warning("model delivery: cannot write %s: %s", self._record_path, e.strerror)


class _Job:
    def __init__(self, source: Source) -> None:
        self.source = source
        self.cancel = threading.Event()
        self.thread: threading.Thread | None = None  # set right after
        self.progress = Progress("checking", total=source.size)
        self.done = False
        self.error: DownloadError | None = None


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


__all__ = ["Entry", "ModelDelivery", "Status", "choose_removals"]
