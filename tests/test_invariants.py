"""Every method on every family it supports, with every runtime invariant: identity at full budget (SDPA and eager,
fp32 and bf16), KV-cache parity, left-padded batch parity with images of different sizes and different numbers of
images per sample, exact budgets per image / view, and exact restore."""
from __future__ import annotations

import pytest
import torch

import vtprune
from vtprune.methods.atp import _ATPStage
from vtprune.methods.csp import _Prune
from vtprune.methods.fastv import _FastVDrop
from vtprune.methods.feather import _FeatherCut
from vtprune.methods.mustdrop_stages import DualAttentionFilter
from vtprune.methods.pyramiddrop import _PyramidStage
from families import FAMILIES, greedy, pairs, picture
from test_atp import keep_everything_atp
from test_mustdrop import MUSTDROP_KEEP, check_mustdrop_budget

PROMPTS = [
    ["user:", picture(100, 190, 1), "what", "is", "in", "the", "image", "?", "assistant:"],
    ["user:", picture(160, 150, 2), "and", picture(90, 90, 3), "describe", "both", "assistant:"],
]
SINGLES = [[PROMPTS[0]], [PROMPTS[1]]]
BUDGET = {"llava": 9, "llava_next": 20, "qwen2_vl": 6, "qwen2_5_vl": 6}
PER_VIEW = {"fastervlm": 5, "tome": 16}  # per-view budgets (a view has 36 patches here)
CSP_KEEP = {"llava": 14, "llava_next": 50, "qwen2_vl": 10, "qwen2_5_vl": 10}  # layer averages reachable on 4 layers
_models: dict = {}


def model_for(family, attn="sdpa", dtype=torch.float32):
    key = (family.name, attn, dtype)
    if key not in _models:
        _models[key] = family.model(attn=attn, dtype=dtype)
    return _models[key]


def budget(family, method) -> dict:
    if method == "atp":  # learned counts: the keep-almost-everything initialisation prunes a few tokens
        return {"weights": "untrained"}
    if method in MUSTDROP_KEEP:  # per view: layer-averaged / entering the LLM / a decode floor (test_mustdrop.py)
        return {"keep": MUSTDROP_KEEP[method]}
    if method == "csp":  # layer-averaged; the scattering layer holds every token, so small averages are unreachable
        return {"keep": CSP_KEEP[family.name]}
    return {"keep": PER_VIEW.get(method, BUDGET[family.name])}


def full_budget(method) -> dict:
    return {"weights": keep_everything_atp()} if method == "atp" else {"ratio": 1.0}


def ids(pair):
    return f"{pair[0].name}-{pair[1]}"


