"""lmms-eval plug-in: any supported HF VLM, pruned by a vtprune method, as an lmms-eval model named ``vtprune``.

    pip install "vtprune[lmms-eval]"
    python -m lmms_eval --model vtprune \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=fastv,keep=64 --tasks mme

lmms-eval finds the model through the ``lmms_eval.models`` entry point this package declares (``manifest`` below),
so nothing is copied into lmms-eval. ``model_args``: ``pretrained`` (path or hub id), ``method`` (a registered
vtprune method; omitted: unpruned), ``device``, ``dtype`` (float32 / bfloat16 / float16), ``batch_size``; every
other key is a parameter of the method (``keep=64``, ``layer=2``...), validated when the pruner is applied.

Requests are answered with the same code as ``vtprune bench`` (:mod:`vtprune.bench.evaluate`): the prompt is the
processor's chat template around the task's text with one image entry per visual; ``loglikelihood`` prefills each
prompt once (the method prunes on the prompt alone) and scores every continuation of that prompt on the pruned
cache; ``generate_until`` decodes greedily and cuts at the task's stop strings. ``vtprune export-lmms-task``
(:mod:`vtprune.integrations.synthvqa_task`) writes
SynthVQA as a local lmms-eval task (``--include_path``), so a user can check that lmms-eval and ``vtprune bench``
agree on the same questions.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from tqdm import tqdm

import vtprune
from vtprune.bench.evaluate import choice_scores, continuation_ids, to_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class VTPrune(lmms):
    """An HF VLM behind a vtprune pruner, answering lmms-eval's loglikelihood and generation requests."""

    def __init__(self, pretrained: str, method: str | None = None, device: str = "cpu", dtype: str = "float32",
                 batch_size: int | str = 1, **method_params: Any) -> None:
        super().__init__()
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)}")
        self.model = AutoModelForImageTextToText.from_pretrained(pretrained, dtype=DTYPES[dtype]).to(device).eval()
        self.processor = AutoProcessor.from_pretrained(pretrained)
        self.processor.tokenizer.padding_side = "left"
        self.batch_size_per_gpu = int(batch_size)
        self.method = method
        # installed once, for the model's lifetime: refused here (not at the first request) if the combination is wrong
        self.pruner = vtprune.apply(self.model, method, **method_params) if method else None

    # --- prompts ----------------------------------------------------------------------------------------------
    def _prompt(self, text: str, images: int) -> str:
        template = getattr(self.processor, "chat_template", None)
        if template:
            content = [{"type": "image"} for _ in range(images)] + [{"type": "text", "text": text}]
            return self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                      add_generation_prompt=True, tokenize=False)
        image_token = getattr(self.processor, "image_token", "<image>")
        return f"USER: {(image_token + chr(10)) * images}{text} ASSISTANT:"

    def _visuals(self, doc_to_visual, doc_id: int, task: str, split: str) -> list:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        return [v for v in (visuals or []) if v is not None]

    def _inputs(self, prompts: list[str], visuals: list[list]) -> dict[str, Any]:
        images = [image for row in visuals for image in row]
        raw = self.processor(images=images or None, text=prompts, return_tensors="pt", padding=True,
                             padding_side="left")
        return to_model(self.model, dict(raw))

    # --- lmms-eval API -----------------------------------------------------------------------------------------
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        groups: OrderedDict[tuple, list[int]] = OrderedDict()
        for i, request in enumerate(requests):
            context, _, doc_to_visual, doc_id, task, split = request.args
            groups.setdefault((context, doc_id, task, split), []).append(i)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        keys = list(groups)
        bar = tqdm(total=len(requests), desc="vtprune loglikelihood", disable=self.rank != 0)
        for start in range(0, len(keys), self.batch_size_per_gpu):
            chunk = keys[start:start + self.batch_size_per_gpu]
            prompts, visuals, ids = [], [], []
            for context, doc_id, task, split in chunk:
                doc_to_visual = requests[groups[(context, doc_id, task, split)][0]].args[2]
                row = self._visuals(doc_to_visual, doc_id, task, split)
                prompt = self._prompt(context, len(row))
                prompts.append(prompt)
                visuals.append(row)
                ids.append([continuation_ids(self.processor.tokenizer, prompt, requests[i].args[1])
                            for i in groups[(context, doc_id, task, split)]])
            with torch.no_grad():
                scores, greedy = choice_scores(self.model, self._inputs(prompts, visuals), ids)
            for key, row_scores, row_greedy in zip(chunk, scores, greedy):
                for i, score, is_greedy in zip(groups[key], row_scores.tolist(), row_greedy.tolist()):
                    results[i] = (float(score), bool(is_greedy))
                    bar.update(1)
        bar.close()
        return results  # type: ignore[return-value]

    def generate_until(self, requests: list[Instance]) -> list[str]:
        outputs = []
        tokenizer = self.processor.tokenizer
        for request in tqdm(requests, desc="vtprune generate", disable=self.rank != 0):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            row = self._visuals(doc_to_visual, doc_id, task, split)
            inputs = self._inputs([self._prompt(context, len(row))], [row])
            with torch.no_grad():
                out = self.model.generate(**inputs, max_new_tokens=int(gen_kwargs.get("max_new_tokens", 32)),
                                          do_sample=False, num_beams=1, pad_token_id=tokenizer.pad_token_id)
            text = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            outputs.append(text)
        return outputs

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("vtprune's lmms-eval model answers single-round tasks only")


#: what the ``lmms_eval.models`` entry point hands lmms-eval
manifest = ModelManifest(model_id="vtprune", simple_class_path="vtprune.integrations.lmms_eval.VTPrune")
