"""Training MiniLLaVA-NeXT, the high-resolution reference model (``vtprune train-reference --model mini-llava-next``).

A real ``LlavaNextForConditionalGeneration`` with MiniLLaVA's widths: every image is a 336-px base view (the whole
image squashed) plus 336-px crops of the full-resolution image on a 1x2, 2x1 or 2x2 grid, packed by the model's own
``pack_image_features`` (base 24x24, then the stitched crop canvas with a newline token closing each canvas row):
1,752 visual tokens for a 672 x 336 image, 2,928 for 672 x 672. It is trained on the high-resolution SynthVQA
variant (``load_split(..., resolution="high")``), whose objects and glyphs keep their pixel sizes on the larger
canvases, so the small ones are legible only in the crops.

Recipe, the way LLaVA-NeXT is made from a LLaVA-1.5-style model: the vision tower, projector and language model start
from the shipped MiniLLaVA (itself trained as its model card says); ``image_newline`` starts as transformers
initialises it. The tower stays frozen (its block features are computed once per view); the projector, the newline
token and the language model are trained on high-resolution questions, **every step on the full, unpruned visual
sequence** (no subsets, no curriculum, no attention auxiliary). The loss is on the answer token and the ``</s>`` that
ends it. Batches hold images of one canvas size (equal lengths, no padding inside the image prefix). The val split
picks the checkpoint; the test split is evaluated once at the end, by the library's ``evaluate`` on the reloaded
checkpoint, and the same model is also scored when fed only the base view (what high resolution adds).
"""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from vtprune.bench import synthvqa as sv
from vtprune.bench.evaluate import evaluate
from vtprune.reference.build import PROMPT_TEMPLATE, build_next_config, build_next_processor, build_tokenizer
from vtprune.reference.train import (REFERENCE_DIR, Question, _autocast, _encode_question, _lr_at, _pack,
                                     _PrefixLM, _set_lr, start_run)

REGRESSION_SUBSET = 24  # first test questions whose predictions are recorded for regression tests

NEXT_DIR: Path = Path(__file__).resolve().parent / "mini-llava-next"


def _question(tokenizer, sample: sv.Sample) -> Question:
    """A training question without its relevant patches (MiniLLaVA's 24 x 24 grounding does not apply here)."""
    ids, answer, family, _ = _encode_question(tokenizer, sample)
    return ids, answer, family, torch.zeros(0, dtype=torch.int16)


class _NextData:
    """Scenes of the high-resolution split as cached tower features: per canvas size, ``feats`` [n, views, T, Dv]
    (float16, the block feeding the projector, [CLS] dropped) and each scene's questions."""

    def __init__(self, model, processor, seeds: Sequence[int], question_sets: int, tokenizer, *, device: str,
                 log: Callable[[str], None], samples: Sequence[sv.Sample] | None = None) -> None:
        self.groups: dict[tuple[int, int], dict[str, Any]] = {}
        tower = model.model.vision_tower
        layer = model.config.vision_feature_layer
        scenes: list[tuple[Any, list[Question]]] = []
        if samples is None:
            for seed in seeds:
                scene = sv.generate_scene(seed, sv.scene_size(seed, "high"))
                asked: dict[str, Question] = {}
                for k in range(question_sets):
                    for s in sv.questions_for_scene(scene, np.random.default_rng([seed, 7 + k])):
                        asked.setdefault(s.question, _question(tokenizer, s))
                scenes.append((scene.image, list(asked.values())))
        else:  # the questions of a split as load_split asks them, grouped by scene
            order: dict[int, int] = {}
            for s in samples:
                if s.scene_seed not in order:
                    order[s.scene_seed] = len(scenes)
                    scenes.append((s.image, []))
                scenes[order[s.scene_seed]][1].append(_question(tokenizer, s))
        t0 = time.time()
        for i, (image, questions) in enumerate(scenes):
            pixels = processor.image_processor(images=image, return_tensors="pt")
            with torch.no_grad():
                out = tower(pixels["pixel_values"][0].to(device), output_hidden_states=True)
            feats = out.hidden_states[layer][:, 1:].to("cpu", torch.float16)
            group = self.groups.setdefault(image.size, {"feats": [], "questions": [],
                                                       "image_size": pixels["image_sizes"][0]})
            group["feats"].append(feats)
            group["questions"].append(questions)
            if (i + 1) % 500 == 0:
                log(f"[features] {i + 1}/{len(scenes)} {(i + 1) / (time.time() - t0):.1f} img/s")
        for group in self.groups.values():
            group["feats"] = torch.stack(group["feats"])

    def __len__(self) -> int:
        return sum(len(g["questions"]) for g in self.groups.values())


