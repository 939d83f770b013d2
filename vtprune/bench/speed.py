"""``vtprune speed``: latency, throughput and memory of every method at the geometry users run, the unpruned model
interleaved, next to the analytic FLOPs bound.

Per case (a method at a budget, or the same in naive mode): ``warmup`` unmeasured forwards, then ``repeats`` rounds
that each run the case and the unpruned model back to back (drift and interference hit both alike), timing prefill
(one forward with the image, ``logits_to_keep=1``), its vision stage and language model (``StageClock``), and time to
first token (``generate(max_new_tokens=1)``, at most 3 rounds). Then: vtprune's own time (``OverheadTimer``: its
hooks, the vision tower excluded; at most 3 rounds), the KV cache after prefill, peak memory of one prefill, the tokens
every vision block and decoder layer saw (FLOPs), and greedy decoding at batch 1 and 8 (the batch-1 cache repeated,
so batch 8 costs one prefill). Figures are medians with their interquartile range; speedups are unpruned median /
case median from the same case's rounds; efficiency is measured speedup / FLOPs-bound speedup.

Naive mode (``Case.naive``) runs the same method with the language model in eager attention and its criterion read
from the scoring layer's kept attention weights (``speed_probes.NaiveScorer``): the papers' way, for comparison.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import vtprune
from vtprune.bench.flops import prefill_flops, text_config_dims, vision_flops
from vtprune.bench.geometry import Geometry
from vtprune.bench.memory import PeakMemory
from vtprune.bench.runner import budget_label, method_spec
from vtprune.bench.speed_probes import (
    NaiveScorer,
    NaiveUnsupported,
    OverheadTimer,
    StageClock,
    VisionTokens,
    eager_language_model,
    sync,
)
from vtprune.methods import REGISTRY, get_method
from vtprune.models import adapter_for
from vtprune.runtime import Pruner


@dataclass
class Settings:
    repeats: int = 5
    warmup: int = 1
    decode_tokens: int = 16
    decode_batches: tuple[int, ...] = (1, 8)
    # Encode the image once and feed its features to every case whose method leaves the vision tower alone (CPU runs
    # at 7B geometry, where the tower costs as much as the truncated LLM): their prefill and TTFT get the tower's
    # time measured once added back, so figures stay end to end.
    reuse_vision: bool = False
    ttft: bool = True  # time generate(max_new_tokens=1) too

    @property
    def side_repeats(self) -> int:
        """Rounds of the secondary timings (TTFT, vtprune's own time): at most 3, to keep the default run short."""
        return min(self.repeats, 3)


@dataclass
class Case:
    method: str | None  # None: unpruned; a registered name or a variant "name:key=value,..."
    budget: int | float | None = None
    naive: bool = False
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        if self.method is None:
            return "unpruned"
        return f"{self.method}@{budget_label(self.budget)}" + (" naive" if self.naive else "")


def cases(methods: list[str], budgets: list[int | float], naive: list[str]) -> list[Case]:
    out = []
    for spec in methods:
        name, params = method_spec(spec)
        for budget in budgets:
            budget_params = {"ratio": budget} if isinstance(budget, float) else {"keep": budget}
            out.append(Case(spec, budget, False, {**params, **budget_params}))
            if spec in naive:
                out.append(Case(spec, budget, True, {**params, **budget_params}))
    return out


def default_methods(model: nn.Module) -> list[str]:
    """Every registered method that runs on the model's family and takes a budget (learned-budget methods need
    trained weights)."""
    adapter = adapter_for(model)
    return sorted(name for name, cls in REGISTRY.items()
                  if cls.requires <= adapter.capabilities and not cls.learned_budget)


def naive_candidates(methods: list[str]) -> list[str]:
    """Methods with an LLM-layer stage (their criteria may read attention a layer computed)."""
    return [spec for spec in methods if "layer" in get_method(method_spec(spec)[0]).stages]


# --- one forward --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def installed(model: nn.Module, case: Case, overhead: bool = False):
    """The case's pruner on ``model`` (naive mode: eager language model with the naive scorer); yields
    (pruner or None, OverheadTimer or None)."""
    if case.method is None:
        yield None, None
        return
    method = get_method(method_spec(case.method)[0])(**case.params)
    with contextlib.ExitStack() as stack:
        if case.naive:
            stack.enter_context(eager_language_model(model))
        pruner = Pruner(model, method)
        timer = OverheadTimer(pruner) if overhead else None
        scorer = NaiveScorer(pruner) if case.naive else None
        pruner.install()
        stack.callback(pruner.remove)
        if scorer is not None:
            stack.callback(scorer.remove)
        yield pruner, timer


def _prefill(model: nn.Module, inputs: dict[str, torch.Tensor]) -> Any:
    return model(**inputs, use_cache=True, logits_to_keep=1)


def _median(values: list[float]) -> dict[str, float]:
    """Median and interquartile range (ms when given seconds)."""
    ms = sorted(v * 1e3 for v in values)
    if len(ms) == 1:
        return {"median": ms[0], "q1": ms[0], "q3": ms[0], "n": 1}
    q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive")
    return {"median": statistics.median(ms), "q1": q1, "q3": q3, "n": len(ms)}


def _kv_bytes(cache: Any) -> int:
    return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)


