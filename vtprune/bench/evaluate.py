"""The one evaluation loop of vtprune: answers scored the way benchmarks score them, and what pruning did on the way.

Two scoring modes (``scoring=``):

- ``"likelihood"`` (closed choice, as lmms-eval's ``multiple_choice`` tasks): the prediction is the choice whose whole
  token sequence has the highest summed log-probability after the prompt. Any tokenizer and multi-token answers
  work. The prompt is prefilled once per batch, so a method prunes on the prompt alone (as when serving); a choice
  longer than one token is scored by continuing that prefill's KV cache, so no pruning decision sees a candidate
  answer.
- ``"generate"`` (generate and match): greedy decoding until the end-of-sequence token (or a few tokens more than
  the longest choice); correct when the generated text, lower-cased and stripped of surrounding spaces and
  punctuation, equals the answer.

The prompt comes from the processor's chat template (one user turn: the image, then the question) or, without a
template, LLaVA-1.5's ``"USER: <image>\\n{question} ASSISTANT:"``.
"""
from __future__ import annotations

import contextlib
import string
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import vtprune
from vtprune.bench import synthvqa as sv
from vtprune.bench.flops import prefill_flops, text_config_dims
from vtprune.bench.intervals import bootstrap_interval
from vtprune.runtime import encode_images

SCORING_MODES = ("likelihood", "generate")
LLAVA_PROMPT = "USER: <image>\n{question} ASSISTANT:"


def prompt_builder(processor) -> Callable[[str], str]:
    """question -> prompt text: the processor's chat template if it has one, else LLaVA-1.5's format."""
    if getattr(processor, "chat_template", None):
        def chat(question: str) -> str:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return chat
    return lambda question: LLAVA_PROMPT.format(question=question)


def normalise(text: str) -> str:
    """Generated text as it is matched against the answer: lower case, outer spaces and punctuation stripped."""
    return text.strip().strip(string.punctuation + " ").lower()


def continuation_ids(tokenizer, context: str, continuation: str) -> list[int]:
    """The token ids that ``continuation`` (with its leading space, lmms-eval's convention) adds after ``context``,
    as the tokenizer splits the whole text: merges across the boundary and SentencePiece's word-initial markers
    come out as in the full text."""
    before = tokenizer(context, add_special_tokens=False).input_ids
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    if whole[:len(before)] == before and len(whole) > len(before):
        return whole[len(before):]
    ids = tokenizer(continuation, add_special_tokens=False).input_ids
    if not ids:
        raise ValueError(f"the continuation {continuation!r} has no tokens")
    return ids


def make_batches(processor, samples: Sequence[sv.Sample], batch_size: int, prompt) -> list[dict[str, torch.Tensor]]:
    batches = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        batches.append(processor(images=[s.image for s in chunk], text=[prompt(s.question) for s in chunk],
                                 return_tensors="pt", padding=True, padding_side="left"))
    return batches


def to_model(model, inputs: dict[str, Any]) -> dict[str, Any]:
    param = next(model.parameters())
    out = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            value = value.to(param.device)
            if value.is_floating_point():
                value = value.to(param.dtype)
        out[key] = value
    return out


