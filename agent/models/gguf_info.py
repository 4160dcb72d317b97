"""Reading a GGUF model's header: shapes, tensor byte ranges, quantisation, without touching the weights.

Owns ``read_model_info`` (file -> ``ModelInfo``) and ``check_quantization`` (the 4-bit rule:
``QuantVerdict``, decided on the transformer blocks or on ``general.file_type``).
Everything the agent plans before loading (memory estimate, context size, warm-up ranges, the
refusal of non-4-bit files) comes from here, so the engine never has to load a model to learn
what it is.

The header is parsed here rather than with ``gguf.GGUFReader``: the reader builds a numpy view
for every string of the vocabulary arrays, which takes about 4 s for a 152k-token vocabulary on a
2-core board-class CPU, while this parser walks past arrays it does not need in well under a second.
The ``gguf`` package still supplies the type tables (block sizes, type names), so new quantisation
types are known as soon as the package knows them.
"""

from __future__ import annotations

import functools
import mmap
import re
import struct
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import gguf

from agent.errors import ModelError

GGUF_MAGIC = b"GGUF"
_SUPPORTED_VERSIONS = (2, 3)
_MAX_DIMS = 4  # GGML_MAX_DIMS
_DEFAULT_ALIGNMENT = 32
# Arrays longer than this are walked but not kept: only their length is needed (vocabularies, merges).
_KEEP_ARRAY_MAX = 4096

_T: type[gguf.GGMLQuantizationType] = gguf.GGMLQuantizationType  # a variable (indexed by type name), not an alias

# Weight types that count as "4-bit or smaller": at most 5.0 stored bits per weight including
# block scales (Q4_1 is exactly 5.0; Q5_0 is 5.5). Smaller types (Q2_K, Q3_K, IQ1-IQ3, TQ) are
# included on purpose: the rule exists because planning assumes 4-bit sizes, and a 3-bit file
# needs less memory, not more.
_MAX_4BIT_BITS_PER_WEIGHT = 5.0
_UNQUANTISED = {_T.F32, _T.F16, _T.BF16, _T.F64, _T.I8, _T.I16, _T.I32, _T.I64}

# general.file_type values (llama.cpp's llama_ftype, gguf.LlamaFileType) that name a 4-bit-or-
# smaller mix. llama.cpp's quantizer writes the type it was asked for; inside such a file some
# tensors are wider by design (Q6_K/Q8_0 embeddings and output, Q6_K ffn_down in _M mixes) or by
# necessity: a k-quant needs rows that are a multiple of 256, and where they are not (Gemma 3 270M:
# 640) the quantizer falls back to Q5_0 for Q4_K and Q8_0 for Q6_K.
_FOUR_BIT_FILE_TYPE = re.compile(r"^MOSTLY_(Q[1-4]_|IQ[1-4]_|TQ[12]_|MXFP4|NVFP4)")
# llama.cpp ORs this flag into general.file_type when it guessed the type (LLAMA_FTYPE_GUESSED).
_FILE_TYPE_GUESSED = 1024
# A file_type can be wrong (a tool that rewrote tensors without updating it). It is believed only
# while the blocks' average stays below this: between Q6_K (6.56 bits per weight) and Q8_0 (8.5).
_FILE_TYPE_MAX_BLOCK_BITS = 7.0

