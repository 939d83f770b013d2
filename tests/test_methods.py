"""Method oracles on hand-made inputs, the registry, and layer scaling."""
from __future__ import annotations

import torch

import vtprune
from vtprune.models.llava import LlavaAdapter
from vtprune.ops import max_min_diversity
from conftest import N_VISUAL, batch, images, prompt, tiny_llava


def _kept(stats, sample=0):
    return stats.kept_patches(sample).nonzero().flatten()


def _run(model, name, **params):
    ids, mask = batch([prompt([1, 5], [7, 8])])
    pixels = images(1)
    with torch.no_grad(), vtprune.apply(model, name, **params) as pruner:
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    return pruner.stats


def test_fastervlm_keeps_top_cls_attention_of_the_feature_block(monkeypatch):
    model = tiny_llava()
    row = torch.tensor([(j % 7) + j / 1000 for j in range(N_VISUAL + 1)])
    calls = []

    def fake(self, trace, block, query_rows):
        calls.append(block)
        return row.expand(trace.hidden_states[block].shape[0], 4, len(query_rows), -1)

    monkeypatch.setattr(LlavaAdapter, "vision_attention", fake)
    stats = _run(model, "fastervlm", keep=8)
    patch_scores = row[1:]
    expected = patch_scores.argsort(descending=True, stable=True)[:8].sort().values
    assert torch.equal(_kept(stats), expected)
    assert calls == [2]  # vision_feature_layer=-2 of a 4-block ViT: output of block 2


def test_fastervlm_ignores_the_last_vit_block_and_follows_the_feature_block():
    model = tiny_llava()
    before = _kept(_run(model, "fastervlm", keep=8))
    with torch.no_grad():
        model.model.vision_tower.encoder.layers[3].self_attn.k_proj.weight.normal_()
    assert torch.equal(_kept(_run(model, "fastervlm", keep=8)), before)
    with torch.no_grad():
        model.model.vision_tower.encoder.layers[2].self_attn.k_proj.weight.normal_(std=3.0)
    after = _kept(_run(model, "fastervlm", keep=8))
    assert not torch.equal(after, before)


def test_divprune_selects_what_the_greedy_solver_selects_on_projected_features():
    model = tiny_llava()
    stats = _run(model, "divprune", keep=7)
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=images(1)).pooler_output[0]
    assert torch.equal(_kept(stats), max_min_diversity(features, 7))


def test_divprune_is_more_diverse_than_random():
    model = tiny_llava()
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=images(1)).pooler_output[0]
    unit = torch.nn.functional.normalize(features, dim=-1)

    def min_distance(index):
        d = 1 - unit[index] @ unit[index].T
        return d[~torch.eye(len(index), dtype=torch.bool)].min()

    diverse = min_distance(_kept(_run(model, "divprune", keep=8)))
    randoms = [min_distance(_kept(_run(model, "random", keep=8, seed=s))) for s in range(10)]
    assert all(diverse >= r for r in randoms)


def test_tome_delivers_size_weighted_mean_and_full_coverage():
    model = tiny_llava()
    stats = _run(model, "tome", keep=16)
    sources = stats.dense_sources(0)
    assert sources.shape == (16, N_VISUAL)
    assert torch.equal(sources.sum(0), torch.ones(N_VISUAL))  # every patch in exactly one merged token
    centre = (sources @ torch.arange(N_VISUAL).float()) / sources.sum(-1)
    assert torch.all(centre[1:] >= centre[:-1])  # raster order into the LLM


def test_uniform_and_pool_geometry():
    model = tiny_llava()
    uniform = _kept(_run(model, "uniform", keep=9))
    assert uniform.tolist() == [7, 9, 11, 19, 21, 23, 31, 33, 35]  # stride 2 on the 6x6 grid, cell centres
    pool = _run(model, "pool", keep=9).dense_sources(0)
    assert torch.allclose(pool[0, [0, 1, 6, 7]], torch.full((4,), 0.25))


def test_registry_lists_methods_with_stages_and_defaults():
    listing = {m["name"]: m for m in vtprune.methods()}
    assert set(listing) >= {"random", "uniform", "pool", "fastv", "fastervlm", "divprune", "tome"}
    assert listing["fastv"]["stages"] == ("layer",)
    assert listing["fastv"]["params"]["query"]["default"] == "last"
    assert listing["divprune"]["default_ratio"] == 0.098
    assert listing["tome"]["stages"] == ("vision", "pre_llm")


def test_fastv_default_layer_scales_with_depth():
    for layers, expected in [(4, 1), (8, 1), (16, 1), (32, 2), (40, 2)]:
        model = tiny_llava(layers=layers)
        stats = _run(model, "fastv")
        counts = stats.visual_tokens[0]
        assert int((counts == N_VISUAL).sum()) == expected
        assert counts[-1] == round(0.5 * N_VISUAL)


def test_readme_support_matrix_is_the_generated_one():
    from pathlib import Path

    from vtprune.methods import support_table

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = readme.split("<!-- support-matrix -->\n")[1].split("\n<!-- /support-matrix -->")[0]
    assert block == support_table(), "regenerate it with `vtprune methods --markdown`"


def test_support_matrix_follows_capabilities():
    matrix = vtprune.support_matrix()
    assert matrix["fastervlm"] == {"llava": True, "llava_next": True, "qwen2_vl": False, "qwen2_5_vl": False}
    assert matrix["tome"]["qwen2_vl"] is False and matrix["fastv"]["qwen2_5_vl"] is True
    listing = {m["name"]: m for m in vtprune.methods()}
    assert listing["fastervlm"]["families"] == ["llava", "llava_next"]
