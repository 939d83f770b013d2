"""ATP-LLaVA's oracles (the card's §11) on tiny random LLaVA models: counts and no revival, soft/hard agreement,
mask-vs-drop equivalence, instance-adaptive thresholds, the spatial floor, the budget loss moving the count, the
criterion against an independent computation, loading and refusals."""
from __future__ import annotations

import tempfile
from functools import cache
from pathlib import Path

import pytest
import torch

import vtprune
from vtprune.methods.atp import ATP, DEFAULTS, _ATPStage, redundancy_scores, save_atp
from vtprune.ops import sparsest_grid_stride
from conftest import GRID, N_VISUAL, batch, images, prompt, tiny_llava

PREFIX, SUFFIX = [1, 5, 6], [7, 8, 9, 10]


def _stage(layers=(1, 2, 3), **settings) -> _ATPStage:
    return _ATPStage(ATP(weights="untrained"), layers, {**DEFAULTS, **settings})


def _save(stage: _ATPStage, red_bias: float | None = None, spatial_bias: float | None = None) -> str:
    with torch.no_grad():
        for module in stage.modules_by_stage:
            if red_bias is not None:
                module.redundancy.weight.zero_()
                module.redundancy.bias.fill_(red_bias)
            if spatial_bias is not None:
                module.spatial.weight.zero_()
                module.spatial.bias.fill_(spatial_bias)
    return str(save_atp(Path(tempfile.mkdtemp()), stage, {"target": None}))


@cache
def keep_everything_atp() -> str:
    """Weights whose thresholds are ~0: every visual token scores above them, so nothing is pruned."""
    return _save(_stage(), red_bias=-60.0, spatial_bias=-60.0)


def _median_threshold_weights(model, inputs, monkeypatch, **settings) -> str:
    """Weights whose theta_r lies near the median redundancy score the first module sees on ``inputs`` (so it prunes
    about half there), in the widest gap between neighbouring scores of the middle third (no score sits on the
    threshold), with a sparse spatial floor (theta_s 0.73: stride-4 and stride-6 grid tokens only)."""
    firsts = []
    original = _ATPStage.scores

    def scores(self, ctx):
        out = original(self, ctx)
        firsts.append(out[0][ctx.candidate])
        return out

    monkeypatch.setattr(_ATPStage, "scores", scores)
    with torch.no_grad(), vtprune.apply(model, "atp", weights="untrained"):
        model(**inputs)
    monkeypatch.setattr(_ATPStage, "scores", original)
    values = firsts[0].double().sort().values
    third = len(values) // 3
    gaps = values[third + 1:2 * third + 1] - values[third:2 * third]
    k = third + int(gaps.argmax())
    threshold = float((values[k] + values[k + 1]) / 2)
    return _save(_stage(**settings), red_bias=float(torch.logit(torch.tensor(threshold, dtype=torch.float64))),
                 spatial_bias=1.0)


def _inputs(prompts=None, count=None):
    prompts = prompts or [prompt(PREFIX, SUFFIX), prompt([1], SUFFIX + [11, 12])]
    ids, mask = batch(prompts)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": images(count or len(prompts), seed=2)}


def _capture(monkeypatch):
    """Records every ATP transition (its context's rows and the Transition) without changing it."""
    seen = []
    original = _ATPStage.transform

    def transform(self, ctx):
        change = original(self, ctx)
        seen.append((ctx.layer, ctx.rows.clone(), ctx.candidate.clone(), change))
        return change

    monkeypatch.setattr(_ATPStage, "transform", transform)
    return seen


@pytest.fixture(scope="module")
def model():
    return tiny_llava(seed=4)


def test_counts_fall_stage_by_stage_and_nothing_comes_back(model, monkeypatch):
    """T1/T2: layers before the first module see every token; counts never rise; each stage's alive set is a
    subset of the previous one; text is untouched; positions are a strictly increasing subsequence (T11)."""
    inputs = _inputs()
    weights = _median_threshold_weights(model, inputs, monkeypatch)
    seen = _capture(monkeypatch)
    positions = {}

    def spy(index):
        def hook(module, args, kwargs):
            positions[index] = kwargs["position_ids"][0].clone()
        return hook

    layers = model.model.language_model.layers
    with torch.no_grad(), vtprune.apply(model, "atp", weights=weights) as pruner:
        handles = [layer.register_forward_pre_hook(spy(i), with_kwargs=True) for i, layer in enumerate(layers)]
        model(**inputs)
        for handle in handles:
            handle.remove()
    counts = pruner.stats.visual_tokens
    assert torch.equal(counts[:, 0], pruner.stats.original_visual_tokens)
    assert bool((counts[:, 1:] <= counts[:, :-1]).all()) and bool((counts[:, -1] < N_VISUAL).all())
    for row in range(2):
        alive = [set(rows[row][cand[row]].tolist()) for _, rows, cand, _ in seen]
        kept = [alive[s] - set(rows[row][cand[row] & ~change.keep[row]].tolist())
                for s, (_, rows, cand, change) in enumerate(seen)]
        for s in range(1, len(seen)):
            assert alive[s] == kept[s - 1]
    for layer in range(1, 4):
        assert bool((positions[layer][1:] > positions[layer][:-1]).all())
        assert set(positions[layer].tolist()) <= set(positions[0].tolist())


