"""`vtprune bench` end to end on a small random model in the reference geometry (576 visual tokens)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import LlavaForConditionalGeneration

from vtprune import reference
from vtprune.bench import synthvqa
from vtprune.bench.flops import prefill_flops
from vtprune.bench.plots import plot_report
from vtprune.bench.runner import format_table, readme_table, run_bench, save_report

RECORD_KEYS = {
    "method", "budget", "params", "accuracy", "retention", "per_family", "grounded_recall",
    "visual_tokens_per_layer", "llm_input_visual_tokens", "mean_visual_tokens", "prefill_tflops", "flops_ratio",
    "latency_ms", "latency_ratio", "latency_ratio_spread", "kv_cache_mb", "peak_memory_mb", "keep_frequency",
    "merges_tokens", "seconds",
}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    torch.manual_seed(0)
    config = reference.build_config(vision_hidden=32, vision_layers=6, text_hidden=64, text_layers=4,
                                    text_intermediate=128)
    model = LlavaForConditionalGeneration(config).eval()
    samples = synthvqa.load_split("test", 6)
    return run_bench(model, reference.build_processor(), samples, ["fastv", "tome", "pool"], [64, 144],
                     batch_size=3, speed_samples=1, speed_repeats=1, progress=False)


def test_report_schema_and_token_accounting(report, tmp_path):
    results = report["results"]
    assert [(r["method"], r["budget"]) for r in results] == [
        ("unpruned", None), ("fastv", 64), ("fastv", 144), ("tome", 64), ("tome", 144), ("pool", 64), ("pool", 144)]
    for record in results:
        assert RECORD_KEYS <= set(record), RECORD_KEYS - set(record)
        assert set(record["per_family"]) <= set(synthvqa.FAMILIES)
        assert np.array(record["keep_frequency"]).shape == (24, 24)
        low, high = record["accuracy_ci"]
        assert low <= record["accuracy"] <= high and record["scoring"] == "likelihood"
        assert len(record["correct"]) == report["samples"] and np.mean(record["correct"]) == record["accuracy"]
    base, fastv64, tome64 = results[0], results[1], results[3]
    assert base["visual_tokens_per_layer"] == [576.0] * 4 and base["grounded_recall"] == 1.0
    assert fastv64["visual_tokens_per_layer"] == [576.0, 64.0, 64.0, 64.0]  # K = 1 on a 4-layer LLM
    assert fastv64["mean_visual_tokens"] == (576 + 3 * 64) / 4
    assert tome64["visual_tokens_per_layer"] == [64.0] * 4
    # recall by weight: a patch averaged with 8 others into one token makes up 1/9 of it, with 3 others 1/4
    assert results[5]["grounded_recall"] == pytest.approx(1 / 9) and results[6]["grounded_recall"] == pytest.approx(1 / 4)
    assert 0 < tome64["grounded_recall"] < 1
    assert 0 < fastv64["flops_ratio"] < 1 and tome64["flops_ratio"] < fastv64["flops_ratio"]
    assert results[5]["kv_cache_mb"] < base["kv_cache_mb"]
    path = save_report(report, tmp_path)
    assert json.loads(path.read_text())["results"][1]["budget"] == 64
    table = format_table(report)
    assert "fastv@64" in table and "\nchance " in table
    legend = table[table.index("columns:"):]
    for column in ("acc", "ret%", "recall", "tok/L0", "tok/avg", "FLOPs", "lat", "lat±", "KV MB"):
        assert f"\n  {column} " in legend and column in report["legend"]
    assert json.loads(path.read_text())["legend"] == report["legend"]
    assert fastv64["resolved"] == {"layer": 1} and base.get("resolved") is None
    # merging is flagged (recall and heatmaps then weigh a patch by its share of the token); dropping is not
    assert [r["merges_tokens"] for r in results] == [False, False, False, True, True, True, True]
    for record in results:  # CPU: no allocator peak exists, so none is claimed (never a misleading 0)
        assert record["peak_memory_mb"] is None
        low, high = record["latency_ratio_spread"]
        assert 0 < low <= record["latency_ratio"] <= high
    chance = np.mean([synthvqa.chance_rate(s.family) for s in synthvqa.load_split("test", 6)])
    assert f"| chance (a uniform guess among each question's choices) | {100 * chance:.1f} |" in readme_table(report)
    for record in results:  # the kept share's bottom half: all of it for unpruned -> 0.5 exactly
        assert 0 <= record["kept_bottom_half"] <= 1
    assert base["kept_bottom_half"] == 0.5 and results[5]["kept_bottom_half"] == pytest.approx(0.5)
    assert base["mean_visual_tokens_per_sample"] == [576.0] * report["samples"]
    assert fastv64["visual_tokens_per_layer_spread"][1] == [64.0, 64.0, 64.0]


def test_flops_follow_the_documented_formula(report):
    text = reference.build_config(text_hidden=64, text_layers=4, text_intermediate=128).text_config
    kv = text.hidden_size // text.num_attention_heads * text.num_key_value_heads
    n = 100
    by_hand = 4 * 2 * (n * 64 * (2 * 64 + 2 * kv) + 2 * n * n * 64 + 3 * n * 64 * 128)
    assert prefill_flops([n] * 4, 64, kv, 128) == by_hand


def test_plots_are_written(report, tmp_path):
    paths = plot_report(report, tmp_path)
    assert {p.name for p in paths} == {"accuracy_vs_tokens.png", "accuracy_vs_flops.png", "keep_frequency.png"}
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_reusing_vit_outputs_changes_nothing():
    from vtprune.bench.evaluate import evaluate, make_batches
    from vtprune.bench.runner import encode_batches

    torch.manual_seed(1)
    config = reference.build_config(vision_hidden=32, vision_layers=6, text_hidden=64, text_layers=4,
                                    text_intermediate=128)
    model = LlavaForConditionalGeneration(config).eval()
    processor = reference.build_processor()
    samples = synthvqa.load_split("test", 4)
    batches = make_batches(processor, samples, 2, reference.format_prompt)
    cache = encode_batches(model, batches)
    for method in ("fastervlm", "fastv", "tome"):
        fresh = evaluate(model, processor, samples, method=method, params={"keep": 64}, batches=batches)
        cached = evaluate(model, processor, samples, method=method, params={"keep": 64}, batches=batches,
                          vision_cache=cache)
        assert fresh == cached


@pytest.mark.parametrize("method", ["fastv", "tome"])
def test_show_writes_overlay(method, tmp_path):
    from vtprune.bench.show import show

    torch.manual_seed(2)
    config = reference.build_config(vision_hidden=32, vision_layers=6, text_hidden=64, text_layers=4,
                                    text_intermediate=128)
    model = LlavaForConditionalGeneration(config).eval()
    sample = synthvqa.load_split("test", 1)[0]
    path = show(model, reference.build_processor(), sample, method, tmp_path / "show.png", reference.format_prompt,
                keep=64)
    from PIL import Image

    picture = np.asarray(Image.open(path).convert("RGB")).astype(float)
    from vtprune.bench.show import HEADER

    assert (picture[:HEADER] < 100).any() and (picture[HEADER + 336:] < 100).any()  # caption above, legend below
    overlay = picture[HEADER:HEADER + 336, 336 + 8:]
    original = picture[HEADER:HEADER + 336, :336]
    assert overlay.shape == original.shape == (336, 336, 3)
    dimmed = overlay.mean() < original.mean() * 0.9  # fastv: 512 of 576 patches dimmed
    outlined = (overlay == [255, 255, 0]).all(-1).sum() > 100  # tome: merged groups outlined in yellow
    assert dimmed if method == "fastv" else outlined


def test_budgets_as_counts_and_shares():
    from vtprune.bench.runner import budget_label, configs
    from vtprune.cli import _budget

    assert _budget("64") == 64 and _budget("20%") == pytest.approx(0.2) and _budget("0.4") == pytest.approx(0.4)
    for bad in ("0%", "1.5", "abc"):
        with pytest.raises(Exception, match="count|share"):
            _budget(bad)
    rows = configs(["hired"], [64, 0.2])
    assert [c.params for c in rows[1:]] == [{"keep": 64}, {"ratio": 0.2}]
    assert [c.label for c in rows] == ["unpruned", "hired@64", "hired@20%"] and budget_label(0.1) == "10%"
    (variant,) = configs(["hired:allocation_map=reference_bands,alpha=0.7"], [0.2])[1:]
    assert variant.name == "hired" and variant.params == {"allocation_map": "reference_bands", "alpha": 0.7,
                                                          "ratio": 0.2}
    with pytest.raises(ValueError, match="allocation_map"):
        configs(["hired:allocation_map=diagonal"], [64])
    with pytest.raises(ValueError, match="key=value"):
        configs(["hired:alpha"], [64])


def test_decode_measurement_counts_live_cache_entries():
    """Unpruned: every layer holds prompt + generated entries; FastV at layer K holds keep of the 576 visual entries
    in layers >= K (what the runtime's tracks say equals the arithmetic)."""
    import contextlib

    import vtprune
    from vtprune.bench.decode import measure_decode
    from vtprune.bench.evaluate import make_batches, prompt_builder

    torch.manual_seed(0)
    config = reference.build_config(vision_hidden=32, vision_layers=2, text_hidden=64, text_layers=4,
                                    text_intermediate=128)
    model = LlavaForConditionalGeneration(config).eval()
    processor = reference.build_processor()
    raw = make_batches(processor, synthvqa.load_split("test", 1), 1, prompt_builder(processor))[0]
    prompt = raw["input_ids"].shape[1]
    base = measure_decode(model, raw, contextlib.nullcontext, 5)
    assert base["decode_live_entries_final"] == 4 * (prompt + 5)
    pruned = measure_decode(model, raw, lambda: vtprune.apply(model, "fastv", keep=64, layer=2), 5)
    assert pruned["decode_live_entries_final"] == 2 * (prompt + 5) + 2 * (prompt - 576 + 64 + 5)
    assert pruned["decode_kv_mb_final"] < base["decode_kv_mb_final"]


def test_tokens_entering_the_llm_are_reported_by_view(report):
    by_label = {f"{r['method']}@{r['budget']}": r for r in report["results"]}
    assert by_label["unpruned@None"]["llm_input_tokens_by_view"] == {"base": 576, "crops": 0, "separators": 0}
    assert by_label["pool@64"]["llm_input_tokens_by_view"] == {"base": 64, "crops": 0, "separators": 0}
    assert by_label["fastv@64"]["llm_input_tokens_by_view"]["base"] == 576  # FastV drops inside the LLM


def test_every_configuration_is_checked_before_it_runs():
    """`plan` refuses what apply() would refuse, on a weightless skeleton too, so the CLI can check before loading."""
    from vtprune.bench.runner import plan

    config = reference.build_config(vision_hidden=32, vision_layers=6, text_hidden=64, text_layers=4,
                                    text_intermediate=128)
    with torch.device("meta"):
        skeleton = LlavaForConditionalGeneration(config).eval()
    todo, skipped = plan(skeleton, ["tome", "fastv"], [8, 64])
    assert [c.label for c in todo] == ["unpruned", "tome@64", "fastv@8", "fastv@64"]
    assert set(skipped) == {"tome@8"} and "use keep >= " in skipped["tome@8"]
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        plan(skeleton, ["nope"], [64])


def test_latency_warning_when_the_unpruned_row_is_off():
    from vtprune.bench.runner import latency_warning

    assert latency_warning({"latency_ratio": 1.02, "latency_ratio_spread": [0.97, 1.06]}) is None
    warning = latency_warning({"latency_ratio": 0.91, "latency_ratio_spread": [0.85, 1.04]})
    assert "gives 0.91 (range 0.85-1.04) instead of 1.00" in warning and "idle" in warning


def test_show_samples_are_different_scenes():
    from vtprune.bench.show import scene_sample

    picked = [scene_sample(i) for i in range(4)]
    assert len({s.scene_seed for s in picked}) == 4
    assert picked[0].question == synthvqa.load_split("test", 1)[0].question