def _valid_logits(logits, inputs):
    return logits[inputs["attention_mask"].bool()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("pair", pairs(), ids=ids)
def test_full_budget_is_identity(pair, attn, dtype):
    family, method = pair
    if dtype == torch.bfloat16 and attn == "eager":
        pytest.skip("bf16 runs on SDPA (the default); eager is covered in fp32")
    model = model_for(family, attn, dtype)
    inputs = family.inputs(PROMPTS)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    with torch.no_grad():
        reference = model(**inputs).logits
        reference_tokens, reference_steps = greedy(model, inputs)
        with vtprune.apply(model, method, **full_budget(method)) as pruner:
            logits = model(**inputs).logits
            tokens, steps = greedy(model, inputs)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(_valid_logits(logits, inputs), _valid_logits(reference, inputs), atol=tolerance,
                               rtol=tolerance)
    assert torch.equal(tokens, reference_tokens)
    torch.testing.assert_close(steps, reference_steps, atol=tolerance, rtol=tolerance)
    assert torch.equal(pruner.stats.visual_tokens[:, -1], pruner.stats.original_visual_tokens)


def _fixed_scores(self, ctx):
    # A score that does not depend on the query token, so recomputing without a cache ranks identically.
    return ctx.rows.float().mul(7919).remainder(97)


@pytest.mark.parametrize("pair", pairs(), ids=ids)
def test_cache_parity(pair, monkeypatch):
    """Pruned generate with the KV cache == recomputing the pruned prompt from scratch at every step."""
    family, method = pair
    for operator in (_FastVDrop, _PyramidStage, _FeatherCut, _Prune):  # in-LLM scores read the last token
        monkeypatch.setattr(operator, "scores", _fixed_scores)
    monkeypatch.setattr(_ATPStage, "scores", lambda self, ctx: (_fixed_scores(self, ctx) / 97,) * 3)
    monkeypatch.setattr(DualAttentionFilter, "scores", lambda self, ctx: (_fixed_scores(self, ctx) / 97,) * 2)
    params = budget(family, method)
    if method == "mustdrop_decode":  # decode-time cache policies differ from a recomputation by design
        pytest.skip("a decode-only stage: its oracle (== the recomputation with its entries masked) is in "
                    "test_mustdrop.py")
    if method == "mustdrop":
        params["decode"] = False  # the same: checked in test_mustdrop.py
    model = model_for(family)
    inputs = family.inputs(PROMPTS)
    with torch.no_grad(), vtprune.apply(model, method, **params):
        cached = greedy(model, inputs, steps=5)
        recomputed = greedy(model, inputs, steps=5, use_cache=False)
    assert torch.equal(cached[0], recomputed[0])
    torch.testing.assert_close(cached[1], recomputed[1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("pair", pairs(), ids=ids)
def test_batch_parity(pair):
    """A left-padded batch (different lengths, image sizes and image counts) == each sample alone."""
    family, method = pair
    model = model_for(family)
    with torch.no_grad(), vtprune.apply(model, method, **budget(family, method)) as pruner:
        tokens, logits = greedy(model, family.inputs(PROMPTS))
        counts = pruner.stats.visual_tokens.clone()
        per_image = pruner.stats.tokens_per_image
        for row, single in enumerate(SINGLES):
            alone_tokens, alone_logits = greedy(model, family.inputs(single))
            assert torch.equal(tokens[row], alone_tokens[0]), f"sample {row}"
            torch.testing.assert_close(logits[row], alone_logits[0], atol=1e-4, rtol=1e-4)
            assert torch.equal(counts[row], pruner.stats.visual_tokens[0])
            assert torch.equal(per_image[row], pruner.stats.tokens_per_image[0])


def _content(stats, sample, image):
    return stats.tokens_per_partition[sample][image].sum(0)


@pytest.mark.parametrize("pair", pairs(), ids=ids)
def test_exact_budgets(pair):
    """Each image (or each view, for per-view methods) keeps exactly its budget, or all it has."""
    family, method = pair
    if method == "atp":
        pytest.skip("atp learns its counts per image; its count oracles are in test_atp.py")
    model = model_for(family)
    inputs = family.inputs(PROMPTS)
    keep = budget(family, method)["keep"]
    with torch.no_grad():
        with vtprune.apply(model, method, ratio=1.0) as full:
            model(**inputs)
        with vtprune.apply(model, method, keep=keep) as pruned:
            model(**inputs)
    depth = len(model.model.language_model.layers)
    last = depth - 1
    separators = vtprune.get_method(method)().separators
    for b in range(2):
        for i in range(full.stats.images[b]):
            have_all = full.stats.tokens_per_image[b][i, last]
            have_content = _content(full.stats, b, i)[last]
            got_all = pruned.stats.tokens_per_image[b][i, last]
            got_content = _content(pruned.stats, b, i)[last]
            views = pruned.stats.tokens_per_partition[b][i][:, last]
            if method in MUSTDROP_KEEP:
                check_mustdrop_budget(method, keep, full.stats, pruned.stats, b, i, depth)
            elif method == "csp":  # keep = the image's content tokens averaged over layers, K after prune_from
                content = _content(pruned.stats, b, i).double()
                assert abs(float(content.mean()) - min(keep, int(have_content))) <= 0.5
                plan = vtprune.get_method("csp")(keep=keep).plan(int(have_content), depth)
                assert content.tolist() == plan.profile
            elif method == "pyramiddrop":  # keep = the image's tokens averaged over layers (within 0.5 here)
                profile = pruned.stats.tokens_per_image[b][i].double()
                assert abs(float(profile.mean()) - min(keep, int(have_all))) <= 0.5
                assert bool((profile[1:] <= profile[:-1]).all())
            elif method == "fastervlm":
                assert torch.equal(views, full.stats.tokens_per_partition[b][i][:, last].clamp(max=keep))
            elif method == "tome":
                assert bool((views <= keep).all())
                if family.name == "llava":
                    assert got_all == keep
            elif method == "hired":  # floored shares (the paper): at most keep, less than a token per view short
                assert min(keep, int(have_content)) - len(views) < got_content <= min(keep, int(have_content))
            elif separators == "candidates":
                assert got_all == min(keep, int(have_all))
            else:
                assert got_content == min(keep, int(have_content))
            if separators == "keep":
                assert got_all - got_content == have_all - have_content
    if method == "fastv":  # layers before K see every token
        assert torch.equal(pruned.stats.visual_tokens[:, 0], pruned.stats.original_visual_tokens)


def _snapshot(model):
    return (
        repr(model),
        {k: v.clone() for k, v in model.state_dict().items()},
        [(name, dict(m._forward_pre_hooks), dict(m._forward_hooks), dict(m.__dict__.get("_forward_hooks_always_called",
         {}))) for name, m in model.named_modules()],
        {name: sorted(k for k in m.__dict__ if not k.startswith("_")) for name, m in model.named_modules()},
        {name: m.__dict__.get("forward") for name, m in model.named_modules()},
    )


@pytest.mark.parametrize("pair", pairs(), ids=ids)
def test_remove_restores_model_exactly(pair):
    family, method = pair
    model = family.model(seed=3)
    inputs = family.inputs(PROMPTS)
    with torch.no_grad():
        reference = model(**inputs).logits
        before = _snapshot(model)  # after a plain forward: transformers installs its own capture hooks lazily
        pruner = vtprune.apply(model, method, **budget(family, method))
        greedy(model, inputs, steps=2)
        pruner.remove()
        after = model(**inputs).logits
    snapshot = _snapshot(model)
    assert snapshot[0] == before[0] and snapshot[2] == before[2] and snapshot[3] == before[3]
    assert snapshot[4] == before[4]
    assert all(torch.equal(before[1][k], v) for k, v in snapshot[1].items())
    assert torch.equal(after, reference)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_text_only_request_passes_through(family):
    model = model_for(family)
    inputs = family.inputs([["user:", "what", "is", "red", "?", "assistant:"], ["describe", "a", "blue", "image"]])
    with torch.no_grad():
        reference = greedy(model, inputs)
        with vtprune.apply(model, "random", keep=4) as pruner:
            out = greedy(model, inputs)
    assert torch.equal(out[0], reference[0]) and torch.equal(out[1], reference[1])
    assert pruner.stats is None


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
@pytest.mark.parametrize("method", ["fastv", "divprune"])
def test_a_text_only_row_beside_image_rows(family, method):
    """A batch mixing a request without images and one with: each row equals its run alone."""
    model = model_for(family)
    rows = [["describe", "a", "red", "image", "in", "the", "left", "of", "the", "picture", "."], PROMPTS[1]]
    with torch.no_grad(), vtprune.apply(model, method, **budget(family, method)) as pruner:
        tokens, logits = greedy(model, family.inputs(rows))
        counts = pruner.stats.visual_tokens.clone()
        text_alone = greedy(model, family.inputs(rows[:1]))
        image_alone = greedy(model, family.inputs(rows[1:]))
    assert torch.equal(tokens[0], text_alone[0][0]) and torch.equal(tokens[1], image_alone[0][0])
    torch.testing.assert_close(logits[0], text_alone[1][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[1], image_alone[1][0], atol=1e-4, rtol=1e-4)
    assert counts[0].sum() == 0 and counts[1, -1] > 0