def test_soft_mask_above_one_half_is_the_hard_keep_set(model, monkeypatch):
    """T3: at the first module (identical inputs in both modes) hard keep == soft weight > 0.5, token by token."""
    inputs = _inputs()
    weights = _median_threshold_weights(model, inputs, monkeypatch)
    seen = _capture(monkeypatch)
    with torch.no_grad(), vtprune.apply(model, "atp", weights=weights) as pruner:
        model(**inputs)
        pruner.train()
        model(**inputs)
    (_, _, candidate, hard), (_, _, _, soft) = seen[0], seen[3]
    assert hard.keep is not None and soft.weight is not None
    assert torch.equal(hard.keep & candidate, (soft.weight > 0.5) & candidate)
    assert 0 < int((hard.keep & candidate).sum()) < int(candidate.sum())


def test_binary_soft_mask_gives_the_logits_of_physical_dropping(model, monkeypatch):
    """T4: with a very large temperature the training-mode mask is 0/1; keeping every token and masking keys gives
    the logits of the inference forward that drops them (original positions), through all three stages."""
    inputs = _inputs()
    weights = _median_threshold_weights(model, inputs, monkeypatch, temperature=1e7)
    with torch.no_grad(), vtprune.apply(model, "atp", weights=weights) as pruner:
        dropped = model(**inputs).logits[:, -1]
        dropped_counts = pruner.stats.visual_tokens.clone()
        pruner.train()
        masked = model(**inputs).logits[:, -1]
    assert bool((dropped_counts[:, -1] < dropped_counts[:, 0]).all())
    torch.testing.assert_close(masked, dropped, atol=1e-4, rtol=1e-4)


def test_thresholds_differ_between_instances_and_follow_the_scores(model):
    """T5: one module (non-saturated: default-initialised heads, theta near 0.5), two different images: different
    thresholds; the thresholds have a gradient w.r.t. the network's parameters."""
    stage = _stage()
    with torch.no_grad():
        for module in stage.modules_by_stage:
            for head in (module.redundancy, module.spatial):
                head.reset_parameters()
                head.bias.zero_()
    weights = _save(stage)
    same = _inputs([prompt(PREFIX, SUFFIX), prompt(PREFIX, SUFFIX)], count=1)
    same["pixel_values"] = same["pixel_values"].expand(2, -1, -1, -1).contiguous()
    different = _inputs()  # other images, prompt lengths and texts
    with vtprune.apply(model, "atp", weights=weights) as pruner:
        pruner.train()
        atp = pruner.layer_ops[0]
        with torch.no_grad():
            model(**same)
        twins = atp.record["theta_r"][1][:, 0]
        assert float(twins[0]) == float(twins[1])  # the same image and prompt: the same thresholds
        model(**different)
        theta_r = atp.record["theta_r"][1]
        assert abs(float((theta_r[0, 0] - theta_r[1, 0]).detach())) > 1e-6
        theta_r.sum().backward()
        module = atp.modules_by_stage[0]
        grads = [p.grad for p in (*module.trunk.parameters(), *module.redundancy.parameters())]
    assert all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)


def test_spatial_floor_survives_any_redundancy_threshold(model, monkeypatch):
    """T6: theta_r = 1 (no redundancy score exceeds it after max-normalisation): the first module keeps exactly the
    grid tokens whose spatial score beats theta_s, computed here from the grid coordinates."""
    theta_s = 0.7
    weights = _save(_stage(), red_bias=60.0, spatial_bias=float(torch.logit(torch.tensor(theta_s))))
    with torch.no_grad(), vtprune.apply(model, "atp", weights=weights) as pruner:
        model(**_inputs())
    rows, cols = torch.meshgrid(torch.arange(GRID), torch.arange(GRID), indexing="ij")
    expected = set()
    for r, c in zip(rows.flatten().tolist(), cols.flatten().tolist()):
        best = max([s for s in DEFAULTS["strides"] if r % s == 0 and c % s == 0], default=0)
        if best and 1 - DEFAULTS["spatial_lambda"] / best ** 2 > theta_s:
            expected.add(r * GRID + c)
    assert set(pruner.stats.kept_patches(0).nonzero().flatten().tolist()) == expected
    assert expected and len(expected) < N_VISUAL


