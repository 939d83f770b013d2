"""What ``vtprune speed`` attaches to a model to take its measurements: stage clocks (vision tower, language model),
vtprune's own time (its hooks, by ``torch.profiler.record_function`` ranges timed on the host), the tokens entering
each vision block (for the FLOPs count), and the naive scorer (the papers' way: the scoring layer's attention read
from an eager forward with its weights kept, instead of vtprune's recomputed q/k rows).

Everything here is bench machinery: it is attached to the bench's own random-weight model and removed after each
measurement. The library never switches a model to eager attention.
"""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

# The pruner's hooks and overrides: everything vtprune runs of its own during a forward (the vision tower, which its
# encoder override calls, is subtracted; see ``OverheadTimer``).
PRUNER_HOOKS = ("_before_top", "_after_top", "_before_multimodal", "_after_multimodal", "_before_language_model",
                "_before_layer", "_encode")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StageClock:
    """Wall time of the vision stage (tower + projector / merger) and of the language model in each forward, by
    forward hooks (CUDA: synchronised at each boundary, so use it only in the runs it times)."""

    def __init__(self, model: nn.Module, family: str) -> None:
        self.device = next(model.parameters()).device
        inner = model.model
        vision = [inner.visual] if family.startswith("qwen") else [inner.vision_tower, inner.multi_modal_projector]
        self.seconds: dict[str, float] = defaultdict(float)
        self._start: dict[str, float] = {}
        self._handles = []
        for name, modules in (("vision", vision), ("llm", [inner.language_model])):
            for module in modules:
                self._handles.append(module.register_forward_pre_hook(self._enter(name)))
                self._handles.append(module.register_forward_hook(self._leave(name), always_call=True))

    def _enter(self, name: str):
        def hook(module: nn.Module, args: Any) -> None:
            sync(self.device)
            self._start[name] = time.perf_counter()
        return hook

    def _leave(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            sync(self.device)
            self.seconds[name] += time.perf_counter() - self._start.pop(name)
        return hook

    def reset(self) -> None:
        self.seconds.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class OverheadTimer:
    """Time spent in the pruner's own hooks (``PRUNER_HOOKS``), each inside a ``record_function("vtprune::<hook>")``
    range so a profiler trace shows the same split. Wraps the pruner's bound methods on the instance before
    ``install()`` (the hooks bind them then). ``_encode`` runs the vision tower: the tower's own time (a
    ``StageClock``) is subtracted by the caller."""

    def __init__(self, pruner: Any) -> None:
        self.device = next(pruner.model.parameters()).device
        self.seconds: dict[str, float] = defaultdict(float)
        for name in PRUNER_HOOKS:
            setattr(pruner, name, self._wrap(name, getattr(pruner, name)))

    def _wrap(self, name: str, function):
        def timed(*args: Any, **kwargs: Any) -> Any:
            with torch.profiler.record_function(f"vtprune::{name.strip('_')}"):
                sync(self.device)
                start = time.perf_counter()
                try:
                    return function(*args, **kwargs)
                finally:
                    sync(self.device)
                    self.seconds[name] += time.perf_counter() - start
        return timed

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


class VisionTokens:
    """Tokens entering each vision block in a forward: [(sequences, tokens per sequence)] per block run."""

    def __init__(self, blocks: nn.ModuleList) -> None:
        self.counts: list[tuple[int, int]] = []
        self._handles = [block.register_forward_pre_hook(self._count, with_kwargs=True) for block in blocks]

    def _count(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        shape = hidden.shape
        self.counts.append((1, shape[0]) if hidden.dim() == 2 else (shape[0], shape[1]))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class NaiveUnsupported(ValueError):
    """The method's criterion is not the attention an earlier eager layer computed (naive mode does not apply)."""


class NaiveScorer:
    """The papers' way of scoring by attention: the language model runs in eager attention, the scoring layers keep
    their full [B, H, n, n] attention weights (what ``output_attentions=True`` returns), and the criterion reads its
    rows from them instead of recomputing q/k rows. Installed on the pruner's adapter instance for one measurement.

    A criterion without RoPE (FEATHER's) or on the layer about to run (PyramidDrop's) has no eager weights to read:
    ``NaiveUnsupported``.
    """

    def __init__(self, pruner: Any) -> None:
        adapter = pruner.adapter
        self.adapter = adapter
        self.weights: dict[int, torch.Tensor] = {}
        self._handles = []
        scoring = sorted({layer - 1 for op in pruner.layer_ops for layer in op.layers if layer >= 1})
        for index in scoring:
            attention = adapter.decoder_layers[index].self_attn
            self._handles.append(attention.register_forward_hook(self._keep(index)))
        adapter.llm_attention = self.llm_attention  # instance attribute: this pruner's adapter only

    def _keep(self, index: int):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if output[1] is not None:
                self.weights[index] = output[1]
        return hook

    def llm_attention(self, layer: int, layer_input: torch.Tensor, rope: Any, query_rows: torch.Tensor,
                      key_mask: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        if rope is None:
            raise NaiveUnsupported("its criterion scores q/k without RoPE, which no eager forward computes")
        weights = self.weights.pop(layer, None)
        if weights is None:
            raise NaiveUnsupported(f"it scores layer {layer}'s attention before that layer has run")
        heads, n = weights.shape[1], weights.shape[-1]
        rows = weights.gather(2, query_rows[:, None, :, None].expand(-1, heads, -1, n)).float()
        rows = rows * key_mask[:, None].to(rows.dtype)  # the criterion's keys (all it sees, or the visual ones)
        return rows / rows.sum(-1, keepdim=True).clamp_min(torch.finfo(rows.dtype).tiny)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self.adapter.__dict__.pop("llm_attention", None)
        self.weights.clear()


@contextlib.contextmanager
def eager_language_model(model: nn.Module) -> Iterator[None]:
    """The bench model's language model in eager attention for the block (naive mode), restored afterwards."""
    config = model.model.language_model.config
    previous = config._attn_implementation
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        config._attn_implementation = previous
