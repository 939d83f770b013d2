"""The vLLM plug-in's vtprune side, without vLLM: the placeholder count it reserves per image equals what the HF path
sends to the language model, and what vLLM cannot serve is refused with the reason (``tests/test_vllm.py`` runs the
plug-in inside vLLM)."""
from __future__ import annotations

import copy

import pytest
import torch

import vtprune
from vtprune import reference
from vtprune.integrations.vllm import SUPPORTED, build_method, placeholder_count


@pytest.fixture(scope="module")
def shipped():
    return reference.load_reference()


def _with_spec(config, spec):
    config = copy.deepcopy(config)
    config.vtprune = spec
    return config


@pytest.mark.parametrize("method,params", [
    ("random", {}), ("random", {"keep": 37}), ("uniform", {"keep": 100}), ("pool", {"keep": 128}),
    ("pool", {"ratio": 0.25}), ("fastervlm", {"keep": 48}), ("divprune", {}), ("hired", {"ratio": 0.1}),
    ("hired", {"keep": 90})])
def test_placeholders_equal_the_tokens_the_hf_path_keeps(shipped, method, params):
    model, processor = shipped
    sample = reference.sample(1)
    inputs = processor(images=sample.image, text=reference.format_prompt(sample.question), return_tensors="pt")
    with torch.no_grad(), vtprune.apply(model, method, positions="renumber", **params) as pruner:
        model(**inputs)
    sent = int(pruner.stats.llm_input_visual_tokens[0])
    assert placeholder_count(_with_spec(model.config, {"method": method, **params})) == sent
    assert sent < 576


def test_a_request_budget_replaces_the_spec_budget(shipped):
    config = _with_spec(shipped[0].config, {"method": "fastervlm", "ratio": 0.5})
    assert placeholder_count(config) == 288
    assert placeholder_count(config, 20) == 20
    assert placeholder_count(shipped[0].config) == 576  # no spec: the plug-in stays out


@pytest.mark.parametrize("spec,message", [
    ({"method": "fastv", "keep": 64}, "fastv acts inside the language model"),
    ({"method": "pyramiddrop"}, "inside the language model"),
    ({"method": "tome"}, "tome acts inside the vision tower"),
    ({"method": "random", "positions": "original"}, "positions='renumber'"),
    ({"method": "divprune", "keep": 600}, "keep <= 576"),
    ({"method": "nosuch"}, "nosuch"),
    ({"method": "divprune", "kep": 3}, "kep"),
    ("divprune", "must be a dict"),
])
def test_what_vllm_cannot_serve_is_refused(shipped, spec, message):
    with pytest.raises((ValueError, TypeError, KeyError), match=message):
        placeholder_count(_with_spec(shipped[0].config, spec))


@pytest.mark.parametrize("keep", [0, -3, 2.5, "8", True])
def test_a_bad_request_budget_is_refused(keep):
    with pytest.raises(ValueError, match="vtprune_keep"):
        build_method({"method": "divprune"}, keep)


def test_every_supported_method_is_a_single_pre_llm_stage():
    from vtprune.methods.base import get_method

    for name in SUPPORTED:
        assert get_method(name).stages == ("pre_llm",)
