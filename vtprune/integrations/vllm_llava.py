"""vLLM's LLaVA-1.5 with vtprune's pre-LLM methods (see :mod:`vtprune.integrations.vllm`); imported by vLLM only.

Subclasses vLLM 0.32's ``LlavaForConditionalGeneration`` and its multimodal processor
(``vllm/model_executor/models/llava.py``). Without a ``vtprune`` entry in the config every override falls through to
vLLM's code. With one:

- the processor reserves ``placeholder_count`` tokens per image (the method's fixed count for the request's
  ``vtprune_keep`` or the spec's budget) and hands that budget to the model as a per-image field;
- ``embed_multimodal`` runs vLLM's own CLIP blocks and projector (the same modules vLLM's forward calls, block by
  block up to the feature block, keeping each block's input for [CLS]-attention scoring) and reduces each image with
  the method's own vtprune operator, so the kept tokens are those ``vtprune.apply`` keeps on the HF model.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import BatchFeature, LlavaConfig, PixtralVisionConfig
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import ImageProcessorItems, MultiModalDataItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdate
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
    PixtralHFMultiModalProcessor,
    PixtralHFProcessingInfo,
)
from vllm.model_executor.models.utils import WeightsMapper

from vtprune.integrations.vllm import (
    KEEP_KWARG,
    _ConfigAdapter,
    build_method,
    image_tokens,
    method_spec,
    placeholder_count,
    reduce_images,
)
from vtprune.models.base import VisionTrace
from vtprune.ops import attention_probs

DEFAULT_KEEP = -1  # the per-image budget field when the request gave none: the spec's own budget


def _keep(value: Any) -> int | None:
    value = int(value)
    return None if value == DEFAULT_KEEP else value


class PrunedLlavaMultiModalProcessor(LlavaMultiModalProcessor):
    """vLLM's LLaVA processor; the processing info's ``get_num_image_tokens`` stays the full view (profiling and
    encoder-cache budgets use it as the upper bound), the prompt updates below reserve the pruned count."""

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        keep = hf_kwargs.get(KEEP_KWARG)
        out = super()._call_hf_processor(hf_data, {k: v for k, v in hf_kwargs.items() if k != KEEP_KWARG})
        pixels = out.get("pixel_values")
        if pixels is not None and method_spec(self.info.get_hf_config()) is not None:
            placeholder_count(self.info.get_hf_config(), keep)  # a bad budget fails this request, not the engine
            out[KEEP_KWARG] = torch.full((len(pixels),), DEFAULT_KEEP if keep is None else int(keep))
        return out

    def _get_mm_fields_config(self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
                              ) -> Mapping[str, MultiModalFieldConfig]:
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        if method_spec(self.info.get_hf_config()) is not None:
            fields[KEEP_KWARG] = MultiModalFieldConfig.batched("image")
        return fields

    def _get_prompt_updates(self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs: Mapping[str, object],
                            out_mm_kwargs: MultiModalKwargsItems) -> Sequence[PromptUpdate]:
        config = self.info.get_hf_config()
        if method_spec(config) is None:
            return super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        count = placeholder_count(config, hf_processor_mm_kwargs.get(KEEP_KWARG))
        image_token = config.image_token_index

        def replacement(item: int) -> list[int]:
            mm_items.get_items("image", ImageProcessorItems)  # pixel inputs only: embeddings carry their own count
            return [image_token] * count

        return [PromptReplacement(modality="image", target=[image_token], replacement=replacement)]


def _info(ctx):
    if isinstance(ctx.get_hf_config(LlavaConfig).vision_config, PixtralVisionConfig):
        return PixtralHFProcessingInfo(ctx)
    return LlavaProcessingInfo(ctx)


def _processor(info, dummy_inputs, **kwargs):
    if isinstance(info, PixtralHFProcessingInfo):
        return PixtralHFMultiModalProcessor(info, dummy_inputs, **kwargs)
    return PrunedLlavaMultiModalProcessor(info, dummy_inputs, **kwargs)


class _VllmAdapter(_ConfigAdapter):
    """vtprune's LLaVA adapter over vLLM's modules: the CLIP blocks (fused qkv projection) for attention rows."""

    @property
    def vision_layers(self):
        return self.model.vision_tower.vision_model.encoder.layers

    def vision_attention(self, trace: VisionTrace, block: int, query_rows: torch.Tensor) -> torch.Tensor:
        layer = self.vision_layers[block]
        attention = layer.self_attn
        normed = layer.layer_norm1(trace.hidden_states[block])
        qkv, _ = attention.qkv_proj(normed)
        query, key, _ = qkv.chunk(3, dim=-1)
        views, n, _ = normed.shape
        heads = attention.num_heads_per_partition
        query = query[:, query_rows].view(views, len(query_rows), heads, -1).transpose(1, 2)
        key = key.view(views, n, heads, -1).transpose(1, 2)
        return attention_probs(query, key, attention.scale)


@MULTIMODAL_REGISTRY.register_processor(_processor, info=_info, dummy_inputs=LlavaDummyInputsBuilder)
class PrunedLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """vLLM's LLaVA-1.5; with ``hf_overrides={"vtprune": {...}}`` each image is reduced by a vtprune method."""

    # transformers 5 checkpoints (and MiniLLaVA) name the CLIP tower without vLLM's `vision_model.` level
    hf_to_vllm_mapper = LlavaForConditionalGeneration.hf_to_vllm_mapper | WeightsMapper(orig_to_new_regex={
        re.compile(r"^(model\.)?vision_tower\.(?=embeddings\.|encoder\.|pre_layrnorm\.|post_layernorm\.)"):
            r"\1vision_tower.vision_model."})

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.vtprune_spec = method_spec(self.config)
        self.vtprune_kept: list[torch.Tensor] = []  # the last images' kept layout indices (for parity checks)
        if self.vtprune_spec is None:
            return
        self._adapter = _VllmAdapter(self.config, self)
        self._methods: dict[int | None, Any] = {}
        placeholder_count(self.config)  # refused here, at load, when vLLM cannot run it or the budget is out of range
        method = self._method(None)
        tensor_parallel = getattr(self.vision_tower.vision_model.encoder.layers[0].self_attn, "tp_size", 1)
        if "cls" in method.requires and tensor_parallel != 1:
            raise ValueError(f"vtprune: {method.name} scores by [CLS] attention over all heads, and this vision tower "
                             f"is split over {tensor_parallel} tensor-parallel ranks; serve with "
                             "--mm-encoder-tp-mode data or one GPU for the tower")

    def _method(self, keep: int | None):
        if keep not in self._methods:
            self._methods[keep] = build_method(self.vtprune_spec, keep)
        return self._methods[keep]

    def embed_multimodal(self, **kwargs: object):
        keeps = kwargs.pop(KEEP_KWARG, None)
        if self.vtprune_spec is None:
            return super().embed_multimodal(**kwargs)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if image_input["type"] != "pixel_values":
            raise ValueError("vtprune: image_embeds inputs arrive already encoded and cannot be reduced; send pixels")
        return self._reduced(image_input["pixel_values"], keeps)

    @torch.no_grad()
    def _reduced(self, pixel_values: torch.Tensor, keeps: Any) -> tuple[torch.Tensor, ...]:
        tower = self.vision_tower.vision_model
        block = self._adapter.default_feature_block
        hidden = tower.pre_layrnorm(tower.embeddings(pixel_values.to(tower.dtype)))
        states = [hidden]  # states[i] = input of block i, as vtprune's VisionTrace holds them
        for layer in tower.encoder.layers[:block + 1]:
            hidden = layer(hidden)
            states.append(hidden)
        projected = self.multi_modal_projector(hidden[:, 1:])  # [CLS] dropped: vision_feature_select_strategy default
        keeps = [None] * len(pixel_values) if keeps is None else [_keep(k) for k in torch.as_tensor(keeps).flatten()]
        outputs: list[torch.Tensor | None] = [None] * len(pixel_values)
        kept: list[torch.Tensor | None] = [None] * len(pixel_values)
        for keep in dict.fromkeys(keeps):  # one operator call per budget, images in placeholder order
            numbers = [i for i, k in enumerate(keeps) if k == keep]
            images = [image_tokens(self._adapter, projected[i], pixel_values[i],
                                   VisionTrace(tuple(s[i:i + 1] for s in states), block), i) for i in numbers]
            expected = placeholder_count(self.config, keep)
            for i, reduction in zip(numbers, reduce_images(self._method(keep), self._adapter, images)):
                if len(reduction.features) != expected:
                    raise RuntimeError(f"vtprune: {self.vtprune_spec['method']} kept {len(reduction.features)} "
                                       f"tokens of an image with {expected} placeholders reserved")
                outputs[i] = reduction.features
                kept[i] = reduction.sources.strongest()
        self.vtprune_kept = kept
        return tuple(outputs)