@torch.no_grad()
def choice_scores(model, inputs: dict[str, Any], choices: Sequence[Sequence[list[int]]]
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per row of the batch, over that row's choices (token ids): the summed log-probability of each choice after the
    row's prompt [choices], and whether greedy decoding would produce it [choices] (bool).

    One prefill for the batch; choices of one token are read from its last logits, longer ones continue its KV
    cache (the cache repeated once per longest row's number of multi-token choices, right-padded continuations)."""
    out = model(**inputs, use_cache=True, logits_to_keep=1)
    first = F.log_softmax(out.logits[:, -1].float(), -1)
    top = first.argmax(-1)
    scores = [torch.stack([first[b, ids[0]] for ids in row]) for b, row in enumerate(choices)]
    greedy = [torch.tensor([bool(top[b] == ids[0]) for ids in row]) for b, row in enumerate(choices)]
    longer = [[(c, ids) for c, ids in enumerate(row) if len(ids) > 1] for row in choices]
    width = max((len(row) for row in longer), default=0)
    if width == 0:
        return [s.cpu() for s in scores], greedy
    cache, batch = out.past_key_values, len(choices)
    length = max(len(ids) for row in longer for _, ids in row) - 1
    pad = 0 if getattr(model.config, "pad_token_id", None) is None else model.config.pad_token_id
    fed = torch.full((batch * width, length), pad, dtype=torch.long)
    for b, row in enumerate(longer):
        for j, (_, ids) in enumerate(row):
            fed[b * width + j, :len(ids) - 1] = torch.tensor(ids[:-1])
    cache.batch_repeat_interleave(width)
    device = first.device
    mask = inputs.get("attention_mask")
    mask = (torch.ones(batch, cache.get_seq_length(), dtype=torch.long, device=device) if mask is None else mask)
    mask = torch.cat([mask.repeat_interleave(width, 0), torch.ones(batch * width, length, dtype=mask.dtype,
                                                                   device=device)], 1)
    logits = model(input_ids=fed.to(device), attention_mask=mask, past_key_values=cache, use_cache=True).logits
    logprobs = F.log_softmax(logits.float(), -1)
    for b, row in enumerate(longer):
        for j, (c, ids) in enumerate(row):
            rest = torch.tensor(ids[1:], device=device)
            steps = logprobs[b * width + j, torch.arange(len(rest), device=device)]
            scores[b] = scores[b].clone()
            scores[b][c] += steps.gather(1, rest[:, None]).sum()
            greedy[b][c] &= bool((steps.argmax(-1) == rest).all())
    return [s.cpu() for s in scores], greedy


@torch.no_grad()
def generate_answers(model, inputs: dict[str, Any], tokenizer, max_new_tokens: Sequence[int]) -> list[str]:
    """Greedy generation for each row, at most ``max_new_tokens[row]`` tokens (so a row's answer does not depend on
    the batch it is in), decoded without special tokens."""
    out = model.generate(**inputs, max_new_tokens=max(max_new_tokens), do_sample=False, num_beams=1,
                         pad_token_id=tokenizer.pad_token_id)
    new = out[:, inputs["input_ids"].shape[1]:]
    return [tokenizer.decode(row[:limit], skip_special_tokens=True) for row, limit in zip(new, max_new_tokens)]


def _relevant_cells(relevant: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """SynthVQA's relevant patches (24x24 over a 336-px image; [height / 14, width / 14] over a high-resolution one)
    as a bool map over a (rows, cols) token grid that spans the same image (LLaVA-NeXT: the squashed base view, or the
    stitched crops): a cell is relevant if any relevant pixel falls in it."""
    pixels = np.kron(relevant, np.ones((sv.PATCH_SIZE, sv.PATCH_SIZE), dtype=bool))
    height, width = pixels.shape
    rows = np.minimum((np.arange(height) * shape[0]) // height, shape[0] - 1)
    cols = np.minimum((np.arange(width) * shape[1]) // width, shape[1] - 1)
    out = np.zeros(shape, dtype=bool)
    ys, xs = np.nonzero(pixels)
    out[rows[ys], cols[xs]] = True
    return out


def _grid_maps(layout, share: torch.Tensor, relevant: np.ndarray) -> tuple[np.ndarray, float | None]:
    """(kept share on the layout's first grid as a 2-D map, recall: mean kept share of the tokens of every grid that
    lie on relevant cells; None when the question has no relevant patch)."""
    base_shape = layout.grid_shapes[0]
    on_grid = layout.col >= 0
    base = np.zeros(base_shape, dtype=np.float32)
    first = (layout.grid == 0) & on_grid
    base[layout.row[first].numpy(), layout.col[first].numpy()] = share[first].numpy()
    if not relevant.any():
        return base, None
    hits = []
    for g, shape in enumerate(layout.grid_shapes):
        cells = _relevant_cells(relevant, shape)
        here = ((layout.grid == g) & on_grid).nonzero().flatten()
        on = cells[layout.row[here].numpy(), layout.col[here].numpy()]
        hits.append(share[here[torch.from_numpy(on)]])
    hits = torch.cat(hits)
    return base, (float(hits.mean()) if len(hits) else None)


def evaluate(
    model,
    processor,
    samples: Sequence[sv.Sample],
    *,
    method: str | None = None,
    params: dict[str, Any] | None = None,
    scoring: str = "likelihood",
    batch_size: int = 16,
    prompt: Callable[[str], str] | None = None,
    batches: list[dict[str, torch.Tensor]] | None = None,
    vision_cache: dict[int, Any] | None = None,
    return_predictions: bool = False,
    token_stats: bool = True,
    bootstrap: int = 1000,
) -> dict[str, Any]:
    """Accuracy of ``model`` (pruned by ``method`` with ``params``, or unpruned) on SynthVQA ``samples``.

    Returns ``accuracy`` with its bootstrap 95% interval ``accuracy_ci``, ``per_family`` accuracies and ``correct``
    (0/1 per sample, for paired comparisons); with ``token_stats`` also ``grounded_recall`` (mean over question-
    relevant tokens of the share of an alive token they make up: 1 when kept as their own token, 1/m when one of m
    tokens merged evenly into one, 0 when dropped; ``merges_tokens``: whether any patch shared a token), visual
    tokens per LLM layer, analytic prefill TFLOPs and
    ``keep_frequency`` (that share on the first grid, averaged over samples) with ``kept_bottom_half``, the part of
    it in the grid's bottom half (FEATHER's positional-bias diagnostic; 0.5 for an even spread). ``batches``/``vision_cache``: the
    processed batches and their encoded images, when the caller reuses them across configurations.
    """
    if scoring not in SCORING_MODES:
        raise ValueError(f"scoring={scoring!r}: choose one of {', '.join(SCORING_MODES)}")
    prompt = prompt or prompt_builder(processor)
    tokenizer = processor.tokenizer
    batches = batches if batches is not None else make_batches(processor, samples, batch_size, prompt)
    hidden, kv_width, mlp = text_config_dims(model.config.text_config)
    layers = model.config.text_config.num_hidden_layers
    image_token = model.config.image_token_id
    choice_ids: dict[tuple[str, str], list[int]] = {}
    correct, predictions, recall, flops, per_layer, heat, by_view = [], [], [], [], [], [], []
    merges = False
    was_training = model.training
    model.eval()
    offset = 0
    try:
        for raw in batches:
            n = raw["input_ids"].shape[0]
            chunk = samples[offset:offset + n]
            offset += n
            prompts = [prompt(s.question) for s in chunk]
            inputs = to_model(model, raw)
            pruning = vtprune.apply(model, method, **(params or {})) if method else contextlib.nullcontext()
            with pruning as pruner:
                if scoring == "likelihood":
                    ids = [[choice_ids.setdefault((p, c), continuation_ids(tokenizer, p, " " + c)) for c in s.choices]
                           for p, s in zip(prompts, chunk)]
                    feed = inputs
                    if vision_cache is not None and not (pruner is not None and pruner.vision_ops):
                        encoded = vision_cache.get(id(raw["pixel_values"]))
                        if encoded is not None:
                            feed = {k: v for k, v in inputs.items() if k != "pixel_values"}
                            feed["mm_encoder_outputs"] = {"image": encoded}
                    scores, _ = choice_scores(model, feed, ids)
                    answers = [s.choices[int(row.argmax())] for s, row in zip(chunk, scores)]
                    hits = [a == s.answer for a, s in zip(answers, chunk)]
                else:
                    # room for the longest choice, its end token and one more
                    limits = [2 + max(len(continuation_ids(tokenizer, p, " " + c)) for c in s.choices)
                              for p, s in zip(prompts, chunk)]
                    answers = generate_answers(model, inputs, tokenizer, limits)
                    hits = [normalise(a) == normalise(s.answer) for a, s in zip(answers, chunk)]
                stats = pruner.stats if pruner is not None else None
            correct += hits
            if return_predictions:
                predictions += [{"question": s.question, "answer": s.answer, "family": s.family, "prediction": a}
                                for s, a in zip(chunk, answers)]
            if not token_stats:
                continue
            text_tokens = (raw["attention_mask"].sum(1) - (raw["input_ids"] == image_token).sum(1)).tolist()
            if stats is None:
                layouts = [r.layout for r in _encoded(model, raw, vision_cache).images()]
            for b, sample in enumerate(chunk):
                if stats is None:
                    layout = layouts[b]
                    visual = np.full(layers, len(layout), dtype=np.float64)
                    share = torch.ones(len(layout))
                    partition = layout.partition
                    entering = torch.bincount(partition[partition >= 0], minlength=layout.num_partitions)
                    separators = int((partition < 0).sum())
                else:
                    layout = stats.layouts(b)[0]
                    visual = stats.visual_tokens[b].numpy().astype(np.float64)
                    share = stats.kept_share(b)[:len(layout)]
                    entering = stats.tokens_per_partition[b][0][:, 0]
                    separators = int(visual[0] - entering.sum())
                by_view.append((float(entering[0]), float(entering[1:].sum()), separators))
                merges |= bool(((share > 1e-6) & (share < 1 - 1e-6)).any())  # a patch is part of a merged token
                base, hit = _grid_maps(layout, share, sample.relevant_patches)
                heat.append(base)
                per_layer.append(visual)
                flops.append(prefill_flops(visual + text_tokens[b], hidden, kv_width, mlp))
                if hit is not None:
                    recall.append(hit)
    finally:
        model.train(was_training)
    hits = np.array(correct, dtype=np.float64)
    result: dict[str, Any] = {
        "n": len(hits),
        "scoring": scoring,
        "accuracy": float(hits.mean()),
        "accuracy_ci": bootstrap_interval(hits[None], lambda x: x[0].mean(-1), bootstrap),
        "per_family": {f: float(hits[[s.family == f for s in samples]].mean())
                       for f in sv.FAMILIES if any(s.family == f for s in samples)},
        "correct": hits.astype(int).tolist(),
    }
    if token_stats:
        profile = np.mean(per_layer, axis=0)
        shapes = {h.shape for h in heat}
        frequency = np.mean(heat, axis=0) if len(shapes) == 1 else None
        result.update({
            "grounded_recall": float(np.mean(recall)) if recall else None,
            # patches shared a token with others: keep_frequency and recall then weigh each by its share
            "merges_tokens": merges,
            "visual_tokens_per_layer": [round(float(v), 2) for v in profile],
            # per image (sample): what adaptive methods vary; [p10, p50, p90] per layer and each sample's layer mean
            "visual_tokens_per_layer_spread": np.percentile(per_layer, [10, 50, 90], axis=0).T.round(1).tolist(),
            "mean_visual_tokens_per_sample": np.mean(per_layer, axis=1).round(2).tolist(),
            "llm_input_visual_tokens": float(profile[0]),
            # the first image's tokens entering the LLM by view: base (or only) view, crops, newline separators
            "llm_input_tokens_by_view": dict(zip(("base", "crops", "separators"),
                                                 np.mean(by_view, axis=0).round(2).tolist())),
            "mean_visual_tokens": float(profile.mean()),
            "prefill_tflops": float(np.mean(flops)) / 1e12,
            "keep_frequency": None if frequency is None else frequency.round(4).tolist(),
            # FEATHER's diagnostic: share of what survives that comes from the bottom half of the grid (0.5: none)
            "kept_bottom_half": None if frequency is None or not frequency.sum() else
            float(frequency[frequency.shape[0] // 2:].sum() / frequency.sum()),
        })
    if return_predictions:
        result["predictions"] = predictions
    return result


def encode_batch(model, raw: dict[str, torch.Tensor]):
    """The batch's images encoded once (pixels and per-image extras such as ``image_sizes`` on the model's device)."""
    return encode_images(model, **to_model(model, {k: v for k, v in raw.items()
                                                   if k not in ("input_ids", "attention_mask")}))


def _encoded(model, raw: dict[str, torch.Tensor], vision_cache: dict[int, Any] | None):
    if vision_cache is not None and id(raw["pixel_values"]) in vision_cache:
        return vision_cache[id(raw["pixel_values"])]
    return encode_batch(model, raw)
