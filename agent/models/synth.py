"""Synthetic GGUF models: real shapes, random 4-bit weights, written without any download.

Owns the preset shapes (``PRESETS``) and ``synth_model``, which writes a llama-architecture GGUF
that llama.cpp loads and runs like the real model of that shape: same tensor sizes and types,
same vocabulary size, a working byte-fallback tokenizer. The weights are random, so the text is
noise, but load time, memory and tokens per second are those of the real model (the kernels do
not look at the values). That is what the agent's tests and measurements need.

Output is deterministic: the same preset and seed give the same bytes (for a given numpy;
``numpy.random.Generator`` streams are stable in practice but not promised across releases).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import string
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import gguf
import numpy as np

from agent.system.files import fsync_dir
from agent.system.progress import progress as progress_of

Q4_0 = gguf.GGMLQuantizationType.Q4_0
F32 = gguf.GGMLQuantizationType.F32
_QK4_0 = 32  # weights per Q4_0 block
_Q4_0_BLOCK_BYTES = 18  # f16 scale + 16 bytes of nibbles
# Standard deviation of (nibble - 8) for uniform nibbles 0..15: sqrt((16**2 - 1) / 12).
_NIBBLE_STD = 4.61
_CHUNK_BYTES = 4 << 20  # generated and written at a time

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
_SPECIAL = ("<unk>", "<s>", "</s>")
_SPACE = "\u2581"  # SentencePiece's visible space


@dataclass(frozen=True)
class ModelShape:
    """The shape of a llama-architecture model: everything that decides tensor sizes and KV cache."""

    name: str
    description: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    rope_freq_base: float
    rms_eps: float
    # Tied: no output.weight, llama.cpp reuses token_embd for the logits (as the real Qwen2.5-0.5B does).
    tied_embeddings: bool

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def tensors(self) -> list[tuple[str, tuple[int, ...], gguf.GGMLQuantizationType]]:
        """(name, ggml shape ne0-first, type) in file order. ne0 is the row length (the input dimension)."""
        e, hd = self.n_embd, self.head_dim
        out: list[tuple[str, tuple[int, ...], gguf.GGMLQuantizationType]] = [
            ("token_embd.weight", (e, self.n_vocab), Q4_0)
        ]
        for i in range(self.n_layer):
            b = f"blk.{i}."
            out += [
                (b + "attn_norm.weight", (e,), F32),
                (b + "attn_q.weight", (e, self.n_head * hd), Q4_0),
                (b + "attn_k.weight", (e, self.n_head_kv * hd), Q4_0),
                (b + "attn_v.weight", (e, self.n_head_kv * hd), Q4_0),
                (b + "attn_output.weight", (self.n_head * hd, e), Q4_0),
                (b + "ffn_norm.weight", (e,), F32),
                (b + "ffn_gate.weight", (e, self.n_ff), Q4_0),
                (b + "ffn_up.weight", (e, self.n_ff), Q4_0),
                (b + "ffn_down.weight", (self.n_ff, e), Q4_0),
            ]
        out.append(("output_norm.weight", (e,), F32))
        if not self.tied_embeddings:
            out.append(("output.weight", (e, self.n_vocab), Q4_0))
        return out

    @property
    def n_params(self) -> int:
        return sum(int(np.prod(shape)) for _, shape, _ in self.tensors())


PRESETS: dict[str, ModelShape] = {
    s.name: s
    for s in (
        ModelShape(
            name="tiny",
            description="test model: 2 layers, loads in milliseconds, file under 1 MB",
            n_layer=2,
            n_embd=64,
            n_head=4,
            n_head_kv=2,
            n_ff=192,
            n_vocab=512,
            n_ctx_train=2048,
            rope_freq_base=10000.0,
            rms_eps=1e-5,
            tied_embeddings=False,
        ),
        ModelShape(
            name="qwen-0.5b",
            description="Qwen2.5-0.5B shapes (as llama architecture, no q/k/v biases), tied embeddings",
            n_layer=24,
            n_embd=896,
            n_head=14,
            n_head_kv=2,
            n_ff=4864,
            n_vocab=151936,
            n_ctx_train=32768,
            rope_freq_base=1000000.0,
            rms_eps=1e-6,
            tied_embeddings=True,
        ),
        ModelShape(
            name="tinyllama-1.1b",
            description="TinyLlama-1.1B shapes, separate output matrix",
            n_layer=22,
            n_embd=2048,
            n_head=32,
            n_head_kv=4,
            n_ff=5632,
            n_vocab=32000,
            n_ctx_train=2048,
            rope_freq_base=10000.0,
            rms_eps=1e-5,
            tied_embeddings=False,
        ),
    )
}


def _filler_pieces() -> Iterator[str]:
    """Unique, plausible SentencePiece pieces: characters, then lowercase words with and without a leading space.

    Real pieces (rather than "<filler_N>") let ordinary ASCII text merge into multi-character tokens,
    so prompts tokenize to about as many tokens as with a real tokenizer.
    """
    yield _SPACE
    for c in string.ascii_letters + string.digits:
        yield _SPACE + c
    for c in string.printable[:94]:  # printable ASCII without whitespace
        yield c
    for length in itertools.count(2):
        for letters in itertools.product(string.ascii_lowercase, repeat=length):
            word = "".join(letters)
            yield _SPACE + word
            yield word


def build_vocab(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """A byte-fallback SPM vocabulary of exactly ``n_vocab`` pieces: specials, 256 byte tokens, filler."""
    n_fixed = len(_SPECIAL) + 256
    if n_vocab < n_fixed:
        raise ValueError(f"n_vocab must be at least {n_fixed} (3 specials + 256 byte tokens)")
    tokens = list(_SPECIAL) + [f"<0x{b:02X}>" for b in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256
    scores = [0.0] * n_fixed
    # Earlier pieces score higher: SPM merges the best-scoring pair first, like frequent pieces in a real model.
    for i, piece in enumerate(itertools.islice(_filler_pieces(), n_vocab - n_fixed)):
        tokens.append(piece)
        types.append(gguf.TokenType.NORMAL)
        scores.append(-float(i + 1))
    return tokens, scores, [int(t) for t in types]


def _q4_0_bytes(rng: np.random.Generator, n_rows: int, row_len: int) -> np.ndarray:
    """Random Q4_0 blocks for an (n_rows x row_len) matrix, as a uint8 array of shape (n_rows, bytes per row).

    Scales are chosen so a row times a unit-RMS input has about unit RMS (std of a weight about
    1/sqrt(row_len), like trained models): activations stay finite through every layer.
    """
    if row_len % _QK4_0:
        raise ValueError(f"Q4_0 row length {row_len} is not a multiple of {_QK4_0}")
    n_blocks = n_rows * (row_len // _QK4_0)
    base = 1.0 / (_NIBBLE_STD * np.sqrt(row_len))
    scale = (base * (0.5 + rng.random(n_blocks, dtype=np.float32))).astype("<f2")
    blocks = np.empty((n_blocks, _Q4_0_BLOCK_BYTES), dtype=np.uint8)
    blocks[:, :2] = scale.view(np.uint8).reshape(n_blocks, 2)
    blocks[:, 2:] = np.frombuffer(rng.bytes(n_blocks * 16), dtype=np.uint8).reshape(n_blocks, 16)
    return blocks.reshape(n_rows, -1)


def _tensor_chunks(
    index: int, ne: tuple[int, ...], qtype: gguf.GGMLQuantizationType, seed: int
) -> Iterator[np.ndarray]:
    """A tensor's bytes in chunks of whole rows, so a 77 MB embedding never sits in memory at once."""
    if qtype == F32:
        yield np.ones(ne[::-1], dtype="<f4")  # RMS norm weights: identity
        return
    # One stream per tensor, so a tensor's bytes do not depend on how the others were generated.
    # The chunk size is a constant, not a tuning knob: it is part of what makes the bytes reproducible.
    rng = np.random.default_rng([seed, index])
    row_len, n_rows = ne[0], int(np.prod(ne[1:]))
    rows_per_chunk = max(1, _CHUNK_BYTES // (row_len // _QK4_0 * _Q4_0_BLOCK_BYTES))
    for first in range(0, n_rows, rows_per_chunk):
        yield _q4_0_bytes(rng, n_rows=min(rows_per_chunk, n_rows - first), row_len=row_len)


def _tensor_nbytes(ne: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(ne)) // block * size


def _pad(f: BinaryIO, alignment: int) -> None:
    f.write(b"\0" * (-f.tell() % alignment))


def synth_model(
    preset: str, out: Path, *, seed: int = 0, progress: bool = False, overrides: dict[str, Any] | None = None
) -> Path:
    """Write the preset's model to ``out`` (atomically: ``out.tmp`` then rename) and return ``out``.
    ``overrides`` changes fields of the preset's shape (tests that need two different shapes).

    GGUFWriter writes the header and tensor table; the tensor data is then generated and appended
    in chunks, so memory stays near 100 MB whatever the file size (the writer's own path needs
    every tensor whole). ``progress`` shows progress (agent.system.progress: a bar on a terminal, else log lines).
    """
    try:
        shape = PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}") from None
    if overrides:
        shape = dataclasses.replace(shape, **overrides)
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    plan = shape.tensors()

    writer = gguf.GGUFWriter(tmp, "llama")
    try:
        _add_metadata(writer, shape, seed)
        for name, ne, qtype in plan:
            # Byte shape + raw_dtype: the writer converts the last dimension from bytes to elements.
            nbytes = _tensor_nbytes(ne, qtype)
            if qtype == F32:
                writer.add_tensor_info(name, ne[::-1], np.dtype(np.float32), nbytes)
            else:
                byte_shape = (*ne[:0:-1], nbytes // int(np.prod(ne[1:])))
                writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.close()

        total = sum(_tensor_nbytes(ne, q) for _, ne, q in plan)
        bar = progress_of(total, f"synth {preset}", enabled=progress)
        # Same layout as GGUFWriter.write_tensors_to_file: data aligned, each tensor padded to the alignment.
        with bar, open(tmp, "ab") as f:
            _pad(f, writer.data_alignment)
            for index, (_name, ne, qtype) in enumerate(plan):
                for chunk in _tensor_chunks(index, ne, qtype, seed):
                    f.write(chunk.tobytes())
                    bar.update(chunk.nbytes)
                _pad(f, writer.data_alignment)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(out.parent)  # the rename is durable only once the folder entry is on disk
    return out


def _add_metadata(w: gguf.GGUFWriter, s: ModelShape, seed: int) -> None:
    w.add_name(f"synthetic {s.name} (random Q4_0 weights, seed {seed})")
    w.add_description(f"edge-agent synthetic model: {s.description}. Weights are random; text output is noise.")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(s.n_vocab)
    w.add_context_length(s.n_ctx_train)
    w.add_embedding_length(s.n_embd)
    w.add_block_count(s.n_layer)
    w.add_feed_forward_length(s.n_ff)
    w.add_head_count(s.n_head)
    w.add_head_count_kv(s.n_head_kv)
    w.add_rope_dimension_count(s.head_dim)
    w.add_rope_freq_base(s.rope_freq_base)
    w.add_layer_norm_rms_eps(s.rms_eps)

    tokens, scores, types = build_vocab(s.n_vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(UNK_ID)
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
