"""Training MiniLLaVA, the small LLaVA-1.5-style reference model shipped with vtprune (``vtprune train-reference``).

Pruning methods need a real VLM to be measured on, but downloading a 7B LLaVA is not an option for tests or CI.
MiniLLaVA keeps every structural property those methods rely on -- a CLIP ViT with a [CLS] token whose penultimate
layer feeds an MLP projector, 576 image tokens per 336x336 image, a multi-layer Llama decoder with grouped-query
attention -- at a size that trains on two CPU cores in under two hours, and loads through the ordinary HuggingFace
classes (``LlavaForConditionalGeneration`` / ``AutoProcessor``).

It is trained the way LLaVA is, on SynthVQA (:mod:`vtprune.bench.synthvqa`):

(a) the vision tower is pretrained alone with a global objective on the pooled [CLS] output (multi-label
    prediction of the scene's attributes, through a linear head that is thrown away), so that [CLS] attention is
    meaningful, plus a per-patch auxiliary (colour, shape, glyph ink and centroid of the object under each patch)
    that makes the patch features informative;
(b) the tower is frozen, its penultimate-layer patch features are computed once, and the projector + language model
    learn to answer SynthVQA train questions, with the loss on the answer token and on the ``</s>`` that ends it.
    The val split picks the checkpoint; the test split is only ever evaluated.

Honesty of the recipe. A model trained on pruned inputs tolerates pruning and flatters every method, so the
language model spends most of its steps on the full, unmasked 576-token visual sequence. A decoder trained from
scratch on this task otherwise sits on the answer priors for thousands of steps -- finding the object a question is
about and reading it out must both be learnt, and neither gives a gradient without the other -- so a short
curriculum starts it: for ``curriculum_hold`` steps each question sees only the image tokens it is about, then a
growing random share of the others until ``curriculum_steps``; during the first ``subset_steps`` the image is cut to
``subset_tokens`` (every patch one of its questions is about, plus random others, at their own RoPE positions) to
make those steps cheap. The curriculum alone did not teach the decoder to find the object among distractors
(training accuracy fell as they appeared), so during the curriculum only (``ground_steps``) an attention auxiliary
pulls the answer position's attention in late layers (``ground_layers``, 4-5 of 8) to its relevant patches; it is
off for every full-sequence step, and no registered method scores with those layers (FastV at its default
depth-scaled K reads layer 0). The model card states all of this and the share of full-sequence steps. The previous
recipe (an auxiliary on layers 0-3, the layers FastV reads, and 3,600 of 4,000 steps on 128-token subsets) is in
git history with the checkpoint it made.

Prompt format (word-level tokens, one word per whitespace-separated item)::

    "USER: <image>\\n<question> ASSISTANT:"

and the answer is one word followed by ``</s>``. The final evaluation uses :func:`vtprune.bench.evaluate.evaluate`
(closed-choice likelihood, and generate-and-match); validation during training reads the first-token logits on the
cached features, which is the same rule for single-token answers.

Two runs of the same recipe agree to about 0.02 in val accuracy but not bit for bit: they match step for step at
first and drift apart later, as multi-threaded CPU kernels summing in varying order would explain.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vtprune.bench import synthvqa as sv
from vtprune.bench.evaluate import evaluate
from vtprune.ops import attention_probs, rotate_half
from vtprune.reference.build import NUM_IMAGE_TOKENS, PROMPT_TEMPLATE, build_config, build_processor, build_tokenizer

REFERENCE_DIR: Path = Path(__file__).resolve().parent / "mini-llava"
#: Size of the fixed test subset whose accuracy is recorded for regression tests.
REGRESSION_SUBSET = 48


# ------------------------------------------------------------------ stage (a): vision targets

def _target_names() -> list[str]:
    colours, shapes = list(sv.COLOURS), list(sv.SHAPES)
    names = [f"colour:{c}" for c in colours] + [f"shape:{s}" for s in shapes]
    names += [f"pair:{c}-{s}" for c in colours for s in shapes]
    names += [f"label:{g}" for g in sv.LABELS]
    names += [f"region:{r}" for r in sv.REGIONS]
    names += [f"region-colour:{r}-{c}" for r in sv.REGIONS for c in colours]
    names += [f"count-colour:{c}>={k}" for c in colours for k in (2, 3)]
    names += [f"count-shape:{s}>={k}" for s in shapes for k in (2, 3)]
    names += [f"count-total>={k}" for k in range(4, 9)]
    names += [f"size:{z}" for z in sv.SIZES]
    return names


TARGET_NAMES: tuple[str, ...] = tuple(_target_names())


def scene_targets(scene: sv.Scene) -> np.ndarray:
    """Multi-label description of a whole scene: what the [CLS] token is trained to summarise.

    It covers what SynthVQA asks about (colours, shapes, their pairs, glyphs, where
    objects are, how many) so the encoder's features carry it, but only globally:
    the tower never sees a question or a per-patch target.
    """
    on: set[str] = set()
    objs = scene.objects
    for o in objs:
        region = sv.region_of(*o.centroid())
        on |= {f"colour:{o.colour}", f"shape:{o.shape}", f"pair:{o.colour}-{o.shape}", f"region:{region}",
               f"region-colour:{region}-{o.colour}", f"size:{o.size}"}
        if o.label is not None:
            on.add(f"label:{o.label}")
    for c in sv.COLOURS:
        n = sum(o.colour == c for o in objs)
        on |= {f"count-colour:{c}>={k}" for k in (2, 3) if n >= k}
    for s in sv.SHAPES:
        n = sum(o.shape == s for o in objs)
        on |= {f"count-shape:{s}>={k}" for k in (2, 3) if n >= k}
    on |= {f"count-total>={k}" for k in range(4, 9) if len(objs) >= k}
    return np.array([name in on for name in TARGET_NAMES], dtype=np.float32)


#: classes of the optional per-patch auxiliary targets (0 = background / no glyph)
PATCH_TARGETS = {"colour": 1 + len(sv.COLOURS), "shape": 1 + len(sv.SHAPES), "glyph": 1 + len(sv.LABELS), "centre": 2}


def patch_targets(scene: sv.Scene) -> np.ndarray:
    """[4, 576] int per patch: colour and shape of the object covering it, the glyph whose ink it holds
    (6+ px), and whether an object's centroid falls in it (the dense auxiliary of stage (a); the ViT's
    position embeddings make region follow)."""
    out = np.zeros((len(PATCH_TARGETS), sv.GRID * sv.GRID), dtype=np.uint8)
    colours, labels = list(sv.COLOURS), list(sv.LABELS)
    for o in scene.objects:
        cover = o.patch_mask().reshape(-1)
        out[0, cover] = 1 + colours.index(o.colour)
        out[1, cover] = 1 + sv.SHAPES.index(o.shape)
        if o.label is not None and o.label_mask is not None:
            ink = o.label_mask.reshape(sv.GRID, sv.PATCH_SIZE, sv.GRID, sv.PATCH_SIZE).sum(axis=(1, 3)).reshape(-1)
            out[2, ink >= 6] = 1 + labels.index(o.label)
        cx, cy = o.centroid()
        out[3, min(int(cy // sv.PATCH_SIZE), sv.GRID - 1) * sv.GRID + min(int(cx // sv.PATCH_SIZE), sv.GRID - 1)] = 1
    return out


# ------------------------------------------------------------------ training helpers

def _tune_allocator() -> None:
    """Keep freed memory in-process: on small VMs, returning and re-faulting big activation buffers
    every step made CPU training several times slower and very erratic (glibc only)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: large blocks from the heap, not mmap
        libc.mallopt(-1, 1 << 40)  # M_TRIM_THRESHOLD: never trim the heap top
        libc.mallopt(-2, 1 << 28)  # M_TOP_PAD
    except (OSError, AttributeError):
        pass


