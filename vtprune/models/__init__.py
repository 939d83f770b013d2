"""Model adapters: one file per model family. They say where the visual tokens are, what each of them is (its
layout) and how to reach the vision and decoder layers; nothing in them is method-specific."""
from __future__ import annotations

from torch import nn

from vtprune.models.base import CAPABILITIES, Adapter, EncodedImages, ImageRecord, Modality, VisionTrace
from vtprune.models.layout import ImageLayout, TokenKind
from vtprune.models.llava import LlavaAdapter
from vtprune.models.llava_next import LlavaNextAdapter
from vtprune.models.qwen2_vl import Qwen2_5_VLAdapter, Qwen2VLAdapter

ADAPTERS: tuple[type[Adapter], ...] = (LlavaAdapter, LlavaNextAdapter, Qwen2VLAdapter, Qwen2_5_VLAdapter)
# The transformers release (major, minor) the adapters and the runtime are tested on: they rely on its internals
# (tests/test_transformers_canary.py lists them). The package installs with older releases too, for vLLM's
# environment, where only method code runs (vtprune.integrations.vllm); the HF runtime checks at apply().
TESTED_TRANSFORMERS = (5, 23)


def check_transformers(version: str | None = None) -> None:
    """Raise, naming the fix, unless ``version`` (default: the installed transformers) is the tested release."""
    import transformers

    version = version or transformers.__version__
    if tuple(int(part) for part in version.split(".")[:2]) != TESTED_TRANSFORMERS:
        tested = ".".join(map(str, TESTED_TRANSFORMERS))
        raise RuntimeError(
            f"vtprune's HF runtime is tested on transformers {tested}.x and relies on its internals; this "
            f"environment has {version}. Install it with: pip install 'transformers>={tested},<"
            f"{TESTED_TRANSFORMERS[0]}.{TESTED_TRANSFORMERS[1] + 1}' (in vLLM's environment, which keeps vLLM's "
            "transformers, use the vLLM plug-in: vtprune.integrations.vllm)"
        )


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


__all__ = [
    "ADAPTERS", "CAPABILITIES", "Adapter", "EncodedImages", "ImageLayout", "ImageRecord", "LlavaAdapter",
    "LlavaNextAdapter", "Modality", "Qwen2VLAdapter", "Qwen2_5_VLAdapter", "TokenKind", "VisionTrace", "adapter_for",
    "check_transformers",
]
