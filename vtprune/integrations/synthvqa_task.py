"""SynthVQA exported as a local lmms-eval task (no hub): the questions of ``vtprune bench``, scored by lmms-eval.

Needs nothing from lmms-eval to write; lmms-eval reads the folder with ``--include_path``.
"""
from __future__ import annotations

import json
from pathlib import Path

_UTILS = '''"""SynthVQA as an lmms-eval task, written by vtprune.integrations.synthvqa_task.export_synthvqa."""
import ast
from pathlib import Path

from PIL import Image

from vtprune.bench.evaluate import normalise

HERE = Path(__file__).resolve().parent


def doc_to_visual(doc):
    return [Image.open(HERE / doc["image"]).convert("RGB")]


def doc_to_text(doc):
    return doc["question"]


def doc_to_choice(doc):
    return list(doc["choices"])


def doc_to_target(doc):
    return doc["choices"].index(doc["answer"])


def doc_to_answer(doc):
    return doc["answer"]


def process_choice(doc, results):
    # lmms-eval 0.7 turns each (log-likelihood, is-greedy) pair into its string before scoring; 0.6 does not
    pairs = [ast.literal_eval(r) if isinstance(r, str) else r for r in results]
    scores = [float(p[0]) for p in pairs]
    best = max(range(len(scores)), key=scores.__getitem__)  # the first of equal scores, as vtprune bench
    return {"acc": float(best == doc_to_target(doc))}


def process_generation(doc, results):
    return {"exact_match": float(normalise(results[0]) == normalise(doc["answer"]))}
'''


def _yaml(task: str, data: Path, body: str) -> str:
    return (f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\ndoc_to_visual: !function utils.doc_to_visual\n"
            f"doc_to_text: !function utils.doc_to_text\n{body}")


def export_synthvqa(folder: str | Path, samples: int = 480, split: str = "test") -> Path:
    """Write SynthVQA ``split`` (its first ``samples`` questions, the ones ``vtprune bench --samples`` asks) as two
    lmms-eval tasks under ``folder``: ``synthvqa_mc`` (closed choice by likelihood, metric ``acc``) and
    ``synthvqa_gen`` (generate and match, metric ``exact_match``). Pass ``--include_path folder`` to lmms-eval."""
    from vtprune.bench import synthvqa as sv

    folder = Path(folder).resolve()
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, sample in enumerate(sv.load_split(split, samples)):
        image = f"images/{split}_{i:05d}.png"
        sample.image.save(folder / image)
        rows.append({"id": i, "image": image, "question": sample.question, "answer": sample.answer,
                     "choices": list(sample.choices), "family": sample.family})
    data = folder / f"{split}.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "utils.py").write_text(_UTILS)
    (folder / "synthvqa_mc.yaml").write_text(_yaml("synthvqa_mc", data, (
        "output_type: multiple_choice\ndoc_to_choice: !function utils.doc_to_choice\n"
        "doc_to_target: !function utils.doc_to_target\nprocess_results: !function utils.process_choice\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")))
    (folder / "synthvqa_gen.yaml").write_text(_yaml("synthvqa_gen", data, (
        "output_type: generate_until\ndoc_to_target: !function utils.doc_to_answer\n"
        "generation_kwargs:\n  max_new_tokens: 8\n  until: []\n"
        "process_results: !function utils.process_generation\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")))
    return folder
