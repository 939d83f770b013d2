"""The hot-path rewrites of issue 14 give what the code they replaced gave, without the cost they removed.

Each rewrite is pinned against the replaced code (copied here as a reference) or against the slow path still in the
library, and its cost is checked by counting calls (host syncs, projections), never by timing.
"""
from __future__ import annotations

import collections
import contextlib

import pytest
import torch

import vtprune
import vtprune.models.clip
from tests.families import FAMILIES, picture
from vtprune.ops import max_min_diversity

SYNCS = ("__bool__", "__int__", "__index__", "__float__", "item", "tolist")


@contextlib.contextmanager
def count_syncs():
    """Counts the Tensor -> Python conversions (each a host-device sync on an accelerator) made inside the block."""
    counts: collections.Counter = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in SYNCS}

    def counting(name, original):
        def wrapper(self, *args, **kwargs):
            counts[name] += 1
            return original(self, *args, **kwargs)
        return wrapper

    for name, original in originals.items():
        setattr(torch.Tensor, name, counting(name, original))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


# --- DivPrune: the greedy loop without a host sync per kept token --------------------------------------------------
def _reference_max_min_diversity(features: torch.Tensor, k: int, eps: float = 1e-8) -> torch.Tensor:
    """The loop as it was before issue 14 (one ``int()`` per kept token)."""
    n = features.shape[0]
    unit = features.float() / features.float().norm(dim=-1, keepdim=True).clamp_min(eps)
    distance = 1.0 - unit @ unit.T
    distance.fill_diagonal_(float("inf"))
    first = int(distance.min(dim=0).values.argmax())
    distance.fill_diagonal_(0.0)
    selected = torch.zeros(n, dtype=torch.bool)
    selected[first] = True
    min_distance = distance[first].clone()
    picks = [first]
    for _ in range(k - 1):
        candidate = min_distance.masked_fill(selected, -float("inf"))
        nxt = int(candidate.argmax())
        picks.append(nxt)
        selected[nxt] = True
        min_distance = torch.minimum(min_distance, distance[nxt])
    return torch.tensor(sorted(picks), dtype=torch.long)


