"""vLLM's own multimodal model classes, made to refuse a ``vtprune`` config entry the plug-in cannot serve yet
(LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL): without the entry each is vLLM's class unchanged; with
it, loading stops with the reason instead of silently serving the unpruned model. Classes are made on first access
(``register`` in :mod:`vtprune.integrations.vllm` names them lazily), so only the model being loaded is imported."""
from __future__ import annotations

import importlib
from typing import Any

from vtprune.integrations.vllm import ARCHITECTURE, REFUSED, method_spec


def __getattr__(name: str) -> Any:
    if name not in REFUSED:
        raise AttributeError(name)
    base = getattr(importlib.import_module(f"vllm.model_executor.models.{REFUSED[name]}"), name)

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        if method_spec(vllm_config.model_config.hf_config) is not None:
            raise ValueError(
                f"vtprune: the vLLM plug-in serves {ARCHITECTURE} (LLaVA-1.5 with a CLIP tower); {name} is not wired "
                "yet. Prune it with vtprune.apply on the HF model, or serve it without the 'vtprune' override")
        base.__init__(self, vllm_config=vllm_config, prefix=prefix)

    cls = type(name, (base,), {"__init__": __init__, "__module__": __name__, "__qualname__": name})
    globals()[name] = cls
    return cls
