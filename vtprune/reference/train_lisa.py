"""Training MiniLISA, the segmentation reference model (``vtprune train-reference --model mini-lisa``).

MiniLISA is the shipped MiniLLaVA extended the way LISA extends LLaVA (see :mod:`vtprune.reference.lisa`): words for
SynthSeg prompts and a ``[SEG]`` token are appended to the vocabulary (every existing id keeps its meaning), and a mask
decoder reads the [SEG] token's last hidden state next to its own, never-pruned copy of the vision tower's features.

Recipe: the vision tower stays frozen (its features are computed once per scene; the decoder's copy is that same
frozen tower), and so does the projector; ``train_from_layer`` > 0 also freezes the token embeddings and the decoder
layers below it (cheaper steps; the default trains them all). The language model and the mask decoder train together
on SynthSeg train prompts, **every step on the full, unpruned 576-token visual sequence** -- no subsets, no pruned
inputs, no auxiliary loss inside the LLM. All prompts of a scene share its image prefix (MiniLLaVA's packed training
path, exactly the causal computation of each full prompt). Loss: per-pixel binary cross-entropy plus dice, at a third
of the image resolution against the target mask's area fractions (the decoder's fine path works at that resolution;
predictions are upsampled to full size). The val split picks the checkpoint by gIoU; the test split is evaluated once,
by the library's ``evaluate_segmentation`` on the reloaded checkpoint.
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

from vtprune.bench import synthseg as ss, synthvqa as sv
from vtprune.bench.segmentation import evaluate_segmentation
from vtprune.reference.build import build_processor, build_tokenizer
from vtprune.reference.lisa import EXTRA_WORDS, PROMPT_TEMPLATE, SEG_TOKEN, MaskDecoder, MiniLisa, format_prompt
from vtprune.reference.train import (REFERENCE_DIR, NUM_IMAGE_TOKENS, Question, _autocast, _lr_at, _pack, _pixels,
                                     _PrefixLM, start_run)

LISA_DIR: Path = Path(__file__).resolve().parent / "mini-lisa"
REGRESSION_SUBSET = 24  # first test prompts whose IoUs are recorded for regression tests


def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of the prompt's continuation after the image: "<prompt> ASSISTANT: [SEG]"."""
    return tokenizer(format_prompt(prompt).split("\n", 1)[1], add_special_tokens=False).input_ids


class _SegData:
    """Scenes as uint8 pixels [n, 336, 336, 3] and frozen-tower features [n, 576, Dv] (float16), each with its prompts
    (``Question`` tuples whose answer slot holds the target's index in ``targets``) and ``targets`` [m, h, w] (uint8
    area fraction of each low-resolution cell covered by the target, x255)."""

    def __init__(self, model, image_processor, tokenizer, scenes: Sequence[tuple[Any, list[tuple[str, np.ndarray]]]],
                 *, stride: int, device: str, log: Callable[[str], None], batch: int = 32) -> None:
        n = len(scenes)
        self.images = torch.empty((n, sv.IMAGE_SIZE, sv.IMAGE_SIZE, 3), dtype=torch.uint8)
        self.questions: list[list[Question]] = []
        targets, full = [], []
        empty = torch.zeros(0, dtype=torch.int16)
        for i, (image, prompts) in enumerate(scenes):
            self.images[i] = torch.from_numpy(np.array(image))
            qs = []
            for prompt, mask in prompts:
                qs.append((_prompt_ids(tokenizer, prompt), len(targets), 0, empty))
                cover = torch.from_numpy(mask).float()[None, None]
                targets.append((F.avg_pool2d(cover, stride)[0, 0] * 255).round().to(torch.uint8))
                full.append(mask)
            self.questions.append(qs)
        self.targets = torch.stack(targets)
        self.full_masks = full
        tower, layer = model.model.vision_tower, model.config.vision_feature_layer
        self.feats = torch.empty((n, NUM_IMAGE_TOKENS, tower.config.hidden_size), dtype=torch.float16)
        t0 = time.time()
        with torch.no_grad():
            for start in range(0, n, batch):
                out = tower(pixel_values=_pixels(self.images[start:start + batch], image_processor, device),
                            output_hidden_states=True)
                self.feats[start:start + batch] = out.hidden_states[layer][:, 1:].to("cpu", torch.float16)
        log(f"[features] {n} scenes in {time.time() - t0:.0f}s")

    def __len__(self) -> int:
        return len(self.questions)


def _train_scenes(seeds: Sequence[int], prompt_sets: int) -> list[tuple[Any, list[tuple[str, np.ndarray]]]]:
    out = []
    for seed in seeds:
        scene = sv.generate_scene(seed)
        asked: dict[str, np.ndarray] = {}
        for k in range(prompt_sets):
            for s in ss.prompts_for_scene(scene, np.random.default_rng([seed, ss.PROMPT_STREAM + k])):
                asked.setdefault(s.prompt, s.mask)
        out.append((scene.image, list(asked.items())))
    return out