def start_run(output_dir: str | Path, *, overwrite: bool, threads: int | None, seed: int, verbose: bool
              ) -> tuple[Path, list[str], Callable[[str], None], float]:
    """A training run's set-up: refuse to overwrite a checkpoint unless asked, threads, seeds, and a log that
    timestamps and keeps every line. Returns (output folder, log lines, log, start time)."""
    output_dir = Path(output_dir)
    if (output_dir / "config.json").exists() and not overwrite:
        raise FileExistsError(f"{output_dir} already holds a checkpoint: choose another output folder, or pass "
                              "overwrite=True (--overwrite) to replace it")
    output_dir.mkdir(parents=True, exist_ok=True)
    _tune_allocator()
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    np.random.seed(seed)
    lines: list[str] = []
    started = time.time()

    def log(msg: str) -> None:
        line = f"[{time.time() - started:7.1f}s] {msg}"
        lines.append(line)
        if verbose:
            print(line, flush=True)

    return output_dir, lines, log, started


def _lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


#: one training question: token ids of "<question> ASSISTANT:", answer id, family index, relevant patch indices
Question = tuple[list[int], int, int, torch.Tensor]


class _Pool:
    """Training scenes kept as uint8 pixels + question token ids (the scene masks are dropped).

    Each scene gets the questions of ``question_sets`` independent draws of
    ``synthvqa.questions_for_scene`` (draw 0 is exactly what ``load_split("train")`` asks of
    it), de-duplicated: the image prefix is shared, so extra questions per image are cheap.
    """

    def __init__(self, seeds: Sequence[int], question_sets: int, tokenizer):
        n = len(seeds)
        self.seeds = list(seeds)
        self.images = torch.empty((n, sv.IMAGE_SIZE, sv.IMAGE_SIZE, 3), dtype=torch.uint8)
        self.targets = torch.empty((n, len(TARGET_NAMES)), dtype=torch.float32)
        self.patch_targets = torch.empty((n, len(PATCH_TARGETS), sv.GRID * sv.GRID), dtype=torch.uint8)
        self.questions: list[list[Question]] = []
        for i, seed in enumerate(self.seeds):
            scene = sv.generate_scene(seed)
            self.images[i] = torch.from_numpy(np.array(scene.image))
            self.targets[i] = torch.from_numpy(scene_targets(scene))
            self.patch_targets[i] = torch.from_numpy(patch_targets(scene))
            asked: dict[str, Question] = {}
            for k in range(question_sets):
                for s in sv.questions_for_scene(scene, np.random.default_rng([seed, 7 + k])):
                    asked.setdefault(s.question, _encode_question(tokenizer, s))
            self.questions.append(list(asked.values()))

    def __len__(self) -> int:
        return len(self.seeds)


def _encode_question(tokenizer, sample: sv.Sample) -> Question:
    ids = tokenizer(f"{sample.question} ASSISTANT:", add_special_tokens=False).input_ids
    relevant = torch.from_numpy(np.flatnonzero(sample.relevant_patches.reshape(-1))).to(torch.int16)
    return ids, int(tokenizer.convert_tokens_to_ids(sample.answer)), sv.FAMILIES.index(sample.family), relevant


def _pixels(images: torch.Tensor, image_processor, device: str) -> torch.Tensor:
    """Same numbers as the CLIP processor (images are already 336x336: rescale + normalise only)."""
    x = images.to(device).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(image_processor.image_mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(image_processor.image_std, device=device).view(1, 3, 1, 1)
    return (x - mean) / std


def _autocast(device: str, enabled: bool):
    return torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu",
                          dtype=torch.bfloat16, enabled=enabled)


class _VisionHeads(nn.Module):
    """Throw-away heads of stage (a): the global [CLS] head and the optional per-patch head."""

    def __init__(self, hidden: int):
        super().__init__()
        self.cls = nn.Linear(hidden, len(TARGET_NAMES))
        self.patch = nn.Linear(hidden, sum(PATCH_TARGETS.values()))

    def forward(self, tower, pixel_values: torch.Tensor, layer: int):
        out = tower(pixel_values=pixel_values, output_hidden_states=True)
        return self.cls(out.pooler_output).float(), self.patch(out.hidden_states[layer][:, 1:]).float()


def _init_position_embedding(tower) -> None:
    """2-D sin-cos start for the learned position table ([CLS] row zero), so attention can find
    neighbouring patches from the first step instead of discovering the grid from scratch."""
    emb = tower.embeddings.position_embedding.weight
    dim, grid = emb.shape[1], sv.GRID
    quarter = dim // 4
    freqs = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float32) / max(1, quarter)))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                            indexing="ij")
    parts = []
    for coord in (ys.reshape(-1), xs.reshape(-1)):
        angles = coord[:, None] * freqs[None, :]
        parts += [angles.sin(), angles.cos()]
    table = torch.zeros_like(emb)
    table[1:, :4 * quarter] = torch.cat(parts, dim=1).to(emb.dtype)
    with torch.no_grad():
        emb.copy_(table)


