"""The single place where sequences, positions, masks and the KV cache change."""
from vtprune.runtime.operators import (
    DecodeContext,
    DecodeOperator,
    DecodeStepContext,
    ImageTokens,
    LayerContext,
    LayerOperator,
    PreLLMContext,
    PreLLMOperator,
    Reduction,
    Transition,
    VisionOperator,
    VisionState,
)
from vtprune.runtime.pruner import Pruner, encode_images
from vtprune.runtime.stats import Stats

__all__ = [
    "DecodeContext",
    "DecodeOperator",
    "DecodeStepContext",
    "ImageTokens",
    "LayerContext",
    "LayerOperator",
    "PreLLMContext",
    "PreLLMOperator",
    "Pruner",
    "Reduction",
    "Stats",
    "Transition",
    "VisionOperator",
    "VisionState",
    "encode_images",
]