# Types llama.cpp's CPU backend may repack into interleaved layouts, with the row-count multiple the
# kernel needs, taken from ggml-cpu/repack.cpp (ggml_repack_get_optimal_repack_type) as vendored in
# llama-cpp-python 0.3.36. Which ones apply depends on the CPU: x86 AVX2 repacks Q4_0, Q4_K, IQ4_NL,
# MXFP4 (8 rows); ARMv8.2 dotprod (Pi 5) also Q8_0, Q5_K, Q6_K and Q4_0/IQ4_NL/Q8_0 at 4 rows;
# AVX-512 adds Q2_K; an ARM core without dotprod (Pi 4) repacks nothing. The table is the union,
# with the smallest row multiple, so repackable_bytes is an upper bound on any CPU. The engine does
# not plan with it: it asks the CPU backend itself (agent.engine.llamacpp.cpu_repack).
_REPACK_ROW_MULTIPLE: dict[str, int] = {
    "Q4_0": 4,
    "IQ4_NL": 4,
    "MXFP4": 4,
    "Q8_0": 4,
    "Q1_0": 4,
    "Q4_K": 8,
    "Q5_K": 8,
    "Q6_K": 8,
    "Q2_K": 8,
}

_BLOCK_RE = re.compile(r"^blk\.(\d+)\.")


class _Span:
    """Bytes [offset, offset + nbytes) of the file."""

    offset: int
    nbytes: int

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


@dataclass(frozen=True)
class TensorEntry(_Span):
    """One tensor as the header describes it. ``shape`` is in ggml order: ne0 (row length) first."""

    name: str
    type_name: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int


@dataclass(frozen=True)
class LayerRange(_Span):
    """The bytes of one transformer block (tensors named ``blk.N.*``): [offset, offset + nbytes) in the file."""

    index: int
    offset: int
    nbytes: int


@dataclass(frozen=True)
class TensorRange(_Span):
    """The bytes of one tensor outside the blocks (token_embd, output_norm, output ...)."""

    name: str
    offset: int
    nbytes: int


@dataclass(frozen=True)
class QuantVerdict:
    """The 4-bit rule's decision and which rule made it.

    ``rule``: ``"blocks"`` when the repeating transformer blocks' matrices are mostly (by bytes)
    4-bit or smaller; ``"file_type"`` when they are not but ``general.file_type`` names a 4-bit mix
    and the blocks average at most 7 bits per weight; ``"none"`` when neither holds (refused).
    Embeddings and output are not judged: llama.cpp's recipes keep them at Q6_K/Q8_0, and in a small
    model with a large vocabulary they are most of the file.
    """

    is_4bit: bool
    rule: str
    reason: str
    block_bytes: int  # bytes of the blocks' matrices (2-D or more ``blk.N.*`` tensors)
    block_four_bit_bytes: int
    block_dominant_type: str
    block_bits_per_weight: float  # the blocks' average, block scales included
    file_type: str | None  # general.file_type as llama.cpp names it without MOSTLY_ (Q4_K_M, F16 ...)


@dataclass(frozen=True)
class ModelInfo:
    """What the agent knows about a model file before loading it.

    Shapes come from the ``{architecture}.*`` keys. Where a key is per layer (an array), the
    largest value is kept, so memory estimates built on it are upper bounds.
    """

    path: Path
    architecture: str
    name: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int  # key head size: {arch}.attention.key_length, else n_embd / n_head
    head_dim_v: int  # value head size: {arch}.attention.value_length, else head_dim
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    n_swa: int  # sliding-window size of the SWA layers ({arch}.attention.sliding_window), 0 when none
    n_expert_used: int  # experts per token ({arch}.expert_used_count), 0 for a dense model
    file_size: int
    gguf_version: int
    tensor_count: int
    data_offset: int
    quant_summary: dict[str, dict[str, int]]  # type name -> {"count": tensors, "bytes": bytes}
    layers: tuple[LayerRange, ...]
    other_ranges: tuple[TensorRange, ...]
    weights_bytes: int
    repackable_bytes: int
    four_bit_bytes: int  # the whole file's bytes in 4-bit or smaller types
    dominant_type: str  # the whole file's largest type by bytes
    quant: QuantVerdict
    tied_embeddings: bool
    tensors: tuple[TensorEntry, ...] = field(repr=False)

    @property
    def is_4bit(self) -> bool:
        return self.quant.is_4bit

    @property
    def n_params(self) -> int:
        n = 0
        for t in self.tensors:
            count = 1
            for d in t.shape:
                count *= d
            n += count
        return n

    def as_dict(self, *, with_tensors: bool = False) -> dict[str, Any]:
        """JSON-ready form (paths as strings); per-tensor entries only on request (hundreds of them)."""
        d = asdict(self)
        d["path"] = str(self.path)
        d["n_params"] = self.n_params
        d["is_4bit"] = self.is_4bit
        if not with_tensors:
            del d["tensors"]
        return d


