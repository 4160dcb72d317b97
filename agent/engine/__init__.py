"""The inference engine boundary: ``Engine`` owns the model; ``estimate`` plans its memory.

Everything outside this package uses these names only; llama-cpp-python is not imported
anywhere else.
"""

from agent.engine.engine import (
    Engine,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    GenerationStats,
    LoadReport,
    RequestLimits,
)
from agent.engine.estimate import MemoryEstimate, ModeChoice, choose_mode, estimate_memory, largest_ctx_that_fits
from agent.engine.residency import LayerResidency

__all__ = [
    "Engine",
    "FinishReason",
    "GenerationRequest",
    "GenerationResult",
    "GenerationStats",
    "LayerResidency",
    "LoadReport",
    "MemoryEstimate",
    "ModeChoice",
    "RequestLimits",
    "choose_mode",
    "estimate_memory",
    "largest_ctx_that_fits",
]
