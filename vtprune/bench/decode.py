"""Decode-time KV memory and throughput of methods that act while decoding (``vtprune bench --decode-tokens N``).

SynthVQA answers are one word, too short for a decode policy to matter, so every configuration greedily generates a
fixed ``new_tokens`` continuation of the same prompts (end-of-sequence ignored: a mechanical measurement, not an
answer). Per step: the KV cache's bytes as allocated (evicted entries stay allocated until the runtime compacts the
cache) and its live entries (valid keys a step attends to); after the run: their means over the generated tokens,
the final values, and tokens per second of the decode steps (prefill excluded), unpruned and pruned side by side.
"""
from __future__ import annotations

import time
from typing import Any

import torch

from vtprune.bench.evaluate import to_model


def _kv_bytes(cache: Any) -> int:
    return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)


def _live_entries(cache: Any) -> int:
    """Valid cache entries summed over layers and batch rows (the runtime's track of each layer when pruned)."""
    state = getattr(cache, "_vtprune", None)
    if state is None:
        return sum(layer.keys.shape[0] * layer.keys.shape[2] for layer in cache.layers)
    return int(sum((track.rows >= 0).sum() for track in state.tracks))


@torch.no_grad()
def measure_decode(model, raw_inputs: dict[str, torch.Tensor], pruner_factory, new_tokens: int) -> dict[str, Any]:
    """Greedy decode of ``new_tokens`` tokens under ``pruner_factory()`` (a context manager; nullcontext: unpruned)."""
    inputs = to_model(model, raw_inputs)
    with pruner_factory():
        out = model(**inputs, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        mask = inputs["attention_mask"]
        kv, live = [], []
        start = time.perf_counter()
        for _ in range(new_tokens):
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
            out = model(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            kv.append(_kv_bytes(cache))
            live.append(_live_entries(cache))
        seconds = time.perf_counter() - start
    batch = mask.shape[0]
    return {
        "decode_tokens": new_tokens,
        "decode_kv_mb_mean": sum(kv) / len(kv) / 2**20,
        "decode_kv_mb_final": kv[-1] / 2**20,
        "decode_live_entries_mean": sum(live) / len(live) / batch,
        "decode_live_entries_final": live[-1] / batch,
        "decode_tokens_per_s": new_tokens * batch / seconds,
    }
