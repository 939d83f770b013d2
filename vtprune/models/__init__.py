"""Model adapters: one file per model family. They say where the visual tokens are and how to reach the ViT and
decoder layers; nothing in them is method-specific."""
from __future__ import annotations

from torch import nn

from vtprune.models.base import Adapter
from vtprune.models.llava import LlavaAdapter

ADAPTERS: tuple[type[Adapter], ...] = (LlavaAdapter,)


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter for ``model``; raises with the list of supported classes when there is none."""
    for adapter_cls in ADAPTERS:
        if adapter_cls.supports(model):
            return adapter_cls(model)
    supported = ", ".join(name for cls in ADAPTERS for name in cls.model_classes)
    raise TypeError(
        f"vtprune does not support {type(model).__name__}; supported model classes: {supported}. "
        "Load the model with one of these classes (e.g. LlavaForConditionalGeneration.from_pretrained(...))."
    )


__all__ = ["ADAPTERS", "Adapter", "LlavaAdapter", "adapter_for"]
