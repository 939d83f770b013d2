"""The vLLM plug-in end to end on vLLM's CPU build: vLLM finds it by its entry point, and on the shipped MiniLLaVA
each pre-LLM method keeps the same tokens and gives the same next-token log-probabilities as vtprune's HF path
(``positions='renumber'``, float32), pruned and unpruned, per request budgets included. Runs where vLLM is installed
(``tests/vllm.sh`` makes such an environment); skipped elsewhere. The HF path's outputs come from vtprune's own
environment (``tests/vllm_reference.py``, passed as ``--hf-reference``), as vLLM's has its own transformers."""
from __future__ import annotations

import json
import os

import pytest
import transformers

pytest.importorskip("vllm")
# vLLM's own switches for a small in-process engine (this test's, not vtprune's configuration)
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from vllm import LLM, SamplingParams  # noqa: E402
from vllm_reference import PRUNED, SCENES, key  # noqa: E402

import vtprune  # noqa: E402
from vtprune import reference  # noqa: E402
from vtprune.integrations.vllm import KEEP_KWARG  # noqa: E402
from vtprune.models import TESTED_TRANSFORMERS  # noqa: E402

TOP = 8  # log-probabilities compared per request: vLLM returns the top ones
TOLERANCE = 2e-3


@pytest.fixture(scope="module")
def hf(request):
    path = request.config.getoption("--hf-reference")
    if path is None:
        pytest.fail("pass --hf-reference FILE made by `python tests/vllm_reference.py FILE` in vtprune's environment "
                    "(tests/vllm.sh does both)")
    return json.loads(open(path).read())


@pytest.fixture(scope="module")
def samples():
    return [reference.sample(i) for i in SCENES]


def _engine(spec: dict | None, model: str = "mini-llava") -> LLM:
    overrides = {"hf_overrides": {"vtprune": spec}} if spec else {}
    return LLM(str(reference.path(model)), dtype="float32", max_model_len=1024, enforce_eager=True, seed=0,
               limit_mm_per_prompt={"image": 1}, enable_prefix_caching=False, mm_processor_cache_gb=0,
               **overrides)


def _vllm(llm: LLM, samples, keeps=None):
    """(top log-probs {token: value}, kept layout indices or None) per request."""
    keeps = keeps or [None] * len(samples)
    requests = [{"prompt": reference.format_prompt(s.question), "multi_modal_data": {"image": s.image},
                 **({"mm_processor_kwargs": {KEEP_KWARG: k}} if k is not None else {})}
                for s, k in zip(samples, keeps)]
    out = []
    for request in requests:  # one at a time, so the model's record of kept tokens is this request's
        result = llm.generate([request], SamplingParams(max_tokens=1, temperature=0, logprobs=TOP), use_tqdm=False)
        logprobs = {t: p.logprob for t, p in result[0].outputs[0].logprobs[0].items()}
        (kept,) = llm.apply_model(lambda model: [k.tolist() for k in model.vtprune_kept])
        out.append((logprobs, kept[0] if kept else None, len(result[0].prompt_token_ids)))
    return out


def _hf(hf, scene, method=None, **params):
    """(log-probs [V], kept layout indices, unpruned prompt length, text tokens) of vtprune's HF path."""
    record = hf[key(scene, method, params)]
    return record["logprobs"], record["kept"], record["prompt_tokens"], record["text_tokens"]


def _assert_same(vllm_out, hf_out, merged=False):
    logprobs, kept, _ = vllm_out
    reference_logprobs, reference_kept = hf_out[:2]
    for token, value in logprobs.items():
        assert value == pytest.approx(reference_logprobs[token], abs=TOLERANCE)
    assert max(logprobs, key=logprobs.get) == max(range(len(reference_logprobs)), key=reference_logprobs.__getitem__)
    if not merged:
        assert sorted(kept) == reference_kept