def _split_scenes(samples: Sequence[ss.SegSample]) -> list[tuple[Any, list[tuple[str, np.ndarray]]]]:
    order: dict[int, int] = {}
    out: list[tuple[Any, list[tuple[str, np.ndarray]]]] = []
    for s in samples:
        if s.scene_seed not in order:
            order[s.scene_seed] = len(out)
            out.append((s.image, []))
        out[order[s.scene_seed]][1].append((s.prompt, s.mask))
    return out


def _forward(plm: _PrefixLM, decoder: MaskDecoder, data: _SegData, scenes: Sequence[int],
             questions: list[list[Question]], image_processor, *, device: str, full_size: bool
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask logits [prompts, h, w] for ``questions`` (one list per scene of ``scenes``) and the target indices."""
    feats = data.feats[list(scenes)].to(device).float()
    packed = _pack(questions, plm.model.config.pad_token_id, plm.prefix_len)
    seg = plm.question_hidden(feats, packed)
    rows = packed["q_row"].to(device)
    pixels = _pixels(data.images[list(scenes)], image_processor, device)
    fine = decoder.pixel_features(pixels)  # once per scene, shared by its prompts
    logits = decoder(feats[rows], seg, pixels[rows], full_size=full_size, pixel_features=fine[rows])
    return logits, packed["answers"]


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    logits, target = logits.float(), target.float() / 255
    bce = F.binary_cross_entropy_with_logits(logits, target)
    prob = logits.sigmoid().flatten(1)
    flat = target.flatten(1)
    dice = 1 - (2 * (prob * flat).sum(1) + 1) / (prob.sum(1) + flat.sum(1) + 1)
    return bce + dice.mean()


@torch.no_grad()
def _val_giou(plm: _PrefixLM, decoder: MaskDecoder, data: _SegData, image_processor, *, device: str, amp: bool,
              batch: int = 8) -> dict[str, float]:
    preds, targets = [], []
    for start in range(0, len(data), batch):
        scenes = range(start, min(len(data), start + batch))
        with _autocast(device, amp):
            logits, index = _forward(plm, decoder, data, scenes, [data.questions[i] for i in scenes],
                                     image_processor, device=device, full_size=True)
        preds.extend((logits > 0).cpu().numpy())
        targets.extend(data.full_masks[int(i)] for i in index)
    return ss.segmentation_scores(preds, targets)


def train_lisa_reference(
    output_dir: str | Path,
    *,
    base: str | Path = REFERENCE_DIR,
    seed: int = 0,
    device: str = "cpu",
    n_scenes: int = 2000,
    prompt_sets: int = 3,
    steps: int = 700,
    batch: int = 6,
    prompts_per_scene: int = 8,
    train_from_layer: int = 0,
    lr: float = 3e-3,
    lm_lr: float = 1e-3,
    weight_decay: float = 0.01,
    warmup: int = 30,
    eval_every: int = 50,
    n_val: int = 240,
    n_test: int = 480,
    amp: bool = True,
    threads: int | None = None,
    log_every: int = 25,
    verbose: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train MiniLISA from the MiniLLaVA checkpoint ``base`` (see the module docstring) into ``output_dir``."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    output_dir, lines, log, t_start = start_run(output_dir, overwrite=overwrite, threads=threads, seed=seed,
                                                verbose=verbose)
    recipe = dict(base=str(base), seed=seed, device=device, n_scenes=n_scenes, prompt_sets=prompt_sets, steps=steps,
                  batch=batch, prompts_per_scene=prompts_per_scene, train_from_layer=train_from_layer, lr=lr,
                  lm_lr=lm_lr, weight_decay=weight_decay,
                  warmup=warmup, eval_every=eval_every, n_val=n_val, n_test=n_test, amp=amp,
                  threads=torch.get_num_threads())
    log(f"recipe {json.dumps(recipe)}")
    tokenizer = build_tokenizer(EXTRA_WORDS)
    processor = build_processor(tokenizer)
    model = LlavaForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
    old_vocab = model.config.text_config.vocab_size
    model.resize_token_embeddings(len(tokenizer))  # new rows start at the mean of the old ones
    model.config.seg_token_id = tokenizer.convert_tokens_to_ids(SEG_TOKEN)
    model.to(device)
    model.model.vision_tower.requires_grad_(False)
    lm = model.model.language_model
    # the lower layers (and what feeds them) stay as MiniLLaVA learnt them: no backward pass through them
    frozen_parts = [model.model.multi_modal_projector, model.lm_head, *lm.layers[:train_from_layer]]
    for frozen in frozen_parts + ([lm.embed_tokens] if train_from_layer else []):
        frozen.requires_grad_(False)
    decoder = MaskDecoder(model.config.vision_config.hidden_size, model.config.text_config.hidden_size).to(device)
    stride = decoder.pixel_stride
    times: dict[str, float] = {}

    t = time.time()
    image_processor = processor.image_processor
    data = _SegData(model, image_processor, tokenizer, _train_scenes(range(n_scenes), prompt_sets), stride=stride,
                    device=device, log=log)
    val = _SegData(model, image_processor, tokenizer, _split_scenes(ss.load_split("val", n_val)), stride=stride,
                   device=device, log=log)
    times["data_and_features"] = time.time() - t
    n_prompts = sum(len(q) for q in data.questions)
    log(f"data: {len(data)} train scenes, {n_prompts} prompts; {n_val} val prompts ({times['data_and_features']:.0f}s)")

    plm = _PrefixLM(model, tokenizer)
    trained = [p for p in plm.parameters() if p.requires_grad]
    groups = [{"params": trained, "lr": lm_lr, "peak": lm_lr},
              {"params": list(decoder.parameters()), "lr": lr, "peak": lr}]
    opt = torch.optim.AdamW(groups, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    history, best = [], {"giou": -1.0}
    t = time.time()
    running = []
    for step in range(steps + 1):
        if step % eval_every == 0 or step == steps:
            model.eval(), decoder.eval()
            scores = _val_giou(plm, decoder, val, image_processor, device=device, amp=amp)
            model.train(), decoder.train()
            history.append({"step": step, **scores})
            log(f"step {step}: val gIoU {scores['giou']:.4f} cIoU {scores['ciou']:.4f}")
            if scores["giou"] > best["giou"]:
                best = {"step": step, **scores,
                        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
                        "decoder": {k: v.detach().clone() for k, v in decoder.state_dict().items()}}
        if step == steps:
            break
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, group["peak"], warmup)
        scenes = torch.randint(len(data), (batch,), generator=gen).tolist()
        questions = []
        for i in scenes:
            qs = data.questions[i]
            pick = torch.randperm(len(qs), generator=gen)[:prompts_per_scene].tolist()
            questions.append([qs[j] for j in pick])
        with _autocast(device, amp):
            logits, index = _forward(plm, decoder, data, scenes, questions, image_processor, device=device,
                                     full_size=False)
        loss = _loss(logits, data.targets[index].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained + list(decoder.parameters()), 1.0)
        opt.step()
        running.append(loss.item())
        if (step + 1) % log_every == 0:
            log(f"step {step + 1}/{steps} loss {np.mean(running):.4f} ({(time.time() - t) / (step + 1):.2f}s/step)")
            running = []
    times["training"] = time.time() - t
    model.load_state_dict(best.pop("state"))
    decoder.load_state_dict(best.pop("decoder"))
    log(f"best val gIoU {best['giou']:.4f} at step {best['step']}")
    del data

    lisa = MiniLisa(model.to("cpu").float().eval(), decoder.to("cpu").float().eval())
    lisa.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)

    t = time.time()
    reloaded = MiniLisa.from_pretrained(output_dir).to(device)
    reprocessor = AutoProcessor.from_pretrained(output_dir)
    test_samples = ss.load_split("test", n_test)
    test = evaluate_segmentation(reloaded, reprocessor, test_samples, batch_size=8)
    ious = test.pop("ious")
    boxes = ss.blind_box_baseline(ss.load_split("train", 400))
    blind = ss.segmentation_scores([ss.box_mask(boxes[s.family]) for s in test_samples],
                                   [s.mask for s in test_samples])
    times["evaluation"] = time.time() - t
    times["total"] = time.time() - t_start
    log(f"test gIoU {test['giou']:.4f} cIoU {test['ciou']:.4f}; box-from-text baseline gIoU {blind['giou']:.4f}")
    for family, scores in test["per_family"].items():
        log(f"  test {family:12s} gIoU {scores['giou']:.3f} cIoU {scores['ciou']:.3f} (n {scores['n']})")
    params = {"vision_tower": sum(p.numel() for p in model.model.vision_tower.parameters()),
              "projector": sum(p.numel() for p in model.model.multi_modal_projector.parameters()),
              "language_model": sum(p.numel() for p in model.model.language_model.parameters())
              + sum(p.numel() for p in model.lm_head.parameters()),
              "mask_decoder": sum(p.numel() for p in decoder.parameters())}
    result = {
        "recipe": recipe,
        "base_model": str(base),
        "vocabulary": {"before": old_vocab, "after": len(tokenizer), "added": list(EXTRA_WORDS),
                       "seg_token_id": model.config.seg_token_id},
        "parameters": params,
        "full_sequence_steps": steps,
        "wall_time_s": {k: round(v, 1) for k, v in times.items()},
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "training_prompts": n_prompts,
        "val_history": history,
        "best": best,
        "prompt_template": PROMPT_TEMPLATE,
        "test": test,
        "box_from_text_baseline": {**blind, "boxes": boxes,
                                   "rule": "per prompt family, the centred square box with the best train gIoU "
                                           "(400 train prompts); it never sees the image"},
        "test_subset": {"n": REGRESSION_SUBSET, "split": "test",
                        "ious": [round(v, 6) for v in ious[:REGRESSION_SUBSET]]},
    }
    (output_dir / "training_log.json").write_text(json.dumps(result, indent=2) + "\n")
    (output_dir / "training_log.txt").write_text("\n".join(lines) + "\n")
    (output_dir / "README.md").write_text(model_card(result))
    return result


def _frozen(train_from_layer: int) -> str:
    if not train_from_layer:
        return ("The vision tower and projector stayed frozen; the language model (all decoder layers, and the token "
                "embeddings whose new rows start from transformers' mean-resizing initialisation) trained")
    return (f"The vision tower, projector, token embeddings and decoder layers 0-{train_from_layer - 1} stayed "
            "frozen; the upper decoder layers trained")


def model_card(result: dict[str, Any]) -> str:
    r, test, blind = result["recipe"], result["test"], result["box_from_text_baseline"]
    rows = "\n".join(f"| {f} | {s['giou']:.3f} | {s['ciou']:.3f} | {s['n']} |" for f, s in test["per_family"].items())
    times, params = result["wall_time_s"], result["parameters"]
    return f"""# MiniLISA (vtprune reference model for segmentation)

MiniLLaVA extended LISA-style for referring and reasoning segmentation on SynthSeg (`vtprune.bench.synthseg`). Not a
general segmentation model.

```python
from vtprune.reference.lisa import MiniLisa
from transformers import AutoProcessor
model = MiniLisa.from_pretrained("vtprune/reference/mini-lisa")     # or reference.load_reference("mini-lisa")
processor = AutoProcessor.from_pretrained("vtprune/reference/mini-lisa")
masks = model.segment(processor, [image], ["segment the red triangle"])
```

Input: `{result['prompt_template']}` (the assistant turn is the `[SEG]` token, teacher forced as LISA evaluates).
Prune with `vtprune.apply(model.vlm, ...)`: the VLM is a stock `LlavaForConditionalGeneration`; the mask decoder's
own image path (a frozen copy of the vision tower) is never pruned, as SAM's is not in LISA.

## Architecture
- VLM: the shipped MiniLLaVA ({params['vision_tower']:,} vision, {params['projector']:,} projector,
  {params['language_model']:,} language-model parameters), vocabulary {result['vocabulary']['before']} ->
  {result['vocabulary']['after']} words (added: {', '.join(result['vocabulary']['added'])}; `config.seg_token_id` =
  {result['vocabulary']['seg_token_id']}).
- Mask decoder ({params['mask_decoder']:,} parameters): the [SEG] token's last hidden state, through an MLP, modulates
  (FiLM) the decoder's 24 x 24 patch features plus fixed place features (a 3x3 and a 1x1 conv, then a coarse logit per
  patch: a 1x1 head plus a dot product with a query from the [SEG] state); a small conv net on the image at 1/3
  resolution refines the upsampled coarse map; logits are upsampled bilinearly to 336 x 336.

