"""``vtprune bench``: methods x budgets on a model and SynthVQA, measured side by side in one run.

Per configuration (answers scored by :mod:`vtprune.bench.evaluate`): accuracy overall and per family, retention (% of
the unpruned accuracy), both with bootstrap 95% intervals, grounded recall (question-relevant tokens weighted by the
share they make up of an alive token), visual tokens per LLM layer, analytic prefill FLOPs (``flops.py``), prefill
latency as a ratio to the unpruned model timed interleaved with it, KV-cache size after prefill and peak memory of
the prefill.
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
from vtprune.bench.evaluate import encode_batch, evaluate, make_batches, prompt_builder, to_model
from vtprune.bench.decode import measure_decode
from vtprune.bench.intervals import bootstrap_interval
from vtprune.bench.memory import PeakMemory
from vtprune.methods import get_method
from vtprune.models import adapter_for

DEFAULT_BUDGETS = (64, 128, 144, 192)


@dataclass
class Config:
    method: str | None  # None = unpruned; a registered name, or a variant "name:key=value,..."
    budget: int | float | None  # an int: keep=; a float in (0, 1]: ratio=
    params: dict[str, Any]

    @property
    def name(self) -> str | None:
        """The registered method."""
        return None if self.method is None else method_spec(self.method)[0]

    @property
    def label(self) -> str:
        return "unpruned" if self.method is None else f"{self.method}@{budget_label(self.budget)}"

    def pruner(self, model):
        if self.method is None:
            return contextlib.nullcontext()
        return vtprune.apply(model, self.name, **self.params)


def budget_label(budget: int | float | None) -> str:
    """64 -> "64" (a count), 0.2 -> "20%" (a share, in the method's own ratio convention)."""
    if budget is None:
        return ""
    return f"{100 * budget:g}%" if isinstance(budget, float) else str(budget)


def method_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"hired:allocation_map=reference_bands,alpha=0.7"`` -> ("hired", {...}): a method with non-default
    parameters (values read as int, float, true/false or text); checked against the registry."""
    name, _, rest = spec.partition(":")
    get_method(name)
    params: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"{spec!r}: write parameters as name:key=value,key=value")
        value: Any = {"true": True, "false": False}.get(text.lower(), text)
        for kind in (int, float):
            try:
                value = kind(text)
                break
            except ValueError:
                pass
        params[key] = value
    get_method(name)(**params)  # a bad parameter fails here, before anything runs
    return name, params


def configs(methods: Sequence[str], budgets: Sequence[int | float]) -> list[Config]:
    """The unpruned model, then every method (or variant, see ``method_spec``) at every budget: an int is ``keep=``,
    a float ``ratio=``."""
    return [Config(None, None, {})] + [
        Config(m, b, {**method_spec(m)[1], **({"ratio": b} if isinstance(b, float) else {"keep": b})})
        for m in methods for b in budgets]


def is_learned(spec: str) -> bool:
    """The method of ``spec`` learns its budget (``Method.learned_budget``): keep=/ratio= do not apply to it."""
    return get_method(method_spec(spec)[0]).learned_budget


def learned_configs(methods: Sequence[str], adapter) -> tuple[list[Config], dict[str, str]]:
    """One configuration per learned-budget method of ``methods``, at the target its weights were trained for (as a
    count of visual tokens), and {method: reason} for those without weights for ``adapter``'s model."""
    todo, skipped = [], {}
    for spec in filter(is_learned, methods):
        name, params = method_spec(spec)
        try:
            resolved = get_method(name)(**params).resolved(adapter)
        except ValueError as error:
            skipped[spec] = str(error)
            continue
        target, visual = resolved.get("target"), adapter.fixed_tokens_per_image
        label = round(target * visual) if target is not None and target <= 1 and visual else round(target or 0)
        todo.append(Config(spec, label, params))
    return todo, skipped


def encode_batches(model, batches) -> dict[int, Any]:
    """ViT outputs of every batch, for configurations whose methods leave the ViT alone."""
    return {id(b["pixel_values"]): encode_batch(model, b) for b in batches}


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
    budgets: Sequence[int | float] = DEFAULT_BUDGETS,
    prompt=None,
    scoring: str = "likelihood",
    batch_size: int = 16,
    speed_samples: int = 2,
    speed_repeats: int = 5,
    progress: bool = True,
    resolution: str = "base",
    decode_tokens: int = 0,
) -> dict[str, Any]:
    """Run every (method, budget) and the unpruned model; returns the JSON-ready report. ``resolution``: the
    SynthVQA variant ``samples`` come from (for the chance rates). ``decode_tokens`` > 0 also measures KV memory and
    throughput over that many generated tokens (``bench/decode.py``) on the speed batch."""
    prompt = prompt or prompt_builder(processor)
    model.eval()
    batches = make_batches(processor, samples, batch_size, prompt)
    speed_inputs = to_model(model, make_batches(processor, samples[:speed_samples], speed_samples, prompt)[0])
    vision_cache = encode_batches(model, batches)
    results = []
    learned, skipped = learned_configs(methods, adapter_for(model))
    todo = configs([m for m in methods if not is_learned(m)], budgets) + learned
    bar = tqdm(todo, desc="vtprune bench", disable=not progress)
    for config in bar:
        bar.set_postfix_str(config.label)
        record = {"method": config.method or "unpruned", "budget": config.budget, "params": config.params}
        if config.method is not None:
            record["budget_convention"] = get_method(config.name).budget_convention
            try:
                record["resolved"] = get_method(config.name)(**config.params).resolved(adapter_for(model))
            except ValueError as error:  # a budget this method cannot reach on this model (csp below its floor)
                skipped[config.label] = str(error)
                continue
        record.update(evaluate(model, processor, samples, method=config.name, params=config.params,
                               scoring=scoring, prompt=prompt, batches=batches, vision_cache=vision_cache))
        record.update(measure_speed(model, config, speed_inputs, speed_repeats))
        if decode_tokens:
            record.update(measure_decode(model, speed_inputs, lambda: config.pruner(model), decode_tokens))
        results.append(record)
    base = results[0]
    for record in results:
        record["retention"] = record["accuracy"] / base["accuracy"] if base["accuracy"] else None
        # paired over the same questions: the interval of this configuration's accuracy over the unpruned one's
        record["retention_ci"] = bootstrap_interval(
            np.array([record["correct"], base["correct"]]),
            lambda x: x[0].mean(-1) / np.where(x[1].mean(-1) > 0, x[1].mean(-1), np.nan))
        record["flops_ratio"] = record["prefill_tflops"] / base["prefill_tflops"]
        if decode_tokens:
            record["decode_kv_ratio"] = record["decode_kv_mb_mean"] / base["decode_kv_mb_mean"]
            record["decode_speed_ratio"] = record["decode_tokens_per_s"] / base["decode_tokens_per_s"]
    return {
        "samples": len(samples),
        "scoring": scoring,
        "intervals": "bootstrap 95% percentile intervals over questions (1000 resamples; retention paired)",
        "families": list(sv.FAMILIES),
        "chance": {f: sv.chance_rate(f, resolution) for f in sv.FAMILIES},
        "families_of_samples": [s.family for s in samples],
        "device": str(next(model.parameters()).device),
        "threads": torch.get_num_threads(),
        "flops_formula": "prefill LLM FLOPs, see vtprune/bench/flops.py (LLaMA 3-matrix MLP, 2 FLOPs per MAC)",
        "latency": f"best of {speed_repeats} prefills of a batch of {speed_samples}, interleaved with unpruned "
                   "(includes the ViT, which is computed afresh for every prefill)",
        "results": results,
        "skipped": skipped,
    }


