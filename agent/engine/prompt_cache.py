"""engine.prompt_cache: a shared prompt prefix whose KV cache outlives the process.

Owns the prefix's state file under ``{device.state_dir}/prompt-cache``: written once with
llama.cpp's sequence state files (``llama_state_seq_save_file``) right after the prefix was
evaluated, and restored into the sequence (``llama_state_seq_load_file``) at load and whenever a
job that starts with the prefix finds the cache holding something else (another job's prompt).

A file is named by, and records, everything its KV cells depend on: the model file's sha256, the
context's size, K/V cache types, flash attention, sliding-window and sequence settings, the
llama.cpp build, and the prefix's tokens. Its sidecar (``.json``, written last) records that key
and the state file's size and sha256. A file whose key, size or checksum does not match, that
llama.cpp refuses, or whose tokens differ, is deleted and rebuilt: never trusted. Files of other
keys (another model, n_ctx ...) are removed when a cache is opened, so the folder holds one.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import llama_cpp
import llama_cpp.llama_cpp as C

from agent.engine.prefix import KVSequence
from agent.system.files import atomic_write, file_sha256

log = logging.getLogger(__name__)

FORMAT = 1
_CONTEXT_FIELDS = ("n_seq_max", "type_k", "type_v", "flash_attn_type", "swa_full", "kv_unified", "offload_kqv")

# What a prefix's KV cells depend on, as written to its sidecar (JSON: strings and integers).
CacheKey = dict[str, str | int]


def model_sha256(model: Path, folder: Path | None) -> str:
    """The model file's sha256, remembered in ``folder`` by (path, size, mtime, inode) so that a
    restart does not read the whole file again (seconds on a Pi for a few hundred MiB)."""
    st = model.stat()
    ident = {"path": str(model.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}
    memo = folder / "model-sha256.json" if folder is not None else None
    if memo is not None:
        try:
            data = json.loads(memo.read_text())
            if {k: data.get(k) for k in ident} == ident and isinstance(data.get("sha256"), str):
                return str(data["sha256"])
        except (OSError, ValueError):
            pass
    log.info("prompt cache: computing the sha256 of %s (once per model file)", model.name)
    with open(model, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if memo is not None:
        try:
            atomic_write(memo, json.dumps({**ident, "sha256": digest}).encode())
        except OSError as e:
            log.warning("prompt cache: cannot remember the model's sha256 in %s: %s", memo, e)
    return digest


def cache_key(llama: Any, model_digest: str, tokens: list[int]) -> CacheKey:
    """Everything the prefix's KV cells depend on."""
    params = llama.context_params
    key: CacheKey = {
        "format": FORMAT,
        "llama_cpp_python": llama_cpp.__version__,
        "model_sha256": model_digest,
        "n_ctx": int(llama.n_ctx()),
        "n_swa": int(C.llama_model_n_swa(llama._model.model)),
        "n_tokens": len(tokens),
        "tokens_sha256": hashlib.sha256(
            b"".join(int(t).to_bytes(4, "little", signed=True) for t in tokens)
        ).hexdigest(),
    }
    for name in _CONTEXT_FIELDS:
        if hasattr(params, name):
            v = getattr(params, name)
            key[name] = v if isinstance(v, (bool, int)) else int(v)
    return key


class PromptCache:
    """One prefix's tokens and its state file. ``saved``: the file on disk holds them."""

    def __init__(self, folder: Path, key: CacheKey, tokens: list[int]) -> None:
        self.folder = folder
        self.key = key
        self.tokens = list(tokens)
        name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        self.kv_path = folder / f"prefix-{name}.kv"
        self.meta_path = folder / f"prefix-{name}.json"
        self.saved = False

    @classmethod
    def open(cls, folder: Path, llama: Any, model: Path, tokens: list[int]) -> PromptCache:
        """The cache for this prefix on this loaded model; checks its files (``saved``) and removes
        other keys' files. Raises OSError when the folder cannot be created."""
        folder.mkdir(parents=True, exist_ok=True)
        pc = cls(folder, cache_key(llama, model_sha256(model, folder), tokens), tokens)
        for p in folder.glob("prefix-*"):
            if p not in (pc.kv_path, pc.meta_path):
                log.info("prompt cache: removing %s (another model, context or prefix)", p.name)
                p.unlink(missing_ok=True)
        pc.saved = pc._files_valid()
        return pc

    def _files_valid(self) -> bool:
        try:
            meta = json.loads(self.meta_path.read_text())
        except FileNotFoundError:
            return False
        except (OSError, ValueError) as e:
            return self._discard(f"unreadable sidecar ({e})")
        if not isinstance(meta, dict) or meta.get("key") != self.key:
            return self._discard("its key does not match")
        try:
            size = self.kv_path.stat().st_size
            if size != meta.get("kv_bytes"):
                return self._discard(f"{size} bytes instead of {meta.get('kv_bytes')}")
            if file_sha256(self.kv_path) != meta.get("kv_sha256"):
                return self._discard("its checksum does not match")
        except OSError as e:
            return self._discard(str(e))
        return True

    def _discard(self, why: str) -> bool:
        log.warning("prompt cache: ignoring %s: %s; it will be rebuilt", self.kv_path.name, why)
        self.kv_path.unlink(missing_ok=True)
        self.meta_path.unlink(missing_ok=True)
        self.saved = False
        return False

    def restore(self, ctx: Any, seq: KVSequence) -> bool:
        """Load the prefix's KV into ``seq`` (emptied first). False, with ``seq`` empty and the
        files removed, when llama.cpp refuses the file or it holds other tokens."""
        if not self.saved:
            return False
        seq.forget(ctx)
        n = len(self.tokens)
        out = (C.llama_token * max(1, n))()
        n_out = ctypes.c_size_t(0)
        read = C.llama_state_seq_load_file(ctx, str(self.kv_path).encode(), seq.seq_id, out, n, ctypes.byref(n_out))
        mem = C.llama_get_memory(ctx)
        if (
            read == 0
            or n_out.value != n
            or list(out[:n]) != self.tokens
            or C.llama_memory_seq_pos_max(mem, seq.seq_id) != n - 1
        ):
            seq.forget(ctx)
            return self._discard("llama.cpp could not restore it, or it holds other tokens")
        seq.replace(self.tokens)
        return True

    def save(self, ctx: Any, seq: KVSequence) -> bool:
        """Write ``seq``, which must hold exactly the prefix, to the state file."""
        if seq.tokens != self.tokens:
            return False
        n = len(self.tokens)
        arr = (C.llama_token * n)(*self.tokens)
        tmp = self.kv_path.with_name(self.kv_path.name + ".tmp")
        try:
            written = C.llama_state_seq_save_file(ctx, str(tmp).encode(), seq.seq_id, arr, n)
            if written == 0:
                raise OSError("llama_state_seq_save_file wrote nothing")
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.kv_path)
            meta = {"key": self.key, "kv_bytes": self.kv_path.stat().st_size, "kv_sha256": file_sha256(self.kv_path)}
            atomic_write(self.meta_path, json.dumps(meta, indent=1).encode())
        except OSError as e:
            log.warning("prompt cache: cannot save %s: %s (the prefix stays cached in memory only)", self.kv_path, e)
            tmp.unlink(missing_ok=True)
            return False
        self.saved = True
        log.info("prompt cache: saved %d tokens of KV to %s (%d bytes)", n, self.kv_path, written)
        return True