class _NextPrefixLM(_PrefixLM):
    """The shared-prefix training path of MiniLLaVA (one image prefix, all its questions packed after it) with
    LLaVA-NeXT's packing: projected views -> ``pack_image_features`` (base, unpadded canvas, newline tokens).
    ``base_only``: the image prefix is the base view alone (the model fed only the low-resolution image)."""

    def __init__(self, model, tokenizer) -> None:
        super().__init__(model, tokenizer)
        self.next_model = model.model
        self.image_size: torch.Tensor | None = None
        self.base_only = False

    def parameters(self):
        return super().parameters() + [self.next_model.image_newline]

    def prefix_length(self, views_tokens: int) -> int:
        return len(self.head_ids) + views_tokens

    def image_tokens(self, feats: torch.Tensor, packed: dict[str, torch.Tensor]):
        projected = self.projector(feats.to(self.head.weight.dtype))  # [B, views, T, D]
        if self.base_only:
            return projected[:, 0], None
        sizes = self.image_size[None].expand(len(projected), -1)
        tokens, _ = self.next_model.pack_image_features(list(projected), sizes, "default",
                                                        image_newline=self.next_model.image_newline)
        return torch.stack(tokens), None


def _prefix_len(plm: _NextPrefixLM, group: dict[str, Any]) -> int:
    if plm.base_only:
        return plm.prefix_length(group["feats"].shape[2])
    with torch.no_grad():
        one = group["feats"][:1, :, :1].expand(-1, -1, group["feats"].shape[2], -1)
        tokens, _ = plm.next_model.pack_image_features(
            list(plm.projector(one.float())), group["image_size"][None], "default",
            image_newline=plm.next_model.image_newline)
    return plm.prefix_length(tokens[0].shape[0])


@torch.no_grad()
def _accuracy(plm: _NextPrefixLM, data: _NextData, tokenizer, *, device: str, amp: bool, base_only: bool = False,
              batch: int = 8) -> dict[str, Any]:
    """First-token closed-choice accuracy on cached features (MiniLLaVA's answers are single tokens, so this is the
    likelihood rule of ``bench.evaluate``)."""
    records: list[tuple[str, bool]] = []
    plm.model.eval()
    plm.base_only = base_only
    for group in data.groups.values():
        plm.image_size = group["image_size"]
        prefix_len = _prefix_len(plm, group)
        for start in range(0, len(group["questions"]), batch):
            packed = _pack(group["questions"][start:start + batch], tokenizer.pad_token_id, prefix_len)
            with _autocast(device, amp):
                logits = plm.logits(group["feats"][start:start + batch].to(device), packed)[0].float().cpu()
            for row, answer, family in zip(logits, packed["answers"].tolist(), packed["families"].tolist()):
                choices = sv.answer_choices(sv.FAMILIES[family])
                best = choices[int(row[tokenizer.convert_tokens_to_ids(list(choices))].argmax())]
                records.append((sv.FAMILIES[family], best == tokenizer.convert_ids_to_tokens(answer)))
    plm.base_only = False
    plm.model.train()
    return {"accuracy": float(np.mean([ok for _, ok in records])),
            "per_family": {f: float(np.mean([ok for g, ok in records if g == f]))
                           for f in sv.FAMILIES if any(g == f for g, _ in records)}}


