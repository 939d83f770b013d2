"""vtprune's HF path on the shipped MiniLLaVA, the reference ``tests/test_vllm.py`` compares vLLM against.

It runs in vtprune's own environment (``python tests/vllm_reference.py OUT.json``, called by ``tests/vllm.sh``):
vLLM's environment has the transformers vLLM needs, on which vtprune's HF runtime refuses to run. Per case: the
next-token log-probabilities, the kept layout indices (``positions='renumber'``, float32) and the prompt lengths.
"""
from __future__ import annotations

import json
import sys
from typing import Any

SCENES = (0, 3, 7)
PRUNED = (("divprune", {"keep": 64}), ("fastervlm", {"keep": 48}), ("random", {"keep": 40, "seed": 3}),
          ("uniform", {"keep": 64}), ("pool", {"keep": 144}), ("hired", {"ratio": 0.1}))
PER_REQUEST = (("fastervlm", {"keep": 64}), ("fastervlm", {"keep": 16}), ("fastervlm", {"keep": 100}))


def key(scene: int, method: str | None = None, params: dict[str, Any] | None = None) -> str:
    return json.dumps([scene, method, params or {}], sort_keys=True)


def cases() -> list[tuple[int, str | None, dict[str, Any]]]:
    unpruned = [(scene, None, {}) for scene in SCENES]
    pruned = [(scene, method, params) for method, params in PRUNED + PER_REQUEST for scene in SCENES]
    return unpruned + pruned


def compute() -> dict[str, dict[str, Any]]:
    import torch

    import vtprune
    from vtprune import reference

    model, processor = reference.load_reference()
    out = {}
    for scene, method, params in cases():
        sample = reference.sample(scene)
        prompt = reference.format_prompt(sample.question)
        inputs = processor(images=sample.image, text=prompt, return_tensors="pt")
        image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
        record = {"prompt_tokens": inputs["input_ids"].shape[1],
                  "text_tokens": inputs["input_ids"].shape[1] - image_tokens}
        with torch.no_grad():
            if method is None:
                logits, kept = model(**inputs).logits[0, -1], None
            else:
                with vtprune.apply(model, method, positions="renumber", **params) as pruner:
                    logits = model(**inputs).logits[0, -1]
                kept = pruner.stats.kept_patches(0).nonzero().flatten().tolist()
        record.update(logprobs=logits.log_softmax(-1).tolist(), kept=kept)
        out[key(scene, method, params)] = record
    return out


if __name__ == "__main__":
    with open(sys.argv[1], "w") as file:
        json.dump(compute(), file)