def test_unpruned_equals_the_hf_model(hf, samples):
    outputs = _vllm(_engine(None), samples)
    for scene, out in zip(SCENES, outputs):
        reference_out = _hf(hf, scene)
        _assert_same(out, reference_out, merged=True)
        assert out[1] is None and out[2] == reference_out[2]  # all 576 placeholders: the plug-in stayed out


@pytest.mark.parametrize("method,params", PRUNED)
def test_pruned_equals_the_hf_path(hf, samples, method, params):
    outputs = _vllm(_engine({"method": method, **params}), samples)
    for scene, out in zip(SCENES, outputs):
        reference_out = _hf(hf, scene, method, **params)
        _assert_same(out, reference_out, merged=method == "pool")
        assert out[2] == reference_out[3] + len(out[1])  # the prompt holds exactly the kept tokens


def test_each_request_its_own_budget(hf, samples):
    """Three budgets in one engine, the same image at two of them (the encoder cache must not mix them)."""
    llm = _engine({"method": "fastervlm", "keep": 64})
    keeps = [None, 16, 100]
    scenes = [SCENES[0], SCENES[1], SCENES[0]]
    batch = [samples[0], samples[1], samples[0]]
    for scene, keep, out in zip(scenes, keeps, _vllm(llm, batch, keeps)):
        _assert_same(out, _hf(hf, scene, "fastervlm", keep=64 if keep is None else keep))
        assert len(out[1]) == (64 if keep is None else keep)


def test_batched_requests_equal_one_at_a_time(hf, samples):
    llm = _engine({"method": "divprune", "keep": 32})
    requests = [{"prompt": reference.format_prompt(s.question), "multi_modal_data": {"image": s.image},
                 "mm_processor_kwargs": {KEEP_KWARG: k}} for s, k in zip(samples, (32, 8, 50))]
    together = llm.generate(requests, SamplingParams(max_tokens=1, temperature=0, logprobs=TOP), use_tqdm=False)
    for request, result in zip(requests, together):
        alone = llm.generate([request], SamplingParams(max_tokens=1, temperature=0, logprobs=TOP), use_tqdm=False)
        for token, value in result.outputs[0].logprobs[0].items():
            assert value.logprob == pytest.approx(alone[0].outputs[0].logprobs[0][token].logprob, abs=TOLERANCE)


@pytest.mark.parametrize("spec,message", [
    ({"method": "fastv", "keep": 64}, "pre-LLM methods"),
    ({"method": "tome"}, "inside the vision tower"),
    ({"method": "random", "positions": "original"}, "positions='renumber'"),
    ({"method": "divprune", "keep": 9999}, "keep <= 576"),
])
def test_what_vllm_cannot_serve_is_refused_at_load(spec, message):
    with pytest.raises(Exception) as error:
        _engine(spec)
    assert any(message in text for text in _messages(error.value)), _messages(error.value)


def _messages(error: BaseException) -> list[str]:
    seen = []
    while error is not None:
        seen.append(str(error))
        error = error.__cause__ or error.__context__
    return seen


def test_a_model_the_plugin_does_not_serve_refuses_the_entry_instead_of_ignoring_it():
    with pytest.raises(Exception) as error:
        _engine({"method": "divprune", "keep": 64}, model="mini-llava-next")
    assert any("LlavaNextForConditionalGeneration is not wired yet" in m for m in _messages(error.value))


def test_the_hf_runtime_refuses_vllms_transformers_naming_the_fix():
    """vLLM's environment has another transformers release: vtprune's HF runtime says so instead of failing later."""
    if tuple(int(x) for x in transformers.__version__.split(".")[:2]) == TESTED_TRANSFORMERS:
        pytest.skip("this vLLM environment has the transformers release vtprune's HF runtime is tested on")
    model, _ = reference.load_reference()
    with pytest.raises(RuntimeError, match="tested on transformers 5.23.x.*use the vLLM plug-in"):
        vtprune.apply(model, "divprune", keep=64)