## How it was trained
From the shipped MiniLLaVA (whose own training is in its model card).
{_frozen(r['train_from_layer'])}, and the mask decoder with them, for {r['steps']} steps of {r['batch']} scenes x up to
{r['prompts_per_scene']} prompts (lr {r['lm_lr']} for the VLM, {r['lr']} for the mask decoder, cosine, bfloat16 autocast),
on {result['training_prompts']} prompts from {r['n_scenes']} SynthSeg train scenes. Loss: per-pixel BCE + dice at
112 x 112. **Every step saw the full, unpruned 576-token visual sequence**; nothing was trained on pruned inputs. The
val split ({r['n_val']} prompts) picked step {result['best']['step']} (val gIoU {result['best']['giou']:.3f}).

Wall time on {result['machine']['threads']} CPU threads: data and features {times['data_and_features'] / 60:.1f} min,
training {times['training'] / 60:.1f} min, evaluation {times['evaluation'] / 60:.1f} min, total
{times['total'] / 60:.1f} min.

## Test split ({r['n_test']} prompts, balanced over the families)
**gIoU {test['giou']:.3f}, cIoU {test['ciou']:.3f}.** Box-from-text baseline (the best fixed centred box per prompt
family, never seeing the image): gIoU {blind['giou']:.3f}, cIoU {blind['ciou']:.3f}.

| family | gIoU | cIoU | prompts |
|---|---|---|---|
{rows}

Retrain: `vtprune train-reference --model mini-lisa --output DIR` (log: `training_log.txt`, record:
`training_log.json`).
"""
