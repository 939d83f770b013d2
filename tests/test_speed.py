"""``vtprune speed``: geometries, the naive scorer, FLOPs accounting and the report (speed itself is measured by the
benchmark, never here: these runs take one round on tiny models and check what is recorded, not how fast)."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import vtprune
from tests.families import FAMILIES, IMAGE, picture
from vtprune.bench import speed
from vtprune.bench.flops import prefill_flops, text_config_dims, vision_block_flops, vision_flops
from vtprune.bench.geometry import GEOMETRIES, Geometry
from vtprune.bench.speed_probes import NaiveScorer, NaiveUnsupported, eager_language_model
from vtprune.methods import get_method
from vtprune.runtime import Pruner


def test_cli_geometries_are_the_registered_ones() -> None:
    from vtprune.cli import SPEED_GEOMETRIES

    assert tuple(GEOMETRIES) == SPEED_GEOMETRIES


@pytest.mark.parametrize("name,hidden,layers,visual", [("llava-1.5-7b", 4096, 32, 576),
                                                       ("llava-next-7b", 4096, 32, 2928),
                                                       ("qwen2.5-vl-7b", 3584, 28, 2304)])
def test_7b_geometries_have_the_checkpoints_dimensions(name: str, hidden: int, layers: int, visual: int) -> None:
    geometry = GEOMETRIES[name]
    config = geometry.config(None)
    assert (config.text_config.hidden_size, config.text_config.num_hidden_layers) == (hidden, layers)
    assert geometry.config(2).text_config.num_hidden_layers == 2
    # 7B of weights at full depth in fp32 would not fit a 24 GB machine; two layers do
    assert geometry.parameter_bytes(None, torch.float32) > 25 * 2**30 > 3 * geometry.parameter_bytes(2, torch.float32)
    if geometry.family != "qwen2_5_vl":  # building the Qwen tower for one count costs ~10 GB; its count is exact
        return
    assert geometry.image == (1344, 1344) and (1344 // 14) ** 2 // 4 == visual


def test_next_geometry_prompt_has_the_processor_count() -> None:
    """The 2x2 grid + base view of a 672x672 image: 576 + 48 x 48 crop tokens + 48 newlines, read from the model's
    own packing (a 2-layer model with a 1-block tower: packing does not depend on depth)."""
    geometry = GEOMETRIES["llava-next-7b"]
    config = geometry.config(1)
    config.vision_config.num_hidden_layers = 1
    config.text_config.hidden_size, config.text_config.intermediate_size = 64, 64
    config.text_config.num_attention_heads = config.text_config.num_key_value_heads = 2
    config.vision_config.hidden_size, config.vision_config.intermediate_size = 32, 32
    config.vision_config.num_attention_heads = 2
    from transformers import LlavaNextForConditionalGeneration

    model = LlavaNextForConditionalGeneration(config).eval()
    inputs = geometry.inputs(model)
    assert geometry.visual_tokens(inputs, model) == 576 + 48 * 48 + 48
    assert inputs["pixel_values"].shape == (1, 5, 3, 336, 336)
    with torch.no_grad(), vtprune.apply(model, "uniform", ratio=0.2) as pruner:  # the prompt is one the model takes
        model(**inputs, logits_to_keep=1)
    assert pruner.stats.original_visual_tokens.tolist() == [2928]


def test_qwen_geometry_prompt_runs_through_the_family() -> None:
    """The 1344x1344 image's patches, grid and placeholders fit the real Qwen2.5-VL classes (narrow 2-layer model,
    the checkpoint's patch and merge sizes): 96 x 96 patches, 2,304 merged tokens."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    geometry = GEOMETRIES["qwen2.5-vl-7b"]
    config = geometry.config(2)
    text = config.text_config
    text.hidden_size, text.intermediate_size, text.num_attention_heads, text.num_key_value_heads = 64, 64, 4, 2
    text.vocab_size = 151700
    text.rope_parameters["mrope_section"] = [2, 3, 3]
    vision = config.vision_config
    vision.depth, vision.hidden_size, vision.intermediate_size, vision.num_heads = 2, 32, 32, 2
    vision.out_hidden_size, vision.fullatt_block_indexes = 64, [1]
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    inputs = geometry.inputs(model)
    assert inputs["pixel_values"].shape == (96 * 96, 3 * 2 * 14 * 14)
    assert geometry.visual_tokens(inputs, model) == 2304
    with torch.no_grad(), vtprune.apply(model, "fastv", ratio=0.2) as pruner:
        model(**inputs, logits_to_keep=1)
    assert pruner.stats.original_visual_tokens.tolist() == [2304]


