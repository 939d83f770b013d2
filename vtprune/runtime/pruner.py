"""The runtime: installs a method's operators on a model with hooks, and removes them exactly.

What a forward meets, in order:
- the multimodal model's own encoder methods (``get_image_features``; Qwen also ``get_video_features``) are replaced
  on the instance: they run the vision stage (vision operators inside the ViT blocks) and return the stock features
  with a record per image (layout, vision trace). ``generate()`` calls them before the first forward and expands
  their output for beams and multiple return sequences like the stock output;
- pre-hooks on the top model (``labels``) and the multimodal model note what the call brings;
- a pre-hook on the language model turns the model's own inputs (image features scattered into the placeholders,
  the model's position ids, 1-D or M-RoPE) into the LLM-input sequence (the pre-LLM stage), or sets up a decode step
  on a pruned cache;
- a pre-hook on every decoder layer applies the layer operators and hands the layer its own mask and positions;
- forward hooks record the stats, adopt the KV cache (post-prefill trims) and align ``labels`` to the output.
Per-forward state lives in a thread-local and per-cache state on the cache, so two threads or two conversations do
not mix. The model keeps its attention implementation: attention rows are recomputed from q/k projections.
"""
from __future__ import annotations

import functools
import inspect
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vtprune.models import adapter_for, check_transformers
from vtprune.models.base import EncodedImages, Modality
from vtprune.runtime.decode import CacheState, Track, adopt, release, state_of
from vtprune.runtime.operators import (
    DecodeContext,
    DecodeOperator,
    DecodeStepContext,
    LayerContext,
    LayerOperator,
    PreLLMOperator,
    VisionOperator,
    VisionState,
)
from vtprune.runtime.prefill import SEPARATOR_POLICIES, Prefill, apply_transition, build_universe, place_images
from vtprune.runtime.sequence import attention_mask
from vtprune.runtime.stats import Stats

_ACTIVE: weakref.WeakKeyDictionary[nn.Module, weakref.ref] = weakref.WeakKeyDictionary()
_COPY_ERROR = (
    "this model has a vtprune pruner installed; a copy would be half-pruned, with hooks that belong to the original "
    "and cannot be removed. Copy the model before vtprune.apply() or after pruner.remove()"
)


class _Bound:
    """A hook or instance override owned by a pruner. It refuses copy.deepcopy and pickling (see ``_COPY_ERROR``);
    ``wraps`` gives it the wrapped method's name and signature, which ``generate()`` inspects."""

    def __init__(self, function, wraps=None) -> None:
        self.function = function
        if wraps is not None:
            functools.update_wrapper(self, wraps)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.function(*args, **kwargs)

    def __deepcopy__(self, memo: dict) -> Any:
        raise RuntimeError(_COPY_ERROR)

    def __reduce_ex__(self, protocol: int) -> Any:
        raise RuntimeError(_COPY_ERROR)


@dataclass
class _Call:
    """One forward of the model in one thread."""

    depth: int = 0
    input_ids: torch.Tensor | None = None
    encoded: dict[str, EncodedImages] = field(default_factory=dict)
    labels: torch.Tensor | None = None
    expect_language_model: bool = False
    prefill: Prefill | None = None
    stats: Stats | None = None
    decode: CacheState | None = None
    cache: Any = None


_MISSING = object()