def read_model_info(path: Path | str) -> ModelInfo:
    """Read the header and tensor table of a GGUF file; tensor data is never read.

    Raises ModelError: ``model_not_found`` when there is no such file, ``model_invalid`` when it is
    not a readable GGUF file (bad magic, unsupported version, truncated, unknown tensor type), with
    a message that says which.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
        if not p.is_file():
            raise ModelError(f"model path {p} is not a regular file", code="model_invalid")
    except FileNotFoundError:
        raise ModelError(f"model file {p} does not exist", code="model_not_found") from None
    except OSError as e:
        raise ModelError(f"cannot read model file {p}: {e.strerror or e}", code="model_invalid") from None
    if size < 24:
        raise ModelError(f"{p} is not a GGUF model: the file has only {size} bytes", code="model_invalid")
    try:
        with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            header = _parse(mm, size)
    except ModelError as e:
        raise ModelError(f"{p} is not a readable GGUF model: {e}", code=e.code) from None
    except OSError as e:
        raise ModelError(f"cannot read model file {p}: {e.strerror or e}", code="model_invalid") from None
    return _build_info(p, size, header)


def check_quantization(info: ModelInfo, allow_non_4bit: bool) -> None:
    """Refuse a model that is not 4-bit (``info.quant``), unless allowed.

    Memory planning, the default budgets and the docs assume 4-bit weights; an 8-bit or F16 file of
    the same model needs two to four times the memory and is the usual cause of OOM kills on small
    boards. The switch exists for users who know their budget holds it.
    """
    q = info.quant
    if q.is_4bit or allow_non_4bit:
        return
    raise ModelError(
        f"model {info.path.name} is not 4-bit: {q.reason}. Use a Q4_0/Q4_K_M/IQ4 quantisation of the model, "
        "or set model.allow_non_4bit = true if the memory budget holds it",
        code="model_not_4bit",
    )


def quant_bits_per_weight(type_name: str) -> float:
    """Stored bits per weight of a ggml type, block scales included (Q4_0: 4.5, Q8_0: 8.5)."""
    block, size = gguf.GGML_QUANT_SIZES[_T[type_name]]
    return size * 8 / block


def is_4bit_type(type_name: str) -> bool:
    """True for the 4-bit quantisations and everything smaller (see ``_MAX_4BIT_BITS_PER_WEIGHT``)."""
    t = _T[type_name]
    return t not in _UNQUANTISED and quant_bits_per_weight(type_name) <= _MAX_4BIT_BITS_PER_WEIGHT


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


# ---------------------------------------------------------------------------------------------
# Header parsing


@dataclass
class _Header:
    version: int
    kv: dict[str, Any]
    array_lengths: dict[str, int]
    tensors: list[TensorEntry]
    data_offset: int


class _Cursor:
    """Bounds-checked little/big-endian reads over the mapped file; running past the end is 'truncated'."""

    def __init__(self, buf: mmap.mmap, size: int) -> None:
        self.buf = buf
        self.size = size
        self.pos = 0
        self.endian = "<"

    def take(self, fmt: str) -> Any:
        s = _struct(self.endian + fmt)
        if self.pos + s.size > self.size:
            raise ModelError(f"the header is truncated at byte {self.pos} (file size {self.size})")
        (value,) = s.unpack_from(self.buf, self.pos)
        self.pos += s.size
        return value

    def skip(self, n: int) -> None:
        if n < 0 or self.pos + n > self.size:
            raise ModelError(f"the header is truncated at byte {self.pos} (file size {self.size})")
        self.pos += n

    def string(self, what: str) -> str:
        n = self.take("Q")
        if self.pos + n > self.size:
            raise ModelError(
                f"the header is truncated: {what} ({n} bytes at byte {self.pos}) runs past the end of the file"
            )
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        # Lenient: a stray byte in some token or description must not make the whole model unreadable.
        return raw.decode("utf-8", errors="replace")


@functools.cache
def _struct(fmt: str) -> struct.Struct:
    return struct.Struct(fmt)


_V = gguf.GGUFValueType
_SCALAR_FMT: dict[int, str] = {
    _V.UINT8: "B",
    _V.INT8: "b",
    _V.UINT16: "H",
    _V.INT16: "h",
    _V.UINT32: "I",
    _V.INT32: "i",
    _V.FLOAT32: "f",
    _V.BOOL: "?",
    _V.UINT64: "Q",
    _V.INT64: "q",
    _V.FLOAT64: "d",
}


def _parse(buf: mmap.mmap, size: int) -> _Header:
    c = _Cursor(buf, size)
    magic = bytes(buf[0:4])
    if magic != GGUF_MAGIC:
        raise ModelError(f"it does not start with the GGUF magic (found {magic!r}, expected b'GGUF')")
    c.pos = 4
    version = c.take("I")
    if version & 0xFFFF == 0 and version != 0:
        # Written on a big-endian machine: every number in the file is byte-swapped.
        c.endian = ">"
        c.pos = 4
        version = c.take("I")
    if version not in _SUPPORTED_VERSIONS:
        raise ModelError(f"GGUF version {version} is not supported (this reader handles versions 2 and 3)")
    n_tensors = c.take("Q")
    n_kv = c.take("Q")
    # Each entry takes at least 8 bytes: counts beyond that are corruption, not large models.
    if n_tensors > size // 8 or n_kv > size // 8:
        raise ModelError(f"implausible counts in the header ({n_tensors} tensors, {n_kv} keys) for a {size}-byte file")

    kv: dict[str, Any] = {}
    array_lengths: dict[str, int] = {}
    for _ in range(n_kv):
        key = c.string("metadata key")
        vtype = c.take("I")
        kv[key] = _read_value(c, key, vtype, array_lengths)

    raw: list[tuple[str, tuple[int, ...], int, int]] = []
    for i in range(n_tensors):
        name = c.string(f"tensor {i} name")
        n_dims = c.take("I")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise ModelError(f"tensor {name!r} has {n_dims} dimensions (ggml supports 1 to {_MAX_DIMS})")
        shape = tuple(c.take("Q") for _ in range(n_dims))
        type_id = c.take("I")
        offset = c.take("Q")
        raw.append((name, shape, type_id, offset))

    alignment = kv.get("general.alignment", _DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ModelError(f"general.alignment {alignment!r} is not a power of two")
    data_offset = -(-c.pos // alignment) * alignment

    tensors: list[TensorEntry] = []
    seen: set[str] = set()
    for name, shape, type_id, offset in raw:
        if name in seen:
            raise ModelError(f"tensor {name!r} appears twice")
        seen.add(name)
        try:
            qtype = _T(type_id)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise ModelError(
                f"tensor {name!r} has type id {type_id}, unknown to gguf {_gguf_version()} "
                "(removed types such as Q4_0_4_4 must be re-quantised to Q4_0; newer types need a newer gguf)"
            ) from None
        n_elems = 1
        for d in shape:
            n_elems *= d
        if shape[0] % block:
            raise ModelError(
                f"tensor {name!r}: row length {shape[0]} is not a multiple of the {qtype.name} block size {block}"
            )
        nbytes = n_elems // block * type_size
        start = data_offset + offset
        if start + nbytes > size:
            raise ModelError(
                f"tensor {name!r} ends at byte {start + nbytes} but the file has {size} bytes "
                "(the file is truncated: an interrupted download or copy?)"
            )
        tensors.append(TensorEntry(name=name, type_name=qtype.name, shape=shape, offset=start, nbytes=nbytes))
    return _Header(version, kv, array_lengths, tensors, data_offset)


def _read_value(c: _Cursor, key: str, vtype: int, array_lengths: dict[str, int]) -> Any:
    if vtype in _SCALAR_FMT:
        return c.take(_SCALAR_FMT[vtype])
    if vtype == _V.STRING:
        return c.string(f"value of {key!r}")
    if vtype != _V.ARRAY:
        raise ModelError(f"metadata key {key!r} has unknown value type {vtype}")
    etype = c.take("I")
    n = c.take("Q")
    array_lengths[key] = n
    keep = n <= _KEEP_ARRAY_MAX
    if etype in _SCALAR_FMT:
        s = struct.Struct(c.endian + _SCALAR_FMT[etype])
        if n * s.size > c.size - c.pos:
            raise ModelError(f"the header is truncated: array {key!r} of {n} items runs past the end of the file")
        if not keep:
            c.skip(n * s.size)
            return None
        return [c.take(_SCALAR_FMT[etype]) for _ in range(n)]
    if etype == _V.STRING:
        if n > (c.size - c.pos) // 8:
            raise ModelError(f"the header is truncated: array {key!r} of {n} strings runs past the end of the file")
        if keep:
            return [c.string(f"item of {key!r}") for _ in range(n)]
        # Walk the length prefixes only: vocabularies are 30k-250k strings nobody here reads.
        fmt = struct.Struct(c.endian + "Q")
        buf, pos, end = c.buf, c.pos, c.size
        for _ in range(n):
            if pos + 8 > end:
                raise ModelError(f"the header is truncated: array {key!r} stops at byte {pos}")
            (length,) = fmt.unpack_from(buf, pos)
            pos += 8 + length
        if pos > end:
            raise ModelError(f"the header is truncated: array {key!r} runs past the end of the file")
        c.pos = pos
        return None
    if etype == _V.ARRAY:
        # Nested arrays are legal GGUF but unused by llama.cpp: walk past them.
        for _ in range(n):
            _read_value(c, key, _V.ARRAY, {})
        return None
    raise ModelError(f"array {key!r} has an unknown element type {etype}")


def _gguf_version() -> str:
    try:
        return version("gguf")
    except Exception:  # noqa: BLE001  only used in a message
        return "(unknown version)"


# ---------------------------------------------------------------------------------------------
# From header to ModelInfo


def _build_info(path: Path, size: int, h: _Header) -> ModelInfo:
    kv = h.kv
    arch = kv.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise ModelError(f"{path} has no general.architecture key: not a llama.cpp model", code="model_invalid")
    splits = kv.get("split.count", 1)
    if isinstance(splits, int) and splits > 1:
        # The other parts' tensors are not in this header: sizes and estimates would be too small.
        raise ModelError(
            f"{path} is part {int(kv.get('split.no', 0)) + 1} of a {splits}-part split GGUF; merge the parts "
            "into one file first (llama-gguf-split --merge FIRST-PART OUT.gguf)",
            code="model_invalid",
        )
    if not h.tensors:
        raise ModelError(f"{path} holds no tensors (a vocabulary-only GGUF?): not a model", code="model_invalid")

    def num(key: str, default: int = 0) -> int:
        # Per-layer keys (arrays) keep their largest value: estimates built on them stay upper bounds.
        v = kv.get(f"{arch}.{key}")
        if isinstance(v, list):
            v = max((int(x) for x in v), default=default)
        return int(v) if isinstance(v, (int, float)) else default

    by_name = {t.name: t for t in h.tensors}
    embd = by_name.get("token_embd.weight")
    n_embd = num("embedding_length") or (embd.shape[0] if embd else 0)
    n_head = num("attention.head_count")
    n_head_kv = num("attention.head_count_kv") or n_head
    head_dim = num("attention.key_length") or (n_embd // n_head if n_head else 0)
    n_vocab = (
        num("vocab_size")
        or h.array_lengths.get("tokenizer.ggml.tokens", 0)
        or (embd.shape[1] if embd and len(embd.shape) > 1 else 0)
    )
    n_layer = num("block_count")

    layers, other = _ranges(h.tensors)
    summary: dict[str, dict[str, int]] = {}
    for t in h.tensors:
        s = summary.setdefault(t.type_name, {"count": 0, "bytes": 0})
        s["count"] += 1
        s["bytes"] += t.nbytes
    summary = dict(sorted(summary.items(), key=lambda kv_: -kv_[1]["bytes"]))
    weights = sum(t.nbytes for t in h.tensors)
    four_bit = sum(s["bytes"] for name, s in summary.items() if is_4bit_type(name))
    tied = "output.weight" not in by_name and embd is not None

    return ModelInfo(
        path=path,
        architecture=arch,
        name=str(kv.get("general.name") or path.stem),
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=head_dim,
        head_dim_v=num("attention.value_length") or head_dim,
        n_ff=num("feed_forward_length"),
        n_vocab=n_vocab,
        n_ctx_train=num("context_length"),
        n_swa=num("attention.sliding_window"),
        n_expert_used=num("expert_used_count"),
        file_size=size,
        gguf_version=h.version,
        tensor_count=len(h.tensors),
        data_offset=h.data_offset,
        quant_summary=summary,
        layers=layers,
        other_ranges=other,
        weights_bytes=weights,
        repackable_bytes=_repackable_bytes(h.tensors, tied, embd),
        four_bit_bytes=four_bit,
        dominant_type=next(iter(summary), "none"),
        quant=_quant_verdict(h.tensors, kv.get("general.file_type")),
        tied_embeddings=tied,
        tensors=tuple(h.tensors),
    )


def _file_type_name(value: object) -> str | None:
    if not isinstance(value, int):
        return None
    try:
        return gguf.LlamaFileType(value & ~_FILE_TYPE_GUESSED).name
    except ValueError:
        return f"unknown ({value})"


def _quant_verdict(tensors: list[TensorEntry], file_type_value: object) -> QuantVerdict:
    # The repeating blocks decide: that is where the per-layer weights and their bulk are once the
    # vocabulary is small relative to the model. A file with no blk.N tensors is judged whole.
    blocks = [t for t in tensors if _BLOCK_RE.match(t.name) and len(t.shape) >= 2]
    judged = blocks or [t for t in tensors if len(t.shape) >= 2] or tensors
    by_type: dict[str, int] = {}
    elements = 0
    for t in judged:
        by_type[t.type_name] = by_type.get(t.type_name, 0) + t.nbytes
        n = 1
        for d in t.shape:
            n *= d
        elements += n
    total = sum(by_type.values())
    four_bit = sum(b for name, b in by_type.items() if is_4bit_type(name))
    dominant = max(by_type, key=lambda k: by_type[k]) if by_type else "none"
    bits = total * 8 / elements if elements else 0.0
    ft_full = _file_type_name(file_type_value)
    ft = ft_full.removeprefix("MOSTLY_") if ft_full else None
    where = "its transformer blocks" if blocks else "its weights"
    share = 100.0 * four_bit / total if total else 0.0

    def verdict(is_4bit: bool, rule: str, reason: str) -> QuantVerdict:
        return QuantVerdict(
            is_4bit,
            rule,
            reason,
            block_bytes=total,
            block_four_bit_bytes=four_bit,
            block_dominant_type=dominant,
            block_bits_per_weight=round(bits, 3),
            file_type=ft,
        )

    if total and four_bit * 2 > total:
        return verdict(True, "blocks", f"{share:.0f}% of {where}' weight bytes are in 4-bit or smaller types")
    ft_says_4bit = ft_full is not None and _FOUR_BIT_FILE_TYPE.match(ft_full) is not None
    if ft_says_4bit and bits <= _FILE_TYPE_MAX_BLOCK_BITS:
        return verdict(
            True,
            "file_type",
            f"general.file_type is {ft}, a 4-bit mix ({where} average {bits:.2f} bits per weight: llama.cpp keeps "
            "some tensors wider, and falls back to Q5_0/Q8_0 where rows are not a multiple of 256)",
        )
    dominant_bytes = by_type.get(dominant, 0)
    if ft_says_4bit:
        ft_text = f"general.file_type says {ft}, but {where} average {bits:.2f} bits per weight"
    else:
        ft_text = f"general.file_type is {ft}" if ft else "there is no general.file_type"
    return verdict(
        False,
        "none",
        f"{where} are mostly {dominant} ({_mib(dominant_bytes)} of {_mib(total)}; 4-bit or smaller types hold "
        f"only {share:.0f}%), and {ft_text}",
    )


def _ranges(tensors: list[TensorEntry]) -> tuple[tuple[LayerRange, ...], tuple[TensorRange, ...]]:
    spans: dict[int, tuple[int, int]] = {}
    other: list[TensorRange] = []
    for t in tensors:
        m = _BLOCK_RE.match(t.name)
        if m is None:
            other.append(TensorRange(t.name, t.offset, t.nbytes))
            continue
        i = int(m.group(1))
        lo, hi = spans.get(i, (t.offset, t.end))
        spans[i] = (min(lo, t.offset), max(hi, t.end))
    layers = tuple(LayerRange(i, lo, hi - lo) for i, (lo, hi) in sorted(spans.items()))
    return layers, tuple(sorted(other, key=lambda r: r.offset))


def _repackable_bytes(tensors: list[TensorEntry], tied: bool, embd: TensorEntry | None) -> int:
    """Bytes llama.cpp's CPU backend may copy into anonymous memory ("CPU_REPACK" buffers) at load.

    Assumptions, from llama.cpp as vendored in llama-cpp-python 0.3.36 (ggml-cpu/repack.cpp and
    src/llama-model-loader.cpp) and checked on this machine by RssAnon with repacking on and off:

    - Only weights used by a matrix multiplication are repacked: 2-D ``*.weight`` tensors (3-D for
      ``*_exps`` experts) of a type with a repack kernel, whose row count (ne1) is a multiple of the
      kernel's interleave. Norms, biases and other 1-D tensors are never repacked.
    - ``token_embd`` is read with get_rows and stays in the mapped file. But when the model has no
      ``output.weight`` (tied embeddings), llama.cpp duplicates ``token_embd`` as the output matrix
      and that copy is repacked: its bytes count once more here.
    - ``output.weight`` is a matrix multiplication on the CPU and is repacked.
    - The type table is the union over CPUs (see ``_REPACK_ROW_MULTIPLE``): an upper bound. On an
      ARM core without dotprod (Raspberry Pi 4) llama.cpp repacks nothing and the true value is 0.

    Measured: qwen-0.5b preset (tied) 278 MB counted, RssAnon grew 265 MiB (278 MB); tinyllama-1.1b
    preset 583 MB counted, RssAnon grew 555 MiB (582 MB).
    """
    total = 0
    for t in tensors:
        if t.name == "token_embd.weight" or not t.name.endswith(".weight"):
            continue
        n_dims = 3 if "_exps." in t.name else 2
        if len(t.shape) == n_dims and _repacks(t):
            total += t.nbytes
    if tied and embd is not None and len(embd.shape) == 2 and _repacks(embd):
        total += embd.nbytes
    return total


def _repacks(t: TensorEntry) -> bool:
    multiple = _REPACK_ROW_MULTIPLE.get(t.type_name)
    return multiple is not None and len(t.shape) >= 2 and t.shape[1] % multiple == 0