def test_budget_loss_step_moves_the_soft_count_toward_the_target(model, monkeypatch):
    """T8: one optimiser step on |N_soft - target| lowers the gap; gradients reach every module."""
    inputs = _inputs()
    stage_weights = _median_threshold_weights(model, inputs, monkeypatch)
    depth = len(model.model.language_model.layers)
    with vtprune.apply(model, "atp", weights=stage_weights) as pruner:
        pruner.train()
        atp = pruner.layer_ops[0]
        optimiser = torch.optim.SGD(pruner.parameters(), lr=0.5)
        gaps = []
        for _ in range(2):
            model(**inputs)
            visual = pruner.stats.original_visual_tokens.float()
            average = atp.average_tokens(visual[:, None], depth)[:, 0]
            gap = ((average - 0.25 * visual).abs() / visual).mean()
            gaps.append(float(gap.detach()))
            optimiser.zero_grad()
            gap.backward()
            if len(gaps) == 1:  # the spatial heads get none while every redundancy mask beats the spatial one
                assert all(m.redundancy.bias.grad is not None and float(m.redundancy.bias.grad.abs()) > 0
                           for m in atp.modules_by_stage)
            optimiser.step()
    assert gaps[1] < gaps[0]


def test_redundancy_scores_against_a_loop():
    """Self score: mean over later visual rows of the same image, weighted; cross: mean over later text rows."""
    generator = torch.Generator().manual_seed(0)
    n = 9
    probs = torch.rand(1, n, n, generator=generator).tril()
    visual = torch.tensor([[0, 1, 1, 1, 0, 1, 1, 0, 0]], dtype=torch.bool)
    image = torch.tensor([[-1, 0, 0, 0, -1, 1, 1, -1, -1]])
    valid = torch.ones(1, n, dtype=torch.bool)
    weight = torch.tensor([[1, 1, 0.5, 0.25, 1, 1, 1, 1, 1]])
    self_score, cross = redundancy_scores(probs, visual, valid, image, weight)
    for j in range(n):
        rows = [i for i in range(j + 1, n) if visual[0, i] and image[0, i] == image[0, j]]
        total = sum(float(weight[0, i]) for i in rows)
        want = sum(float(weight[0, i] * probs[0, i, j]) for i in rows) / total if total else 0.0
        assert float(self_score[0, j]) == pytest.approx(want, abs=1e-6)
        text = [i for i in range(j + 1, n) if not visual[0, i]]
        assert float(cross[0, j]) == pytest.approx(sum(float(probs[0, i, j]) for i in text) / max(1, len(text)),
                                                   abs=1e-6)


def test_sparsest_grid_stride():
    rows, cols = torch.tensor([0, 0, 6, 3, 2, 5, -1]), torch.tensor([0, 4, 6, 9, 2, 5, 0])
    assert sparsest_grid_stride(rows, cols, (2, 3, 4, 6, 12)).tolist() == [12, 4, 6, 3, 2, 0, 0]


