"""``vtprune bench``: methods x budgets on a model and SynthVQA, measured side by side in one run.

Per configuration: accuracy (closed-choice argmax of the next-token logits) overall and per family, retention
(% of the unpruned accuracy), grounded recall (share of question-relevant patches covered by visual tokens alive
after the last layer), visual tokens per LLM layer, analytic prefill FLOPs (``flops.py``), prefill latency as a
ratio to the unpruned model timed interleaved with it, KV-cache size after prefill and peak memory of the prefill.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

import vtprune
from vtprune.bench import synthvqa as sv
from vtprune.bench.flops import prefill_flops, text_config_dims
from vtprune.bench.memory import PeakMemory
from vtprune.bench.reference import closed_prediction
from vtprune.methods import get_method
from vtprune.runtime import encode_images

DEFAULT_BUDGETS = (64, 128, 192)


@dataclass
class Config:
    method: str | None  # None = unpruned
    budget: int | None
    params: dict[str, Any]

    @property
    def label(self) -> str:
        return "unpruned" if self.method is None else f"{self.method}@{self.budget}"

    def pruner(self, model):
        if self.method is None:
            return contextlib.nullcontext()
        return vtprune.apply(model, self.method, **self.params)


def configs(methods: Sequence[str], budgets: Sequence[int]) -> list[Config]:
    return [Config(None, None, {})] + [Config(m, b, {"keep": b}) for m in methods for b in budgets]


def _batches(processor, samples: Sequence[sv.Sample], batch_size: int, prompt) -> list[dict[str, torch.Tensor]]:
    batches = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        batches.append(processor(images=[s.image for s in chunk], text=[prompt(s.question) for s in chunk],
                                 return_tensors="pt", padding=True))
    return batches


def encode_batches(model, batches) -> dict[int, Any]:
    """ViT outputs of every batch, for configurations whose methods leave the ViT alone."""
    return {id(b["pixel_values"]): encode_images(model, pixel_values=b["pixel_values"]) for b in batches}


def _model_inputs(inputs: dict[str, torch.Tensor], pruner, vision_cache: dict[int, Any] | None) -> dict[str, Any]:
    """The batch, with its cached ViT output in place of the pixels when the method leaves the ViT alone."""
    if vision_cache is None or (pruner is not None and pruner.vision_ops):
        return inputs
    encoded = vision_cache.get(id(inputs["pixel_values"]))
    if encoded is None:
        return inputs
    return {**{k: v for k, v in inputs.items() if k != "pixel_values"}, "mm_encoder_outputs": {"image": encoded}}


def evaluate(model, processor, samples, config: Config, batches, prompt,
             vision_cache: dict[int, Any] | None = None) -> dict[str, Any]:
    """Accuracy, grounded recall, token profile and FLOPs of one configuration on ``samples``."""
    tokenizer = processor.tokenizer
    hidden, kv_width, mlp = text_config_dims(model.config.text_config)
    grid = sv.GRID
    correct, recall, flops = [], [], []
    per_layer: list[np.ndarray] = []
    keep_frequency = np.zeros((grid, grid))
    offset = 0
    for inputs in batches:
        with torch.no_grad(), config.pruner(model) as pruner:
            logits = model(**_model_inputs(inputs, pruner, vision_cache), logits_to_keep=1).logits[:, -1]
        chunk = samples[offset:offset + logits.shape[0]]
        text_tokens = inputs["attention_mask"].sum(1) - (inputs["input_ids"] == model.config.image_token_id).sum(1)
        for i, sample in enumerate(chunk):
            predicted = closed_prediction(logits[i], tokenizer, sample.choices)
            correct.append((sample.family, predicted == sample.answer))
            if pruner is None:
                visual = np.full(model.config.text_config.num_hidden_layers, grid * grid)
                kept = np.ones((grid, grid), dtype=bool)
            else:
                visual = pruner.stats.visual_tokens[i].numpy()
                kept = pruner.stats.kept_patches(i).numpy().reshape(grid, grid)
            per_layer.append(visual)
            keep_frequency += kept
            flops.append(prefill_flops(visual + int(text_tokens[i]), hidden, kv_width, mlp))
            if sample.relevant_patches.any():
                recall.append(float((kept & sample.relevant_patches).sum() / sample.relevant_patches.sum()))
        offset += logits.shape[0]
    families = {f: [ok for fam, ok in correct if fam == f] for f in sv.FAMILIES}
    profile = np.mean(per_layer, axis=0)
    return {
        "accuracy": float(np.mean([ok for _, ok in correct])),
        "per_family": {f: float(np.mean(v)) for f, v in families.items() if v},
        "grounded_recall": float(np.mean(recall)) if recall else None,
        "visual_tokens_per_layer": [round(float(v), 2) for v in profile],
        "llm_input_visual_tokens": float(profile[0]),
        "mean_visual_tokens": float(profile.mean()),
        "prefill_tflops": float(np.mean(flops)) / 1e12,
        "keep_frequency": (keep_frequency / len(samples)).round(4).tolist(),
    }


def measure_speed(model, config: Config, inputs: dict[str, torch.Tensor], repeats: int) -> dict[str, float]:
    """Prefill latency of ``config`` and of the unpruned model: best of ``repeats`` runs each, interleaved so that
    drift and interference hit both alike; KV-cache size after prefill; peak memory of one prefill."""
    baseline = Config(None, None, {})

    def prefill(cfg: Config) -> tuple[float, Any]:
        with torch.no_grad(), cfg.pruner(model):
            start = time.perf_counter()
            out = model(**inputs, use_cache=True, logits_to_keep=1)
            return time.perf_counter() - start, out.past_key_values

    prefill(config), prefill(baseline)  # warm-up
    times, base_times = [], []
    for _ in range(repeats):
        times.append(prefill(config)[0])
        base_times.append(prefill(baseline)[0])
    with PeakMemory(inputs["input_ids"].device) as memory:
        _, cache = prefill(config)
    kv_bytes = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)
    latency, base_latency = min(times), min(base_times)
    return {
        "latency_ms": latency * 1e3,
        "latency_ratio": latency / base_latency,
        "kv_cache_mb": kv_bytes / 2**20,
        "peak_memory_mb": memory.peak_mb,
    }


def run_bench(
    model,
    processor,
    samples: Sequence[sv.Sample],
    methods: Sequence[str],
    budgets: Sequence[int] = DEFAULT_BUDGETS,
    prompt=None,
    batch_size: int = 16,
    speed_samples: int = 2,
    speed_repeats: int = 5,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every (method, budget) and the unpruned model; returns the JSON-ready report."""
    from vtprune.bench.reference import format_prompt

    prompt = prompt or format_prompt
    model.eval()
    batches = _batches(processor, samples, batch_size, prompt)
    speed_inputs = _batches(processor, samples[:speed_samples], speed_samples, prompt)[0]
    vision_cache = encode_batches(model, batches)
    results = []
    todo = configs(methods, budgets)
    bar = tqdm(todo, desc="vtprune bench", disable=not progress)
    for config in bar:
        bar.set_postfix_str(config.label)
        record = {"method": config.method or "unpruned", "budget": config.budget, "params": config.params}
        if config.method is not None:
            record["budget_convention"] = get_method(config.method).budget_convention
        record.update(evaluate(model, processor, samples, config, batches, prompt, vision_cache))
        record.update(measure_speed(model, config, speed_inputs, speed_repeats))
        results.append(record)
    base = results[0]
    for record in results:
        record["retention"] = record["accuracy"] / base["accuracy"] if base["accuracy"] else None
        record["flops_ratio"] = record["prefill_tflops"] / base["prefill_tflops"]
    return {
        "samples": len(samples),
        "families": list(sv.FAMILIES),
        "chance": {f: sv.chance_rate(f) for f in sv.FAMILIES},
        "device": str(next(model.parameters()).device),
        "threads": torch.get_num_threads(),
        "flops_formula": "prefill LLM FLOPs, see vtprune/bench/flops.py (LLaMA 3-matrix MLP, 2 FLOPs per MAC)",
        "latency": f"best of {speed_repeats} prefills of a batch of {speed_samples}, interleaved with unpruned "
                   "(includes the ViT, which is computed afresh for every prefill)",
        "results": results,
    }


