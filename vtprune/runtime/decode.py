"""Decoding on a pruned KV cache: which entries every layer holds, its mask at each step, evictions, and a cache
that reports and follows its logical length.

Layers that saw the same token set share one ``Track`` (so a step builds one mask per distinct set, not per layer).
The cache object itself carries the state (``cache._vtprune``), so several caches and threads work side by side, and
its ``get_seq_length``/``crop``/``reorder_cache``/``batch_*``/``reset`` are wrapped on the instance: generate() then
slices a continued prompt at the logical length (tokens seen, not entries kept), and beam search, assisted
decoding's crops and cache resets keep the state in step with the tensors.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch

from vtprune.runtime.sequence import attention_mask, keep_index


@dataclass(eq=False)
class Track:
    """The KV entries of a group of layers: ``rows`` [B, len] (the LLM-input row of each entry; generated tokens get
    rows >= n0; -1: padding or evicted), the position ``shift`` [B] of new tokens (renumbered layers), and whether
    every entry is valid (``clean``: one new token may then use SDPA's mask-free kernel)."""

    rows: torch.Tensor
    shift: torch.Tensor | None
    clean: bool
    mask: torch.Tensor | None = None
    rope: tuple[torch.Tensor, torch.Tensor] | None = None
    positions: torch.Tensor | None = None
    evicted_since_compaction: bool = False


class CacheState:
    """What a pruned cache holds, layer by layer (``tracks[l]``), and its logical ``length``."""

    def __init__(self, owner: Any, tracks: list[Track], length: int, first_generated: int,
                 visual_rows: torch.Tensor) -> None:
        self.owner = weakref.ref(owner)
        self.tracks = tracks
        self.length = length
        self.next_row = first_generated
        self.visual_rows = visual_rows  # [B, n0]: the LLM-input rows that are visual
        self.memory: dict[Any, Any] = {}  # decode operators' scratch space (batch-first tensors follow beams)
        self.step = 0
        self.new_valid: torch.Tensor | None = None
        self.soft = False  # filled under soft (training-mode) masks: no decoding

    def distinct(self) -> list[Track]:
        return list({id(track): track for track in self.tracks}.values())

    def visual(self, rows: torch.Tensor) -> torch.Tensor:
        inside = (rows >= 0) & (rows < self.visual_rows.shape[1])
        return self.visual_rows.gather(1, rows.clamp(0, self.visual_rows.shape[1] - 1)) & inside

    # --- following the cache's own operations ------------------------------------------------------------------
    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove >= 0:
            return
        for track in self.distinct():
            track.rows = track.rows[:, :tokens_to_remove]
        self.length += tokens_to_remove

    def select(self, index: torch.Tensor) -> None:
        index = index.to(self.visual_rows.device)
        for track in self.distinct():
            track.rows = track.rows[index]
            track.shift = None if track.shift is None else track.shift[index]
        self._per_row(lambda x: x[index.to(x.device)])

    def repeat(self, repeats: int) -> None:
        for track in self.distinct():
            track.rows = track.rows.repeat_interleave(repeats, dim=0)
            track.shift = None if track.shift is None else track.shift.repeat_interleave(repeats, dim=0)
        self._per_row(lambda x: x.repeat_interleave(repeats, dim=0))

    def _per_row(self, function) -> None:
        """Apply a batch reordering to the visual rows and to the batch-first tensors in ``memory``."""
        batch = self.visual_rows.shape[0]
        self.visual_rows = function(self.visual_rows)
        for key, value in self.memory.items():
            if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == batch:
                self.memory[key] = function(value)

    # --- a decode step ------------------------------------------------------------------------------------------
    def begin_step(self, new_valid: torch.Tensor, known_valid: bool, dtype: torch.dtype, implementation: str,
                   positions: torch.Tensor, rotary) -> None:
        """Append the step's q tokens to every track and build each track's mask (and RoPE when shifted).
        ``known_valid``: the new tokens are all real (no attention mask was given); otherwise a track stops being
        clean, since checking the mask would cost a host sync at every step."""
        q = new_valid.shape[1]
        rows = (torch.arange(q, device=new_valid.device) + self.next_row).expand_as(new_valid)
        rows = rows.masked_fill(~new_valid, -1)
        self.new_valid = new_valid
        for track in self.distinct():
            track.mask = self._mask(track, dtype, implementation)
            track.positions = None if track.shift is None else positions - track.shift[None, :, None]
            track.rope = None if track.shift is None else rotary(track.positions)
            track.rows = torch.cat([track.rows, rows], dim=1)
            track.clean = track.clean and known_valid
        self.next_row += q
        self.length += q

    def _mask(self, track: Track, dtype: torch.dtype, implementation: str,
              past: torch.Tensor | None = None) -> torch.Tensor | None:
        past = track.rows if past is None else past
        simple = track.clean and self.new_valid.shape[1] == 1  # a padding query's output is never used
        return attention_mask(past >= 0, self.new_valid, dtype, implementation, simple=simple)

    def evict(self, layer: int, evict: torch.Tensor, dtype: torch.dtype, implementation: str) -> Track:
        """Mark ``evict`` [B, len] (visual entries of ``layer``'s cache before this step) as gone, from this step on."""
        track = self.tracks[layer]
        old = evict.shape[1]
        gone = evict & self.visual(track.rows[:, :old])
        past = track.rows[:, :old].masked_fill(gone, -1)
        own = Track(torch.cat([past, track.rows[:, old:]], dim=1), track.shift, False, rope=track.rope,
                    positions=track.positions, evicted_since_compaction=True)
        own.mask = self._mask(own, dtype, implementation, past=past)
        self.tracks[layer] = own
        return own

    def drop(self, layer: int, gone: torch.Tensor, cache_layer: Any) -> None:
        """After prefill: remove ``gone`` [B, len] visual entries of ``layer`` from its cache for good."""
        track = self.tracks[layer]
        rows = track.rows.masked_fill(gone & self.visual(track.rows), -1)
        self.tracks[layer] = Track(rows, track.shift, False)
        self.compact(layer, cache_layer, 0, cache_layer.keys.dtype, "eager")

    def compact(self, layer: int, cache_layer: Any, new_tokens: int, dtype: torch.dtype,
                implementation: str) -> Track:
        """Physically drop ``layer``'s invalid entries (cache tensors and track alike); one host sync."""
        track = self.tracks[layer]
        old = track.rows.shape[1] - new_tokens
        past = track.rows[:, :old]
        index, valid = keep_index(past >= 0)
        expanded = index[:, None, :, None].expand(-1, cache_layer.keys.shape[1], -1, cache_layer.keys.shape[-1])
        cache_layer.keys = cache_layer.keys.gather(2, expanded)
        cache_layer.values = cache_layer.values.gather(2, expanded)
        past = past.gather(1, index).masked_fill(~valid, -1)
        own = Track(torch.cat([past, track.rows[:, old:]], dim=1), track.shift, bool(valid.all()), rope=track.rope,
                    positions=track.positions)
        if new_tokens:
            own.mask = self._mask(own, dtype, implementation, past=past)
        self.tracks[layer] = own
        return own


def adopt(cache: Any, state: CacheState) -> None:
    """Attach ``state`` to ``cache`` and wrap the cache operations that must keep it in step (see module doc)."""
    cls = type(cache)
    cache.__dict__["_vtprune"] = state

    def get_seq_length(layer_idx: int = 0) -> int:
        owner = state.owner()
        if owner is None or not owner.installed:  # the stock model would read per-layer lengths as one: refuse
            raise RuntimeError(
                "this KV cache holds a pruned prompt (its layers keep different tokens) and its pruner was removed; "
                "continue it with that pruner installed, or start a new generation from the prompt"
            )
        return state.length

    def crop(tokens_to_remove: int) -> None:
        cls.crop(cache, tokens_to_remove)
        state.crop(tokens_to_remove)

    def reorder_cache(beam_idx: torch.Tensor) -> None:
        cls.reorder_cache(cache, beam_idx)
        state.select(beam_idx)

    def batch_select_indices(indices: torch.Tensor) -> None:
        cls.batch_select_indices(cache, indices)
        state.select(indices)

    def batch_repeat_interleave(repeats: int) -> None:
        cls.batch_repeat_interleave(cache, repeats)
        state.repeat(repeats)

    def reset() -> None:
        cls.reset(cache)
        release(cache)

    for function in (get_seq_length, crop, reorder_cache, batch_select_indices, batch_repeat_interleave, reset):
        cache.__dict__[function.__name__] = function


def release(cache: Any) -> None:
    """Forget vtprune's state on ``cache`` (a new prefill starts from an empty cache)."""
    for name in ("_vtprune", "get_seq_length", "crop", "reorder_cache", "batch_select_indices",
                 "batch_repeat_interleave", "reset"):
        cache.__dict__.pop(name, None)


def state_of(cache: Any) -> CacheState | None:
    return None if cache is None else cache.__dict__.get("_vtprune")
