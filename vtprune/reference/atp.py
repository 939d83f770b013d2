"""``vtprune train-atp``: train ATP threshold modules on a VLM (by default the shipped MiniLLaVA) with the
budget-constrained loss, base model frozen unless asked otherwise.

Loss per batch (the paper's budget-constrained loss; our choices where the paper could not be read): cross-entropy of the answer's
first token after the prompt, plus ``budget_weight * |N_soft - target| / N`` (N_soft: the soft, layer-averaged visual
tokens per image over all decoder layers; N: the image's visual tokens), plus ``compute_weight * N_soft / N`` (fewer
tokens at equal accuracy). Training runs the pruner in training mode (soft masks, every token present); validation
runs it in inference mode (hard masks, tokens dropped), as ``vtprune.apply(model, "atp", weights=...)`` will.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import vtprune
from vtprune.bench import synthvqa as sv
from vtprune.bench.evaluate import continuation_ids, evaluate, make_batches, prompt_builder, to_model
from vtprune.methods.atp import _ATPStage, model_fingerprint, save_atp


def train_atp(
    model,
    processor,
    output_dir: str | Path,
    *,
    target: float = 0.25,
    steps: int = 300,
    batch_size: int = 8,
    lr: float = 0.03,
    budget_weight: float = 2.0,
    compute_weight: float = 0.05,
    train_llm: bool = False,
    llm_lr: float = 2e-5,
    n_train: int = 2400,
    n_val: int = 240,
    eval_every: int = 100,
    seed: int = 0,
    log: Callable[[str], None] = print,
    **atp_params: Any,
) -> dict[str, Any]:
    """Train ATP modules for ``model`` and write them to ``output_dir`` (``atp_config.json`` + safetensors, with the
    loss/budget curve). ``target``: the layer-averaged visual tokens per image, as a share of the image's tokens
    (<= 1) or a count (> 1). ``train_llm``: also fine-tune the language model (the paper's main setting; costs a
    backward pass into every decoder weight and an LLM-sized optimiser state, and changes the model you serve)."""
    torch.manual_seed(seed)
    output_dir = Path(output_dir)
    started = time.time()
    prompt = prompt_builder(processor)
    tokenizer = processor.tokenizer
    train = sv.load_split("train", n_train)
    val = sv.load_split("val", n_val)
    rng = np.random.default_rng(seed)
    model.eval()
    flags = [p.requires_grad for p in model.parameters()]  # restored at the end
    for p in model.parameters():
        p.requires_grad_(False)
    if train_llm:
        for p in model.model.language_model.parameters():
            p.requires_grad_(True)
    pruner = vtprune.apply(model, "atp", weights="untrained", **atp_params)
    stage = next(op for op in pruner.layer_ops if isinstance(op, _ATPStage))
    depth = len(pruner.adapter.decoder_layers)
    groups = [{"params": list(pruner.parameters()), "lr": lr}]
    if train_llm:
        groups.append({"params": list(model.model.language_model.parameters()), "lr": llm_lr})
    optimiser = torch.optim.AdamW(groups, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: min(1.0, (s + 1) / 20))
    curve: list[dict[str, float]] = []
    extra = {"target": target, "base_fingerprint": model_fingerprint(pruner.adapter.language_model), "train_llm": train_llm,
             "recipe": {"steps": steps, "batch_size": batch_size, "lr": lr, "budget_weight": budget_weight,
                        "compute_weight": compute_weight, "n_train": n_train, "seed": seed}}
    try:
        for step in range(1, steps + 1):
            chunk = [train[i] for i in rng.choice(len(train), batch_size, replace=False)]
            inputs = to_model(model, make_batches(processor, chunk, batch_size, prompt)[0])
            answers = torch.tensor([continuation_ids(tokenizer, prompt(s.question), " " + s.answer)[0] for s in chunk],
                                   device=inputs["input_ids"].device)
            pruner.train()
            logits = model(**inputs, logits_to_keep=1).logits[:, -1].float()
            answer_loss = torch.nn.functional.cross_entropy(logits, answers)
            visual = pruner.stats.original_visual_tokens.to(logits.device).float()  # one image per sample
            average = stage.average_tokens(visual[:, None], depth)[:, 0]
            goal = target * visual if target <= 1 else torch.full_like(visual, float(target))
            budget_loss = ((average - goal).abs() / visual).mean()
            compute_loss = (average / visual).mean()
            loss = answer_loss + budget_weight * budget_loss + compute_weight * compute_loss
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            curve.append({"step": step, "loss": float(loss.detach()), "answer_loss": float(answer_loss.detach()),
                          "soft_tokens": float(average.detach().mean()), "target": float(goal.mean())})
            if step % 10 == 0:
                recent = curve[-10:]
                log(f"[atp] step {step}/{steps} answer loss {np.mean([c['answer_loss'] for c in recent]):.3f} "
                    f"soft tokens/layer {np.mean([c['soft_tokens'] for c in recent]):.1f} (target {float(goal.mean()):.0f})"
                    f" {time.time() - started:.0f}s")
            if step % eval_every == 0 or step == steps:
                pruner.eval()
                save_atp(output_dir, stage, {**extra, "curve": curve})
                with _removed(pruner):
                    result = evaluate(model, processor, val, method="atp", params={"weights": str(output_dir)},
                                      prompt=prompt, bootstrap=0)
                curve[-1].update(val_accuracy=result["accuracy"], val_tokens=result["mean_visual_tokens"])
                log(f"[atp] step {step} val acc {result['accuracy']:.3f} at {result['mean_visual_tokens']:.1f} "
                    "visual tokens per layer (hard masks)")
    finally:
        pruner.remove()
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
    seconds = time.time() - started
    save_atp(output_dir, stage, {**extra, "curve": curve, "train_seconds": round(seconds, 1)})
    return {"curve": curve, "seconds": seconds, "output": str(output_dir)}


class _removed:
    """Takes the training pruner off for an evaluation (which installs its own) and puts it back after."""

    def __init__(self, pruner) -> None:
        self.pruner = pruner

    def __enter__(self) -> None:
        self.pruner.remove()

    def __exit__(self, *exc: object) -> None:
        self.pruner.install()