def format_table(report: dict[str, Any]) -> str:
    """A fixed-width table of the report, one row per configuration."""
    short = {"attribute": "attr", "existence": "exist", "counting": "count", "spatial": "spat",
             "localisation": "loc", "reading": "read"}
    head = (f"{'config':<16}{'acc':>6}{'ret%':>6} " + "".join(f"{short[f]:>6}" for f in report["families"])
            + f"{'recall':>7}{'tok/L0':>7}{'tok/avg':>8}{'FLOPs':>7}{'lat':>6}{'KV MB':>7}")
    lines = [head, "-" * len(head)]
    for r in report["results"]:
        label = "unpruned" if r["budget"] is None else f"{r['method']}@{r['budget']}"
        recall = r["grounded_recall"]
        lines.append(
            f"{label:<16}{r['accuracy']*100:6.1f}{(r['retention'] or 0)*100:6.1f} "
            + "".join(f"{r['per_family'].get(f, float('nan'))*100:6.1f}" for f in report["families"])
            + f"{(recall if recall is not None else float('nan'))*100:7.1f}{r['llm_input_visual_tokens']:7.0f}"
            + f"{r['mean_visual_tokens']:8.1f}{r['flops_ratio']:7.2f}{r['latency_ratio']:6.2f}{r['kv_cache_mb']:7.2f}"
        )
    return "\n".join(lines)


def save_report(report: dict[str, Any], out_dir: Path) -> Path:
    import json

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "bench.json"
    path.write_text(json.dumps(report, indent=1))
    return path