class Pruner:
    """A method installed on a model. Use as a context manager or call ``remove()``.

    ``stats`` describes the last prefill (see ``Stats``); ``None`` after a request without images. Trainable
    operators: ``train()``/``eval()``, ``parameters()``, ``state_dict()``/``load_state_dict()``.
    """

    def __init__(self, model: nn.Module, method: Any) -> None:
        check_transformers()
        self.adapter = adapter_for(model)
        target = self.adapter.multimodal_model
        existing = _ACTIVE.get(target)
        if existing is not None and existing() is not None:
            raise RuntimeError(
                f"{type(model).__name__} already has a vtprune pruner ({existing().method.name}) on it or on the "
                "model that contains it; call .remove() on it (or leave its `with` block) before applying another"
            )
        self.model = model
        self.method = method
        self.positions = method.resolve_positions(self.adapter)
        self.separators = getattr(method, "separators", "rows")
        if self.separators not in SEPARATOR_POLICIES:
            raise ValueError(f"{method.name}: separators={self.separators!r} must be one of {SEPARATOR_POLICIES}")
        operators = method.operators(self.adapter)
        self.vision_ops = [op for op in operators if isinstance(op, VisionOperator)]
        pre_llm = [op for op in operators if isinstance(op, PreLLMOperator)]
        if len(pre_llm) > 1:
            raise ValueError("a method may contribute at most one pre-LLM operator")
        self.pre_llm_op = pre_llm[0] if pre_llm else None
        self.layer_ops = [op for op in operators if isinstance(op, LayerOperator)]
        self.decode_ops = [op for op in operators if isinstance(op, DecodeOperator)]
        self._validate_operators()
        self._vision_key = object() if self.vision_ops else None
        self._ops_at: dict[int, list[LayerOperator]] = {}
        for op in self.layer_ops:
            for layer in op.layers:
                self._ops_at.setdefault(layer, []).append(op)
        self._needs_input = {layer - 1 for op in self.layer_ops if op.needs_previous_input for layer in op.layers}
        self._step_ops: dict[int, list[DecodeOperator]] = {}
        for op in self.decode_ops:
            for layer in op.step_layers:
                self._step_ops.setdefault(layer, []).append(op)
        self.operator_modules = nn.ModuleList([op for op in operators if isinstance(op, nn.Module)])
        self.stats: Stats | None = None
        self.installed = False
        self._local = threading.local()
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._overrides: list[tuple[nn.Module, str, Any]] = []

    def _validate_operators(self) -> None:
        name = self.method.name
        depth = len(self.adapter.decoder_layers)
        for op in self.layer_ops:
            lowest = 1 if op.needs_previous_input else 0
            for layer in op.layers:
                if not lowest <= layer < depth:
                    raise ValueError(
                        f"{name}: layer {layer} is out of range; this model has {depth} decoder layers, so tokens can "
                        f"be dropped before layers {lowest}..{depth - 1}"
                    )
        for op in self.decode_ops:
            bad = [layer for layer in op.step_layers if not 0 <= layer < depth]
            if bad:
                raise ValueError(f"{name}: decode layers {bad} are out of range for {depth} decoder layers")
        if self.vision_ops:
            blocks = len(self.adapter.vision_layers)
            bad = [b for op in self.vision_ops for b in op.blocks if not 0 <= b < blocks]
            if bad:
                raise ValueError(f"{name}: vision blocks {bad} are out of range for a {blocks}-block tower")

    # --- lifecycle ------------------------------------------------------------------------------------------------
    def install(self) -> Pruner:
        target = self.adapter.multimodal_model
        _ACTIVE[target] = weakref.ref(self)
        self.installed = True
        device = next(self.model.parameters()).device
        self.operator_modules.to(device)
        if self.model is not target:
            self._hook(self.model, self._before_top, self._after_top)
        self._hook(target, self._before_multimodal, self._after_multimodal)
        for modality in self.adapter.modalities:
            if hasattr(target, modality.method):
                previous = getattr(target, modality.method)
                self._override(target, modality.method,
                               _Bound(functools.partial(self._encode, modality), wraps=previous))
        self._handles.append(self.adapter.language_model.register_forward_pre_hook(
            _Bound(self._before_language_model), with_kwargs=True))
        for index, layer in enumerate(self.adapter.decoder_layers):
            self._handles.append(layer.register_forward_pre_hook(
                _Bound(functools.partial(self._before_layer, index)), with_kwargs=True))
        for op in self.vision_ops:
            for block in op.blocks:
                layer = self.adapter.vision_layers[block]
                self._override(layer, "forward",
                               _Bound(functools.partial(self._vision_block, op, block, layer.forward)))
        return self

    def _hook(self, module: nn.Module, before, after) -> None:
        self._handles.append(module.register_forward_pre_hook(_Bound(before), with_kwargs=True))
        self._handles.append(module.register_forward_hook(_Bound(after), with_kwargs=True, always_call=True))

    def _override(self, module: nn.Module, name: str, value: Any) -> None:
        self._overrides.append((module, name, module.__dict__.get(name, _MISSING)))
        module.__dict__[name] = value

    def remove(self) -> None:
        """Uninstall: hooks removed, overridden methods restored to exactly what was there before (an earlier
        instance override, e.g. accelerate's, included)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module, name, previous in reversed(self._overrides):
            if previous is _MISSING:
                module.__dict__.pop(name, None)
            else:
                module.__dict__[name] = previous
        self._overrides.clear()
        self.installed = False
        self._local = threading.local()
        target = self.adapter.multimodal_model
        if target in _ACTIVE and _ACTIVE[target]() is self:
            del _ACTIVE[target]

    def __enter__(self) -> Pruner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # --- trainable operators -------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> Pruner:
        """Training mode for trainable operators (soft masks); the model's own mode is left alone."""
        self.operator_modules.train(mode)
        return self

    def eval(self) -> Pruner:
        return self.train(False)

    def parameters(self):
        return self.operator_modules.parameters()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.operator_modules.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True):
        return self.operator_modules.load_state_dict(state, strict=strict)

    @property
    def _soft(self) -> bool:
        return any(module.training for module in self.operator_modules)

    # --- per-forward bookkeeping -------------------------------------------------------------------------------------
    def _enter(self) -> _Call:
        call = getattr(self._local, "call", None)
        if call is None:
            call = self._local.call = _Call()
        call.depth += 1
        return call

    def _leave(self) -> _Call | None:
        call = getattr(self._local, "call", None)
        if call is not None:
            call.depth -= 1
            if call.depth <= 0:
                self._local.call = None
        return call

    def _before_top(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        call = self._enter()
        call.labels = kwargs.pop("labels", None)
        if call.labels is not None and kwargs.get("logits_to_keep", 0) != 0:
            raise ValueError("vtprune aligns labels to every output row; do not combine labels with logits_to_keep")
        return args, kwargs

    def _after_top(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        call = self._leave()
        if call is None or call.labels is None or output is None or getattr(output, "logits", None) is None:
            return
        labels = call.labels.to(output.logits.device)
        if call.stats is not None:  # this call's own prefill (another thread may have run one since)
            columns = call.stats.output_positions.to(labels.device)
            labels = labels.gather(1, columns.clamp_min(0)).masked_fill(columns < 0, -100)
        config = getattr(self.model.config, "text_config", self.model.config)
        output["loss"] = self.model.loss_function(logits=output.logits, labels=labels, vocab_size=config.vocab_size)

    def _before_multimodal(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        call = self._enter()
        bound = self._bind(module.forward, args, kwargs)
        call.input_ids = bound.get("input_ids")
        for name, output in (bound.get("mm_encoder_outputs") or {}).items():
            if output is not None:
                call.encoded[name] = output
        call.expect_language_model = True

    def _after_multimodal(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        call = self._leave()
        if call is None or output is None:
            return
        if call.prefill is not None:
            self.stats = call.stats = Stats(call.prefill, len(self.adapter.decoder_layers))
            cache = getattr(output, "past_key_values", None)
            if cache is not None:
                self._adopt(cache, call.prefill)
            call.prefill = None
        elif call.decode is not None:
            call.decode.step += 1
            call.decode = None

    @staticmethod
    def _bind(function, args: tuple, kwargs: dict) -> dict[str, Any]:
        try:
            bound = _signature(function).bind_partial(*args, **kwargs).arguments
        except TypeError:
            return dict(kwargs)
        extra = bound.pop("kwargs", {})
        return {**bound, **extra}

    # --- vision stage ------------------------------------------------------------------------------------------------
    def _encode(self, modality: Modality, *args: Any, **kwargs: Any) -> EncodedImages:
        """The multimodal model's encoder method while the pruner is installed."""
        state = VisionState() if self.vision_ops else None
        self._local.vision = state
        try:
            encoded = _encode_with(self.adapter, modality, args, kwargs, state, self._vision_key)
        finally:
            self._local.vision = None
        call = getattr(self._local, "call", None)
        if call is not None:
            call.encoded[modality.name] = encoded
        return encoded

    def _vision_block(self, op: VisionOperator, block: int, previous, hidden: torch.Tensor, *args: Any,
                      **kwargs: Any) -> torch.Tensor:
        state = getattr(self._local, "vision", None)
        if state is None:  # the tower called outside the pruner's encoding (e.g. directly): run it as it is
            return previous(hidden, *args, **kwargs)
        if state.size is None:  # first operator block: every token is one original token
            views, n, _ = hidden.shape
            state.size = hidden.new_ones(views, n, 1)
            state.owner = torch.arange(n, device=hidden.device).expand(views, n)
        return op.block_forward(self.adapter, block, state, hidden)

    # --- the language model --------------------------------------------------------------------------------------
    def _before_language_model(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        call = getattr(self._local, "call", None)
        if call is None or not call.expect_language_model:
            return None  # the language model called on its own: leave it alone
        call.expect_language_model = False
        if args:
            raise RuntimeError("vtprune expects the language model to be called with keyword arguments")
        cache = kwargs.get("past_key_values")
        state = state_of(cache)
        if state is not None and state.owner() is not self and state.length:
            raise RuntimeError("this KV cache was filled under another vtprune pruner; continue it with that pruner "
                               "installed, or start a new generation from the prompt")
        past = state.length if state is not None else (cache.get_seq_length() if cache is not None else 0)
        if past == 0:
            if cache is not None:
                release(cache)
            return self._start_prefill(call, kwargs)
        if state is None:
            self._refuse_images(call, "continuing a KV cache that this pruner did not fill")
            return None  # text continuing an unpruned cache: nothing to prune
        return self._start_decode(call, state, kwargs)

    @staticmethod
    def _refuse_images(call: _Call, situation: str) -> None:
        if call.encoded:
            raise ValueError(
                f"vtprune prunes images during the prefill of a prompt; {situation} with new images is not supported. "
                "Start a new generation from the full prompt (with its images) and an empty cache"
            )

    def _start_prefill(self, call: _Call, kwargs: dict) -> tuple[tuple, dict] | None:
        if not call.encoded:
            self.stats = None  # a request without images goes through untouched
            return None
        if call.input_ids is None:
            raise ValueError("vtprune needs `input_ids` to find the image tokens; pass input_ids, not inputs_embeds")
        embeds = kwargs["inputs_embeds"]
        batch, length = embeds.shape[:2]
        modalities = []
        for modality in self.adapter.modalities:
            if modality.name in call.encoded:
                encoded = call.encoded[modality.name]
                if getattr(encoded, "vision_key", self._vision_key) is not self._vision_key:
                    raise ValueError("vtprune: these images were encoded with another pruner's vision stage; encode "
                                     "them again under this pruner (pass pixel_values)")
                modalities.append((modality.token_id, encoded.images()))
        placed = place_images(call.input_ids, modalities)
        mask2d = kwargs.get("attention_mask")
        if mask2d is not None and mask2d.dim() != 2:
            raise ValueError("vtprune builds each layer's mask itself; pass a 2-D attention_mask (batch, sequence)")
        valid = mask2d.bool() if mask2d is not None else torch.ones(batch, length, dtype=torch.bool,
                                                                     device=embeds.device)
        if not bool(valid[:, -1].all()):
            raise ValueError("vtprune needs left-padded batches (the last token of every row must be real); set "
                             "processor.tokenizer.padding_side = 'left'")
        positions = self.adapter.positions_in(kwargs.get("position_ids"), batch, length, 0, embeds.device)
        universe = build_universe(self.adapter, embeds, valid, positions, placed, self.pre_llm_op, self.separators,
                                  self.positions == "renumber", getattr(self.method, "seed", 0) or 0,
                                  input_ids=call.input_ids)
        call.prefill = Prefill.start(universe, positions[0, :, -1] + 1, length)
        kwargs.update(inputs_embeds=universe.hidden, attention_mask=None,
                      position_ids=self.adapter.positions_out(universe.positions))
        return (), kwargs

    def _start_decode(self, call: _Call, state: CacheState, kwargs: dict) -> tuple[tuple, dict]:
        self._refuse_images(call, "continuing a pruned cache")
        if state.soft:
            raise RuntimeError("this cache was filled while trainable operators were in training mode (soft masks); "
                               "call pruner.eval() before generating")
        embeds = kwargs["inputs_embeds"]
        batch, q = embeds.shape[:2]
        mask2d = kwargs.get("attention_mask")
        new_valid = (mask2d[:, -q:].bool() if mask2d is not None and mask2d.dim() == 2
                     else torch.ones(batch, q, dtype=torch.bool, device=embeds.device))
        positions = self.adapter.positions_in(kwargs.get("position_ids"), batch, q, state.length, embeds.device)
        state.begin_step(new_valid, mask2d is None, embeds.dtype, self.adapter.attn_implementation, positions,
                         lambda shifted: self.adapter.rotary(embeds, shifted))
        call.decode = state
        call.cache = kwargs.get("past_key_values")
        kwargs.update(attention_mask=None, position_ids=self.adapter.positions_out(positions))
        return (), kwargs

    def _before_layer(self, index: int, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        call = getattr(self._local, "call", None)
        if call is None or (call.prefill is None and call.decode is None):
            return None
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if call.prefill is not None:
            hidden = self._prefill_layer(call.prefill, index, hidden, kwargs)
        else:
            self._decode_layer(call, index, hidden, kwargs)
        return (hidden, *args[1:]), kwargs

    # --- prefill layers ------------------------------------------------------------------------------------------
    def _prefill_layer(self, prefill: Prefill, index: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        prefill.tokens.hidden = hidden
        if prefill.rope is None:  # the language model's own RoPE for the LLM-input sequence
            prefill.rope = (prefill.tokens.version, kwargs["position_embeddings"])
        for op in self._ops_at.get(index, ()):
            change = op.transform(self._layer_context(prefill, index, kwargs.get("past_key_values")))
            apply_transition(prefill, change, self.separators, self.positions == "renumber")
        tokens, rope = prefill.tokens, self._rope(prefill)
        if index in self._needs_input:
            prefill.layer_inputs[index] = (tokens.hidden, rope)
        if prefill.mask is None or prefill.mask[0] != tokens.version:
            mask = attention_mask(None, tokens.valid, tokens.hidden.dtype, self.adapter.attn_implementation,
                                  key_weight=tokens.weight)
            prefill.mask = (tokens.version, mask)
        kwargs["attention_mask"] = prefill.mask[1]
        kwargs["position_embeddings"] = rope
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = self.adapter.positions_out(tokens.positions)
        prefill.tracks[index] = (tokens.rows, tokens.weight, prefill.shift)
        return tokens.hidden

    def _rope(self, prefill: Prefill) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE (cos, sin) of the current token set, recomputed only after a transition changed it."""
        tokens = prefill.tokens
        if prefill.rope[0] != tokens.version:
            prefill.rope = (tokens.version, self.adapter.rotary(tokens.hidden, tokens.positions))
        return prefill.rope[1]

    def _layer_context(self, prefill: Prefill, index: int, kv_cache: Any = None) -> LayerContext:
        universe, tokens = prefill.universe, prefill.tokens
        rope = self._rope(prefill)
        visual = tokens.lookup(universe.visual)
        return LayerContext(
            adapter=self.adapter, layer=index, hidden_states=tokens.hidden, valid=tokens.valid, visual=visual,
            candidate=tokens.lookup(universe.candidate), image=tokens.lookup(universe.image),
            partition=tokens.lookup(universe.partition), kind=tokens.lookup(universe.kind),
            grid=tokens.lookup(universe.grid), row=tokens.lookup(universe.row), col=tokens.lookup(universe.col),
            tags={name: tokens.lookup(tag) * tokens.valid for name, tag in universe.tags.items()},
            image_candidates=universe.image_candidates, positions=tokens.positions, rope=rope,
            rows=tokens.rows, universe_hidden=universe.hidden, universe_visual=universe.visual,
            universe_tags=universe.tags,
            token_ids=None if universe.token_ids is None else tokens.lookup(universe.token_ids),
            previous_input=prefill.layer_inputs.get(index - 1), training=self._soft, weight=tokens.weight,
            kv_cache=kv_cache,
        )

    # --- decoding ------------------------------------------------------------------------------------------------
    def _adopt(self, cache: Any, prefill: Prefill) -> None:
        layers = self.adapter.cache_layers(cache)
        tracks: dict[int, Track] = {}
        per_layer = []
        soft = False
        for index in range(len(self.adapter.decoder_layers)):
            rows, weight, shift = prefill.tracks[index]
            soft |= weight is not None
            key = (id(rows), id(shift))
            if key not in tracks:
                shift = shift if self.positions == "renumber" else None
                tracks[key] = Track(rows, shift, bool((rows >= 0).all()))
            per_layer.append(tracks[key])
            if layers[index].keys.shape[2] != rows.shape[1]:
                raise RuntimeError(f"vtprune: layer {index} cached {layers[index].keys.shape[2]} entries for "
                                   f"{rows.shape[1]} tokens; the cache was changed during the forward")
        state = CacheState(self, per_layer, prefill.input_length, prefill.universe.valid.shape[1],
                           prefill.universe.visual)
        state.soft = soft
        adopt(cache, state)
        if self.decode_ops:
            ctx = DecodeContext(self.adapter, cache, [t.rows for t in per_layer],
                                [state.visual(t.rows) for t in per_layer], prefill.universe.tags, state.memory)
            with torch.no_grad():
                for op in self.decode_ops:
                    for index, keep in op.trim(ctx).items():
                        state.drop(index, ~keep, layers[index])

    def _decode_layer(self, call: _Call, index: int, hidden: torch.Tensor, kwargs: dict) -> None:
        state = call.decode
        track = state.tracks[index]
        implementation = self.adapter.attn_implementation
        ops = self._step_ops.get(index)
        if ops:
            layer_cache = self.adapter.cache_layers(call.cache)[index]
            past = layer_cache.keys.shape[2]
            rope = track.rope or kwargs["position_embeddings"]
            for op in ops:
                rows = track.rows[:, :past]
                ctx = DecodeStepContext(self.adapter, index, state.step, hidden, rope, layer_cache.keys, rows,
                                        state.visual(rows), rows >= 0, state.memory)
                with torch.no_grad():
                    evict = op.step(ctx)
                if evict is not None:
                    track = state.evict(index, evict, hidden.dtype, implementation)
            interval = min(op.compact_interval for op in ops)
            if track.evicted_since_compaction and (state.step + 1) % interval == 0:
                track = state.compact(index, layer_cache, track.rows.shape[1] - past, hidden.dtype, implementation)
        kwargs["attention_mask"] = track.mask
        if track.rope is not None:
            kwargs["position_embeddings"] = track.rope
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = self.adapter.positions_out(track.positions)


@functools.lru_cache(maxsize=64)
def _method_signature(function: Any) -> inspect.Signature:
    """A class's method's signature with ``self`` bound (what ``inspect.signature`` of the bound method gives)."""
    return inspect.signature(functools.partial(function, None))


def _signature(function: Any) -> inspect.Signature:
    """The signature of a module's ``forward`` as its hooks bind it, cached per class method: it is read at every
    forward, decode steps included (~70 us uncached). A function set on the instance is not cached (it may belong to
    one object)."""
    underlying = getattr(function, "__func__", None)
    return inspect.signature(function) if underlying is None else _method_signature(underlying)


def _encode_with(adapter, modality: Modality, args: tuple, kwargs: dict, state: VisionState | None,
                 vision_key: object) -> EncodedImages:
    method = getattr(type(adapter.multimodal_model), modality.method)
    bound = inspect.signature(method).bind(adapter.multimodal_model, *args, **kwargs)
    bound.apply_defaults()
    arguments = {**bound.arguments, **bound.arguments.pop("kwargs", {})}
    records = adapter.encode(modality.method, arguments, lambda block: None if state is None else state.owner_at(block))
    return EncodedImages().attach(records, vision_key)


def encode_images(model: nn.Module, modality: str = "image", **inputs: Any) -> EncodedImages:
    """The images of ``inputs`` encoded once, for reuse by every pruner without a vision stage (pass them to the model
    as ``mm_encoder_outputs={modality: encoded}`` instead of pixel values): what ``vtprune bench`` does to time the
    vision tower once per batch, not once per method."""
    adapter = adapter_for(model)
    chosen = next(m for m in adapter.modalities if m.name == modality)
    with torch.no_grad():
        return _encode_with(adapter, chosen, (), inputs, None, None)
