"""The SHA-256 of model files, for the shadow's reported ``serving.sha256``: computed once per file,
in the background.

Owns ``FileHashes``: ``get(path)`` answers at once with the file's digest when it is known, else
None (and that it is pending), and then hashes the file on a thread of its own (one file at a time,
at the lowest CPU and I/O priority an unprivileged process may set, never on the job path), and
calls ``on_ready()`` when the digest is known. A file is known by its identity: (device, inode,
size, mtime, ctime). The same file is never hashed again, not even after a restart: the digests are
kept in ``cache_file`` (``{device.state_dir}/model-hashes.json``). A file replaced, rewritten or
touched has a new identity and is hashed again. A file that changes while it is hashed is not
cached, and hashed again when asked again.

The hash is ``agent.system.files.file_sha256``, the same the model load checks
``model.sha256`` with.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from pathlib import Path

from agent.system.files import atomic_write, file_sha256
from agent.system.priority import current_tid, set_io, set_nice

log = logging.getLogger(__name__)

CACHE_FILE = "model-hashes.json"
_MAX_ENTRIES = 32  # models kept on one board; the oldest known digests are forgotten first

Identity = tuple[int, int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns


def identity(path: Path) -> Identity:
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class FileHashes:
    def __init__(
        self,
        *,
        cache_file: Path | None,
        on_ready: Callable[[], None] = lambda: None,
        hash_file: Callable[[Path], str] = file_sha256,
    ) -> None:
        """``cache_file``: where known digests are kept across restarts (None: in memory only);
        ``on_ready()`` is called on the hashing thread each time a file's hashing ended (its digest
        is known, or the file could not be read)."""
        self._cache_file = cache_file
        self._on_ready = on_ready
        self._hash_file = hash_file
        self._lock = threading.Lock()
        self._known: OrderedDict[Identity, str] = self._read()
        self._failed: dict[Identity, str] = {}  # files that could not be read, with why (not retried)
        self._queue: deque[tuple[Path, Identity]] = deque()
        self._thread: threading.Thread | None = None
        self.computed = 0  # files hashed by this process (the cache's hits are not counted)

    def get(self, path: Path) -> tuple[str | None, bool]:
        """(the file's SHA-256 or None, whether it is being computed). Unknown: the file is queued for
        the hashing thread. (None, False): the file is gone or could not be read. Any thread; never
        waits for the hashing."""
        try:
            ident = identity(path)
        except (OSError, ValueError):  # gone, unreadable, a name the OS refuses
            return None, False
        with self._lock:
            digest = self._known.get(ident)
            if digest is not None or ident in self._failed:
                return digest, False
            if all(i != ident for _, i in self._queue):
                self._queue.append((Path(path), ident))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="model-sha256", daemon=True)
                self._thread.start()
        return None, True

    def _run(self) -> None:
        # Below the jobs: lowest CPU priority (niceness 19) and lowest best-effort I/O priority for this
        # thread only. Both are always allowed without privileges; where they are not, it runs as it is.
        set_nice(19, [current_tid()], setting="hashing")
        set_io("best-effort", 7, [current_tid()])
        while True:
            with self._lock:
                if not self._queue:
                    self._thread = None
                    return
                path, ident = self._queue[0]
            digest, error = None, None
            try:
                digest = self._hash_file(path)
                after = identity(path)
            except OSError as e:
                error, after = e.strerror or str(e), None
            with self._lock:
                self._queue.popleft()
                if error is not None:
                    self._failed[ident] = error
                elif after == ident and digest is not None:
                    self._known[ident] = digest
                    self._known.move_to_end(ident)
                    while len(self._known) > _MAX_ENTRIES:
                        self._known.popitem(last=False)
                    self.computed += 1
                known = list(self._known.items())
            if error is not None:
                log.warning("model sha256: cannot read %s: %s", path, error)
            elif after != ident:
                # Not told: the next reading of the facts asks again (a file still being written is not
                # hashed over and over).
                log.info("model sha256: %s changed while it was hashed; it is hashed again when asked", path.name)
                continue
            else:
                log.info("model sha256: %s is %s", path.name, digest)
                self._write(known)
            try:
                self._on_ready()
            except Exception:  # the caller's bug must not end the hashing of the next file
                log.exception("model sha256: telling that a digest is known failed")

    def _read(self) -> OrderedDict[Identity, str]:
        out: OrderedDict[Identity, str] = OrderedDict()
        if self._cache_file is None:
            return out
        try:
            entries = json.loads(self._cache_file.read_text())["files"]
            for e in entries:
                ident = (int(e["dev"]), int(e["ino"]), int(e["size"]), int(e["mtime_ns"]), int(e["ctime_ns"]))
                digest = str(e["sha256"])
                if len(digest) == 64 and all(c in "0123456789abcdef" for c in digest):
                    out[ident] = digest
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as e:  # the cache only saves hashing
            log.warning("model sha256: %s is unreadable (%s); files are hashed again", self._cache_file, e)
        return out

    def _write(self, known: list[tuple[Identity, str]]) -> None:
        if self._cache_file is None:
            return
        files = [
            {"dev": i[0], "ino": i[1], "size": i[2], "mtime_ns": i[3], "ctime_ns": i[4], "sha256": d} for i, d in known
        ]
        try:
            atomic_write(self._cache_file, json.dumps({"files": files}, indent=1), durable=False)  # a cache
        except OSError as e:
            # The cache only saves hashing: losing a write costs one hash after a restart. Not a warning: a
            # full or read-only disk is told once by the job store's health, and a cache is no reason to repeat it.
            log.info(
                "model sha256: cannot write %s (%s); the digest is computed again after a restart",
                self._cache_file,
                e.strerror or e,
            )


__all__ = ["CACHE_FILE", "FileHashes", "identity"]