def format_table(report: dict[str, Any]) -> str:
    """A fixed-width table of the report, one row per configuration."""
    short = {"attribute": "attr", "existence": "exist", "counting": "count", "spatial": "spat",
             "localisation": "loc", "reading": "read"}
    head = (f"{'config':<16}{'acc':>6}{'±':>5}{'ret%':>6}{'±':>5} " + "".join(f"{short[f]:>6}" for f in report["families"])
            + f"{'recall':>7}{'bot%':>6}{'tok/L0':>7}{'tok/avg':>8}{'FLOPs':>7}{'lat':>6}{'KV MB':>7}")
    lines = [head, "-" * len(head)]
    for r in report["results"]:
        label = "unpruned" if r["budget"] is None else f"{r['method']}@{budget_label(r['budget'])}"
        recall = r["grounded_recall"]
        bottom = r.get("kept_bottom_half")
        lines.append(
            f"{label:<16}{r['accuracy']*100:6.1f}{_half_width(r.get('accuracy_ci')):>5}"
            f"{(r['retention'] or 0)*100:6.1f}{_half_width(r.get('retention_ci')):>5} "
            + "".join(f"{r['per_family'].get(f, float('nan'))*100:6.1f}" for f in report["families"])
            + f"{(recall if recall is not None else float('nan'))*100:7.1f}"
            + f"{(bottom if bottom is not None else float('nan'))*100:6.0f}{r['llm_input_visual_tokens']:7.0f}"
            + f"{r['mean_visual_tokens']:8.1f}{r['flops_ratio']:7.2f}{r['latency_ratio']:6.2f}{r['kv_cache_mb']:7.2f}"
        )
    return "\n".join(lines)


