"""``vtprune bench``: methods x budgets on a model and SynthVQA, measured side by side in one run.

Per configuration (answers scored by :mod:`vtprune.bench.evaluate`): accuracy overall and per family, retention (% of
the unpruned accuracy), both with bootstrap 95% intervals, grounded recall (question-relevant tokens weighted by the
share they make up of an alive token), visual tokens per LLM layer, analytic prefill FLOPs (``flops.py``), prefill
latency as a ratio to the unpruned model timed interleaved with it (median of paired repetitions, with their range),
KV-cache size after prefill and, on CUDA, peak memory of the prefill. ``LEGEND`` defines every column; it is printed
under the table and stored in the JSON. With a ``ResultStream`` (``resume.py``) each configuration is written to disk
as it finishes and a rerun skips the ones already there.
"""
from __future__ import annotations

import contextlib
import json
import statistics
import textwrap
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
from vtprune.bench.resume import ResultStream
from vtprune.methods import get_method
from vtprune.models import adapter_for

DEFAULT_BUDGETS = (64, 128, 144, 192)
# the unpruned model timed against itself should give 1.00; further off than this, latency ratios are noise
LATENCY_TOLERANCE = 0.05
LEGEND = {
    "config": "method@budget, the budget in the method's own convention (64: keep=64; 20%: ratio=0.2); unpruned: "
              "the model as it is",
    "acc": "accuracy on the test questions, %",
    "±": "half-width of the bootstrap 95% interval of the column to its left (accuracy, retention), points",
    "ret%": "retention: accuracy over the unpruned model's on the same questions, % (interval paired)",
    "attr exist count spat loc read": "accuracy per question family (attribute, existence, counting, spatial, "
                                      "localisation, reading), %",
    "recall": "grounded recall, %: the question-relevant patches, each counted by the share it makes up of a visual "
              "token alive after the last layer (kept as its own token: 1; merged evenly with 8 others: 1/9; "
              "dropped: 0), so merging methods are not credited as if they kept every patch",
    "bot%": "share of the surviving tokens' weight that comes from the image grid's bottom half, % (50: an even "
            "spread; FEATHER's diagnostic of RoPE bias)",
    "tok/L0": "visual tokens per image entering the LLM (its first layer)",
    "tok/avg": "visual tokens per image averaged over all LLM layers",
    "FLOPs": "analytic prefill FLOPs of the LLM (vtprune/bench/flops.py) as a fraction of the unpruned model's",
    "lat": "prefill latency (vision tower included) over the unpruned model's, timed interleaved with it: the median "
           "of the paired repetitions' ratios; 1.00 on the unpruned row unless the machine is noisy",
    "lat±": "half the range of those paired ratios: the timing noise of this row",
    "KV MB": "KV-cache size after prefill of the speed batch, MB",
}


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
        except NotImplementedError:  # a meta-device skeleton: the weights' target is read when the model is real
            continue
        target, visual = resolved.get("target"), adapter.fixed_tokens_per_image
        label = round(target * visual) if target is not None and target <= 1 and visual else round(target or 0)
        todo.append(Config(spec, label, params))
    return todo, skipped


def encode_batches(model, batches) -> dict[int, Any]:
    """ViT outputs of every batch, for configurations whose methods leave the ViT alone."""
    return {id(b["pixel_values"]): encode_batch(model, b) for b in batches}


def measure_speed(model, config: Config, inputs: dict[str, torch.Tensor], repeats: int) -> dict[str, Any]:
    """Prefill latency of ``config`` and of the unpruned model, ``repeats`` runs each, interleaved so that drift and
    interference hit both alike: the median of the paired ratios and their range; KV-cache size after prefill; on
    CUDA the allocator's peak memory of one prefill (``None`` on CPU: the process's peak RSS does not move when the
    allocator reuses memory freed by earlier prefills, so it would read as a misleading zero)."""
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
    device = inputs["input_ids"].device
    with PeakMemory(device) if device.type == "cuda" else contextlib.nullcontext() as memory:
        _, cache = prefill(config)
    kv_bytes = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)
    ratios = sorted(t / b for t, b in zip(times, base_times))
    return {
        "latency_ms": statistics.median(times) * 1e3,
        "latency_ratio": statistics.median(ratios),
        "latency_ratio_spread": [ratios[0], ratios[-1]],
        "kv_cache_mb": kv_bytes / 2**20,
        "peak_memory_mb": None if memory is None else memory.peak_mb,
    }