def test_criterion_rows_match_eager_attention():
    """The attention map the first module scores from == layer 0's eager attention (head mean)."""
    model = tiny_llava(attn="eager", seed=4)
    maps = {}

    def grab(module, args, output):
        maps[0] = output[1]  # returns None: the layer's output is left alone

    captured = {}
    original = _ATPStage.scores

    def scores(self, ctx):
        from vtprune.ops import reweight_keys  # the same reweighting as the operator (all weights 1 here)

        hidden, rope = ctx.previous_input
        n = ctx.valid.shape[1]
        order = torch.arange(n)
        key_mask = (order[None, :] <= order[:, None])[None] & ctx.valid[:, None, :]
        if ctx.layer == 1:  # the first module reads layer 0
            captured["probs"] = reweight_keys(ctx.adapter.llm_attention(0, hidden, rope, order.expand(len(hidden), n),
                                                                        key_mask).mean(1), ctx.valid.float())
        return original(self, ctx)

    _ATPStage.scores = scores
    try:
        with torch.no_grad(), vtprune.apply(model, "atp", weights="untrained"):
            hook = model.model.language_model.layers[0].self_attn.register_forward_hook(grab)
            model(**_inputs())
    finally:
        _ATPStage.scores = original
        hook.remove()
    torch.testing.assert_close(captured["probs"], maps[0].float().mean(1), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("params,message", [
    ({"keep": 64}, "learns how many tokens"),
    ({}, "ships them only for its reference"),
    ({"weights": "/nonexistent"}, "holds no atp_config.json"),
])
def test_refusals_name_the_fix(model, params, message):
    with pytest.raises(ValueError, match=message):
        vtprune.apply(model, "atp", **params)
    vtprune.apply(model, "atp", weights="untrained").remove()  # nothing was left installed


def test_weights_refuse_a_different_layer_setting(model):
    with pytest.raises(ValueError, match="differs from the weights"):
        vtprune.apply(model, "atp", weights=keep_everything_atp(), layers=(1, 3))


def test_train_atp_writes_weights_that_load_by_path(tmp_path):
    """A few steps of `train-atp` on the shipped MiniLLaVA: the folder holds the config (target, fingerprint,
    curve) and weights; they load by path and prune with hard masks; the curve logs the soft count."""
    from vtprune import reference
    from vtprune.reference.atp import train_atp

    model, processor = reference.load_reference()
    lines = []
    result = train_atp(model, processor, tmp_path / "atp", steps=2, batch_size=2, n_train=8, n_val=4,
                       eval_every=2, log=lines.append)
    config = (tmp_path / "atp" / "atp_config.json").read_text()
    assert '"target": 0.25' in config and '"base_fingerprint"' in config
    assert [c["step"] for c in result["curve"]] == [1, 2] and "val_accuracy" in result["curve"][-1]
    assert all(c["soft_tokens"] > 0 for c in result["curve"])
    inputs = processor(images=[reference.sample(0).image], text=["USER: <image>\nwhat? ASSISTANT:"],
                       return_tensors="pt")
    with torch.no_grad(), vtprune.apply(model, "atp", weights=str(tmp_path / "atp")) as pruner:
        model(**inputs)
    counts = pruner.stats.visual_tokens[0]
    assert counts[0] == 576 and bool((counts[1:] <= counts[:-1]).all())


def test_shipped_weights_load_by_name_on_the_shipped_model_only():
    """`vtprune.apply(model, "atp")` on the shipped MiniLLaVA finds the shipped modules (trained for 25% of the
    visual tokens on average over layers); the counts fall per layer and differ between images."""
    from vtprune import reference
    from vtprune.methods.atp import shipped_atp

    assert shipped_atp(), "no shipped ATP weights"
    model, processor = reference.load_reference()
    method = vtprune.get_method("atp")()
    from vtprune.models import adapter_for

    resolved = method.resolved(adapter_for(model))
    assert resolved["target"] == 0.25 and resolved["weights"].endswith("mini-llava-atp")
    samples = [reference.sample(i) for i in range(6)]
    inputs = processor(images=[s.image for s in samples],
                       text=[reference.format_prompt(s.question) for s in samples], return_tensors="pt",
                       padding=True, padding_side="left")
    with torch.no_grad(), vtprune.apply(model, "atp") as pruner:
        model(**inputs)
    counts = pruner.stats.visual_tokens
    assert bool((counts[:, 1:] <= counts[:, :-1]).all()) and bool((counts[:, -1] < 576).all())
    assert len(set(counts[:, -1].tolist())) > 1  # instance-adaptive
    other = tiny_llava()
    with pytest.raises(ValueError, match="ships them only"):
        vtprune.apply(other, "atp")


def test_a_batch_with_different_kept_counts_equals_single_runs(model, monkeypatch):
    """T10: two samples that keep different numbers of tokens, left-padded into one batch == each alone."""
    inputs = _inputs()
    weights = _median_threshold_weights(model, inputs, monkeypatch)
    with torch.no_grad(), vtprune.apply(model, "atp", weights=weights) as pruner:
        logits = model(**inputs).logits[:, -1]
        counts = pruner.stats.visual_tokens.clone()
        for row in range(2):
            alone = {"input_ids": inputs["input_ids"][row:row + 1], "pixel_values": inputs["pixel_values"][row:row + 1]}
            alone["attention_mask"] = inputs["attention_mask"][row:row + 1]
            width = int(alone["attention_mask"].sum())
            alone = {k: v[:, -width:] if k != "pixel_values" else v for k, v in alone.items()}
            single = model(**alone).logits[:, -1]
            torch.testing.assert_close(logits[row], single[0], atol=1e-4, rtol=1e-4)
            assert torch.equal(counts[row], pruner.stats.visual_tokens[0])
    assert not torch.equal(counts[0], counts[1])