def format_decode_table(report: dict[str, Any]) -> str:
    """Decode-time KV cache and throughput per configuration (when the bench measured them)."""
    rows = [r for r in report["results"] if "decode_kv_mb_mean" in r]
    if not rows:
        return ""
    head = (f"{'config':<24}{'KV MB mean':>11}{'final':>8}{'x unpr.':>8}{'live/row':>9}{'tok/s':>8}{'x unpr.':>8}")
    lines = [f"decode: {rows[0]['decode_tokens']} generated tokens per prompt", head, "-" * len(head)]
    for r in rows:
        label = "unpruned" if r["budget"] is None else f"{r['method']}@{budget_label(r['budget'])}"
        lines.append(f"{label:<24}{r['decode_kv_mb_mean']:11.2f}{r['decode_kv_mb_final']:8.2f}"
                     f"{r.get('decode_kv_ratio', 1.0):8.2f}{r['decode_live_entries_mean']:9.0f}"
                     f"{r['decode_tokens_per_s']:8.1f}{r.get('decode_speed_ratio', 1.0):8.2f}")
    return "\n".join(lines)


README_MARKERS = ("<!-- bench-results -->", "<!-- /bench-results -->")


def readme_table(report: dict[str, Any]) -> str:
    """The README's results table: per method, accuracy at each budget with its 95% interval, and at the smallest
    budget retention (paired interval), grounded recall and prefill latency ratio."""
    budgets = sorted({r["budget"] for r in report["results"] if r["budget"] is not None})
    base = report["results"][0]
    low = budgets[0] if budgets else None

    def cell(r: dict[str, Any] | None) -> str:
        if r is None:
            return ""
        ci = r.get("accuracy_ci")
        return f"{100 * r['accuracy']:.1f}" + (f" ({100 * ci[0]:.0f}-{100 * ci[1]:.0f})" if ci else "")

    head = ("| method | " + " | ".join(f"acc @{budget_label(b)}" for b in budgets)
            + f" | retention @{budget_label(low)} | recall @{budget_label(low)} | latency @{budget_label(low)} |")
    lines = [head, "|" + "---|" * (len(budgets) + 4)]
    recall = "" if base["grounded_recall"] is None else f"{100 * base['grounded_recall']:.0f}"
    lines.append(f"| unpruned ({base['llm_input_visual_tokens']:.0f} tokens) | {cell(base)} |"
                 + " |" * (len(budgets) - 1) + f" 100 | {recall} | {base['latency_ratio']:.2f} |")
    chance = chance_accuracy(report)
    if chance is not None:
        lines.append(f"| chance (a uniform guess among each question's choices) | {100 * chance:.1f} |"
                     + " |" * (len(budgets) - 1) + " | | |")
    methods = sorted({r["method"] for r in report["results"] if r["budget"] is not None},
                     key=lambda m: -max(r["accuracy"] for r in report["results"] if r["method"] == m))
    for method in methods:
        rows = {r["budget"]: r for r in report["results"] if r["method"] == method}
        first = rows.get(low)
        ret = first.get("retention_ci") if first else None
        retention = (f"{100 * first['retention']:.1f}" + (f" ({100 * ret[0]:.0f}-{100 * ret[1]:.0f})" if ret else "")
                     if first and first["retention"] is not None else "")
        rec = first["grounded_recall"] if first else None
        lines.append(f"| {method} | " + " | ".join(cell(rows.get(b)) for b in budgets)
                     + f" | {retention} | {'' if rec is None else f'{100 * rec:.0f}'} | "
                     + (f"{first['latency_ratio']:.2f}" if first else "") + " |")
    return "\n".join(lines)


def chance_accuracy(report: dict[str, Any]) -> float | None:
    """Expected accuracy of guessing: each question's family chance rate, averaged over the questions."""
    families = report.get("families_of_samples")
    chance = report.get("chance")
    if not families or not chance:
        return None
    return float(np.mean([chance[f] for f in families]))


def update_readme(report: dict[str, Any], path: Path) -> None:
    """Replace the table between the README's bench-results markers with this report's (see ``readme_table``)."""
    text = path.read_text()
    start, end = README_MARKERS
    if start not in text or end not in text:
        raise ValueError(f"{path} has no {start} ... {end} block to replace")
    before, rest = text.split(start, 1)
    after = rest.split(end, 1)[1]
    path.write_text(f"{before}{start}\n{readme_table(report)}\n{end}{after}")


def _half_width(interval: list[float] | None) -> str:
    return "" if not interval else f"{(interval[1] - interval[0]) * 50:.1f}"


def save_report(report: dict[str, Any], out_dir: Path) -> Path:
    import json

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "bench.json"
    path.write_text(json.dumps(report, indent=1))
    return path
