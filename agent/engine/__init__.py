"""The inference engine boundary: ``Engine`` owns the model; ``estimate`` plans its memory.

Everything outside this package uses these names only; llama-cpp-python is not imported
anywhere else. The data types (requests, results, reports) import without llama-cpp-python;
``Engine`` itself loads it on first use of the name, so `model inspect`, the protocol and the
job path's tests do not pay for libllama.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from agent.engine.estimate import (
    MemoryEstimate,
    ModeChoice,
    Serving,
    choose_mode,
    estimate_memory,
    largest_ctx_that_fits,
)
from agent.engine.residency import LayerResidency
from agent.engine.types import (
    ChatMessage,
    EngineLike,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    GenerationStats,
    LoadPlan,
    LoadReport,
    RequestLimits,
    ResponseFormat,
)

if TYPE_CHECKING:
    from agent.engine.engine import Engine  # costly: loads llama.cpp (see the docstring)


def __getattr__(name: str) -> Any:
    if name == "Engine":
        from agent.engine.engine import Engine  # costly: loads llama.cpp (see the docstring)

        return Engine
    raise AttributeError(f"module 'agent.engine' has no attribute {name!r}")


__all__ = [
    "ChatMessage",
    "Engine",
    "EngineLike",
    "FinishReason",
    "GenerationRequest",
    "GenerationResult",
    "GenerationStats",
    "LayerResidency",
    "LoadPlan",
    "LoadReport",
    "MemoryEstimate",
    "ModeChoice",
    "RequestLimits",
    "ResponseFormat",
    "Serving",
    "choose_mode",
    "estimate_memory",
    "largest_ctx_that_fits",
]
