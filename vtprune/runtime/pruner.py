"""The runtime: installs a method's operators on a model with forward hooks, and removes them exactly.

All sequence, position, mask and KV-cache changes happen here:
- the multimodal model's forward pre-hook runs the vision tower (with vision operators swapped into the blocks
  for that call only), the pre-LLM operator, and hands the language model a shorter ``inputs_embeds`` with explicit
  ``position_ids`` (original RoPE positions of the kept tokens, or renumbered if the method asks);
- each decoder layer's pre-hook applies in-LLM drops, gives the layer its own 4-D mask (layers after a drop have
  shorter KV caches than earlier ones), and tracks which cache entries are valid for every later decode step;
- after prefill, decode operators trim visual entries of the KV cache.
The model keeps its attention implementation: attention rows are recomputed from q/k projections.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from vtprune.models import adapter_for
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
from vtprune.runtime.sequence import (
    Sequence,
    attention_mask,
    build_reduced_sequence,
    gather_rows,
    keep_index,
    renumber,
)
from vtprune.runtime.stats import Stats

SUPPORTED_ATTENTION = ("sdpa", "eager")
_ACTIVE: weakref.WeakKeyDictionary[nn.Module, Pruner] = weakref.WeakKeyDictionary()
_FORWARD_ARGS = ("input_ids", "pixel_values", "attention_mask", "position_ids", "past_key_values", "inputs_embeds")


@dataclass
class ReducedImages(BaseModelOutputWithPooling):
    """``get_image_features`` output while a pruner is installed: the reduced features per image
    (``pooler_output``), with their ``reductions`` (features + source maps) for the runtime."""

    reductions: list[Reduction] | None = None
    vision_tokens: int | None = None


@dataclass
class _Prefill:
    sequence: Sequence
    sources: list[torch.Tensor]
    original_visual: torch.Tensor
    visual_tokens: torch.Tensor
    vision_tokens: int
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
    mask: tuple[torch.Tensor, torch.Tensor | None] | None = None  # (valid it was built for, mask)
    layer_inputs: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)


@dataclass
class _Cache:
    """Per-layer validity of KV-cache entries (layers differ in length once tokens are dropped inside the LLM)."""

    valid: list[torch.Tensor | None]
    visual: list[torch.Tensor | None]
    original_length: int
    position_shift: torch.Tensor


class Pruner:
    """A method installed on a model. Use as a context manager or call ``remove()``.

    ``stats`` describes the last prefill (see ``Stats``).
    """

    def __init__(self, model: nn.Module, method: Any) -> None:
        if model in _ACTIVE:
            raise RuntimeError(
                f"{type(model).__name__} already has a vtprune pruner ({_ACTIVE[model].method.name}); "
                "call .remove() on it (or leave its `with` block) before applying another"
            )
        self.model = model
        self.adapter = adapter_for(model)
        implementation = self.adapter.attn_implementation
        if implementation not in SUPPORTED_ATTENTION:
            raise TypeError(
                f"attn_implementation={implementation!r} is not supported by vtprune; load the model with "
                f"attn_implementation='sdpa' (default) or 'eager'"
            )
        self.method = method
        operators = method.operators(self.adapter)
        self.vision_ops = [op for op in operators if isinstance(op, VisionOperator)]
        pre_llm = [op for op in operators if isinstance(op, PreLLMOperator)]
        if len(pre_llm) > 1:
            raise ValueError("a method may contribute at most one pre-LLM operator")
        self.pre_llm_op = pre_llm[0] if pre_llm else None
        self.layer_ops = [op for op in operators if isinstance(op, LayerOperator)]
        self.decode_ops = [op for op in operators if isinstance(op, DecodeOperator)]
        num_layers = len(self.adapter.decoder_layers)
        for op in self.layer_ops:
            for layer in op.layers:
                if not 1 <= layer < num_layers:
                    raise ValueError(
                        f"{method.name}: layer {layer} is out of range; this model has {num_layers} decoder layers, "
                        f"so tokens can be dropped before layers 1..{num_layers - 1}"
                    )
        self._needs_input = {layer - 1 for op in self.layer_ops if op.needs_previous_input for layer in op.layers}
        self.stats: Stats | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._prefill: _Prefill | None = None
        self._decode_valid: torch.Tensor | None = None
        self._cache: _Cache | None = None

    # --- lifecycle ------------------------------------------------------------------------------------------------
    def install(self) -> Pruner:
        _ACTIVE[self.model] = self
        multimodal = self.adapter.multimodal_model
        if multimodal is not self.model:
            self._handles.append(self.model.register_forward_pre_hook(self._check_labels, with_kwargs=True))
        self._handles.append(multimodal.register_forward_pre_hook(self._before_multimodal, with_kwargs=True))
        self._handles.append(multimodal.register_forward_hook(self._after_multimodal, with_kwargs=True))
        multimodal.get_image_features = self.reduce_images
        for index, layer in enumerate(self.adapter.decoder_layers):
            hook = self._layer_hook(index)
            self._handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        multimodal = self.adapter.multimodal_model
        if multimodal.__dict__.get("get_image_features") == self.reduce_images:
            del multimodal.get_image_features
        self._prefill = self._cache = None
        if _ACTIVE.get(self.model) is self:
            del _ACTIVE[self.model]

    def __enter__(self) -> Pruner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # --- hooks ----------------------------------------------------------------------------------------------------
    @staticmethod
    def _check_labels(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if kwargs.get("labels") is not None:
            raise ValueError("vtprune shortens the sequence, so `labels` cannot be aligned; compute the loss without "
                             "a pruner (remove it first)")

    def _before_multimodal(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kwargs = {**dict(zip(_FORWARD_ARGS, args)), **kwargs}
        cache = kwargs.get("past_key_values")
        past = cache.get_seq_length() if cache is not None else 0
        if past == 0:
            kwargs = self._start_prefill(kwargs)
        else:
            kwargs = self._start_decode(kwargs, past)
        return (), kwargs

    def _after_multimodal(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        prefill, self._prefill, self._decode_valid = self._prefill, None, None
        if prefill is None:
            return
        seq = prefill.sequence
        alive = seq.visual & seq.valid
        self.stats = Stats(
            visual_tokens=prefill.visual_tokens,
            original_visual_tokens=prefill.original_visual,
            vision_tokens_per_image=prefill.vision_tokens,
            sources=prefill.sources,
            final_tokens=[seq.token_id[b][alive[b]] for b in range(seq.valid.shape[0])],
        )
        cache = kwargs.get("past_key_values") or getattr(output, "past_key_values", None)
        if cache is not None and self.decode_ops:
            self._trim_cache(cache)

    def _layer_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if self._prefill is None and self._decode_valid is None:
                return None  # the language model called on its own: nothing to do
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if self._prefill is not None:
                hidden = self._prefill_layer(index, hidden, kwargs)
            else:
                self._decode_layer(index, hidden, kwargs)
            return (hidden, *args[1:]), kwargs

        return hook

    # --- prefill --------------------------------------------------------------------------------------------------
    def _start_prefill(self, kwargs: dict) -> dict:
        input_ids, pixel_values = kwargs.get("input_ids"), kwargs.get("pixel_values")
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        if input_ids is None:
            raise ValueError("vtprune needs `input_ids` to find the image tokens; pass input_ids, not inputs_embeds")
        n_tokens = self.adapter.tokens_per_image
        is_image = input_ids == self.adapter.image_token_id
        if (pixel_values is None and encoded is None) or not is_image.any():
            raise ValueError(
                "vtprune: this batch has no image (no pixel_values / no image tokens in input_ids); "
                "run text-only batches without the pruner (pruner.remove() or outside its `with` block)"
            )
        per_sample = is_image.sum(1)
        if (per_sample % n_tokens).any():
            raise ValueError(f"each image must be {n_tokens} consecutive image tokens; got counts {per_sample.tolist()}")
        if pixel_values is not None:
            images = self.reduce_images(pixel_values)
        elif isinstance(encoded, ReducedImages):  # generate() encodes images before the first forward
            images = encoded
        else:
            raise ValueError("vtprune: image features were encoded before the pruner was installed; pass pixel_values")
        if len(images.reductions) * n_tokens != int(per_sample.sum()):
            raise ValueError(
                f"{len(images.reductions)} images but {int(per_sample.sum()) // n_tokens} image placeholders in input_ids"
            )
        batch, length = input_ids.shape
        mask2d = kwargs.get("attention_mask")
        valid = mask2d.bool() if mask2d is not None else torch.ones_like(input_ids, dtype=torch.bool)
        if not valid[:, -1].all():
            raise ValueError("vtprune needs left-padded batches (the last token of every row must be real); set "
                             "processor.tokenizer.padding_side = 'left'")
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = torch.arange(length, device=input_ids.device).expand(batch, length)

        embeds = self.adapter.embed(input_ids)
        seq, sample_sources = build_reduced_sequence(embeds, is_image, valid, positions, images.reductions, n_tokens)
        shift = torch.zeros(batch, dtype=torch.long, device=input_ids.device)
        if getattr(self.method, "positions", "original") == "renumber":
            renumbered = renumber(seq.valid)
            shift = seq.positions[:, -1] - renumbered[:, -1]
            seq.positions = renumbered
        num_layers = len(self.adapter.decoder_layers)
        self._prefill = _Prefill(
            sequence=seq,
            sources=sample_sources,
            original_visual=per_sample,
            visual_tokens=torch.zeros(batch, num_layers, dtype=torch.long),
            vision_tokens=images.vision_tokens,
        )
        self._cache = _Cache([None] * num_layers, [None] * num_layers, length, shift)
        kwargs.update(input_ids=None, pixel_values=None, mm_encoder_outputs={}, inputs_embeds=seq.hidden,
                      attention_mask=None, position_ids=seq.positions)
        return kwargs

    def reduce_images(self, pixel_values: torch.Tensor, **unused: Any) -> ReducedImages:
        """Vision and pre-LLM stages for a batch of images: the visual tokens each image contributes to the LLM.

        While the pruner is installed this also serves as the model's ``get_image_features`` (``generate`` encodes
        images through it before the first forward).
        """
        n_tokens = self.adapter.tokens_per_image
        state = VisionState(size=torch.empty(0), source=torch.empty(0))
        vision = self._encode(pixel_values, state)
        features = self.adapter.project(vision.features)
        if self.vision_ops:
            sources = state.source[:, 1:, 1:]
        else:
            sources = torch.eye(n_tokens, device=features.device).expand(features.shape[0], -1, -1)
        if self.pre_llm_op is not None:
            ctx = PreLLMContext(
                self.adapter, features, vision.features, sources, vision.hidden_states, pixel_values,
                seed=getattr(self.method, "seed", 0) or 0,
            )
            reductions = self.pre_llm_op.reduce(ctx)
        else:
            reductions = [Reduction(features[i], sources[i]) for i in range(features.shape[0])]
        return ReducedImages(
            last_hidden_state=vision.features,
            pooler_output=[r.features for r in reductions], reductions=reductions, vision_tokens=features.shape[1]
        )

    def _encode(self, pixel_values: torch.Tensor, state: VisionState):
        layers = self.adapter.vision_layers
        swapped = []
        try:
            for op in self.vision_ops:
                for block in op.blocks:
                    layers[block].forward = self._vision_block(op, block, state)
                    swapped.append(layers[block])
            return self.adapter.encode_images(pixel_values)
        finally:
            for layer in swapped:
                del layer.forward

    def _vision_block(self, op: VisionOperator, block: int, state: VisionState):
        def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if state.size.numel() == 0:  # first swapped block: every token is one patch
                n_img, n, _ = hidden_states.shape
                state.size = hidden_states.new_ones(n_img, n, 1)
                state.source = torch.eye(n, device=hidden_states.device).expand(n_img, n, n).clone()
            return op.block_forward(self.adapter, block, state, hidden_states)

        return forward

    def _prefill_layer(self, index: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        prefill = self._prefill
        seq = prefill.sequence
        seq.hidden = hidden
        for op in self.layer_ops:
            if index in op.layers:
                hidden = self._drop(op, index, hidden, kwargs)
        position_embeddings = prefill.position_embeddings or kwargs["position_embeddings"]
        if index in self._needs_input:
            prefill.layer_inputs[index] = (hidden, position_embeddings)
        prefill.visual_tokens[:, index] = (seq.visual & seq.valid).sum(1).cpu()
        if prefill.mask is None or prefill.mask[0] is not seq.valid:  # rebuilt only after a drop
            mask = attention_mask(None, seq.valid, hidden.dtype, self.adapter.attn_implementation)
            prefill.mask = (seq.valid, mask)
        kwargs["attention_mask"] = prefill.mask[1]
        kwargs["position_embeddings"] = position_embeddings
        kwargs["position_ids"] = seq.positions
        self._cache.valid[index] = seq.valid
        self._cache.visual[index] = seq.visual
        return hidden

    def _drop(self, op: LayerOperator, index: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        prefill = self._prefill
        seq = prefill.sequence
        ctx = LayerContext(
            adapter=self.adapter,
            layer=index,
            hidden_states=hidden,
            valid=seq.valid,
            visual=seq.visual & seq.valid,
            original_visual=prefill.original_visual.to(hidden.device),
            previous_input=prefill.layer_inputs.get(index - 1),
        )
        with torch.no_grad():
            chosen = op.select(ctx)
        keep = (chosen & ctx.visual) | (~seq.visual & seq.valid)
        index_, new_valid = keep_index(keep)
        cos, sin = prefill.position_embeddings or kwargs["position_embeddings"]
        batch = hidden.shape[0]
        prefill.position_embeddings = (
            gather_rows(cos.expand(batch, -1, -1), index_),
            gather_rows(sin.expand(batch, -1, -1), index_),
        )
        seq.hidden = gather_rows(hidden, index_)
        seq.valid = new_valid
        seq.positions = seq.positions.gather(1, index_)
        seq.token_id = seq.token_id.gather(1, index_).masked_fill(~new_valid, -1)
        return seq.hidden

    # --- decode ---------------------------------------------------------------------------------------------------
    def _start_decode(self, kwargs: dict, past: int) -> dict:
        self._prefill = None  # in case an earlier forward raised half-way
        cache = self._cache
        if cache is None or cache.valid[0] is None or cache.valid[0].shape[1] != past:
            raise RuntimeError(
                "vtprune: this KV cache was not produced by the last pruned prefill of this pruner; start "
                "generation again from the prompt (with pixel_values) while the pruner is installed"
            )
        if kwargs.get("pixel_values") is not None:
            raise ValueError("vtprune: new images in a cached continuation are not supported; start a new prefill")
        ids = kwargs.get("input_ids")
        ref = ids if ids is not None else kwargs["inputs_embeds"]
        batch, q = ref.shape[:2]
        mask2d = kwargs.get("attention_mask")
        self._decode_valid = (mask2d[:, -q:].bool() if mask2d is not None
                              else torch.ones(batch, q, dtype=torch.bool, device=ref.device))
        positions = kwargs.get("position_ids")
        if positions is None:  # what the unpruned model would use: continue after the full prompt
            positions = (torch.arange(q, device=ref.device) + cache.original_length).expand(batch, q)
        cache.original_length += q
        kwargs.update(attention_mask=None, position_ids=positions - cache.position_shift[:, None])
        return kwargs

    def _decode_layer(self, index: int, hidden: torch.Tensor, kwargs: dict) -> None:
        cache = self._cache
        step_valid = self._decode_valid
        past = cache.valid[index]
        kwargs["attention_mask"] = attention_mask(past, step_valid, hidden.dtype, self.adapter.attn_implementation)
        cache.valid[index] = torch.cat([past, step_valid], dim=1)
        cache.visual[index] = torch.cat([cache.visual[index], torch.zeros_like(step_valid)], dim=1)

    def _trim_cache(self, kv_cache: Any) -> None:
        state = self._cache
        ctx = DecodeContext(self.adapter, kv_cache, state.valid, state.visual)
        for op in self.decode_ops:
            for layer, keep in op.trim(ctx).items():
                valid, visual = state.valid[layer], state.visual[layer]
                keep = (keep & visual & valid) | (~visual & valid)
                index, new_valid = keep_index(keep)
                cached = kv_cache.layers[layer]
                expanded = index[:, None, :, None].expand(-1, cached.keys.shape[1], -1, cached.keys.shape[-1])
                cached.keys = cached.keys.gather(2, expanded)
                cached.values = cached.values.gather(2, expanded)
                state.valid[layer] = new_valid
                state.visual[layer] = visual.gather(1, index) & new_valid