DECODE_WARMUP = 2  # untimed steps first: the first steps at a new batch shape pay allocator and kernel warm-up


@torch.no_grad()
def _decode_rate(model: nn.Module, inputs: dict[str, torch.Tensor], case: Case, batch: int, steps: int) -> float:
    """Tokens/s of ``steps`` greedy decode steps at ``batch`` (the batch-1 prefill cache repeated), timed after
    ``DECODE_WARMUP`` untimed ones."""
    device = next(model.parameters()).device
    with installed(model, case):
        out = _prefill(model, inputs)
        cache = out.past_key_values
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        mask = inputs["attention_mask"]
        if batch > 1:
            cache.batch_repeat_interleave(batch)
            token, mask = token.repeat_interleave(batch, 0), mask.repeat_interleave(batch, 0)
        for step in range(DECODE_WARMUP + steps):
            if step == DECODE_WARMUP:
                sync(device)
                start = time.perf_counter()
            mask = torch.cat([mask, mask.new_ones(batch, 1)], 1)
            out = model(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        sync(device)
        return steps * batch / (time.perf_counter() - start)


# --- one case -----------------------------------------------------------------------------------------------------
def has_vision_stage(case: Case) -> bool:
    return case.method is not None and "vision" in get_method(method_spec(case.method)[0]).stages


@dataclass
class Vision:
    """The image encoded once (``Settings.reuse_vision``): model inputs carrying its features instead of pixels, the
    tower's measured times, and the tokens its blocks received."""

    inputs: dict[str, Any]
    seconds: list[float]
    counts: list[tuple[int, int]]


@torch.no_grad()
def encode_once(model: nn.Module, inputs: dict[str, torch.Tensor], settings: Settings) -> Vision:
    from vtprune.runtime.pruner import encode_images

    device = next(model.parameters()).device
    pixels = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    counter = VisionTokens(adapter_for(model).vision_layers)
    try:
        encode_images(model, **pixels)
    finally:
        counter.remove()
    seconds = []
    for _ in range(settings.side_repeats):  # the counting run above was the warm-up
        sync(device)
        start = time.perf_counter()
        encoded = encode_images(model, **pixels)
        sync(device)
        seconds.append(time.perf_counter() - start)
    feed = {k: v for k, v in inputs.items() if k != "pixel_values"}
    feed["mm_encoder_outputs"] = {"image": encoded}
    return Vision(feed, seconds, counter.counts)


@torch.no_grad()
def measure_case(model: nn.Module, geometry: Geometry, inputs: dict[str, torch.Tensor], case: Case,
                 settings: Settings, vision: Vision | None = None) -> dict[str, Any]:
    """Every figure of one case, with the unpruned model's from the same rounds (``base_*``). ``vision``: the image
    encoded once, used unless the case's method runs inside the vision tower (then both run it)."""
    device = next(model.parameters()).device
    if vision is not None and has_vision_stage(case):
        vision = None
    if vision is not None:
        inputs = vision.inputs
    base = Case(None)
    # the unpruned case is its own baseline: measured once per round
    pairs = ((case, ""), (base, "base_")) if case.method is not None else ((case, ""),)
    clock = StageClock(model, geometry.family)
    try:
        for _ in range(settings.warmup):
            for each, _prefix in pairs:
                with installed(model, each):
                    _prefill(model, inputs)
        times: dict[str, list[float]] = {key: [] for key in (
            "prefill", "vision", "llm", "ttft", "base_prefill", "base_vision", "base_llm", "base_ttft")}
        for _ in range(settings.repeats):
            for each, prefix in pairs:
                with installed(model, each):
                    clock.reset()
                    sync(device)
                    start = time.perf_counter()
                    _prefill(model, inputs)
                    sync(device)
                    times[prefix + "prefill"].append(time.perf_counter() - start)
                    times[prefix + "vision"].append(clock.seconds["vision"])
                    times[prefix + "llm"].append(clock.seconds["llm"])
        for _ in range(settings.side_repeats if settings.ttft else 0):
            for each, prefix in pairs:
                with installed(model, each):
                    sync(device)
                    start = time.perf_counter()
                    model.generate(**inputs, max_new_tokens=1, do_sample=False)
                    sync(device)
                    times[prefix + "ttft"].append(time.perf_counter() - start)
        overhead = []
        for _ in range(settings.side_repeats) if case.method is not None else ():
            with installed(model, case, overhead=True) as (_, timer):
                clock.reset()
                _prefill(model, inputs)
                overhead.append(timer.total - clock.seconds["vision"])  # _encode's tower and projector
    finally:
        clock.remove()
    if case.method is None:
        times.update({"base_" + key: times[key] for key in ("prefill", "vision", "llm", "ttft")})
    if vision is not None:  # the tower's time, measured once, added back to every end-to-end figure
        once = statistics.median(vision.seconds)
        for key in ("prefill", "ttft", "base_prefill", "base_ttft"):
            times[key] = [t + once for t in times[key]]
        times["vision"] = times["base_vision"] = vision.seconds
    record: dict[str, Any] = {"case": case.label, "method": case.method, "budget": case.budget, "naive": case.naive,
                              "vision_reused": vision is not None,
                              **{key: _median(values) if values else None for key, values in times.items()}}
    record["overhead"] = _median(overhead) if overhead else None
    record.update(_inspect(model, geometry, inputs, case, None if vision is None else vision.counts))
    record["decode_tokens_per_s"] = {}
    record["base_decode_tokens_per_s"] = {}
    for batch in settings.decode_batches if settings.decode_tokens else ():
        record["decode_tokens_per_s"][batch] = _decode_rate(model, inputs, case, batch, settings.decode_tokens)
        record["base_decode_tokens_per_s"][batch] = _decode_rate(model, inputs, base, batch, settings.decode_tokens)
    _derive(record)
    return record


@torch.no_grad()
def _inspect(model: nn.Module, geometry: Geometry, inputs: dict[str, torch.Tensor], case: Case,
             vision_counts: list[tuple[int, int]] | None = None) -> dict[str, Any]:
    """One more prefill under the case: peak memory, KV bytes, tokens per vision block (``vision_counts`` when the
    tower does not run) and decoder layer, FLOPs."""
    adapter = adapter_for(model)
    counter = VisionTokens(adapter.vision_layers)
    try:
        with installed(model, case) as (pruner, _), PeakMemory(next(model.parameters()).device) as memory:
            out = _prefill(model, inputs)
            stats = pruner.stats if pruner is not None else None
    finally:
        counter.remove()
    counts = counter.counts if vision_counts is None else vision_counts
    config = model.config
    dims = text_config_dims(config.text_config)
    depth = len(adapter.decoder_layers)
    length = inputs["input_ids"].shape[1]
    visual0 = geometry.visual_tokens(inputs, model)
    if stats is None:
        tokens = [length] * depth
        visual = [visual0] * depth
    else:
        tokens = stats.tokens[0].tolist()
        visual = stats.visual_tokens[0].tolist()
    return {
        "peak_memory_mb": memory.peak_mb,
        "kv_cache_mb": _kv_bytes(out.past_key_values) / 2**20,
        "tokens_per_layer": tokens,
        "visual_tokens_per_layer": visual,
        "llm_input_visual_tokens": visual[0],
        "mean_visual_tokens": sum(visual) / len(visual),
        "llm_flops": prefill_flops(tokens, *dims),
        "llm_flops_unpruned": prefill_flops([length] * depth, *dims),
        "vision_flops": vision_flops(counts, config.vision_config, geometry.family),
        "vision_tokens_per_block": [s * n for s, n in counts],
    }


def _derive(record: dict[str, Any]) -> None:
    """Speedups, FLOPs bounds and efficiencies."""
    def ratio(key: str) -> float:
        return record[f"base_{key}"]["median"] / record[key]["median"]

    record["speedup_prefill"] = ratio("prefill")
    record["speedup_llm"] = ratio("llm")
    record["speedup_ttft"] = ratio("ttft") if record["ttft"] is not None else None
    record["llm_flops_ratio"] = record["llm_flops"] / record["llm_flops_unpruned"]
    record["bound_llm"] = 1 / record["llm_flops_ratio"]
    record["efficiency_llm"] = record["speedup_llm"] / record["bound_llm"]
    record["overhead_share"] = (None if record["overhead"] is None
                                else record["overhead"]["median"] / record["base_prefill"]["median"])


def finish(records: list[dict[str, Any]]) -> None:
    """End-to-end FLOPs bounds need the unpruned vision FLOPs: the unpruned record's."""
    base = records[0]
    for record in records:
        record["vision_flops_ratio"] = record["vision_flops"] / base["vision_flops"]
        total = base["vision_flops"] + base["llm_flops"]
        record["bound_prefill"] = total / (record["vision_flops"] + record["llm_flops"])
        record["efficiency_prefill"] = record["speedup_prefill"] / record["bound_prefill"]
        record["kv_ratio"] = record["kv_cache_mb"] / base["kv_cache_mb"]


# --- the run ------------------------------------------------------------------------------------------------------
def machine(device: torch.device, dtype: torch.dtype, attn: str) -> dict[str, Any]:
    import transformers

    info: dict[str, Any] = {
        "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "vtprune": vtprune.__version__, "device": str(device),
        "dtype": str(dtype).removeprefix("torch."), "attention": attn, "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "load_average_start": list(os.getloadavg()),
    }
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        info["cpu"] = names[0] if names else platform.processor()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                            cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


def run_speed(geometry: Geometry, layers: int | None, methods: list[str] | None, budgets: list[int | float],
              naive: list[str] | None, settings: Settings, device: str = "cpu", dtype: str = "float32",
              progress: bool = True) -> dict[str, Any]:
    """Build the model, measure the unpruned model and every case; returns the report (see ``save``)."""
    from tqdm import tqdm

    torch_dtype = getattr(torch, dtype)
    started = time.perf_counter()
    model = geometry.build(layers, torch_dtype, device)
    inputs = {k: v.to(device) for k, v in geometry.inputs(model).items()}
    methods = methods or default_methods(model)
    naive = naive_candidates(methods) if naive is None else naive
    todo = [Case(None)] + cases(methods, budgets, naive)
    report: dict[str, Any] = {
        "geometry": geometry.name, "description": geometry.description, "family": geometry.family,
        "layers": len(adapter_for(model).decoder_layers), "full_depth": geometry.full_depth(),
        "llm_dims": list(text_config_dims(model.config.text_config)),
        "image": list(geometry.image), "prompt_tokens": inputs["input_ids"].shape[1],
        "visual_tokens": geometry.visual_tokens(inputs, model), "settings": vars(settings),
        "machine": machine(torch.device(device), torch_dtype, adapter_for(model).attn_implementation),
        "results": [], "skipped": {},
    }
    vision = encode_once(model, inputs, settings) if settings.reuse_vision else None
    bar = tqdm(todo, desc=f"vtprune speed {geometry.name}", unit="case", disable=not progress)
    for case in bar:
        bar.set_postfix_str(case.label)
        try:
            report["results"].append(measure_case(model, geometry, inputs, case, settings, vision))
        except NaiveUnsupported as error:
            report["skipped"][case.label] = f"naive mode does not apply: {error}"
        except (ValueError, TypeError) as error:  # a budget the geometry cannot reach, a refused combination
            report["skipped"][case.label] = str(error)
    finish(report["results"])
    report["machine"]["load_average_end"] = list(os.getloadavg())
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    return report


def save(report: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "speed.json"
    path.write_text(json.dumps(report, indent=1))
    return path
