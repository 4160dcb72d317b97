"""GGUF tooling: synthetic models, header reading, the 4-bit rule, `edge-agent model`.

Everything runs on real files: models written by agent.models.synth and loaded by llama.cpp,
small hand-written GGUFs for the refusal paths, the real Gemma 3 270M Q4_K_M file and
llama.cpp's own requantisations of it. Tests using the 0.5B preset are marked slow.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from agent.cli import main
from agent.errors import ModelError
from agent.models.gguf_info import ModelInfo, check_quantization, is_4bit_type, read_model_info
from agent.models.synth import BOS_ID, EOS_ID, PRESETS, _tensor_chunks, build_vocab, synth_model


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_gguf(
    path: Path,
    tensors: dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType | None]],
    split_count: int = 0,
    file_type: gguf.LlamaFileType | None = None,
) -> Path:
    """A minimal llama-architecture GGUF with the given tensors (header-level tests; not loadable by llama.cpp)."""
    w = gguf.GGUFWriter(path, "llama")
    if split_count:
        w.add_uint16("split.count", split_count)
    if file_type is not None:
        w.add_file_type(file_type)
    w.add_block_count(1)
    w.add_embedding_length(64)
    w.add_head_count(4)
    w.add_context_length(256)
    for name, (data, raw) in tensors.items():
        w.add_tensor(name, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _plain_model(path: Path, dtype: type) -> Path:
    rng = np.random.default_rng(0)
    return write_gguf(
        path,
        {
            "token_embd.weight": (rng.standard_normal((128, 64)).astype(dtype), None),
            "blk.0.attn_q.weight": (rng.standard_normal((64, 64)).astype(dtype), None),
            "blk.0.ffn_up.weight": (rng.standard_normal((256, 64)).astype(dtype), None),
            "blk.0.attn_norm.weight": (np.ones(64, dtype=np.float32), None),
        },
    )


def _q_bytes(rows: int, row_len: int, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return np.zeros((rows, row_len // block * size), dtype=np.uint8)


# --- synth ------------------------------------------------------------------------------------


def test_same_preset_and_seed_give_identical_bytes(tiny_model: Path, tmp_path: Path) -> None:
    again = synth_model("tiny", tmp_path / "again.gguf")
    other = synth_model("tiny", tmp_path / "other.gguf", seed=1)
    assert _sha256(again) == _sha256(tiny_model)
    assert _sha256(other) != _sha256(tiny_model)
    assert again.stat().st_size == other.stat().st_size


def test_large_tensors_are_generated_in_reproducible_chunks() -> None:
    # tiny's tensors fit in one chunk; this covers the multi-chunk path the real-size presets take.
    ne, q4 = (2048, 5632), gguf.GGMLQuantizationType.Q4_0
    first = [c.copy() for c in _tensor_chunks(7, ne, q4, seed=0)]
    again = np.concatenate(list(_tensor_chunks(7, ne, q4, seed=0)))
    assert len(first) > 1
    data = np.concatenate(first)
    assert data.shape == (5632, 2048 // 32 * 18) and np.array_equal(data, again)
    scales = data[:, :18].copy().view("<f2")[:, 0]
    assert np.all(np.isfinite(scales)) and 0 < scales.min() and scales.max() < 0.01


def test_synth_leaves_no_temporary_file_and_replaces_atomically(tmp_path: Path) -> None:
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")
    assert synth_model("tiny", out) == out
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]
    assert out.read_bytes()[:4] == b"GGUF"


def test_synth_refuses_unknown_preset(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tiny"):
        synth_model("llama-70b", tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []


def test_tiny_is_under_one_megabyte(tiny_model: Path) -> None:
    assert tiny_model.stat().st_size < 1_000_000


@pytest.mark.parametrize("preset", list(PRESETS))
def test_vocab_has_full_size_unique_pieces_and_byte_fallback(preset: str) -> None:
    n = PRESETS[preset].n_vocab
    tokens, scores, types = build_vocab(n)
    assert len(tokens) == len(scores) == len(types) == n
    assert len(set(tokens)) == n
    assert tokens[:3] == ["<unk>", "<s>", "</s>"] and (BOS_ID, EOS_ID) == (1, 2)
    assert tokens[3 + 0x41] == "<0x41>" and types[3 + 0x41] == gguf.TokenType.BYTE


def test_tiny_loads_tokenizes_and_generates_in_llama_cpp(tiny_model: Path) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(str(tiny_model), n_ctx=256, n_threads=1, verbose=False, seed=0)
    try:
        assert llm.n_vocab() == PRESETS["tiny"].n_vocab
        assert llm.token_eos() == EOS_ID and llm.token_bos() == BOS_ID
        text = b"Hello, world! 42 tokens; {json: true}\n~"
        toks = llm.tokenize(text)
        assert toks[0] == BOS_ID
        assert llm.detokenize(toks) == text  # byte fallback covers all ASCII
        out = llm("Hello", max_tokens=8, temperature=0.0)
        # Random weights may pick any token (even EOS at once); the contract is: no crash, a valid answer.
        assert out["choices"][0]["finish_reason"] in ("length", "stop")
        assert out["usage"]["prompt_tokens"] > 0
    finally:
        llm.close()


# --- read_model_info ----------------------------------------------------------------------------


def _assert_matches_preset(info: ModelInfo, preset: str, path: Path) -> None:
    s = PRESETS[preset]
    assert info.architecture == "llama"
    assert (info.n_layer, info.n_embd, info.n_head, info.n_head_kv, info.n_ff, info.n_vocab, info.n_ctx_train) == (
        s.n_layer,
        s.n_embd,
        s.n_head,
        s.n_head_kv,
        s.n_ff,
        s.n_vocab,
        s.n_ctx_train,
    )
    assert info.head_dim == info.head_dim_v == s.head_dim
    assert info.file_size == path.stat().st_size
    assert info.tensor_count == len(s.tensors())
    assert info.tied_embeddings is s.tied_embeddings
    assert info.n_params == s.n_params
    assert info.is_4bit and info.dominant_type == "Q4_0"
    assert set(info.quant_summary) == {"Q4_0", "F32"}
    assert info.quant_summary["F32"]["count"] == 2 * s.n_layer + 1
    assert sum(q["bytes"] for q in info.quant_summary.values()) == info.weights_bytes
    assert len(info.layers) == s.n_layer


def test_info_of_tiny_matches_the_preset(tiny_model: Path) -> None:
    _assert_matches_preset(read_model_info(tiny_model), "tiny", tiny_model)


def test_info_agrees_with_gguf_reader(tiny_model: Path) -> None:
    # The header parser is our own (for speed); gguf's reference reader keeps it honest.
    info = read_model_info(tiny_model)
    ref = gguf.GGUFReader(tiny_model)
    assert info.data_offset == ref.data_offset
    assert [(t.name, t.type_name, t.offset, t.nbytes, t.shape) for t in info.tensors] == [
        (t.name, t.tensor_type.name, t.data_offset, t.n_bytes, tuple(int(d) for d in t.shape)) for t in ref.tensors
    ]


def test_layer_ranges_are_ascending_disjoint_and_inside_the_file(tiny_model: Path) -> None:
    info = read_model_info(tiny_model)
    assert [r.index for r in info.layers] == list(range(info.n_layer))
    ranges = sorted([(r.offset, r.end) for r in info.layers] + [(r.offset, r.end) for r in info.other_ranges])
    for (_, end), (start, _) in zip(ranges, ranges[1:], strict=False):
        assert end <= start
    assert ranges[0][0] >= info.data_offset and ranges[-1][1] <= info.file_size
    for r in info.layers:
        assert r.offset < r.end
        for t in info.tensors:
            if t.name.startswith(f"blk.{r.index}."):
                assert r.offset <= t.offset and t.end <= r.end
    assert {r.name for r in info.other_ranges} == {"token_embd.weight", "output_norm.weight", "output.weight"}
    # Ranges cover every weight byte; only alignment padding lies between them.
    covered = sum(r.nbytes for r in info.layers) + sum(r.nbytes for r in info.other_ranges)
    assert info.weights_bytes <= covered < info.weights_bytes + 32 * info.tensor_count


def test_repackable_bytes_are_the_matmul_weights(tiny_model: Path) -> None:
    info = read_model_info(tiny_model)
    by_name = {t.name: t for t in info.tensors}
    block_matrices = sum(t.nbytes for t in info.tensors if t.name.startswith("blk.") and len(t.shape) == 2)
    # Untied: token_embd stays in the mapped file (get_rows), output.weight is repacked.
    assert info.repackable_bytes == block_matrices + by_name["output.weight"].nbytes
    assert info.repackable_bytes < info.weights_bytes - by_name["token_embd.weight"].nbytes + 1


def test_4bit_type_table() -> None:
    for t in ("Q4_0", "Q4_1", "Q4_K", "IQ4_NL", "IQ4_XS", "MXFP4", "Q3_K", "Q2_K", "IQ2_XS"):
        assert is_4bit_type(t), t
    for t in ("Q5_0", "Q5_K", "Q6_K", "Q8_0", "F16", "BF16", "F32"):
        assert not is_4bit_type(t), t


@pytest.mark.parametrize("dtype, name", [(np.float16, "F16"), (np.float32, "F32")])
def test_non_4bit_model_is_refused_unless_allowed(tmp_path: Path, dtype: type, name: str) -> None:
    info = read_model_info(_plain_model(tmp_path / "plain.gguf", dtype))
    assert not info.is_4bit and info.dominant_type == name
    with pytest.raises(ModelError) as e:
        check_quantization(info, allow_non_4bit=False)
    assert e.value.code == "model_not_4bit"
    assert name in str(e.value) and "model.allow_non_4bit" in str(e.value)
    check_quantization(info, allow_non_4bit=True)


def test_q8_0_model_is_refused_and_mixed_q4_model_accepted(tmp_path: Path) -> None:
    q8, q4, f16 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.F16
    info = read_model_info(write_gguf(tmp_path / "q8.gguf", {"blk.0.attn_q.weight": (_q_bytes(64, 64, q8), q8)}))
    assert info.dominant_type == "Q8_0" and not info.is_4bit
    # A Q4_K_M-style mix: mostly 4-bit with one wider tensor is still a 4-bit model.
    mixed = {
        "blk.0.ffn_up.weight": (_q_bytes(512, 256, q4), q4),
        "blk.0.ffn_down.weight": (_q_bytes(256, 512, q4), q4),
        "output.weight": (np.zeros((64, 64), dtype=np.float16), f16),
    }
    info = read_model_info(write_gguf(tmp_path / "mixed.gguf", mixed))
    assert info.is_4bit and info.quant_summary["F16"]["count"] == 1
    check_quantization(info, allow_non_4bit=False)


def _small_model_big_vocab(
    path: Path, block_type: gguf.GGMLQuantizationType, file_type: gguf.LlamaFileType | None
) -> Path:
    """The shape of a standard Q4_K_M file of a small model: a Q8_0 token embedding that holds most of
    the bytes, and blocks of ``block_type``."""
    q8 = gguf.GGMLQuantizationType.Q8_0
    tensors = {
        "token_embd.weight": (_q_bytes(4096, 256, q8), q8),
        "blk.0.attn_q.weight": (_q_bytes(256, 256, block_type), block_type),
        "blk.0.ffn_up.weight": (_q_bytes(512, 256, block_type), block_type),
        "blk.0.attn_norm.weight": (np.ones(256, dtype=np.float32), None),
    }
    return write_gguf(path, tensors, file_type=file_type)


def test_the_rule_judges_the_blocks_not_the_embedding(tmp_path: Path) -> None:
    q4 = gguf.GGMLQuantizationType.Q4_0
    info = read_model_info(_small_model_big_vocab(tmp_path / "q4.gguf", q4, None))
    assert info.dominant_type == "Q8_0" and info.four_bit_bytes * 2 < info.weights_bytes  # most bytes are 8-bit
    assert info.is_4bit and info.quant.rule == "blocks" and info.quant.block_dominant_type == "Q4_0"
    assert info.quant.file_type is None
    check_quantization(info, allow_non_4bit=False)


def test_a_4bit_file_type_accepts_llama_cpp_fallbacks_but_not_a_wider_file(tmp_path: Path) -> None:
    """Rows that are not a multiple of 256 make llama.cpp's Q4_K_M recipe fall back to Q5_0: the
    blocks are then mostly 5.5-bit, and only general.file_type says what the file is."""
    q5, f16, ft = gguf.GGMLQuantizationType.Q5_0, gguf.GGMLQuantizationType.F16, gguf.LlamaFileType
    info = read_model_info(_small_model_big_vocab(tmp_path / "k_m.gguf", q5, ft.MOSTLY_Q4_K_M))
    assert info.is_4bit and info.quant.rule == "file_type" and info.quant.file_type == "Q4_K_M"
    assert info.quant.block_bits_per_weight == 5.5 and "Q4_K_M" in info.quant.reason
    # The same tensors without a file type, or calling themselves Q5_K_M: refused, saying why.
    for file_type, says in ((None, "there is no general.file_type"), (ft.MOSTLY_Q5_K_M, "general.file_type is Q5_K_M")):
        info = read_model_info(_small_model_big_vocab(tmp_path / f"q5-{file_type}.gguf", q5, file_type))
        assert not info.is_4bit and info.quant.rule == "none"
        with pytest.raises(ModelError) as e:
            check_quantization(info, allow_non_4bit=False)
        assert e.value.code == "model_not_4bit" and "mostly Q5_0" in str(e.value) and says in str(e.value)
    # A file type is not believed over F16 blocks.
    info = read_model_info(_small_model_big_vocab(tmp_path / "liar.gguf", f16, ft.MOSTLY_Q4_K_M))
    assert not info.is_4bit and "says Q4_K_M, but its transformer blocks average 16.00 bits" in info.quant.reason
    # llama.cpp's "guessed" flag does not hide the type.
    info = read_model_info(_small_model_big_vocab(tmp_path / "guessed.gguf", q5, ft.MOSTLY_Q4_K_M | ft.GUESSED))
    assert info.quant.file_type == "Q4_K_M" and info.is_4bit


def test_not_a_gguf_file_is_a_precise_model_error(tmp_path: Path, tiny_model: Path) -> None:
    cases = {
        "text.gguf": (b"hello, I am not a model\n" * 10, "GGUF magic"),
        "empty.gguf": (b"", "only 0 bytes"),
        "truncated.gguf": (tiny_model.read_bytes()[: tiny_model.stat().st_size // 2], "truncated"),
        "header-cut.gguf": (tiny_model.read_bytes()[:4000], "truncated"),
        "version.gguf": (b"GGUF" + (9).to_bytes(4, "little") + bytes(16), "version 9"),
    }
    for name, (data, needle) in cases.items():
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(ModelError) as e:
            read_model_info(p)
        assert e.value.code == "model_invalid", name
        assert needle in str(e.value) and name in str(e.value), str(e.value)
    with pytest.raises(ModelError) as e:
        read_model_info(tmp_path / "missing.gguf")
    assert e.value.code == "model_not_found"
    with pytest.raises(ModelError) as e:
        read_model_info(tmp_path)
    assert e.value.code == "model_invalid"


def test_split_and_tensorless_files_are_refused(tmp_path: Path) -> None:
    q4 = gguf.GGMLQuantizationType.Q4_0
    part = write_gguf(tmp_path / "m-00001-of-00002.gguf", {"blk.0.ffn_up.weight": (_q_bytes(64, 64, q4), q4)}, 2)
    with pytest.raises(ModelError, match="part 1 of a 2-part split GGUF; merge") as e:
        read_model_info(part)
    assert e.value.code == "model_invalid"
    with pytest.raises(ModelError, match="no tensors"):
        read_model_info(write_gguf(tmp_path / "vocab.gguf", {}))


# --- CLI ----------------------------------------------------------------------------------------


def test_cli_inspect_prints_the_report(tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model", "inspect", str(tiny_model), "--ctx", "256"]) == 0
    out = capsys.readouterr().out
    for needle in (
        "llama, 2 layers, embedding 64",
        "4 heads, 2 KV heads, head size 16",
        "512 tokens",
        "trained for 2048 tokens",
        "Q4_0",
        "blk.1",
        "output.weight",
        "n_ctx 256",
        "4-bit      yes (rule: blocks)",
        "memory (exact plan: llama.cpp's own buffer sizes on this CPU)",
        "on this CPU: CPU_REPACK repacks 15 tensors",
    ):
        assert needle in out, needle
    assert main(["model", "inspect", str(tiny_model), "--ctx", "256", "--header-only"]) == 0
    out = capsys.readouterr().out
    assert "memory (header-only estimate)" in out and "note: --header-only: llama.cpp was not asked" in out


def test_cli_inspect_json_matches_read_model_info(tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model", "inspect", str(tiny_model), "--json", "--mode", "fast", "--n-batch", "32"]) == 0
    doc = json.loads(capsys.readouterr().out)
    info = read_model_info(tiny_model)
    assert doc["model"]["n_layer"] == info.n_layer and doc["model"]["repackable_bytes"] == info.repackable_bytes
    assert doc["model"]["layers"][1]["offset"] == info.layers[1].offset
    assert doc["model"]["is_4bit"] is True and doc["model"]["quant"]["rule"] == "blocks"
    assert doc["estimate"]["settings"] == {
        "n_ctx": 2048,
        "mode": "fast",
        "n_batch": 32,
        "type_k": "f16",
        "type_v": "f16",
        "flash_attn": False,
    }
    assert doc["estimate"]["source"] == "llama.cpp"
    assert doc["estimate"]["anon_bytes"] > 0 and doc["estimate"]["file_bytes"] >= 0
    assert main(["model", "inspect", str(tiny_model), "--json", "--header-only"]) == 0
    assert json.loads(capsys.readouterr().out)["estimate"]["source"] == "header"
    assert main(["model", "inspect", str(tiny_model), "--type-v", "q8_0"]) == 1
    assert "needs --flash-attn" in capsys.readouterr().err


def test_cli_inspect_refuses_non_4bit_unless_allowed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _plain_model(tmp_path / "f16.gguf", np.float16)
    assert main(["model", "inspect", str(path)]) == 1
    err = capsys.readouterr().err
    assert "model_not_4bit" in err and "F16" in err and "--allow-non-4bit" in err
    assert main(["model", "inspect", str(path), "--allow-non-4bit", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["is_4bit"] is False


def test_cli_inspect_of_a_text_file_is_one_line_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    p = tmp_path / "notes.txt"
    p.write_text("not a model")
    assert main(["model", "inspect", str(p)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("edge-agent: error [model_invalid]") and "Traceback" not in err


def test_cli_synth_writes_and_reports(tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "t.gguf"
    assert main(["model", "synth", "--preset", "tiny", str(out)]) == 0
    lines = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert lines["path"] == str(out.resolve())
    assert lines["sha256"] == _sha256(out) == _sha256(tiny_model)
    assert lines["size"].startswith(f"{out.stat().st_size} bytes")
    assert main(["model", "synth", "--preset", "tiny", str(out)]) == 1
    assert "--force" in capsys.readouterr().err
    assert main(["model", "synth", "--preset", "tiny", "--seed", "3", "--force", str(out)]) == 0
    assert _sha256(out) != _sha256(tiny_model)


# --- the 0.5B preset ------------------------------------------------------------------------------


@pytest.mark.slow
def test_qwen05_header_and_repack_bytes(qwen05_model: Path) -> None:
    info = read_model_info(qwen05_model)
    _assert_matches_preset(info, "qwen-0.5b", qwen05_model)
    embd = next(t for t in info.tensors if t.name == "token_embd.weight")
    blocks = sum(t.nbytes for t in info.tensors if t.name.startswith("blk.") and len(t.shape) == 2)
    # Tied: llama.cpp duplicates token_embd as the output matrix and repacks that copy.
    assert info.repackable_bytes == blocks + embd.nbytes
    assert 270e6 < info.file_size < 290e6


@pytest.mark.slow
def test_qwen05_loads_and_generates_in_llama_cpp(qwen05_model: Path) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(str(qwen05_model), n_ctx=256, n_threads=2, verbose=False)
    try:
        assert llm.n_vocab() == 151936 and llm.token_eos() == EOS_ID
        toks = llm.tokenize(b"The quick brown fox jumps over the lazy dog.")
        assert len(toks) < 20  # filler pieces merge ordinary words like a real tokenizer would
        out = llm("The quick brown fox", max_tokens=4, temperature=0.0)
        assert out["choices"][0]["finish_reason"] in ("length", "stop")
    finally:
        llm.close()


# --- the real model: Gemma 3 270M Q4_K_M and llama.cpp's requantisations of it ------------------


@pytest.mark.slow
def test_real_q4_k_m_file_is_accepted_by_its_file_type(gemma_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model", "inspect", str(gemma_model), "--ctx", "1024", "--mode", "fast", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    m, est = doc["model"], doc["estimate"]
    assert m["architecture"] == "gemma3" and m["n_vocab"] == 262144 and m["n_swa"] == 512
    assert m["dominant_type"] == "Q8_0"  # the embedding: most of the file, and not what the rule judges
    assert m["is_4bit"] and m["quant"]["rule"] == "file_type" and m["quant"]["file_type"] == "Q4_K_M"
    assert est["source"] == "llama.cpp"
    # llama.cpp repacks only the Q4_K tensors here (not the Q8_0 embedding or the Q5_0 fallbacks);
    # the header's bound counts every type some CPU repacks.
    q4k = m["quant_summary"]["Q4_K"]["bytes"]
    assert est["components"]["repacked_weights"] in (0, q4k) and m["repackable_bytes"] > 10 * q4k
    # The KV cache as llama.cpp allocates it: every layer at full size (swa_full), f16.
    assert est["components"]["kv_cache"] == 1024 * 18 * 1 * (256 + 256) * 2


@pytest.mark.slow
def test_real_file_generates_english_with_default_settings(
    gemma_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(
        [
            "generate",
            "--model",
            str(gemma_model),
            "--prompt",
            "The capital of France is",
            "--max-tokens",
            "12",
            "--json",
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["estimate"]["source"] == "llama.cpp" and doc["stats"]["completion_tokens"] >= 1
    words = doc["text"].split()
    # Real text: words of letters from a 262k-token vocabulary, not byte noise.
    assert len(words) >= 3 and sum(w.strip(".,;:!?'\"").isalpha() for w in words) >= 0.6 * len(words), doc["text"]


@pytest.mark.slow
@pytest.mark.parametrize("fixture, kind", [("gemma_q8_0_model", "Q8_0"), ("gemma_f16_model", "F16")])
def test_real_8bit_and_f16_requantisations_are_refused(
    request: pytest.FixtureRequest, fixture: str, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = request.getfixturevalue(fixture)
    info = read_model_info(path)
    assert info.quant.file_type == kind and info.quant.block_dominant_type == kind and not info.is_4bit
    assert main(["model", "inspect", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"[model_not_4bit]: model {path.name} is not 4-bit: its transformer blocks are mostly {kind}" in err
    assert main(["generate", "--model", str(path), "--prompt", "x", "--max-tokens", "1"]) == 1
    assert "[model_not_4bit]" in capsys.readouterr().err


@pytest.mark.slow
def test_real_q4_0_requantisation_is_accepted_by_its_blocks(gemma_q4_0_model: Path) -> None:
    info = read_model_info(gemma_q4_0_model)
    assert info.is_4bit and info.quant.rule == "blocks" and info.quant.file_type == "Q4_0"
    assert info.dominant_type == "Q8_0"  # llama.cpp's recipe keeps the embedding at Q8_0
