"""`vtprune bench --task synthseg` end to end on a tiny random-weight MiniLISA in the reference geometry (576 image
tokens, 336-px SynthSeg scenes), saved and reloaded through the real ``MiniLisa.from_pretrained``."""
from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
from transformers import AutoProcessor, LlavaConfig, LlavaForConditionalGeneration

from vtprune import cli, reference
from vtprune.bench import synthseg as ss
from vtprune.bench.flops import layer_flops, text_config_dims
from vtprune.bench.evaluate import to_model
from vtprune.bench.seg_runner import (PREFERRED_METHODS, default_methods, match_budget, prompt_inputs,
                                      run_seg_bench)
from vtprune.bench.segmentation import evaluate_segmentation
from vtprune.methods import REGISTRY
from vtprune.reference.build import build_processor, build_tokenizer
from vtprune.reference.lisa import EXTRA_WORDS, SEG_TOKEN, MaskDecoder, MiniLisa, format_prompt

SAMPLES = 4  # one prompt per family
LAYERS = 8  # FastV's K is then 1 and 25% (144 per layer) is reachable: (576 + 7 * 82) / 8 = 143.75


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random MiniLISA folder: MiniLLaVA's config at toy width with SynthSeg's words and [SEG] in the vocabulary."""
    torch.manual_seed(0)
    tokenizer = build_tokenizer(EXTRA_WORDS)
    config = reference.build_config(len(tokenizer), vision_hidden=32, vision_layers=2, text_hidden=64,
                                    text_layers=LAYERS, text_intermediate=128)
    config.seg_token_id = tokenizer.convert_tokens_to_ids(SEG_TOKEN)
    model = MiniLisa(LlavaForConditionalGeneration(config), MaskDecoder(32, 64, width=8, pixel_width=4))
    folder = tmp_path_factory.mktemp("mini-lisa")
    model.save_pretrained(folder)
    build_processor(tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def run(checkpoint, tmp_path_factory):
    """The CLI's run with two methods at 25% and 100%, plus one learned-budget and one decode-only method that must
    be skipped: (report, printed text, output folder)."""
    out = tmp_path_factory.mktemp("bench")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        cli.main(["bench", "--task", "synthseg", "--model", str(checkpoint), "--methods", "fastv", "uniform", "atp",
                  "mustdrop_decode", "--budgets", "25%", "100%", "--samples", str(SAMPLES), "--batch-size", "2",
                  "--out", str(out)])
    return json.loads((out / "bench.json").read_text()), printed.getvalue(), out


def _rows(report):
    return {r["label"]: r for r in report["results"]}


def test_cli_runs_end_to_end(run):
    report, printed, out = run
    assert [r["label"] for r in report["results"]] == [
        "unpruned", "fastv@25%", "fastv@100%", "uniform@25%", "uniform@100%"]
    assert set(report["skipped"]) == {"atp", "mustdrop_decode@25%", "mustdrop_decode@100%"}  # decode-only: all
    assert "train-atp" in report["skipped"]["atp"] and "in place" in report["skipped"]["mustdrop_decode@25%"]
    assert report["samples"] == SAMPLES and report["image_tokens"] == 576 and report["layers"] == LAYERS
    assert report["table"] in printed and "| fastv@25% |" in report["table"] and "| blind box |" in report["table"]
    for record in [*report["results"], report["blind_box"]]:
        low, high = record["giou_ci"]
        assert low <= record["giou"] <= high
        assert record["ciou_ci"][0] <= record["ciou"] <= record["ciou_ci"][1]
        assert set(record["per_family"]) == set(ss.FAMILIES) and len(record["ious"]) == SAMPLES
    for record in report["results"][1:]:
        assert record["latency_ratio"] > 0 and record["budget_convention"]
    png = (out / "masks.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_unpruned_row_is_evaluate_segmentation(run, checkpoint):
    report = run[0]
    model, processor = MiniLisa.from_pretrained(checkpoint), AutoProcessor.from_pretrained(checkpoint)
    direct = evaluate_segmentation(model, processor, ss.load_split("test", SAMPLES), batch_size=2)
    base = report["results"][0]
    assert base["giou"] == direct["giou"] and base["ciou"] == direct["ciou"]
    assert base["ious"] == [round(v, 6) for v in direct["ious"]]
    assert 0 < base["giou"] < 1  # masks are neither empty nor everything: scores can move with pruning


def test_full_budget_reproduces_unpruned(run):
    rows = _rows(run[0])
    base, full, quarter = rows["unpruned"], rows["uniform@100%"], rows["uniform@25%"]
    assert full["giou"] == base["giou"] and full["ious"] == base["ious"] and full["ciou"] == base["ciou"]
    assert full["mean_visual_tokens"] == 576 and full["image_flops_share"] == 1.0 and full["flops_ratio"] == 1.0
    assert full["retention"] == 1.0
    assert quarter["ious"] != base["ious"]  # the comparison above can fail: pruning does change the masks


def test_pre_llm_method_keeps_144_tokens_in_every_layer(run, checkpoint):
    report = run[0]
    quarter = _rows(report)["uniform@25%"]
    assert quarter["params"] == {"ratio": 0.25} and quarter["calibrated"] is False and quarter["budget_matched"]
    assert quarter["visual_tokens_per_layer"] == [144.0] * LAYERS and quarter["mean_visual_tokens"] == 144.0
    # image FLOPs by hand: per prompt, sum over layers of F(text + 144) - F(text), against F(text + 576) - F(text)
    processor = AutoProcessor.from_pretrained(checkpoint)
    dims = text_config_dims(LlavaConfig.from_pretrained(checkpoint).text_config)
    samples = ss.load_split("test", SAMPLES)
    text = [len(processor(images=[s.image], text=[format_prompt(s.prompt)])["input_ids"][0]) - 576 for s in samples]
    added = [LAYERS * (layer_flops(t + n, *dims) - layer_flops(t, *dims)) for t in text for n in (144, 576)]
    assert quarter["image_flops_share"] == pytest.approx(sum(added[0::2]) / sum(added[1::2]), rel=1e-12)
    assert quarter["flops_ratio"] > quarter["image_flops_share"]  # text tokens are never pruned


def test_fastv_is_matched_to_the_layer_average(run):
    report = run[0]
    fastv = _rows(report)["fastv@25%"]
    keep = fastv["params"]["keep"]
    assert fastv["calibrated"] and fastv["budget_matched"] and fastv["resolved"] == {"layer": 1}
    assert fastv["visual_tokens_per_layer"] == [576.0] + [float(keep)] * (LAYERS - 1)
    assert abs(fastv["mean_visual_tokens"] - 144) <= report["match_tolerance"]
    assert fastv["mean_visual_tokens"] == pytest.approx((576 + 7 * keep) / 8)
    assert fastv["target_tokens_per_layer"] == 144.0 and "keep=82 (matched)" in report["table"]


def test_blind_box_row(run):
    report = run[0]
    blind = report["blind_box"]
    samples = ss.load_split("test", SAMPLES)
    masks = [ss.box_mask(tuple(blind["boxes"][s.family])) for s in samples]
    assert blind["giou"] == ss.segmentation_scores(masks, [s.mask for s in samples])["giou"]
    assert blind["train_prompts"] == 400
    assert blind["retention"] == pytest.approx(blind["giou"] / report["results"][0]["giou"])


def test_nominal_budgets_pass_the_methods_convention(checkpoint):
    model, processor = MiniLisa.from_pretrained(checkpoint), AutoProcessor.from_pretrained(checkpoint)
    report, examples = run_seg_bench(model, processor, ss.load_split("test", 2), ["fastv"], [0.25], match=False,
                                     speed_repeats=1, train_prompts=8, progress=False)
    fastv = report["results"][1]
    assert fastv["params"] == {"ratio": 0.25} and fastv["budget_matched"] is None
    assert fastv["mean_visual_tokens"] == (576 + 7 * 144) / 8
    assert set(examples) == {"unpruned", "blind box", "fastv@25%"} and len(examples["fastv@25%"]["masks"]) == 2


def test_matching_finds_a_count_the_method_can_realise(checkpoint):
    model, processor = MiniLisa.from_pretrained(checkpoint), AutoProcessor.from_pretrained(checkpoint)
    inputs = to_model(model.vlm, prompt_inputs(processor, ss.load_split("test", 1)))
    # pool realises only h x w grids (h, w <= 24): 35% = 201.6 is none, the nearest within reach is one
    pool = match_budget(model.vlm, "pool", {"ratio": 0.35}, 0.35 * 576, inputs, 576, tolerance=5.76)
    keep = pool["params"]["keep"]
    assert pool["matched"] and abs(keep - 201.6) <= 5.76 and pool["measured"] == keep
    assert any(keep % h == 0 and keep // h <= 24 for h in range(1, 25))
    # FEATHER keeps every image token up to its first cut: 10% is out of reach, the closest count is its least
    feather = match_budget(model.vlm, "feather", {"ratio": 0.1}, 57.6, inputs, 576, tolerance=5.76)
    assert not feather["matched"] and feather["params"] == {"keep": 1} and feather["measured"] > 57.6
    with pytest.raises(ValueError, match="cannot be written as h\\*w"):  # no matching asked: the refusal stands
        match_budget(model.vlm, "pool", {"ratio": 0.35}, 0.35 * 576, inputs, 576, tolerance=float("inf"))


def test_default_methods_put_the_papers_baselines_first():
    methods = default_methods()
    assert methods[:len([m for m in PREFERRED_METHODS if m in REGISTRY])] == [m for m in PREFERRED_METHODS
                                                                             if m in REGISTRY]
    assert sorted(methods) == sorted(REGISTRY)


def test_rerun_resumes_from_the_streamed_results(run, checkpoint):
    """A rerun into the same folder reuses every finished configuration (their records, latency included, come back
    unchanged) and measures only the new one; other options are refused, naming --fresh."""
    report, _, out = run
    lines = (out / "results.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["options"]["samples"] == SAMPLES
    assert [json.loads(line)["label"] for line in lines[1:]] == [r["label"] for r in report["results"]]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        cli.main(["bench", "--task", "synthseg", "--model", str(checkpoint), "--methods", "fastv", "uniform",
                  "random", "--budgets", "25%", "100%", "--samples", str(SAMPLES), "--batch-size", "2",
                  "--out", str(out), "--no-plots"])
    assert "resuming" in printed.getvalue()
    again = _rows(json.loads((out / "bench.json").read_text()))
    for label, record in _rows(report).items():
        for key in ("giou", "ciou", "ious", "latency_ratio", "mean_visual_tokens"):
            assert again[label][key] == record[key], (label, key)
    assert {"random@25%", "random@100%"} <= set(again)
    measured = [json.loads(line)["label"] for line in (out / "results.jsonl").read_text().splitlines()[1:]]
    assert measured == [r["label"] for r in report["results"]] + ["random@25%", "random@100%"]
    with pytest.raises(SystemExit, match="other options.*samples.*--fresh"):
        cli.main(["bench", "--task", "synthseg", "--model", str(checkpoint), "--methods", "fastv", "--samples",
                  str(SAMPLES + 1), "--out", str(out), "--no-plots"])


def test_bad_inputs_fail_with_the_fix(checkpoint, tmp_path):
    plain = tmp_path / "plain-llava"
    LlavaForConditionalGeneration.from_pretrained(checkpoint).save_pretrained(plain)
    with pytest.raises(SystemExit, match="not a MiniLISA checkpoint.*train-reference --model mini-lisa"):
        cli.main(["bench", "--task", "synthseg", "--model", str(plain), "--samples", "2"])
    with pytest.raises(SystemExit, match="--readme.*not used by --task synthseg"):
        cli.main(["bench", "--task", "synthseg", "--model", str(checkpoint), "--readme", "README.md"])
    with pytest.raises(SystemExit, match="--nominal-budgets is a --task synthseg option"):
        cli.main(["bench", "--nominal-budgets"])
    with pytest.raises(SystemExit, match="unknown method 'nope'"):  # one line from the CLI, not a traceback
        cli.main(["bench", "--task", "synthseg", "--model", str(checkpoint), "--methods", "nope", "--samples", "2",
                  "--no-plots", "--out", str(tmp_path / "out")])


def test_train_reference_mini_lisa_calls_its_recipe(monkeypatch, tmp_path):
    from vtprune.reference import train_lisa

    calls = []
    monkeypatch.setattr(train_lisa, "train_lisa_reference", lambda output, **kw: calls.append((output, kw)) or {})
    with contextlib.redirect_stdout(io.StringIO()):
        cli.main(["train-reference", "--model", "mini-lisa", "--output", str(tmp_path / "lisa")])
    assert calls == [(str(tmp_path / "lisa"), {"base": reference.path(), "device": "cpu", "overwrite": False})]
