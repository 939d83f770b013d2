"""The single place where sequences, positions, masks and the KV cache change."""
from vtprune.runtime.operators import (
    DecodeContext,
    DecodeOperator,
    LayerContext,
    LayerOperator,
    PreLLMContext,
    PreLLMOperator,
    Reduction,
    VisionOperator,
    VisionState,
)
from vtprune.runtime.pruner import Pruner
from vtprune.runtime.stats import Stats

__all__ = [
    "DecodeContext",
    "DecodeOperator",
    "LayerContext",
    "LayerOperator",
    "PreLLMContext",
    "PreLLMOperator",
    "Pruner",
    "Reduction",
    "Stats",
    "VisionOperator",
    "VisionState",
]