def _train(plm: _NextPrefixLM, data: _NextData, val: _NextData, tokenizer, *, steps: int, batch: int, lr: float,
           weight_decay: float, seed: int, device: str, amp: bool, eval_every: int, log: Callable[[str], None],
           log_every: int, end_weight: float) -> dict[str, Any]:
    params = plm.parameters()
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(seed + 3)
    groups = list(data.groups.values())
    weights = torch.tensor([len(g["questions"]) for g in groups], dtype=torch.float)
    orders = [torch.randperm(len(g["questions"]), generator=gen) for g in groups]
    cursors = [0] * len(groups)
    prefix_lens = [_prefix_len(plm, g) for g in groups]
    trained = [plm.projector, plm.lm, plm.head]
    best: dict[str, Any] = {"accuracy": -1.0, "step": 0, "state": None}
    evals, history = [], []
    warmup = max(1, steps // 20)
    eos = tokenizer.eos_token_id
    plm.model.train()
    t0 = time.time()

    def validate(step: int) -> None:
        res = _accuracy(plm, val, tokenizer, device=device, amp=amp)
        log(f"[lm] step {step} val acc {res['accuracy']:.4f} ("
            + " ".join(f"{f[:5]} {a:.2f}" for f, a in res["per_family"].items()) + ")")
        evals.append({"step": step, **res})
        if res["accuracy"] > best["accuracy"]:
            best.update(accuracy=res["accuracy"], step=step,
                        state=[{k: v.detach().clone() for k, v in m.state_dict().items()} for m in trained]
                        + [plm.next_model.image_newline.detach().clone()])

    for step in range(steps):
        g = int(torch.multinomial(weights, 1, generator=gen))  # a canvas size, in proportion to its scenes
        group = groups[g]
        if cursors[g] + batch > len(orders[g]):
            orders[g], cursors[g] = torch.randperm(len(group["questions"]), generator=gen), 0
        idx = orders[g][cursors[g]:cursors[g] + batch]
        cursors[g] += batch
        plm.image_size = group["image_size"]
        packed = _pack([group["questions"][i] for i in idx.tolist()], tokenizer.pad_token_id, prefix_lens[g],
                       eos_id=eos)
        _set_lr(opt, _lr_at(step, steps, lr, warmup))
        with _autocast(device, amp):
            logits, _ = plm.logits(group["feats"][idx].to(device), packed)
        logits = logits.float()
        answers = packed["answers"].to(device)
        loss = F.cross_entropy(logits[:, 0], answers) + end_weight * F.cross_entropy(
            logits[:, 1], torch.full_like(answers, eos))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        history.append((float(loss.detach()), float((logits[:, 0].argmax(-1) == answers).float().mean())))
        if log_every and (step + 1) % log_every == 0:
            recent = np.array(history[-log_every:])
            log(f"[lm] step {step + 1}/{steps} loss {recent[:, 0].mean():.4f} train-acc {recent[:, 1].mean():.3f} "
                f"{(time.time() - t0) / (step + 1):.2f} s/step")
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            validate(step + 1)
    validate(steps)
    for module, state in zip(trained, best["state"]):
        module.load_state_dict(state)
    with torch.no_grad():
        plm.next_model.image_newline.copy_(best["state"][-1])
    plm.model.eval()
    return {"best_step": best["step"], "best_val_accuracy": best["accuracy"], "val_curve": evals}


def train_next_reference(
    output_dir: str | Path,
    *,
    base: str | Path = REFERENCE_DIR,
    seed: int = 0,
    device: str = "cpu",
    n_scenes: int = 2400,
    question_sets: int = 3,
    steps: int = 600,
    batch: int = 4,
    lr: float = 1e-3,
    end_weight: float = 0.5,
    weight_decay: float = 0.05,
    eval_every: int = 100,
    n_val: int = 480,
    n_test: int = 600,
    amp: bool = True,
    threads: int | None = None,
    log_every: int = 25,
    verbose: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train MiniLLaVA-NeXT from the MiniLLaVA checkpoint ``base`` (see the module docstring) into ``output_dir``."""
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    output_dir, lines, log, t_start = start_run(output_dir, overwrite=overwrite, threads=threads, seed=seed,
                                                verbose=verbose)

    recipe = dict(base=str(base), seed=seed, device=device, n_scenes=n_scenes, question_sets=question_sets,
                  steps=steps, batch=batch, lr=lr, end_weight=end_weight, weight_decay=weight_decay,
                  eval_every=eval_every, n_val=n_val, n_test=n_test, amp=amp, threads=torch.get_num_threads())
    log(f"recipe {json.dumps(recipe)}")
    tokenizer = build_tokenizer()
    processor = build_next_processor(tokenizer)
    start = LlavaForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
    base_record = json.loads((Path(base) / "training_log.json").read_text())
    model = LlavaNextForConditionalGeneration(build_next_config(start.config))
    missing = model.load_state_dict(start.state_dict(), strict=False)
    if missing.unexpected_keys or missing.missing_keys != ["model.image_newline"]:
        raise RuntimeError(f"MiniLLaVA -> NeXT weight transfer: unexpected keys {missing}")
    del start
    model.to(device)
    model.model.vision_tower.requires_grad_(False)
    times: dict[str, float] = {}

    t = time.time()
    data = _NextData(model, processor, range(sv.HIGH_RES_SEED_BASE["train"], sv.HIGH_RES_SEED_BASE["train"] + n_scenes),
                     question_sets, tokenizer, device=device, log=log)
    val = _NextData(model, processor, (), 0, tokenizer, device=device, log=log,
                    samples=sv.load_split("val", n_val, resolution="high"))
    times["data_and_features"] = time.time() - t
    shares = ", ".join(f"{w}x{h}: {len(g['questions'])}" for (w, h), g in data.groups.items())
    log(f"data: {len(data)} train scenes ({shares}), "
        f"{sum(len(q) for g in data.groups.values() for q in g['questions'])} questions; {n_val} val questions "
        f"({times['data_and_features']:.0f}s)")

    plm = _NextPrefixLM(model, tokenizer)
    start_val = _accuracy(plm, val, tokenizer, device=device, amp=amp)
    start_base = _accuracy(plm, val, tokenizer, device=device, amp=amp, base_only=True)
    log(f"before training: val acc {start_val['accuracy']:.4f}, base view only {start_base['accuracy']:.4f}")
    t = time.time()
    report = _train(plm, data, val, tokenizer, steps=steps, batch=batch, lr=lr, weight_decay=weight_decay, seed=seed,
                    device=device, amp=amp, eval_every=eval_every, log=log, log_every=log_every,
                    end_weight=end_weight)
    times["language_training"] = time.time() - t
    del data

    model.to("cpu").float()
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)

    # evaluation of what was saved
    t = time.time()
    reloaded = LlavaNextForConditionalGeneration.from_pretrained(output_dir, dtype=torch.float32).to(device).eval()
    from transformers import AutoProcessor

    reprocessor = AutoProcessor.from_pretrained(output_dir)
    test_samples = sv.load_split("test", n_test, resolution="high")
    test = evaluate(reloaded, reprocessor, test_samples, token_stats=False, batch_size=8, return_predictions=True)
    test.pop("correct", None)
    subset = test.pop("predictions")[:REGRESSION_SUBSET]
    test["chance"] = {f: sv.chance_rate(f, "high") for f in test["per_family"]}
    test["family_n"] = {f: sum(s.family == f for s in test_samples) for f in test["per_family"]}
    plm = _NextPrefixLM(reloaded, tokenizer)
    test_data = _NextData(reloaded, reprocessor, (), 0, tokenizer, device=device, log=log, samples=test_samples)
    test_base = _accuracy(plm, test_data, tokenizer, device=device, amp=False, base_only=True)
    test_fast = _accuracy(plm, test_data, tokenizer, device=device, amp=False)
    times["evaluation"] = time.time() - t
    times["total"] = time.time() - t_start
    log(f"test acc {test['accuracy']:.4f} (cached-feature path {test_fast['accuracy']:.4f}); fed only the base view "
        f"{test_base['accuracy']:.4f}")
    for fam, acc in test["per_family"].items():
        log(f"  test {fam:13s} {acc:.3f} (base view only {test_base['per_family'][fam]:.3f}, chance "
            f"{test['chance'][fam]:.3f}, n {test['family_n'][fam]})")
    result = {
        "recipe": recipe,
        "base_model": {"path": str(base), "full_sequence_share": base_record.get("full_sequence_steps", 0)
                       / max(1, base_record["recipe"]["lm_steps"]), "lm_steps": base_record["recipe"]["lm_steps"],
                       "test_accuracy": base_record["test"]["accuracy"]},
        "full_sequence_steps": steps,
        "checkpoint_bytes": sum(p.stat().st_size for p in output_dir.glob("*.safetensors")),
        "wall_time_s": {k: round(v, 1) for k, v in times.items()},
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "language_training": report,
        "before_training": {"val": start_val, "val_base_view_only": start_base},
        "evaluation_rule": "accuracy: the family's closed choice with the highest sequence likelihood "
                           "(vtprune.bench.evaluate); base view only: the same model, its image prefix cut to the "
                           "576 base-view tokens (cached-feature path)",
        "prompt_template": PROMPT_TEMPLATE,
        "test": test,
        "test_base_view_only": test_base,
        "test_subset": {"n": len(subset), "split": "test", "first": len(subset),
                        "correct": sum(p["prediction"] == p["answer"] for p in subset),
                        "predictions": [p["prediction"] for p in subset]},
        "pinpoints": reloaded.config.image_grid_pinpoints,
    }
    (output_dir / "training_log.json").write_text(json.dumps(result, indent=2) + "\n")
    (output_dir / "training_log.txt").write_text("\n".join(lines) + "\n")
    (output_dir / "README.md").write_text(model_card(result))
    return result


def model_card(result: dict[str, Any]) -> str:
    r, test, base = result["recipe"], result["test"], result["test_base_view_only"]
    rows = "\n".join(f"| {f} | {100 * a:.1f} | {100 * base['per_family'][f]:.1f} | {100 * test['chance'][f]:.1f} |"
                     for f, a in test["per_family"].items())
    times = result["wall_time_s"]
    return f"""# MiniLLaVA-NeXT (vtprune reference model)

A `LlavaNextForConditionalGeneration` at toy width, trained on the high-resolution SynthVQA variant, for measuring
visual-token reduction on LLaVA-NeXT's anyres layout. Not a general VLM.

- Images: a 336-px base view plus 336-px crops on a 1x2, 2x1 or 2x2 grid (pinpoints {json.dumps(result.get('pinpoints', [[336, 672], [672, 336], [672, 672]]))}),
  packed by the model: 1,752 visual tokens for a 672 x 336 image, 2,928 for 672 x 672.
- Weights: vision tower, projector and language model start from the shipped MiniLLaVA; `image_newline` from
  transformers' initialisation.

## How it was trained
The vision tower stays frozen. The projector, `image_newline` and the language model trained for {r['steps']} steps of
{r['batch']} images (all questions of an image share its prefix), lr {r['lr']} (cosine), bfloat16 autocast, loss on
the answer and on `</s>`, on {r['n_scenes']} high-resolution train scenes. **Every one of these {r['steps']} steps saw the
full, unpruned visual sequence** (no subsets, no curriculum, no auxiliary loss). The MiniLLaVA it starts from spent
{100 * result['base_model']['full_sequence_share']:.0f}% of its {result['base_model']['lm_steps']} language-model steps on
its full 576-token sequence (see its model card). The val split ({r['n_val']} questions) picked step
{result['language_training']['best_step']}.

Wall time on {result['machine']['threads']} CPU threads: data and features {times['data_and_features'] / 60:.1f} min,
training {times['language_training'] / 60:.1f} min, evaluation {times['evaluation'] / 60:.1f} min, total
{times['total'] / 60:.1f} min (plus MiniLLaVA's own training, which it starts from).

## Test split ({sum(test['family_n'].values())} questions, likelihood over each family's closed choices)
Overall **{100 * test['accuracy']:.1f}%**; the same model fed only the base view (the 576 low-resolution tokens):
{100 * base['accuracy']:.1f}%.

| family | accuracy (%) | base view only (%) | chance (%) |
|---|---|---|---|
{rows}

Retrain: `vtprune train-reference --model mini-llava-next --output DIR` (log: `training_log.txt`, record:
`training_log.json`).
"""
