"""``vtprune bench --task synthseg``: methods x budgets on a LISA-style segmentation model (MiniLISA) and SynthSeg,
measured side by side in one run.

Budgets are in one unit for every method, the paper's (LVLM_CSP's and PyramidDrop's tables): image tokens entering a
decoder layer of the LLM, averaged over its layers -- a share (``0.2``) of the image's tokens or a count. Methods whose
own convention is that average (PyramidDrop, CSP, MustDrop) or that reduce the tokens before the LLM (the average is
then the count entering it) get the budget as it is; the others (FastV and its kin: every image token before layer K,
``keep`` after it; ``pool``, whose counts must be h x w grids) are matched: their ``keep`` is solved on a calibration
batch from the counts ``pruner.stats`` measures (``match_budget``); a target out of a method's reach runs at the closest
count it can realise, marked so. Every row reports the average measured over the whole split next to its nominal
budget, and the parameters it was run with; decode-only methods (nothing removed from the prefill) are skipped.

Per configuration (masks scored by :mod:`vtprune.bench.segmentation`): gIoU and cIoU, retention (% of the unpruned
gIoU), each with a bootstrap 95% interval, gIoU per prompt family, image tokens per layer, analytic prefill FLOPs
(``flops.py``) with the share due to image tokens, prefill latency of the VLM as a ratio to the unpruned one (timed
interleaved with it, ``runner.measure_speed``) and the method's resolved settings (CSP's plan). Next to them the
box-from-text baseline (``synthseg.blind_box_baseline``): the best fixed box per prompt family, fitted on train
prompts, never looking at the image.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

import vtprune
from vtprune.bench import synthseg as ss
from vtprune.bench.evaluate import to_model
from vtprune.bench.flops import prefill_flops, text_config_dims
from vtprune.bench.intervals import bootstrap_interval
from vtprune.bench.resume import ResultStream
from vtprune.bench.runner import Config, budget_label, configs, is_learned, learned_configs, measure_speed
from vtprune.bench.segmentation import evaluate_segmentation
from vtprune.methods import REGISTRY, get_method
from vtprune.models import adapter_for
from vtprune.reference.lisa import format_prompt

DEFAULT_BUDGETS = (0.35, 0.30, 0.20)
#: run first, in this order: the methods LVLM_CSP compares against (CSP itself when registered)
PREFERRED_METHODS = ("csp", "fastv", "pyramiddrop", "divprune", "fastervlm", "random", "uniform", "pool", "tome")
BLIND_TRAIN_PROMPTS = 400
#: a method whose nominal budget lands this close (share of the image's tokens) to the target average is not matched
MATCH_TOLERANCE = 0.01
MATCH_SCAN = 8  # counts either side of the bisection's result that matching also tries
BLIND_BOX = "blind box"
UNTOUCHED = "leaves every image token of the prefill in place"  # decode-only methods: nothing to measure here


def default_methods() -> list[str]:
    """What the segmentation bench runs without ``--methods``: ``PREFERRED_METHODS`` that are registered, then every
    other registered method (those that refuse the model are skipped with the reason)."""
    preferred = [m for m in PREFERRED_METHODS if m in REGISTRY]
    return preferred + sorted(set(REGISTRY) - set(preferred))


def layer_average(vlm, name: str, params: dict[str, Any], inputs: dict[str, Any]) -> float:
    """Image tokens entering a decoder layer, averaged over the layers and the rows of ``inputs``, with ``name`` and
    ``params`` installed on ``vlm``."""
    with torch.no_grad(), vtprune.apply(vlm, name, **params) as pruner:
        vlm(**inputs, logits_to_keep=1)
    return float(pruner.stats.mean_visual_tokens.mean())


def match_budget(vlm, name: str, params: dict[str, Any], target: float, inputs: dict[str, Any], tokens: int,
                 tolerance: float) -> dict[str, Any]:
    """The parameters that bring ``name`` to ``target`` image tokens per layer on ``inputs`` (images of ``tokens``
    tokens): ``params`` as they are when their measured average lies within ``tolerance`` of the target, else with
    ``keep`` replaced by the count whose average is closest (bisection, as the average grows with ``keep``, then the
    ``MATCH_SCAN`` counts either side, for methods that cannot realise every count, such as ``pool``'s h x w grids).

    Returns {params, measured (the calibration batch's average), matched (within tolerance), untouched (the prefill
    keeps every image token at the nominal budget: a decode-only method)}. Raises the method's ``ValueError`` when it
    refuses the budget and no count runs either (or at once, with an infinite ``tolerance``: nothing to match)."""
    try:
        nominal: float | None = layer_average(vlm, name, params, inputs)
        refusal = None
    except ValueError as error:  # pool: 35% (202) is no h x w grid; CSP: below its floor. Another count may run
        if not np.isfinite(tolerance):
            raise
        nominal, refusal = None, error
    out = {"params": params, "measured": nominal,
           "matched": nominal is not None and abs(nominal - target) <= tolerance,
           "untouched": nominal is not None and nominal >= tokens and target < tokens}
    if out["matched"] or out["untouched"]:
        return out
    fixed = {k: v for k, v in params.items() if k not in ("keep", "ratio")}
    seen: dict[int, float] = {}

    def average(keep: int) -> float:
        if keep not in seen:
            try:
                seen[keep] = layer_average(vlm, name, {**fixed, "keep": keep}, inputs)
            except ValueError:  # a count the method cannot realise: treated as too low
                seen[keep] = -np.inf
        return seen[keep]

    low, high = 1, tokens
    while low < high:  # the smallest keep whose average reaches the target
        middle = (low + high) // 2
        low, high = (low, middle) if average(middle) >= target else (middle + 1, high)
    near = range(max(1, low - MATCH_SCAN), min(tokens, low + MATCH_SCAN) + 1)
    best = min(near, key=lambda k: (abs(average(k) - target), -k))
    if not np.isfinite(average(best)):
        if refusal is not None:
            raise refusal
        return out
    if nominal is None or abs(average(best) - target) < abs(nominal - target):
        out.update(params={**fixed, "keep": best}, measured=average(best),
                   matched=abs(average(best) - target) <= tolerance)
    return out


def prompt_inputs(processor, samples: Sequence[ss.SegSample]) -> dict[str, Any]:
    """The VLM's inputs for ``samples`` as ``MiniLisa.segment`` builds them (left padding, prompts ending in [SEG])."""
    return processor(images=[s.image for s in samples], text=[format_prompt(s.prompt) for s in samples],
                     return_tensors="pt", padding=True, padding_side="left")


def _unpruned_counts(processor, samples: Sequence[ss.SegSample], image_token: int, layers: int,
                     batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(image tokens, all tokens) entering each layer of the unpruned LLM [n, layers], from the prompts."""
    visual, total = [], []
    for start in range(0, len(samples), batch_size):
        inputs = prompt_inputs(processor, samples[start:start + batch_size])
        visual += (inputs["input_ids"] == image_token).sum(1).tolist()
        total += inputs["attention_mask"].sum(1).tolist()
    return (np.repeat(np.array(visual, np.float64)[:, None], layers, 1),
            np.repeat(np.array(total, np.float64)[:, None], layers, 1))


def _overlaps(masks: Sequence[np.ndarray], samples: Sequence[ss.SegSample]) -> np.ndarray:
    """[2, n]: each prediction's intersection and union with its target (pixels)."""
    return np.array([[np.logical_and(m, s.mask).sum() for m, s in zip(masks, samples)],
                     [np.logical_or(m, s.mask).sum() for m, s in zip(masks, samples)]], dtype=np.float64)


def _scores(masks: Sequence[np.ndarray], samples: Sequence[ss.SegSample], ious: Sequence[float],
            per_family: dict[str, Any], bootstrap: int) -> dict[str, Any]:
    """gIoU and cIoU with their bootstrap intervals, per-family gIoU/cIoU, the per-prompt IoUs."""
    overlap = _overlaps(masks, samples)
    result = ss.segmentation_scores(masks, [s.mask for s in samples])
    result.update({
        "giou_ci": bootstrap_interval(np.array(ious)[None], lambda x: x[0].mean(-1), bootstrap),
        "ciou_ci": bootstrap_interval(overlap, lambda x: x[0].sum(-1) / np.maximum(1, x[1].sum(-1)), bootstrap),
        "per_family": {f: v["giou"] for f, v in per_family.items()},
        "per_family_ciou": {f: v["ciou"] for f, v in per_family.items()},
        "ious": [round(float(v), 6) for v in ious],
    })
    return result


def _token_record(visual: np.ndarray, tokens: np.ndarray, base_visual: np.ndarray, base_tokens: np.ndarray,
                  dims: tuple[int, int, int]) -> dict[str, Any]:
    """Token and FLOPs accounting from the image tokens and all tokens entering each layer [n, layers], against the
    unpruned counts. The image tokens' FLOPs of a sample: sum over layers of F(text + v_l) - F(text)."""
    prefill = np.array([prefill_flops(row, *dims) for row in tokens])
    image = prefill - np.array([prefill_flops(row, *dims) for row in tokens - visual])
    base_prefill = np.array([prefill_flops(row, *dims) for row in base_tokens])
    base_image = base_prefill - np.array([prefill_flops(row, *dims) for row in base_tokens - base_visual])
    profile = visual.mean(0)
    return {
        "visual_tokens_per_layer": [round(float(v), 2) for v in profile],
        "llm_input_visual_tokens": float(profile[0]),
        "mean_visual_tokens": float(profile.mean()),
        "mean_visual_tokens_per_sample": visual.mean(1).round(2).tolist(),
        "prefill_tflops": float(prefill.mean()) / 1e12,
        "flops_ratio": float(prefill.sum() / base_prefill.sum()),
        "image_tflops": float(image.mean()) / 1e12,
        "image_flops_share": float(image.sum() / base_image.sum()),
    }


def _evaluate(model, processor, samples: Sequence[ss.SegSample], config: Config, batch_size: int,
              base_counts: tuple[np.ndarray, np.ndarray], dims: tuple[int, int, int], bootstrap: int
              ) -> tuple[dict[str, Any], list[np.ndarray]]:
    """One configuration over the split: its record (scores and token accounting) and its predicted masks."""
    visual, tokens = [], []
    with config.pruner(model.vlm) as pruner:  # None for the unpruned model
        def collect(_: int) -> None:  # called after each batch: the pruner's stats are that batch's prefill
            if pruner is not None:
                visual.append(pruner.stats.visual_tokens.double().numpy())
                tokens.append(pruner.stats.tokens.double().numpy())

        result = evaluate_segmentation(model, processor, samples, batch_size, return_masks=True, progress=collect)
    if pruner is None:
        visual, tokens = base_counts
    else:
        visual, tokens = np.concatenate(visual), np.concatenate(tokens)
    record = _scores(result["masks"], samples, result["ious"], result["per_family"], bootstrap)
    record.update(_token_record(visual, tokens, *base_counts, dims))
    return record, result["masks"]


def blind_box_record(samples: Sequence[ss.SegSample], train_prompts: int = BLIND_TRAIN_PROMPTS,
                     bootstrap: int = 1000) -> tuple[dict[str, Any], list[np.ndarray]]:
    """The box-from-text baseline on ``samples``: each family's best centred box on the first ``train_prompts`` train
    prompts (``synthseg.blind_box_baseline``); its record and masks."""
    boxes = ss.blind_box_baseline(ss.load_split("train", train_prompts))
    masks = [ss.box_mask(boxes[s.family]) for s in samples]
    families = {}
    for family in dict.fromkeys(s.family for s in samples):
        chosen = [i for i, s in enumerate(samples) if s.family == family]
        families[family] = ss.segmentation_scores([masks[i] for i in chosen], [samples[i].mask for i in chosen])
    record = {"method": BLIND_BOX, "budget": None, "train_prompts": train_prompts,
              "boxes": {f: list(b) for f, b in boxes.items()}}
    record.update(_scores(masks, samples, [ss.iou(m, s.mask) for m, s in zip(masks, samples)], families, bootstrap))
    return record, masks


def _prepare(config: Config, vlm, adapter, inputs: dict[str, Any], image_tokens: int, tolerance: float | None
             ) -> tuple[Config, dict[str, Any]] | str:
    """The configuration to run (its budget matched within ``tolerance``, see ``match_budget``; None: passed as it
    is) with the start of its record, or the reason it cannot run on this model."""
    record: dict[str, Any] = {"method": config.method or "unpruned", "budget": config.budget, "label": config.label,
                              "params": config.params}
    if config.method is None:
        return config, record
    method = get_method(config.name)
    try:
        method(**config.params).check_support(adapter)
    except TypeError as error:
        return str(error)
    record["budget_convention"] = method.budget_convention
    if not method.learned_budget:
        target = config.budget * image_tokens if isinstance(config.budget, float) else float(config.budget)
        try:
            fit = match_budget(vlm, config.name, config.params, target, inputs, image_tokens,
                               np.inf if tolerance is None else tolerance)
        except ValueError as error:  # the method refuses the budget on this model
            return str(error)
        if fit["untouched"]:
            return f"{UNTOUCHED} (its budget: {method.budget_convention})"
        config = Config(config.method, config.budget, fit["params"])
        record.update(params=config.params, target_tokens_per_layer=target,
                      calibrated=fit["params"] != record["params"],
                      budget_matched=None if tolerance is None else fit["matched"])
    record["resolved"] = method(**config.params).resolved(adapter)
    return config, record


def run_seg_bench(
    model,
    processor,
    samples: Sequence[ss.SegSample],
    methods: Sequence[str],
    budgets: Sequence[int | float] = DEFAULT_BUDGETS,
    *,
    batch_size: int = 8,
    match: bool = True,
    speed_samples: int = 2,
    speed_repeats: int = 5,
    train_prompts: int = BLIND_TRAIN_PROMPTS,
    examples: int = 4,
    bootstrap: int = 1000,
    progress: bool = True,
    stream: ResultStream | None = None,
) -> tuple[dict[str, Any], dict[str, dict[str, list]]]:
    """Run the unpruned model, then every (method, budget), on MiniLISA ``model`` (pruners go on ``model.vlm``) and
    SynthSeg ``samples``. ``budgets``: shares (floats) or counts (ints) of image tokens per decoder layer, averaged over
    the layers; ``match=False`` passes them to every method in its own convention instead (``ratio=`` / ``keep=``).

    Returns the JSON-ready report (``table``: its Markdown table) and the predicted masks and IoUs of the first
    ``examples`` samples ({label: {masks, ious}}, for ``plots.plot_masks``) of the unpruned model, the blind box and
    each method's configuration with the fewest image tokens per layer. ``stream``: where each configuration's record
    is saved as it finishes; the configurations it already holds are reused (their example masks are predicted
    again, on the ``examples`` prompts only)."""
    vlm = model.vlm
    model.eval()
    adapter = adapter_for(vlm)
    layers = vlm.config.text_config.num_hidden_layers
    dims = text_config_dims(vlm.config.text_config)
    base_counts = _unpruned_counts(processor, samples, vlm.config.image_token_id, layers, batch_size)
    image_tokens = adapter.fixed_tokens_per_image or int(base_counts[0][:, 0].max())
    tolerance = max(0.5, MATCH_TOLERANCE * image_tokens)
    speed_inputs = to_model(vlm, prompt_inputs(processor, samples[:speed_samples]))

    learned, skipped = learned_configs(methods, adapter)
    todo = configs([m for m in methods if not is_learned(m)], budgets) + learned  # the unpruned model first
    prepared, untouched = [], {}
    for config in tqdm(todo, desc="matching budgets", disable=not progress):
        ready = _prepare(config, vlm, adapter, speed_inputs, image_tokens, tolerance if match else None)
        if isinstance(ready, str):
            skipped[config.label] = ready
            if ready.startswith(UNTOUCHED):
                untouched[config.method] = ready
        else:
            prepared.append(ready)
    for config, _ in prepared:  # a method that keeps every image token at one budget is decode-only: all of it goes
        if config.method in untouched:
            skipped[config.label] = untouched[config.method]
    prepared = [(c, r) for c, r in prepared if c.method not in untouched]

    results, shown = [], {}
    done = stream.done if stream is not None else {}
    bar = tqdm(prepared, desc="vtprune bench synthseg", disable=not progress)
    for config, record in bar:
        bar.set_postfix_str(config.label)
        if config.label in done:
            record = done[config.label]
            with config.pruner(vlm):
                masks = evaluate_segmentation(model, processor, samples[:examples], batch_size,
                                              return_masks=True)["masks"]
        else:
            scores, masks = _evaluate(model, processor, samples, config, batch_size, base_counts, dims, bootstrap)
            record.update(scores)
            record.update(measure_speed(vlm, config, speed_inputs, speed_repeats))
            if stream is not None:
                stream.add(config.label, record)
        results.append(record)
        shown[config.label] = {"masks": masks[:examples], "ious": record["ious"][:examples]}

    blind, blind_masks = blind_box_record(samples, train_prompts, bootstrap)
    shown[BLIND_BOX] = {"masks": blind_masks[:examples], "ious": blind["ious"][:examples]}
    base = results[0]
    for record in [*results, blind]:
        record["retention"] = record["giou"] / base["giou"] if base["giou"] else None
        # paired over the same prompts: this configuration's gIoU over the unpruned one's
        record["retention_ci"] = bootstrap_interval(
            np.array([record["ious"], base["ious"]]),
            lambda x: x[0].mean(-1) / np.where(x[1].mean(-1) > 0, x[1].mean(-1), np.nan), bootstrap)
    report = {
        "task": "synthseg",
        "split": "test",
        "samples": len(samples),
        "families": list(ss.FAMILIES),
        "families_of_samples": [s.family for s in samples],
        "image_tokens": image_tokens,
        "layers": layers,
        "budget_unit": ("image tokens per image entering a decoder layer, averaged over the layers (a budget share "
                        "is of the image's tokens); methods of other conventions get the keep= that matches it on "
                        "a calibration batch" if match else
                        "each method's own budget convention (ratio= / keep= passed as given)"),
        "match_tolerance": tolerance if match else None,
        "intervals": f"bootstrap 95% percentile intervals over prompts ({bootstrap} resamples; retention paired)",
        "device": str(next(vlm.parameters()).device),
        "threads": torch.get_num_threads(),
        "flops_formula": "prefill LLM FLOPs, see vtprune/bench/flops.py (LLaMA 3-matrix MLP, 2 FLOPs per MAC); "
                         "image part: sum over layers of F(text + image tokens) - F(text), summed over prompts, as a "
                         "share of the unpruned model's",
        "latency": f"best of {speed_repeats} VLM prefills of a batch of {speed_samples}, interleaved with unpruned "
                   "(includes the VLM's ViT; the mask decoder and its own image encoder are not timed)",
        "results": results,
        "blind_box": blind,
        "skipped": skipped,
    }
    report["table"] = format_seg_table(report)
    smallest: dict[str, dict[str, Any]] = {}  # per method, its configuration with the fewest image tokens per layer
    for record in results[1:]:
        if record["mean_visual_tokens"] < smallest.get(record["method"], {}).get("mean_visual_tokens", np.inf):
            smallest[record["method"]] = record
    keep = {"unpruned", BLIND_BOX, *(r["label"] for r in smallest.values())}
    return report, {label: value for label, value in shown.items() if label in keep}


def _interval(value: float | None, ci: list[float] | None) -> str:
    if value is None:
        return ""
    return f"{100 * value:.1f}" + (f" ({100 * ci[0]:.1f}-{100 * ci[1]:.1f})" if ci else "")


def _passed(record: dict[str, Any]) -> str:
    """The budget parameters a configuration ran with, marked where they were matched."""
    params = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in record["params"].items())
    if record.get("budget_matched") is False:  # the target lies out of the method's reach
        params += " (closest reachable)" if record.get("calibrated") else " (unmatched)"
    elif record.get("calibrated"):
        params += " (matched)"
    return params


def format_seg_table(report: dict[str, Any]) -> str:
    """The report as a Markdown table, one row per configuration (unpruned, the blind box, then methods), followed by
    the resolved settings of methods that derive some (CSP's plan) and the skipped configurations."""
    families = [f for f in report["families"] if f in set(report["families_of_samples"])]
    head = (["config", "params", "img tok/layer", "gIoU (95% CI)", "cIoU (95% CI)", "retention % (95% CI)"]
            + families + ["img FLOPs %", "prefill FLOPs %", "latency x"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = [report["results"][0], report["blind_box"], *report["results"][1:]]
    for r in rows:
        blind = r["method"] == BLIND_BOX
        label = r["method"] if r["budget"] is None else f"{r['method']}@{budget_label(r['budget'])}"
        cells = [label, "" if blind else _passed(r), "0" if blind else f"{r['mean_visual_tokens']:.1f}",
                 _interval(r["giou"], r["giou_ci"]), _interval(r["ciou"], r["ciou_ci"]),
                 _interval(r["retention"], r["retention_ci"])]
        cells += [f"{100 * r['per_family'][f]:.1f}" if f in r["per_family"] else "" for f in families]
        cells += ["0", "", ""] if blind else [f"{100 * r['image_flops_share']:.1f}", f"{100 * r['flops_ratio']:.1f}",
                                              f"{r['latency_ratio']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- {r['method']}@{budget_label(r['budget'])}: "
             + ", ".join(f"{k}={v}" for k, v in r["resolved"].items() if not isinstance(v, (list, tuple, dict)))
             for r in report["results"][1:] if r.get("resolved")]
    if notes:
        lines += ["", "Resolved settings:", *notes]
    if report["skipped"]:
        by_reason: dict[str, list[str]] = {}
        for label, reason in report["skipped"].items():
            by_reason.setdefault(reason, []).append(label)
        lines += ["", "Skipped:", *(f"- {', '.join(labels)}: {reason}" for reason, labels in by_reason.items())]
    return "\n".join(lines)