@dataclass(frozen=True)
class Tiny(Geometry):
    """A test family's tiny model in place of a checkpoint's geometry."""

    def config(self, layers):
        family = next(f for f in FAMILIES if f.name == self.family)
        return family.model(layers=layers or 6).config

    def build(self, layers, dtype, device, attn="sdpa", seed=0):
        family = next(f for f in FAMILIES if f.name == self.family)
        return family.model(attn=attn, layers=layers or 6, dtype=dtype).to(device)

    def inputs(self, model, batch=1, seed=0):
        family = next(f for f in FAMILIES if f.name == self.family)
        return family.inputs([["describe", picture(84, 84, seed), "what", "is", "in", "the", "image", "?"]] * batch)

    def visual_tokens(self, inputs, model):
        return int((inputs["input_ids"][0] == IMAGE).sum())


@pytest.mark.parametrize("method", ["fastv", "mustdrop_prefill"])
def test_naive_scorer_keeps_what_recomputed_rows_keep(method: str) -> None:
    """The papers' way (eager layer, its kept attention weights) and vtprune's (q/k rows recomputed) score the same
    tokens: the naive mode measures the cost of the way, not a different method."""
    family = FAMILIES[0]
    model = family.model(layers=4)
    inputs = family.inputs([["describe", picture(84, 84, 3), "what", "is", "in", "the", "image", "?"],
                            ["what", picture(84, 84, 4), "is", "red", "?"]])
    with torch.no_grad(), vtprune.apply(model, method, keep=9) as pruner:
        model(**inputs)
        kept = pruner.stats.final_tokens
    with torch.no_grad(), eager_language_model(model):
        pruner = Pruner(model, get_method(method)(keep=9))
        scorer = NaiveScorer(pruner)
        pruner.install()
        try:
            model(**inputs)
            naive = pruner.stats.final_tokens
        finally:
            pruner.remove()
            scorer.remove()
    assert model.model.language_model.config._attn_implementation == "sdpa"  # restored
    assert "llm_attention" not in pruner.adapter.__dict__
    assert all(torch.equal(a, b) for a, b in zip(kept, naive))


@pytest.mark.parametrize("method,reason", [("feather", "without RoPE"), ("pyramiddrop", "before that layer")])
def test_naive_mode_refuses_criteria_no_eager_layer_computed(method: str, reason: str) -> None:
    family = FAMILIES[0]
    model = family.model(layers=4)
    inputs = family.inputs([["describe", picture(84, 84, 3), "what", "?"]])
    with torch.no_grad(), eager_language_model(model):
        pruner = Pruner(model, get_method(method)(keep=9))
        scorer = NaiveScorer(pruner)
        pruner.install()
        try:
            with pytest.raises(NaiveUnsupported, match=reason):
                model(**inputs)
        finally:
            pruner.remove()
            scorer.remove()


def test_vision_flops_count_what_each_block_received() -> None:
    from transformers import CLIPVisionConfig

    config = CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2)
    d, m = 8, 16
    by_hand = 2 * 3 * (4 * 10 * d * d + 2 * 10 * 10 * d + 2 * 10 * d * m)
    assert vision_block_flops(3, 10, d, m) == by_hand
    assert vision_flops([(3, 10), (3, 10), (3, 6)], config, "llava") == 2 * by_hand + vision_block_flops(3, 6, d, m)
    # a windowed block attends within its window only
    assert vision_block_flops(1, 100, d, m, 3, attended=16) < vision_block_flops(1, 100, d, m, 3)