def plan(model, methods: Sequence[str], budgets: Sequence[int | float]) -> tuple[list[Config], dict[str, str]]:
    """The configurations to run on ``model`` (the unpruned one first), and {label: reason} for those it cannot run.

    Each is installed and removed once, so whatever ``vtprune.apply`` would refuse (a budget out of reach, a method
    the model family does not support) shows here, before anything is measured. ``model`` may be a skeleton on the
    meta device (``torch.device("meta")``, no weights): checks that need weights are then left to the run."""
    adapter = adapter_for(model)
    learned, skipped = learned_configs(methods, adapter)
    todo = []
    for config in configs([m for m in methods if not is_learned(m)], budgets) + learned:
        if config.method is not None:
            try:
                method = get_method(config.name)(**config.params)
                method.resolved(adapter)
                if not method.learned_budget:  # learned methods load their weights: resolved() checked those
                    vtprune.apply(model, method).remove()
            except (ValueError, TypeError) as error:
                skipped[config.label] = str(error)
                continue
            except NotImplementedError:  # a meta-device skeleton cannot run this check; the run does
                pass
        todo.append(config)
    return todo, skipped


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
    stream: ResultStream | None = None,
) -> dict[str, Any]:
    """Run every (method, budget) and the unpruned model; returns the JSON-ready report. ``resolution``: the
    SynthVQA variant ``samples`` come from (for the chance rates). ``decode_tokens`` > 0 also measures KV memory and
    throughput over that many generated tokens (``bench/decode.py``) on the speed batch. ``stream``: where each
    finished configuration goes, and the ones a previous run finished (taken as they are)."""
    prompt = prompt or prompt_builder(processor)
    model.eval()
    todo, skipped = plan(model, methods, budgets)
    done = stream.done if stream is not None else {}
    batches = speed_inputs = vision_cache = None
    results = []
    bar = tqdm(todo, desc="vtprune bench", disable=not progress)
    for config in bar:
        if config.label in done:
            results.append(done[config.label])
            continue
        bar.set_postfix_str(config.label)
        if batches is None:  # not needed at all when a rerun finds every configuration done
            batches = make_batches(processor, samples, batch_size, prompt)
            speed_inputs = to_model(model, make_batches(processor, samples[:speed_samples], speed_samples, prompt)[0])
            vision_cache = encode_batches(model, batches)
        start = time.perf_counter()
        record = {"method": config.method or "unpruned", "budget": config.budget, "params": config.params}
        if config.method is not None:
            record["budget_convention"] = get_method(config.name).budget_convention
            record["resolved"] = get_method(config.name)(**config.params).resolved(adapter_for(model))
        record.update(evaluate(model, processor, samples, method=config.name, params=config.params,
                               scoring=scoring, prompt=prompt, batches=batches, vision_cache=vision_cache))
        record.update(measure_speed(model, config, speed_inputs, speed_repeats))
        if decode_tokens:
            record.update(measure_decode(model, speed_inputs, lambda: config.pruner(model), decode_tokens))
        record["seconds"] = round(time.perf_counter() - start, 1)
        record = json.loads(json.dumps(record))  # as a resumed record reads back, so both kinds compare alike
        if stream is not None:
            stream.add(config.label, record)
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
        "latency": f"median over {speed_repeats} paired repetitions of the prefill of a batch of {speed_samples} "
                   "over the unpruned one run next to it, with the range of those ratios (includes the ViT, which is "
                   "computed afresh for every prefill)",
        "latency_warning": latency_warning(base),
        "memory": "kv_cache_mb: KV cache after prefill; peak_memory_mb: the CUDA allocator's peak of one prefill "
                  "(null on CPU, where no allocator statistic exists and peak RSS misses reused memory)",
        "legend": LEGEND,
        "results": results,
        "skipped": skipped,
    }


def latency_warning(base: dict[str, Any]) -> str | None:
    """A warning when the unpruned model, timed against itself, is off 1.00 by more than ``LATENCY_TOLERANCE``:
    the run's latency ratios then differ by load, not by method."""
    ratio = base["latency_ratio"]
    if abs(ratio - 1) <= LATENCY_TOLERANCE:
        return None
    low, high = base.get("latency_ratio_spread") or (ratio, ratio)
    noise = max(abs(ratio - 1), (high - low) / 2)
    return (f"latency is noise in this run: the unpruned model timed against itself gives {ratio:.2f} (range "
            f"{low:.2f}-{high:.2f}) instead of 1.00, so lat differences below about {noise:.2f} mean nothing; the "
            "machine was busy: rerun on an idle one for latency")


def format_table(report: dict[str, Any], legend: bool = True) -> str:
    """A fixed-width table of the report, one row per configuration, then (``legend``) what each column means, the
    chance accuracy and the latency warning if the run has one."""
    short = {"attribute": "attr", "existence": "exist", "counting": "count", "spatial": "spat",
             "localisation": "loc", "reading": "read"}
    head = (f"{'config':<16}{'acc':>6}{'±':>5}{'ret%':>6}{'±':>5} " + "".join(f"{short[f]:>6}" for f in report["families"])
            + f"{'recall':>7}{'bot%':>6}{'tok/L0':>7}{'tok/avg':>8}{'FLOPs':>7}{'lat':>6}{'lat±':>5}{'KV MB':>7}")
    lines = [head, "-" * len(head)]
    for r in report["results"]:
        label = "unpruned" if r["budget"] is None else f"{r['method']}@{budget_label(r['budget'])}"
        recall = r["grounded_recall"]
        bottom = r.get("kept_bottom_half")
        spread = r.get("latency_ratio_spread")
        lines.append(
            f"{label:<16}{r['accuracy']*100:6.1f}{_half_width(r.get('accuracy_ci')):>5}"
            f"{(r['retention'] or 0)*100:6.1f}{_half_width(r.get('retention_ci')):>5} "
            + "".join(f"{r['per_family'].get(f, float('nan'))*100:6.1f}" for f in report["families"])
            + f"{(recall if recall is not None else float('nan'))*100:7.1f}"
            + f"{(bottom if bottom is not None else float('nan'))*100:6.0f}{r['llm_input_visual_tokens']:7.0f}"
            + f"{r['mean_visual_tokens']:8.1f}{r['flops_ratio']:7.2f}{r['latency_ratio']:6.2f}"
            + (f"{(spread[1] - spread[0]) / 2:5.2f}" if spread else f"{'':5}") + f"{r['kv_cache_mb']:7.2f}"
        )
    if not legend:
        return "\n".join(lines)
    chance = chance_accuracy(report)
    if chance is not None:
        lines.append(f"{'chance':<16}{100 * chance:6.1f}   (a uniform guess among each question's choices)")
    lines += ["", "columns:"] + [textwrap.fill(text, 118, initial_indent=f"  {name:<32}", subsequent_indent=" " * 34)
                                 for name, text in report.get("legend", LEGEND).items()]
    if report.get("latency_warning"):
        lines += ["", f"warning: {report['latency_warning']}"]
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
