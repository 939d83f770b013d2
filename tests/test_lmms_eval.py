"""The lmms-eval plug-in end to end, through lmms-eval's own entry point (``python -m lmms_eval``): it finds the
``vtprune`` model by its entry point, and its accuracy on exported SynthVQA equals ``vtprune bench``'s evaluation on
the same questions, pruned and unpruned. Runs where lmms-eval is installed (``tests/lmms_eval.sh`` makes such an
environment); skipped elsewhere."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("lmms_eval")

from vtprune import reference  # noqa: E402
from vtprune.bench import synthvqa  # noqa: E402
from vtprune.bench.evaluate import evaluate  # noqa: E402
from vtprune.integrations.synthvqa_task import export_synthvqa  # noqa: E402

QUESTIONS = 24


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return export_synthvqa(tmp_path_factory.mktemp("task"), QUESTIONS)


def _lmms_eval(task, out, model_args: str) -> dict:
    command = [sys.executable, "-m", "lmms_eval", "--model", "vtprune", "--model_args", model_args,
               "--tasks", "synthvqa_mc,synthvqa_gen", "--include_path", str(task), "--batch_size", "8",
               "--output_path", str(out)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (path,) = out.rglob("*_results.json")
    return json.loads(path.read_text())["results"]


@pytest.mark.parametrize("method,params", [(None, {}), ("fastv", {"keep": 64}), ("divprune", {"keep": 32})])
def test_lmms_eval_accuracy_equals_vtprune_bench(task, tmp_path, method, params):
    args = ",".join([f"pretrained={reference.path()}"] + ([f"method={method}"] if method else [])
                    + [f"{k}={v}" for k, v in params.items()])
    results = _lmms_eval(task, tmp_path, args)
    model, processor = reference.load_reference()
    samples = synthvqa.load_split("test", QUESTIONS)
    likelihood = evaluate(model, processor, samples, method=method, params=params, token_stats=False)
    generated = evaluate(model, processor, samples, method=method, params=params, scoring="generate",
                         token_stats=False)
    assert results["synthvqa_mc"]["acc,none"] == pytest.approx(likelihood["accuracy"], abs=1e-9)
    assert results["synthvqa_gen"]["exact_match,none"] == pytest.approx(generated["accuracy"], abs=1e-9)
    assert likelihood["accuracy"] > 0.5  # the shipped model answers: a broken path could not agree by chance


def test_plugin_refuses_a_bad_method_before_any_request():
    from vtprune.integrations.lmms_eval import VTPrune

    with pytest.raises(ValueError, match="nosuchmethod"):
        VTPrune(pretrained=str(reference.path()), method="nosuchmethod")