def test_speed_report_records_every_figure_and_the_bounds(tmp_path) -> None:
    geometry = Tiny("tiny", "llava", "test", (84, 84), (9,))
    settings = speed.Settings(repeats=1, warmup=0, decode_tokens=2, decode_batches=(1, 2))
    report = speed.run_speed(geometry, 4, ["fastv", "divprune", "feather"], [9], None, settings, progress=False)
    labels = [r["case"] for r in report["results"]]
    assert labels == ["unpruned", "fastv@9", "fastv@9 naive", "divprune@9", "feather@9"]
    assert "feather@9 naive" in report["skipped"] and "RoPE" in report["skipped"]["feather@9 naive"]
    assert report["layers"] == 4 and report["full_depth"] == 6 and report["machine"]["dtype"] == "float32"
    base, fastv, naive, divprune = report["results"][:4]
    model = geometry.build(4, torch.float32, "cpu")
    dims = text_config_dims(model.config.text_config)
    assert base["llm_flops"] == prefill_flops([report["prompt_tokens"]] * 4, *dims)
    assert divprune["tokens_per_layer"] == [report["prompt_tokens"] - report["visual_tokens"] + 9] * 4
    assert divprune["llm_flops"] == prefill_flops(divprune["tokens_per_layer"], *dims)
    assert divprune["vision_flops_ratio"] == 1.0 and divprune["bound_llm"] > 1
    assert fastv["tokens_per_layer"] == naive["tokens_per_layer"]  # same method, scored two ways
    for record in report["results"]:
        assert record["efficiency_llm"] == pytest.approx(record["speedup_llm"] / record["bound_llm"])
        assert set(record["decode_tokens_per_s"]) == {1, 2}
        assert record["kv_cache_mb"] > 0
    assert base["overhead"] is None and divprune["overhead"]["median"] > 0
    assert divprune["kv_ratio"] < 1
    path = speed.save(report, tmp_path)
    assert path.exists()
    from vtprune.bench.speed_report import format_decode_table, format_table, header, plot_speedup

    assert "TRUNCATED with --layers 4" in header(report)
    assert format_table(report).count("\n") == len(report["results"]) + 1
    assert "fastv@9 naive" in format_decode_table(report)
    assert plot_speedup(report, tmp_path).exists()


def test_cli_refuses_a_7b_geometry_that_does_not_fit(monkeypatch) -> None:
    from vtprune import cli
    from vtprune.bench import geometry

    monkeypatch.setattr(geometry, "available_memory_bytes", lambda: 8 * 2**30)
    with pytest.raises(SystemExit, match="--layers 2"):
        cli.main(["speed", "--geometry", "llava-1.5-7b"])
    with pytest.raises(SystemExit, match="give 1 to 32"):
        cli.main(["speed", "--geometry", "llava-1.5-7b", "--layers", "40"])


def test_reuse_vision_runs_the_tower_only_for_methods_inside_it() -> None:
    geometry = Tiny("tiny", "llava", "test", (84, 84), (9,))
    settings = speed.Settings(repeats=1, warmup=0, decode_tokens=0, reuse_vision=True, ttft=False)
    report = speed.run_speed(geometry, 4, ["fastv", "tome"], [9], [], settings, progress=False)
    base, fastv, tome = report["results"]
    assert base["vision_reused"] and fastv["vision_reused"] and not tome["vision_reused"]
    # the reused cases carry the tower's one measurement and its FLOPs; ToMe ran (and counted) its own merges
    assert fastv["vision"] == base["vision"] and fastv["vision_flops"] == base["vision_flops"]
    assert tome["vision_flops"] < base["vision_flops"]
    assert fastv["ttft"] is None and fastv["decode_tokens_per_s"] == {}
    assert fastv["prefill"]["median"] > fastv["vision"]["median"]  # the tower's time was added back