def _patch_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-patch losses, each restricted to where it is informative (objects cover ~10% of patches)."""
    sizes = list(PATCH_TARGETS.values())
    colour, shape, glyph, centre = torch.split(logits, sizes, dim=-1)
    t = targets.long()
    on_object = t[:, 0] > 0
    labelled = torch.zeros_like(on_object)
    for b in range(t.shape[0]):  # patches of objects that carry a glyph: glyph ink vs. plain surface
        ids = torch.unique(t[b, 0][t[b, 2] > 0])
        if len(ids):
            labelled[b] = on_object[b] & torch.isin(t[b, 0], ids)
    loss = F.cross_entropy(colour.reshape(-1, sizes[0]), t[:, 0].reshape(-1))
    if on_object.any():
        loss = loss + F.cross_entropy(shape[on_object], t[:, 1][on_object])
        loss = loss + F.cross_entropy(centre[on_object], t[:, 3][on_object],
                                      weight=torch.tensor([1.0, 5.0], device=logits.device))
    if labelled.any():
        loss = loss + F.cross_entropy(glyph[labelled], t[:, 2][labelled])
    return loss / len(sizes)


def _pretrain_vision(model, pool: _Pool, val_pool: _Pool, image_processor, *, steps: int, batch: int,
                     lr: float, weight_decay: float, patch_weight: float, seed: int, device: str, amp: bool,
                     log: Callable[[str], None], log_every: int, val_every: int = 0) -> dict[str, Any]:
    tower = model.model.vision_tower
    layer = model.config.vision_feature_layer
    _init_position_embedding(tower)
    heads = _VisionHeads(tower.config.hidden_size).to(device)
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(seed + 1)
    order = torch.randperm(len(pool), generator=gen)
    warmup = max(1, steps // 20)
    tower.train()
    cursor, history = 0, []
    t0 = time.time()
    for step in range(steps):
        if cursor + batch > len(order):
            order, cursor = torch.randperm(len(pool), generator=gen), 0
        idx = order[cursor:cursor + batch]
        cursor += batch
        _set_lr(opt, _lr_at(step, steps, lr, warmup))
        with _autocast(device, amp):
            cls_logits, patch_logits = heads(tower, _pixels(pool.images[idx], image_processor, device), layer)
        cls_loss = F.binary_cross_entropy_with_logits(cls_logits, pool.targets[idx].to(device))
        loss = cls_loss
        patch_loss = torch.zeros(())
        if patch_weight:
            patch_loss = _patch_loss(patch_logits, pool.patch_targets[idx].to(device))
            loss = loss + patch_weight * patch_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        history.append((float(cls_loss.detach()), float(patch_loss.detach())))
        if log_every and (step + 1) % log_every == 0:
            recent = np.array(history[-log_every:])
            log(f"[vit] step {step + 1}/{steps} cls-loss {recent[:, 0].mean():.4f} patch-loss {recent[:, 1].mean():.4f} "
                f"{(step + 1) * batch / (time.time() - t0):.1f} img/s")
        if val_every and (step + 1) % val_every == 0 and step + 1 < steps:
            tower.eval()
            metrics = _vision_metrics(tower, heads, val_pool, image_processor, layer=layer, device=device, amp=amp)
            log(f"[vit] step {step + 1} val: {json.dumps({k: round(v, 3) for k, v in metrics.items()})}")
            tower.train()
    tower.eval()
    metrics = _vision_metrics(tower, heads, val_pool, image_processor, layer=layer, device=device, amp=amp)
    log(f"[vit] val: {json.dumps({k: round(v, 4) for k, v in metrics.items()})}")
    recent = np.array(history[-max(1, log_every):])
    return {"train_cls_loss_last": float(recent[:, 0].mean()), "train_patch_loss_last": float(recent[:, 1].mean()),
            "val": metrics}


@torch.no_grad()
def _vision_metrics(tower, heads: _VisionHeads, pool: _Pool, image_processor, *, layer: int, device: str,
                    amp: bool) -> dict[str, float]:
    """Balanced accuracy of the [CLS] head per target group on held-out scenes, plus per-patch accuracy
    of the auxiliary head on object patches (how much the frozen features already say)."""
    cls_preds, patch_preds = [], []
    for start in range(0, len(pool), 32):
        with _autocast(device, amp):
            c, p = heads(tower, _pixels(pool.images[start:start + 32], image_processor, device), layer)
        cls_preds.append((c > 0).cpu())
        parts, s0 = [], 0
        for n in PATCH_TARGETS.values():
            parts.append(p[..., s0:s0 + n].argmax(-1).cpu())
            s0 += n
        patch_preds.append(torch.stack(parts, 1))
    pred, truth = torch.cat(cls_preds).float(), pool.targets
    pos = (pred * truth).sum(0) / truth.sum(0).clamp(min=1)
    neg = ((1 - pred) * (1 - truth)).sum(0) / (1 - truth).sum(0).clamp(min=1)
    balanced = (pos + neg) / 2
    groups: dict[str, list[int]] = {}
    for j, name in enumerate(TARGET_NAMES):
        groups.setdefault(name.split(":")[0].split(">")[0], []).append(j)
    out = {f"cls_{g}": float(balanced[js].mean()) for g, js in groups.items()}
    ppred, ptruth = torch.cat(patch_preds), pool.patch_targets.long()
    for k, name in enumerate(PATCH_TARGETS):
        on = ptruth[:, k] > 0
        out[f"patch_{name}"] = float((ppred[:, k][on] == ptruth[:, k][on]).float().mean()) if on.any() else float("nan")
    return out


@torch.no_grad()
def _extract_features(model, images: torch.Tensor, image_processor, *, device: str, batch: int,
                      log: Callable[[str], None]) -> torch.Tensor:
    """The exact tensor LLaVA feeds its projector: penultimate layer, [CLS] dropped, in float32."""
    tower = model.model.vision_tower
    tower.eval()
    layer = model.config.vision_feature_layer
    feats = torch.empty((len(images), NUM_IMAGE_TOKENS, tower.config.hidden_size), dtype=torch.float16)
    t0 = time.time()
    for start in range(0, len(images), batch):
        out = tower(pixel_values=_pixels(images[start:start + batch], image_processor, device),
                    output_hidden_states=True)
        feats[start:start + batch] = out.hidden_states[layer][:, 1:].to("cpu", torch.float16)
        if start // batch % 50 == 49:
            log(f"[features] {start + batch}/{len(images)} {(start + batch) / (time.time() - t0):.1f} img/s")
    return feats


class _PrefixLM:
    """Projector + decoder trained with one image prefix shared by all of that image's questions.

    "<s> USER: <image>x576" does not depend on the question, so it is run once per image
    (plain causal attention, with gradients) and all of the image's questions are then packed
    into one continuation row: each question attends to the whole prefix and causally to
    itself only, with positions restarting right after the prefix.  For every question this
    is exactly the causal computation of its full prompt (RoPE only sees relative positions,
    so left padding in the batched full forward does not change it) at a fraction of the cost.
    """

    def __init__(self, model, tokenizer):
        from transformers import DynamicCache

        self._cache_cls = DynamicCache
        self.model = model
        self.lm = model.model.language_model
        self.projector = model.model.multi_modal_projector
        self.head = model.lm_head
        self.head_ids = torch.tensor(tokenizer("USER:").input_ids)  # "<s> USER:"
        self.prefix_len = len(self.head_ids) + NUM_IMAGE_TOKENS

    def parameters(self) -> list[nn.Parameter]:
        return list(self.projector.parameters()) + list(self.lm.parameters()) + list(self.head.parameters())

    def image_tokens(self, feats: torch.Tensor, packed: dict[str, torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The image's LLM tokens [B, K, D] and the prefix positions (None: contiguous)."""
        keep = packed.get("image_keep")
        if keep is None:
            return self.projector(feats.to(self.head.weight.dtype)), None
        # a subset of the image tokens, at their own positions
        device, b, head_len = feats.device, feats.shape[0], len(self.head_ids)
        keep = keep.to(device)
        feats = feats.gather(1, keep[..., None].expand(-1, -1, feats.shape[-1]))
        prefix_pos = torch.cat([torch.arange(head_len, device=device).expand(b, -1), head_len + keep], 1)
        return self.projector(feats.to(self.head.weight.dtype)), prefix_pos

    def _run(self, feats: torch.Tensor, packed: dict[str, torch.Tensor], ground_layers: Sequence[int] = ()):
        """The packed continuation's last hidden states [B, width, D], the prefix embeddings, the KV cache, and
        the inputs of ``ground_layers`` ({layer: (hidden, rope)})."""
        device = feats.device
        embed = self.lm.get_input_embeddings()
        head = embed(self.head_ids.to(device)).unsqueeze(0).expand(feats.shape[0], -1, -1)
        img, prefix_pos = self.image_tokens(feats, packed)
        prefix = torch.cat([head.to(img.dtype), img], dim=1)
        cache = self._cache_cls(config=self.lm.config)
        self.lm(inputs_embeds=prefix, past_key_values=cache, use_cache=True, position_ids=prefix_pos)
        captured: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = {}

        def capture(layer: int):
            def hook(module, args, kwargs):
                captured[layer] = (args[0] if args else kwargs["hidden_states"], kwargs["position_embeddings"])
            return hook

        handles = [self.lm.layers[i].register_forward_pre_hook(capture(i), with_kwargs=True) for i in ground_layers]
        try:
            hidden = self.lm(input_ids=packed["suffix"].to(device), past_key_values=cache, use_cache=True,
                             attention_mask=packed["mask"].to(device),
                             position_ids=packed["pos"].to(device)).last_hidden_state
        finally:
            for h in handles:
                h.remove()
        return hidden, prefix, cache, captured

    def question_hidden(self, feats: torch.Tensor, packed: dict[str, torch.Tensor]) -> torch.Tensor:
        """The last hidden state at each packed question's last token [questions, D] (MiniLISA: the [SEG] token)."""
        hidden = self._run(feats, packed)[0]
        return hidden[packed["q_row"].to(feats.device), packed["q_last"].to(feats.device)]

    def logits(self, feats: torch.Tensor, packed: dict[str, torch.Tensor],
               ground_layers: Sequence[int] = ()) -> tuple[torch.Tensor, torch.Tensor | None]:
        """feats [B,576,Dv] + a :func:`_pack` batch -> (next-token logits [questions, V], grounding).

        When the batch was packed ``with_answers``, the logits are [questions, 2, V]: at the answer
        position (target: the answer) and at the answer token (target: ``</s>``).

        ``grounding`` [questions, layers, heads, 2] is the attention mass that each question's answer
        position puts, in ``ground_layers``, on its relevant patches and on its own question's tokens
        (None when no layer is asked).
        """
        device = feats.device
        b, head_len = feats.shape[0], len(self.head_ids)
        hidden, prefix, cache, captured = self._run(feats, packed, ground_layers)
        q_row, q_last = packed["q_row"].to(device), packed["q_last"].to(device)
        if "answer_at" in packed:  # teacher-forced answers: also the logits that must predict </s>
            logits = self.head(hidden[q_row[:, None], torch.stack([q_last, packed["answer_at"].to(device)], 1)])
        else:
            logits = self.head(hidden[q_row, q_last])
        if not ground_layers:
            return logits, None
        key_mask = packed["mask"][packed["q_row"], 0, packed["q_last"]].to(device)
        relevant = packed["relevant"].to(device)
        prefix_keys = prefix.shape[1]
        image_keys = slice(head_len, prefix_keys)
        masses = []
        for i in ground_layers:
            layer_input, (cos, sin) = captured[i]
            layer = self.lm.layers[i]
            attn = layer.self_attn
            x = layer.input_layernorm(layer_input[q_row, q_last])
            query = attn.q_proj(x).view(len(q_row), -1, 1, attn.head_dim)
            qc = cos.expand(b, -1, -1)[q_row, q_last][:, None, None]
            qs = sin.expand(b, -1, -1)[q_row, q_last][:, None, None]
            query = query * qc + rotate_half(query) * qs
            keys = cache.layers[i].keys[q_row]  # rotated already, prefix + packed questions
            probs = attention_probs(query, keys, attn.scaling, key_mask)[:, :, 0]
            masses.append(torch.stack([(probs[..., image_keys] * relevant[:, None]).sum(-1),
                                       probs[..., prefix_keys:].sum(-1)], -1))
        return logits, torch.stack(masses, 1)


