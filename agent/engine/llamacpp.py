"""The seam between the engine and llama-cpp-python: everything that reaches below ``Llama()``.

Owns: constructing ``Llama`` with the model/context parameters its constructor does not expose
(``use_extra_bufts``, ``n_outputs_max``); routing llama.cpp's log into Python logging and
capturing the buffer sizes it reports at load; the abort callback type; ``malloc_trim`` (agent.system.libc, re-exported).

Process-wide state lives here on purpose and only here: llama.cpp's log callback and
llama-cpp-python's default-parameter functions are process-global by nature, so the objects that
stand in for them are too, guarded by one lock.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import logging
import re
import threading
from collections.abc import Iterator
from typing import Any

import llama_cpp
import llama_cpp.llama_cpp as C

from agent.system.libc import LIBC

log = logging.getLogger("agent.engine.llama")

GGML_TYPES = {"f32": C.GGML_TYPE_F32, "f16": C.GGML_TYPE_F16, "q8_0": C.GGML_TYPE_Q8_0, "q4_0": C.GGML_TYPE_Q4_0}

# llama_decode's return value when the abort callback stopped it (llama-context.cpp: GGML_STATUS_ABORTED -> 2).
DECODE_ABORTED = 2

AbortCallback = C.ggml_abort_callback


class _LogSink:
    """llama.cpp's single process-wide log callback, forwarded to the ``agent.engine.llama`` logger.

    llama.cpp logs buffer sizes at INFO while loading; a capture collects those lines so the
    load report can show llama.cpp's own numbers next to the estimate.
    """

    # ggml.h: 1 DEBUG, 2 INFO, 3 WARN, 4 ERROR, 5 CONT (continues the previous line). llama.cpp's
    # INFO is a page of model details per load: DEBUG here. (llama-cpp-python's own table is off by one.)
    _LEVELS = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}
    # What llama.cpp reports when our abort callback stops a decode (GGML_STATUS_ABORTED = 1,
    # llama_decode -> 2, the micro-batch dropped from the KV cache): a cancel, not a failure.
    _QUIET = (
        "removing memory module entries",
        "compute status: 1",
        "compute_async failed with error 1",
        "failed to decode, ret = 2",
    )

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._capture: list[str] | None = None
        self._last_level = logging.DEBUG
        # The ctypes object must outlive every call llama.cpp makes to it: keep it on the sink.
        self._cfunc = C.llama_log_callback(self._on_log)
        self._installed = False

    def _on_log(self, level: int, text: bytes, _user: Any) -> None:
        try:
            line = text.decode("utf-8", "replace")
            py_level = self._last_level if level == 5 else self._LEVELS.get(level, logging.DEBUG)
            self._last_level = py_level
            if py_level >= logging.WARNING and any(q in line for q in self._QUIET):
                py_level = logging.DEBUG
            cap = self._capture
            if cap is not None:
                cap.append(line)
            if log.isEnabledFor(py_level) and line.strip():
                log.log(py_level, "%s", line.rstrip())
        except Exception:  # noqa: BLE001  an exception must never cross back into C
            pass

    def install(self) -> None:
        # llama-cpp-python installs its own callback when it is imported; ours replaces it.
        with self._lock:
            if not self._installed:
                C.llama_log_set(self._cfunc, ctypes.c_void_p(0))
                self._installed = True

    @contextlib.contextmanager
    def capture(self) -> Iterator[list[str]]:
        lines: list[str] = []
        self._capture = lines
        try:
            yield lines
        finally:
            self._capture = None


LOG_SINK = _LogSink()

# Serialises every Llama() construction in the process: the default-parameter functions are
# swapped on the llama_cpp module for the duration of one constructor call.
_CONSTRUCT_LOCK = threading.Lock()


@contextlib.contextmanager
def _default_params(*, use_extra_bufts: bool, n_outputs_max: int) -> Iterator[None]:
    """Make ``Llama.__init__`` start from our parameters.

    ``Llama()`` builds its structs with ``llama_cpp.llama_model_default_params()`` and
    ``llama_context_default_params()`` and exposes neither ``use_extra_bufts`` (weight repacking
    into anonymous memory) nor ``n_outputs_max``. It looks both functions up on the module at call
    time, so wrapping them for the duration of the constructor is enough; the caller then checks
    ``Llama.model_params`` to prove the value took effect.
    """
    orig_model, orig_context = C.llama_model_default_params, C.llama_context_default_params

    def model_params() -> Any:
        p = orig_model()
        p.use_extra_bufts = use_extra_bufts
        return p

    def context_params() -> Any:
        p = orig_context()
        p.n_outputs_max = n_outputs_max
        return p

    C.llama_model_default_params = model_params
    C.llama_context_default_params = context_params
    try:
        yield
    finally:
        C.llama_model_default_params = orig_model
        C.llama_context_default_params = orig_context


def construct_llama(
    path: str,
    *,
    repack: bool,
    n_ctx: int,
    n_batch: int,
    n_ubatch: int,
    n_threads: int,
    type_k: str,
    type_v: str,
    flash_attn: bool,
) -> tuple[llama_cpp.Llama, list[str]]:
    """Load ``path`` with mmap (never mlock) and return the Llama and llama.cpp's load log.

    verbose=True keeps llama-cpp-python from redirecting the process's stdout/stderr file
    descriptors to /dev/null during load (it does that with verbose=False, and every other thread
    of the daemon would lose its log lines meanwhile); its own Python prints are swallowed here
    instead, and llama.cpp's log goes through LOG_SINK.
    """
    LOG_SINK.install()
    with _CONSTRUCT_LOCK, LOG_SINK.capture() as lines:
        with _default_params(use_extra_bufts=repack, n_outputs_max=1), contextlib.redirect_stderr(io.StringIO()):
            llama = llama_cpp.Llama(
                path,
                n_ctx=n_ctx,
                n_batch=n_batch,
                n_ubatch=n_ubatch,
                n_threads=n_threads,
                n_threads_batch=n_threads,
                use_mmap=True,
                use_mlock=False,
                type_k=GGML_TYPES[type_k],
                type_v=GGML_TYPES[type_v],
                flash_attn=flash_attn,
                logits_all=False,
                verbose=True,
            )
    if bool(llama.model_params.use_extra_bufts) != repack:
        llama.close()
        raise RuntimeError("llama-cpp-python did not take use_extra_bufts from llama_model_default_params()")
    return llama, lines


_SIZE_RE = re.compile(r"(\S+)\s+(model|KV|compute|output) buffer size\s*=\s*([\d.]+) MiB")


def buffer_sizes(lines: list[str]) -> dict[str, int]:
    """llama.cpp's reported buffers from its load log, bytes: {"CPU_Mapped model": ..., "CPU_REPACK model": ...,
    "CPU KV": ..., "CPU compute": ..., "CPU output": ...}."""
    out: dict[str, int] = {}
    for line in lines:
        m = _SIZE_RE.search(line)
        if m:
            key = f"{m.group(1)} {m.group(2)}"
            out[key] = out.get(key, 0) + int(float(m.group(3)) * 1024 * 1024)
    return out




def token_piece(vocab: Any, token: int, buf: ctypes.Array[ctypes.c_char]) -> tuple[bytes, ctypes.Array[ctypes.c_char]]:
    """The bytes of one token (llama-cpp-python's detokenize asserts pieces fit 32 bytes)."""
    n = C.llama_token_to_piece(vocab, token, buf, len(buf), 0, False)
    if n < 0:
        buf = ctypes.create_string_buffer(-n)
        n = C.llama_token_to_piece(vocab, token, buf, len(buf), 0, False)
    return bytes(buf[:n]), buf