@pytest.mark.parametrize("seed", range(6))
def test_divprune_selection_equals_the_reference_loop(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(200, 16, generator=generator)
    if seed % 2:  # duplicates and exact ties, where the tie rule decides
        features[50:80] = features[10]
        features[120:130] = 0.0
    for k in (1, 2, 37, 130, 200):
        assert torch.equal(max_min_diversity(features, k), _reference_max_min_diversity(features, k)), k


def test_divprune_selection_makes_no_host_sync() -> None:
    features = torch.randn(300, 8, generator=torch.Generator().manual_seed(0))
    with count_syncs() as counts:
        max_min_diversity(features, 64)
    assert sum(counts.values()) == 0, counts
    with count_syncs() as before:  # the counter sees the syncs of the loop this replaced
        _reference_max_min_diversity(features, 64)
    assert sum(before.values()) >= 64


# --- ToMe: the ViT keys the attention projected, not projected again ------------------------------------------------
def _reference_block_step(layer, hidden_states, attention_bias, between):
    """``clip.block_step`` as it was before issue 14 (keys projected a second time)."""
    attention = layer.self_attn
    normed = layer.layer_norm1(hidden_states)
    attended, _ = attention(hidden_states=normed, attention_mask=attention_bias)
    hidden_states = hidden_states + attended
    views, n, _ = normed.shape
    keys = attention.k_proj(normed).view(views, n, attention.num_heads, attention.head_dim).mean(dim=2)
    hidden_states = between(hidden_states, keys)
    return hidden_states + layer.mlp(layer.layer_norm2(hidden_states))


def _llava_batch(family):
    return family.inputs([["describe", picture(90, 120, 1), "what", "is", "in", "the", "image", "?"],
                          ["what", picture(60, 60, 2), "is", "red", "?"]])


@pytest.mark.parametrize("family", [f for f in FAMILIES if f.name.startswith("llava")], ids=lambda f: f.name)
def test_tome_outputs_equal_the_reprojecting_block(family, monkeypatch) -> None:
    from vtprune.models import clip

    model, inputs = family.model(), _llava_batch(family)
    with torch.no_grad(), vtprune.apply(model, "tome", keep=12) as pruner:
        logits = model(**inputs).logits
        kept = [pruner.stats.kept_share(b) for b in range(2)]
    monkeypatch.setattr(clip, "block_step", _reference_block_step)
    with torch.no_grad(), vtprune.apply(model, "tome", keep=12) as pruner:
        assert torch.equal(model(**inputs).logits, logits)
        assert all(torch.equal(pruner.stats.kept_share(b), kept[b]) for b in range(2))


def test_tome_projects_each_blocks_keys_once() -> None:
    family = next(f for f in FAMILIES if f.name == "llava")
    model, inputs = family.model(), _llava_batch(family)
    layers = vtprune.models.clip.encoder_layers(model.model.vision_tower)
    calls = collections.Counter()
    handles = [layer.self_attn.k_proj.register_forward_hook(lambda m, a, o, i=i: calls.update([i]))
               for i, layer in enumerate(layers)]
    try:
        with torch.no_grad(), vtprune.apply(model, "tome", keep=12):
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    assert set(calls.values()) == {1}, calls  # merging blocks included



def test_tome_proportional_attention_makes_no_host_sync() -> None:
    """Proportional attention is switched on by a Python flag (an earlier block merged), not by testing the sizes on
    the device once per block: a forward with it syncs exactly as often as one without it."""
    family = next(f for f in FAMILIES if f.name == "llava")
    model, inputs = family.model(), _llava_batch(family)
    counts = []
    for proportional in (True, False):
        with torch.no_grad(), vtprune.apply(model, "tome", keep=12, proportional_attention=proportional) as pruner:
            assert len(pruner.vision_ops[0].blocks) > 1
            with count_syncs() as syncs:
                model(**inputs)
            counts.append(sum(syncs.values()))
    assert counts[0] == counts[1], counts


# --- FastV-type criteria: the previous layer's keys read from the KV cache ---------------------------------------
def _prompts(family):
    return family.inputs([["describe", picture(90, 120, 1), "what", "is", "in", "the", "image", "?"],
                          ["what", picture(60, 60, 2), "is", "red", "?"]])


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
@pytest.mark.parametrize("method", ["fastv", "csp", "feather:criterion_rope=true", "mustdrop_prefill"])
def test_scores_from_cached_keys_equal_recomputed_ones(family, method, monkeypatch) -> None:
    """With a cache (keys read from it) and without one (keys projected again): the same scores, kept sets and
    logits; and the scoring layer's k_proj runs once with the cache, twice without."""
    from vtprune.bench.runner import method_spec
    from vtprune.models.base import Adapter

    name, params = method_spec(method)
    model, inputs = family.model(), _prompts(family)
    scores: list[torch.Tensor] = []
    original = Adapter.llm_attention
    monkeypatch.setattr(Adapter, "llm_attention",
                        lambda *a, **k: scores.append(original(*a, **k)) or scores[-1])
    results = {}
    for use_cache in (True, False):
        scores.clear()
        with torch.no_grad(), vtprune.apply(model, name, ratio=0.5, **params) as pruner:
            layer = pruner.layer_ops[-1].layers[-1] - 1
            calls = []
            handle = model.model.language_model.layers[layer].self_attn.k_proj.register_forward_hook(
                lambda m, a, o: calls.append(o.shape[1]))
            try:
                logits = model(**inputs, use_cache=use_cache).logits
            finally:
                handle.remove()
            results[use_cache] = (logits, [pruner.stats.final_tokens[b] for b in range(2)], list(scores), len(calls))
    (cached_logits, cached_kept, cached_scores, cached_calls), (logits, kept, recomputed, calls) = \
        results[True], results[False]
    assert cached_scores and len(cached_scores) == len(recomputed)
    for a, b in zip(cached_scores, recomputed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert all(torch.equal(a, b) for a, b in zip(cached_kept, kept))
    torch.testing.assert_close(cached_logits, logits)
    assert cached_calls < calls  # the scoring layer's keys were not projected again


# --- decode steps: the one-row mask built directly ---------------------------------------------------------------
def _reference_mask(past_valid: torch.Tensor, valid: torch.Tensor, dtype: torch.dtype, implementation: str):
    """``attention_mask``'s general path as it was before issue 14, for a step after a cache."""
    batch, q = valid.shape
    causal = torch.ones(q, q, dtype=torch.bool).tril()
    diagonal = torch.eye(q, dtype=torch.bool)
    current = causal[None] & valid[:, None, :]
    current |= diagonal[None] & ~valid[:, :, None]
    mask = torch.cat([past_valid[:, None, :].expand(batch, q, -1), current], dim=-1)[:, None]
    if implementation == "sdpa":
        return mask
    return torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("q", [1, 3])
def test_decode_step_mask_equals_the_general_path(implementation: str, q: int) -> None:
    from vtprune.runtime.sequence import attention_mask

    generator = torch.Generator().manual_seed(q)
    past_valid = torch.rand(4, 9, generator=generator) > 0.3
    valid = torch.rand(4, q, generator=generator) > 0.5
    valid[0] = True
    mask = attention_mask(past_valid, valid, torch.float32, implementation, simple=False)
    assert torch.equal(mask, _reference_mask(past_valid, valid, torch.float32, implementation))


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_generation_with_padding_unchanged_by_the_step_mask(family, monkeypatch) -> None:
    """Left-padded batch (tracks not clean: a mask at every step): the same tokens and logits with the reference
    general-path mask."""
    from tests.families import greedy
    from vtprune.runtime import sequence

    model, inputs = family.model(), _prompts(family)
    with vtprune.apply(model, "fastv", keep=6):
        tokens, logits = greedy(model, inputs, steps=4)
    general = sequence.attention_mask

    def reference(past_valid, valid, dtype, implementation, key_weight=None, simple=None):
        if past_valid is not None and past_valid.shape[1] and valid.shape[1] == 1 and not simple:
            return _reference_mask(past_valid, valid, dtype, implementation)
        return general(past_valid, valid, dtype, implementation, key_weight, simple)

    monkeypatch.setattr("vtprune.runtime.decode.attention_mask", reference)
    with vtprune.apply(model, "fastv", keep=6):
        reference_tokens, reference_logits = greedy(model, inputs, steps=4)
    assert torch.equal(tokens, reference_tokens)
    assert torch.equal(logits, reference_logits)


# --- random: the pixels hashed without a copy of their bytes -------------------------------------------------------
@pytest.mark.parametrize("shape,dtype", [((3, 12, 12), torch.float32), ((5, 3, 8, 8), torch.bfloat16),
                                         ((64, 1176), torch.float32), ((3, 7, 5), torch.float16)])
def test_random_generator_seed_equals_the_copying_hash(shape, dtype) -> None:
    import hashlib
    from types import SimpleNamespace

    from vtprune.runtime.operators import PreLLMContext

    pixels = torch.randn(*shape, generator=torch.Generator().manual_seed(len(shape))).to(dtype)
    ctx = PreLLMContext(None, [SimpleNamespace(record=SimpleNamespace(pixels=pixels))], seed=3)
    bytes_ = pixels.to(torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes()  # the replaced code
    digest = hashlib.blake2b(bytes_, digest_size=7).digest()
    expected = torch.Generator().manual_seed(3 * 1_000_003 + int.from_bytes(digest, "little"))
    assert ctx.generator(0).initial_seed() == expected.initial_seed()


# --- every forward: the multimodal model's signature read once per class -------------------------------------------
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_cached_forward_signature_binds_like_inspect(family) -> None:
    import inspect

    from vtprune.runtime.pruner import Pruner, _signature

    model = family.model()
    inner = model.model
    assert _signature(inner.forward) == inspect.signature(inner.forward)
    assert _signature(inner.forward) is _signature(family.model().model.forward)  # one per class
    ids = torch.ones(1, 3, dtype=torch.long)
    for args, kwargs in (((ids,), {}), ((), {"input_ids": ids, "use_cache": True}), ((ids, None), {"foo": 1})):
        expected = inspect.signature(inner.forward).bind_partial(*args, **kwargs).arguments
        extra = expected.pop("kwargs", {})
        expected = {**expected, **extra}
        assert Pruner._bind(inner.forward, args, kwargs) == expected