@torch.no_grad()
def _init_language(model, std: float, seed: int) -> None:
    """Re-draw projector, decoder and head weights with a wider normal than HF's 0.02.

    With 0.02 at width 256 the query/key products start ~1e-3, attention over the ~600 prefix
    tokens is uniform and its bilinear gradient nearly vanishes, so the decoder spends
    thousands of steps on the answer priors before it starts looking at the image.
    """
    gen = torch.Generator().manual_seed(seed + 3)
    modules = [model.model.multi_modal_projector, model.model.language_model, model.lm_head]
    for root in modules:
        for module in root.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                w = module.weight
                w.copy_(torch.randn(w.shape, generator=gen) * std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()


@torch.no_grad()
def _standardise_projector(projector, feats: torch.Tensor, sample: int = 256) -> dict[str, float]:
    """Fold per-channel standardisation of the frozen features into the projector's first linear layer.

    Penultimate-layer features of a pre-LN ViT carry a large component shared by every token
    (here ~85% of the norm); at a plain init the projector passes it on and the few percent that
    tell patches apart barely move the decoder, which then sits on the answer priors for a long
    time.  Starting from standardised inputs removes that plateau; it is only an initialisation.
    """
    x = feats[:sample].float().reshape(-1, feats.shape[-1])
    mean, std = x.mean(0), x.std(0).clamp(min=1e-3)
    lin = projector.linear_1
    lin.bias.sub_(lin.weight @ (mean / std))
    lin.weight.div_(std)
    return {"feature_norm": float(x.norm(dim=-1).mean()), "shared_norm": float(mean.norm())}


def _pack(questions: list[list[Question]], pad_id: int, prefix_len: int,
          image_keep: torch.Tensor | None = None, visible_fraction: float = 1.0,
          gen: torch.Generator | None = None, eos_id: int | None = None) -> dict[str, torch.Tensor]:
    """One continuation row per image holding all its questions back to back (see :class:`_PrefixLM`).

    ``image_keep`` [images, K] (sorted patch indices) trains on a subset of the image tokens: the
    prefix then has ``prefix_len - 576 + K`` keys, but every token keeps its full-prompt position.
    ``visible_fraction`` < 1 hides from each question a random share of the image tokens it is not
    about (the curriculum of :func:`_train_language`); the image tokens themselves still see each other.
    ``eos_id`` appends each question's answer and ``</s>`` (teacher forcing), so the model also learns
    to end its answer: ``answer_at`` is the answer token's index, whose target is ``</s>``.
    """
    b = len(questions)
    extra = 0 if eos_id is None else 2
    width = max(1, max(sum(len(q[0]) + extra for q in qs) for qs in questions))
    keys = prefix_len if image_keep is None else prefix_len - NUM_IMAGE_TOKENS + image_keep.shape[1]
    suffix = torch.full((b, width), pad_id, dtype=torch.long)
    pos = torch.full((b, width), prefix_len, dtype=torch.long)
    mask = torch.zeros((b, 1, width, keys + width), dtype=torch.bool)
    mask[..., :keys] = True
    mask[:, 0, torch.arange(width), keys + torch.arange(width)] = True  # padding attends to itself
    head_len = prefix_len - NUM_IMAGE_TOKENS
    q_row, q_last, answers, families, relevant, answer_at = [], [], [], [], [], []
    for r, qs in enumerate(questions):
        t = 0
        for ids, answer, family, patches in qs:
            row = _patch_row(patches)
            relevant.append(row)
            ids = list(ids) if eos_id is None else [*ids, answer, eos_id]
            n = len(ids)
            suffix[r, t:t + n] = torch.tensor(ids)
            pos[r, t:t + n] = prefix_len + torch.arange(n)
            mask[r, 0, t:t + n, keys + t:keys + t + n] = torch.ones(n, n, dtype=torch.bool).tril()
            if visible_fraction < 1.0:
                on = row if image_keep is None else row[image_keep[r]]
                on = on | (torch.rand(on.shape, generator=gen) < visible_fraction)
                mask[r, 0, t:t + n, head_len:keys] = on
            q_row.append(r), q_last.append(t + n - 1 - extra), answers.append(answer), families.append(family)
            answer_at.append(t + n - 2)
            t += n
    packed = {"suffix": suffix, "pos": pos, "mask": mask, "q_row": torch.tensor(q_row, dtype=torch.long),
              "q_last": torch.tensor(q_last, dtype=torch.long), "answers": torch.tensor(answers, dtype=torch.long),
              "families": torch.tensor(families, dtype=torch.long), "relevant": torch.stack(relevant)}
    if eos_id is not None:
        packed["answer_at"] = torch.tensor(answer_at, dtype=torch.long)
    if image_keep is not None:
        packed["image_keep"] = image_keep
        packed["relevant"] = packed["relevant"].gather(1, image_keep[packed["q_row"]])
    return packed


def _patch_row(patches: torch.Tensor) -> torch.Tensor:
    """Patch indices -> bool [576]."""
    row = torch.zeros(NUM_IMAGE_TOKENS, dtype=torch.bool)
    row[patches.long()] = True
    return row


def _training_subset(questions: list[list[Question]], n_tokens: int, gen: torch.Generator) -> torch.Tensor:
    """[images, K] sorted patch indices: every patch some question of the image is about, filled up
    with random other patches to ``K = max(n_tokens, largest such union in the batch)``."""
    unions = [_patch_row(torch.cat([q[3] for q in qs])) for qs in questions]
    k = max(n_tokens, max(int(u.sum()) for u in unions))
    rows = []
    for on in unions:
        # relevant patches first (score >= 1), then a random order of the rest
        score = on.float() + torch.rand(NUM_IMAGE_TOKENS, generator=gen) * 0.5
        rows.append(score.topk(k).indices.sort().values)
    return torch.stack(rows)


@torch.no_grad()
def _fast_eval(plm: _PrefixLM, feats: torch.Tensor, questions: list[list[Question]],
               tokenizer, *, device: str, amp: bool, batch: int = 16) -> dict[str, Any]:
    """Validation through the shared-prefix path on cached features (same rule as :func:`evaluate`)."""
    records: list[tuple[str, bool]] = []
    plm.model.eval()
    for start in range(0, len(questions), batch):
        packed = _pack(questions[start:start + batch], tokenizer.pad_token_id, plm.prefix_len)
        with _autocast(device, amp):
            logits = plm.logits(feats[start:start + batch].to(device), packed)[0].float().cpu()
        for row, a, f in zip(logits, packed["answers"].tolist(), packed["families"].tolist()):
            family = sv.FAMILIES[f]
            choices = sv.answer_choices(family)
            # MiniLLaVA's answers are single tokens: the first-token argmax is the likelihood rule of bench.evaluate
            closed = choices[int(row[tokenizer.convert_tokens_to_ids(list(choices))].argmax())]
            records.append((family, closed == tokenizer.convert_ids_to_tokens(a)))
    plm.model.train()
    return {"accuracy": float(np.mean([ok for _, ok in records])),
            "per_family": {f: {"accuracy": float(np.mean([ok for g, ok in records if g == f]))}
                           for f in sv.FAMILIES if any(g == f for g, _ in records)}}


def _group_by_scene(samples: Sequence[sv.Sample], tokenizer):
    """Unique images of a sample list and, per image, its questions (for the shared-prefix path)."""
    order: dict[int, int] = {}
    images, questions = [], []
    for s in samples:
        if s.scene_seed not in order:
            order[s.scene_seed] = len(images)
            images.append(torch.from_numpy(np.array(s.image)))
            questions.append([])
        questions[order[s.scene_seed]].append(_encode_question(tokenizer, s))
    return torch.stack(images), questions


def _train_language(plm: _PrefixLM, feats: torch.Tensor, pool: _Pool, val_feats: torch.Tensor,
                    val_questions, tokenizer, *, steps: int, batch: int, lr: float, weight_decay: float,
                    seed: int, device: str, amp: bool, eval_every: int, log: Callable[[str], None],
                    log_every: int, question_layers: Sequence[int] = (), ground_layers: Sequence[int] = (),
                    ground_weight: float = 0.0, subset_tokens: int = 0, subset_steps: int = 0,
                    curriculum_steps: int = 0, curriculum_hold: int = 0,
                    end_weight: float = 0.0, ground_steps: int | None = None) -> dict[str, Any]:
    params = plm.parameters()
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(seed + 2)
    order, cursor, epoch = torch.randperm(len(pool), generator=gen), 0, 0
    warmup = max(1, steps // 20)
    trained = [plm.projector, plm.lm, plm.head]
    best: dict[str, Any] = {"accuracy": -1.0, "step": 0, "state": None}
    history: list[tuple[float, float, float]] = []
    evals = []
    plm.model.train()
    t0 = time.time()

    def validate(step: int) -> None:
        res = _fast_eval(plm, val_feats, val_questions, tokenizer, device=device, amp=amp)
        fams = " ".join(f"{f[:5]} {v['accuracy']:.2f}" for f, v in res["per_family"].items())
        log(f"[lm] step {step} val acc {res['accuracy']:.4f} ({fams})")
        evals.append({"step": step, "accuracy": res["accuracy"],
                      "per_family": {f: v["accuracy"] for f, v in res["per_family"].items()}})
        if res["accuracy"] > best["accuracy"]:
            best.update(accuracy=res["accuracy"], step=step,
                        state=[{k: v.detach().clone() for k, v in m.state_dict().items()} for m in trained])

    for step in range(steps):
        if cursor + batch > len(order):
            order, cursor, epoch = torch.randperm(len(pool), generator=gen), 0, epoch + 1
        idx = order[cursor:cursor + batch]
        cursor += batch
        questions = [pool.questions[i] for i in idx.tolist()]
        keep = _training_subset(questions, subset_tokens, gen) if subset_tokens and step < subset_steps else None
        # curriculum: each question first sees only the patches it is about, then more and more others
        ramp = curriculum_steps - curriculum_hold
        visible = min(1.0, max(0.0, step - curriculum_hold) / ramp) if ramp > 0 else float(step >= curriculum_steps)
        packed = _pack(questions, tokenizer.pad_token_id, plm.prefix_len, keep, visible, gen,
                       eos_id=tokenizer.eos_token_id if end_weight else None)
        _set_lr(opt, _lr_at(step, steps, lr, warmup))
        with _autocast(device, amp):
            grounded = ground_weight and (ground_steps is None or step < ground_steps)
            logits, grounding = plm.logits(feats[idx].to(device), packed,
                                           (*question_layers, *ground_layers) if grounded else ())
        logits = logits.float()
        answers = packed["answers"].to(device)
        end_loss = torch.zeros(())
        if logits.ndim == 3:  # [questions, (answer, </s>), V]
            end_loss = F.cross_entropy(logits[:, 1], torch.full_like(answers, tokenizer.eos_token_id))
            logits = logits[:, 0]
        loss = F.cross_entropy(logits, answers) + end_weight * end_loss
        ground_loss = torch.zeros(())
        if grounding is not None:
            # attention auxiliary: the answer position first reads its question, then its relevant patches
            text = grounding[:, :len(question_layers), :, 1]
            image = grounding[:, len(question_layers):, :, 0][packed["relevant"].any(-1).to(device)]
            masses = torch.cat([text.reshape(-1), image.reshape(-1)]).float()
            if masses.numel():  # e.g. only "0"-count questions and no question layers: nothing to ground
                ground_loss = -masses.clamp_min(1e-4).log().mean()
                loss = loss + ground_weight * ground_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        history.append((float(loss.detach()), float((logits.argmax(-1) == answers).float().mean()),
                        float(ground_loss.detach())))
        if log_every and (step + 1) % log_every == 0:
            recent = np.array(history[-log_every:])
            log(f"[lm] step {step + 1}/{steps} epoch {epoch} loss {recent[:, 0].mean():.4f} "
                f"train-acc {recent[:, 1].mean():.3f} ground-loss {recent[:, 2].mean():.3f} "
                f"{(step + 1) * batch / (time.time() - t0):.1f} img/s")
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            validate(step + 1)
    validate(steps)
    for module, state in zip(trained, best["state"]):
        module.load_state_dict(state)
    plm.model.eval()
    return {"best_step": best["step"], "best_val_accuracy": best["accuracy"], "val_curve": evals,
            "epochs": epoch + cursor / len(order)}


# ------------------------------------------------------------------ entry point

def train_reference(
    output_dir: str | Path,
    *,
    seed: int = 0,
    device: str = "cpu",
    n_scenes: int = 3000,
    question_sets: int = 3,
    vit_steps: int = 1400,
    vit_batch: int = 32,
    vit_lr: float = 3e-3,
    vit_patch_weight: float = 1.0,
    lm_steps: int = 3200,
    subset_tokens: int = 128,
    subset_steps: int = 1400,
    curriculum_steps: int = 1400,
    curriculum_hold: int = 100,
    end_weight: float = 0.5,
    lm_batch: int = 8,
    lm_lr: float = 2e-3,
    lm_init_std: float = 0.06,
    question_layers: Sequence[int] = (),
    ground_layers: Sequence[int] = (4, 5),
    ground_weight: float = 1.0,
    ground_steps: int | None = 1400,
    weight_decay: float = 0.05,
    eval_every: int = 400,
    n_val: int = 480,
    n_test: int = 1200,
    vision_hidden: int = 128,
    vision_layers: int = 6,
    vision_heads: int = 4,
    text_hidden: int = 192,
    text_layers: int = 8,
    text_heads: int = 4,
    text_kv_heads: int = 2,
    text_intermediate: int = 512,
    rope_theta: float = 1e6,
    vit_amp: bool = True,
    amp: bool = True,
    threads: int | None = None,
    log_every: int = 25,
    verbose: bool = True,
    cache_dir: str | Path | None = None,
    vision_from: str | Path | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train MiniLLaVA from scratch with the current recipe (its status: see the module docstring).

    Stage (b)'s training-only devices (see the module docstring): ``curriculum_steps`` over which the
    share of non-relevant image tokens each question may see grows from 0 to 1; ``ground_weight`` > 0
    adds ``-log`` of the answer position's attention mass (averaged over heads) on its own question's
    tokens in ``question_layers`` and on its relevant patches in ``ground_layers``; the first
    ``subset_steps`` steps run on ``subset_tokens`` (at least every relevant patch) of the 576 image
    tokens.  The val split, always with all 576 tokens and full visibility, picks the checkpoint.

    Determinism: every random draw is derived from ``seed`` and the SynthVQA seeds, but two runs
    agree only to about 0.02 in val accuracy, not bit for bit (see the module docstring's status).
    Only the train split is trained on, val picks the language-model checkpoint, test is evaluated once at the end
    on the model as reloaded from ``output_dir``.  ``vision_from`` (optional) takes stage (a)'s tower
    from an earlier checkpoint of this recipe instead of retraining it (its stage-(a) settings and wall
    time are read from that checkpoint's ``training_log.json`` and must match).  ``cache_dir`` (optional) keeps the stage (a)
    tower and its features, keyed by the stage (a) settings, so that trying other stage (b)
    settings does not redo (a); it is a development aid and does not change the result.
    """
    from transformers import LlavaForConditionalGeneration

    output_dir, lines, log, t_start = start_run(output_dir, overwrite=overwrite, threads=threads, seed=seed,
                                                verbose=verbose)

    arch = dict(vision_hidden=vision_hidden, vision_layers=vision_layers, vision_heads=vision_heads,
                text_hidden=text_hidden, text_layers=text_layers, text_heads=text_heads,
                text_kv_heads=text_kv_heads, text_intermediate=text_intermediate, rope_theta=rope_theta)
    recipe = dict(seed=seed, device=device, n_scenes=n_scenes, question_sets=question_sets, vit_steps=vit_steps,
                  vit_batch=vit_batch, vit_lr=vit_lr, vit_patch_weight=vit_patch_weight, lm_steps=lm_steps,
                  lm_batch=lm_batch, lm_lr=lm_lr, lm_init_std=lm_init_std, subset_tokens=subset_tokens,
                  subset_steps=subset_steps, curriculum_steps=curriculum_steps, curriculum_hold=curriculum_hold,
                  end_weight=end_weight, ground_steps=ground_steps, question_layers=list(question_layers),
                  ground_layers=list(ground_layers), ground_weight=ground_weight,
                  weight_decay=weight_decay, eval_every=eval_every, n_val=n_val, n_test=n_test, vit_amp=vit_amp,
                  amp=amp, threads=torch.get_num_threads(), **arch)
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    config = build_config(**arch)
    model = LlavaForConditionalGeneration(config)
    _init_language(model, lm_init_std, seed)
    model.to(device)
    counts = {"vision_tower": sum(p.numel() for p in model.model.vision_tower.parameters()),
              "projector": sum(p.numel() for p in model.model.multi_modal_projector.parameters()),
              "language_model": sum(p.numel() for p in model.model.language_model.parameters())
              + sum(p.numel() for p in model.lm_head.parameters())}
    counts["total"] = sum(counts.values())
    log(f"recipe {json.dumps(recipe)}")
    log(f"parameters {json.dumps(counts)}")
    times: dict[str, float] = {}

    # data
    t = time.time()
    pool = _Pool(range(sv.SPLIT_SEED_BASE["train"], sv.SPLIT_SEED_BASE["train"] + n_scenes), question_sets, tokenizer)
    val_samples = sv.load_split("val", n_val)
    val_images, val_questions = _group_by_scene(val_samples, tokenizer)
    val_seeds = list(dict.fromkeys(s.scene_seed for s in val_samples))
    vit_val = _Pool(val_seeds[:256], 0, tokenizer)
    times["data"] = time.time() - t
    log(f"data: {n_scenes} train scenes, {sum(len(q) for q in pool.questions)} distinct questions, "
        f"{len(val_samples)} val questions on {len(val_images)} scenes ({times['data']:.0f}s)")

    # (a) vision tower pretraining on a global [CLS] objective (+ the per-patch auxiliary)
    stage_a = {k: recipe[k] for k in ("seed", "n_scenes", "vit_steps", "vit_batch", "vit_lr", "vit_patch_weight",
                                      "weight_decay", "n_val", "vit_amp", "vision_hidden", "vision_layers",
                                      "vision_heads")}
    cached = None
    if vision_from is not None:
        cached = _stage_a_from_checkpoint(Path(vision_from), stage_a, model, pool, val_images,
                                          processor.image_processor, device=device, log=log)
    elif cache_dir is not None:
        key = hashlib.sha1(json.dumps(stage_a, sort_keys=True).encode()).hexdigest()[:12]
        cache_file = Path(cache_dir) / f"stage_a_{key}.pt"
        if cache_file.is_file():
            cached = torch.load(cache_file, weights_only=False)
            log(f"[vit] reusing stage (a) from {cache_file}")
    t = time.time()
    if cached is None:
        vit_report = _pretrain_vision(model, pool, vit_val, processor.image_processor, steps=vit_steps,
                                      batch=vit_batch, lr=vit_lr, weight_decay=weight_decay,
                                      patch_weight=vit_patch_weight, seed=seed, device=device, amp=vit_amp,
                                      log=log, log_every=log_every, val_every=log_every * 8)
    else:
        model.model.vision_tower.load_state_dict(cached["tower"])
        vit_report = cached["report"]
    times["vision_pretraining"] = cached["seconds"] if cached else time.time() - t

    # frozen tower: cache the projector inputs once
    t = time.time()
    model.model.vision_tower.requires_grad_(False)
    if cached is None:
        feats = _extract_features(model, pool.images, processor.image_processor, device=device, batch=32, log=log)
        val_feats = _extract_features(model, val_images, processor.image_processor, device=device, batch=32, log=log)
    else:
        feats, val_feats = cached["feats"], cached["val_feats"]
    pool.images = torch.empty(0)
    times["feature_extraction"] = cached["feature_seconds"] if cached else time.time() - t
    log(f"features {tuple(feats.shape)} ({times['feature_extraction']:.0f}s)")
    if cache_dir is not None and cached is None and vision_from is None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        torch.save({"tower": model.model.vision_tower.state_dict(), "report": vit_report, "feats": feats,
                    "val_feats": val_feats, "seconds": times["vision_pretraining"],
                    "feature_seconds": times["feature_extraction"]}, cache_file)

    # (b) projector + language model on SynthVQA questions, answer token only
    t = time.time()
    feature_stats = _standardise_projector(model.model.multi_modal_projector, feats)
    log(f"features: mean norm {feature_stats['feature_norm']:.1f}, shared part {feature_stats['shared_norm']:.1f}")
    plm = _PrefixLM(model, tokenizer)
    lm_report = _train_language(plm, feats, pool, val_feats, val_questions, tokenizer, steps=lm_steps,
                                batch=lm_batch, lr=lm_lr, weight_decay=weight_decay, seed=seed, device=device,
                                amp=amp, eval_every=eval_every, log=log, log_every=log_every,
                                question_layers=question_layers, ground_layers=ground_layers,
                                ground_weight=ground_weight, subset_tokens=subset_tokens, subset_steps=subset_steps,
                                curriculum_steps=curriculum_steps, curriculum_hold=curriculum_hold,
                                end_weight=end_weight, ground_steps=ground_steps)
    times["language_training"] = time.time() - t
    del feats

    # save, reload, evaluate what was saved
    model.to("cpu").float()
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    result = {
        "recipe": recipe,
        "parameters": counts,
        "checkpoint_bytes": sum(p.stat().st_size for p in output_dir.glob("*.safetensors")),
        "wall_time_s": times,
        "stage_a_reused": cached is not None,
        "stage_a_source": str(vision_from) if vision_from is not None else None,
        "full_sequence_steps": full_sequence_steps(lm_steps, subset_steps, curriculum_steps),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "vision_pretraining": vit_report,
        "language_training": lm_report,
    }
    return evaluate_checkpoint(output_dir, result, lines, log, n_val=n_val, n_test=n_test, device=device,
                               started=t_start)


def evaluate_checkpoint(output_dir: Path, result: dict[str, Any], lines: list[str], log: Callable[[str], None],
                        *, n_val: int, n_test: int, device: str = "cpu", started: float | None = None
                        ) -> dict[str, Any]:
    """The final evaluation of a saved checkpoint, as reloaded from ``output_dir``: val and test accuracy by
    likelihood (with intervals), test by generate-and-match; then the training log and the model card are written
    (``result``: the training record so far, completed here)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    t = time.time()
    reloaded = LlavaForConditionalGeneration.from_pretrained(output_dir, dtype=torch.float32).to(device)
    reprocessor = AutoProcessor.from_pretrained(output_dir)
    val_metrics = evaluate(reloaded, reprocessor, sv.load_split("val", n_val), token_stats=False)
    test_samples = sv.load_split("test", n_test)
    test_metrics = evaluate(reloaded, reprocessor, test_samples, return_predictions=True, token_stats=False)
    generated = evaluate(reloaded, reprocessor, test_samples, scoring="generate", token_stats=False)
    test_metrics["generate_accuracy"] = generated["accuracy"]
    test_metrics["generate_per_family"] = generated["per_family"]
    test_metrics["chance"] = {f: sv.chance_rate(f) for f in test_metrics["per_family"]}
    test_metrics["family_n"] = {f: sum(s.family == f for s in test_samples) for f in test_metrics["per_family"]}
    for metrics in (val_metrics, test_metrics):
        metrics.pop("correct")
    subset = test_metrics.pop("predictions")[:REGRESSION_SUBSET]
    times = result["wall_time_s"]
    times["evaluation"] = time.time() - t
    if started is not None:
        times["total"] = time.time() - started
    elif "total" in times:  # a re-evaluation: the caller removed the earlier evaluation's time
        times["total"] += times["evaluation"]
    log(f"val acc {val_metrics['accuracy']:.4f}  test acc {test_metrics['accuracy']:.4f} "
        f"(generate and match {test_metrics['generate_accuracy']:.4f})")
    for fam, acc in test_metrics["per_family"].items():
        log(f"  test {fam:13s} {acc:.3f} (chance {test_metrics['chance'][fam]:.3f}, generate "
            f"{test_metrics['generate_per_family'][fam]:.3f}, n {test_metrics['family_n'][fam]})")
    result.update({
        "wall_time_s": {k: round(v, 1) for k, v in times.items()},
        "evaluation_rule": "accuracy: the family's closed choice with the highest sequence likelihood; "
                           "generate_accuracy: greedy generation matched against the answer (vtprune.bench.evaluate)",
        "prompt_template": PROMPT_TEMPLATE,
        "val": val_metrics,
        "test": test_metrics,
        "test_subset": {"n": len(subset), "split": "test", "first": REGRESSION_SUBSET,
                        "correct": sum(p["prediction"] == p["answer"] for p in subset),
                        "accuracy": float(np.mean([p["prediction"] == p["answer"] for p in subset])) if subset else 0.0,
                        "predictions": [p["prediction"] for p in subset]},
    })
    (output_dir / "training_log.json").write_text(json.dumps(result, indent=2) + "\n")
    (output_dir / "training_log.txt").write_text("\n".join(lines) + "\n")
    (output_dir / "README.md").write_text(model_card(result))
    return result


def full_sequence_steps(lm_steps: int, subset_steps: int, curriculum_steps: int) -> int:
    """Stage-(b) steps on which every question saw all 576 image tokens (no subset, full visibility)."""
    return max(0, lm_steps - max(subset_steps, curriculum_steps))


def _stage_a_from_checkpoint(path: Path, stage_a: dict[str, Any], model, pool: _Pool, val_images: torch.Tensor,
                             image_processor, *, device: str, log: Callable[[str], None]) -> dict[str, Any]:
    """Stage (a)'s output taken from an earlier checkpoint of the same stage-(a) recipe (see ``vision_from``)."""
    from transformers import LlavaForConditionalGeneration

    record = json.loads((path / "training_log.json").read_text())
    theirs = {k: record["recipe"].get(k) for k in stage_a}
    if theirs != stage_a:
        diff = {k: (theirs[k], v) for k, v in stage_a.items() if theirs[k] != v}
        raise ValueError(f"{path} was trained with other stage-(a) settings {diff}: retrain stage (a) instead")
    earlier = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    model.model.vision_tower.load_state_dict(earlier.model.vision_tower.state_dict())
    log(f"[vit] stage (a) taken from {path} (trained there in {record['wall_time_s']['vision_pretraining']:.0f}s)")
    t = time.time()
    feats = _extract_features(model, pool.images, image_processor, device=device, batch=32, log=log)
    val_feats = _extract_features(model, val_images, image_processor, device=device, batch=32, log=log)
    return {"tower": model.model.vision_tower.state_dict(), "report": record["vision_pretraining"], "feats": feats, "val_feats": val_feats,
            "seconds": record["wall_time_s"]["vision_pretraining"], "feature_seconds": time.time() - t}


def model_card(result: dict[str, Any]) -> str:
    """The checkpoint's README, written from its training log so the two cannot disagree."""
    r, p, t = result["recipe"], result["parameters"], result["wall_time_s"]
    test, lm = result["test"], result["language_training"]
    phases = {k: v for k, v in t.items() if k != "total"}
    phase_text = ", ".join(f"{k.replace('_', ' ')} {v / 60:.1f}" for k, v in phases.items())
    full = result.get("full_sequence_steps", full_sequence_steps(r["lm_steps"], r["subset_steps"],
                                                                 r["curriculum_steps"]))
    reused = ""
    if result.get("stage_a_source"):
        reused = (f" Stage (a) was not rerun: its tower was taken from the earlier checkpoint of the same stage-(a)"
                  f" recipe (`vision_from`, in git history), whose stage-(a) time is the one listed; this process took"
                  f" {t['total'] / 60:.0f} minutes.")
    elif result.get("stage_a_reused"):
        reused = (f" Stage (a) and its features came from the recipe's stage-(a) cache (`cache_dir`), timed when they"
                  f" were made in an earlier process, so this process took {t['total'] / 60:.0f} minutes.")
    if r.get("ground_weight"):
        parts = []
        if r["question_layers"]:
            parts.append(f"to its own question in layers {r['question_layers']}")
        if r["ground_layers"]:
            parts.append(f"to its relevant patches in layers {r['ground_layers']}")
        steps = r.get("ground_steps")
        when = (f"during the first {steps} steps only, and was off for every full-sequence step" if steps is not None
                else "throughout training")
        auxiliary = (f"A grounding signal was needed to start the decoder (without it, accuracy fell as soon as the"
                     f" curriculum showed distractors): an attention auxiliary (weight {r['ground_weight']}) pulled"
                     f" the answer position's attention {' and '.join(parts)}, {when}. Methods that score with"
                     f" those layers' attention would be flattered; FastV at its default depth-scaled K scores with"
                     f" layer 0, and the pre-LLM methods read no decoder layer.")
    else:
        auxiliary = ("No auxiliary loss of any kind touched the decoder's attention: the layers that methods read"
                     " their scores from were trained by the answer loss alone.")
    devices = []
    if r["subset_steps"]:
        devices.append(f"the first {r['subset_steps']} steps ran on {r['subset_tokens']}+ of the 576 image tokens"
                       " (every patch one of the image's questions is about, plus random others, at their own"
                       " positions)")
    if r["curriculum_steps"]:
        devices.append(f"over the first {r['curriculum_steps']} steps each question saw only the image tokens it is"
                       " about plus a share of the others growing from 0 to 1")
    start_text = ("A short curriculum started it: " + "; ".join(devices) + ". "
                  if devices else "")
    end_text = (f" The loss also teaches the answer to end: `</s>` after the answer token (weight {r['end_weight']}),"
                " so `generate` stops." if r.get("end_weight") else "")
    rows = "\n".join(f"| {fam} | {test['family_n'][fam]} | {acc:.3f} | {test['chance'][fam]:.3f} | "
                     f"{test['generate_per_family'][fam]:.3f} |" for fam, acc in test["per_family"].items())
    return f"""# MiniLLaVA (vtprune reference model)

A small LLaVA-1.5-style VLM trained from scratch on SynthVQA so that token-pruning methods can be measured for
real on a CPU. Load it with the ordinary classes, or with `vtprune.reference.load_reference()`:

```python
from transformers import AutoProcessor, LlavaForConditionalGeneration
model = LlavaForConditionalGeneration.from_pretrained("vtprune/reference/mini-llava")
processor = AutoProcessor.from_pretrained("vtprune/reference/mini-llava")
```

Prompt: `{PROMPT_TEMPLATE!r}` (its chat template gives the same string); the answer is one word followed by `</s>`.

## Architecture ({p['total'] / 1e6:.2f} M parameters, {result['checkpoint_bytes'] / 1e6:.1f} MB safetensors, float32)
- Vision: CLIP ViT, patch 14, 336 px, so a 24x24 grid of 576 tokens plus [CLS], {r['vision_layers']} layers of width
  {r['vision_hidden']} and {r['vision_heads']} heads ({p['vision_tower']:,} parameters). Features come from the
  penultimate layer with [CLS] dropped (`vision_feature_layer=-2`, strategy `default`).
- Projector: 2-layer GELU MLP ({p['projector']:,} parameters).
- Language model: Llama, {r['text_layers']} layers of width {r['text_hidden']}, {r['text_heads']} query and
  {r['text_kv_heads']} key/value heads, MLP {r['text_intermediate']}, RoPE theta {r['rope_theta']:g}
  ({p['language_model']:,} parameters with the head). Word-level tokenizer over SynthVQA's closed vocabulary.

## Training (`vtprune train-reference`, recipe = its defaults)
Data: {r['n_scenes']} SynthVQA train scenes with {r['question_sets']} question draws each. The val split
({r['n_val']} questions) picks the checkpoint; the test split is evaluated once, at the end.

(a) Vision tower alone: {r['vit_steps']} steps of {r['vit_batch']} images, multi-label scene attributes from the
pooled [CLS] output plus per-patch colour/shape/glyph/centroid heads (both heads are thrown away). No language
model and no question is involved.

(b) Tower frozen; projector and decoder: {r['lm_steps']} steps of {r['lm_batch']} images (all questions of an
image share its prefix){', forward in bfloat16 autocast (weights and optimiser in float32)' if r.get('amp') else ''}, loss on
the answer token.{end_text}

**Full visual sequence: {full} of {r['lm_steps']} language-model steps ({100 * full / r['lm_steps']:.0f}%)** saw
all 576 image tokens with nothing masked, as real LLaVA checkpoints are trained. {start_text}{auxiliary}
Best val step: {lm['best_step']} (val accuracy {lm['best_val_accuracy']:.3f} on the training code's fast path).

Wall time on {result['machine']['threads']} CPU threads ({result['machine']['platform']}, torch
{result['machine']['torch']}), in minutes: {phase_text}; sum {sum(phases.values()) / 60:.0f}.{reused}

## Accuracy on the test split (unpruned, {test['n']} questions)
Overall {test['accuracy']:.3f} (95% bootstrap interval {test['accuracy_ci'][0]:.3f}-{test['accuracy_ci'][1]:.3f}),
scored by the likelihood of each closed choice; generate-and-match: {test['generate_accuracy']:.3f}.

| family | n | accuracy | chance | generate |
|---|---|---|---|---|
{rows}

## Limits
A toy model on a synthetic task: the numbers measure how pruning methods trade accuracy for compute on a model
whose answers depend on small image regions, not how a 7B LLaVA behaves.
"""
