"""vtprune.compose: several methods' stages in one pruner, with conflicts refused at apply()."""
from __future__ import annotations

import pytest
import torch

import vtprune
from families import FAMILIES, picture

LLAVA = next(f for f in FAMILIES if f.name == "llava")
PROMPT = [["user:", picture(100, 190, 1), "what", "is", "in", "the", "image", "?", "assistant:"]]


@pytest.fixture(scope="module")
def model():
    return LLAVA.model()


def _forward(model, method, **params):
    inputs = LLAVA.inputs(PROMPT)
    with torch.no_grad(), vtprune.apply(model, method, **params) as pruner:
        logits = model(**inputs).logits[0, -1]
    return logits, pruner.stats


def test_vision_merge_then_llm_drop_runs_both_stages(model):
    """mustdrop_vision's merge decides what enters the LLM; fastv then cuts to its keep before its layer — exactly
    what each does alone at its own stage."""
    merge = ("mustdrop_vision", {"tau": -1.0, "positions": "renumber"})  # tau -1: every window merges (36 -> 4)
    drop = ("fastv", {"keep": 3, "layer": 1, "positions": "renumber"})
    _, merged_only = _forward(model, *merge[:1], **merge[1])
    both_logits, both = _forward(model, vtprune.compose(merge, drop))
    assert merged_only.visual_tokens[0].tolist() == [4, 4, 4, 4]
    assert both.visual_tokens[0].tolist() == [4, 3, 3, 3]
    unpruned = model(**LLAVA.inputs(PROMPT)).logits[0, -1]
    assert not torch.allclose(both_logits, unpruned)


@pytest.mark.parametrize("methods,message", [
    (("hired", "fastervlm"), "both act before the LLM"),
    (("tome", "mustdrop_vision"), "both act inside the vision tower"),
    ((("fastv", {"layer": 2, "positions": "renumber"}), ("pyramiddrop", {"layers": (2,)})), "same decoder layer"),
    (("mustdrop_vision", "fastv"), "positions="),
])
def test_conflicts_are_refused_at_apply_and_leave_the_model_untouched(model, methods, message):
    inputs = LLAVA.inputs(PROMPT)
    before = model(**inputs).logits
    with pytest.raises(ValueError, match=message):
        vtprune.apply(model, vtprune.compose(*methods))
    torch.testing.assert_close(model(**inputs).logits, before, rtol=0, atol=0)


def test_separator_policies_must_agree_only_where_the_model_has_separators(model):
    methods = (("fastv", {"separators": "keep", "layer": 1}), ("feather", {"layers": (2, 3)}))
    vtprune.apply(model, vtprune.compose(*methods)).remove()  # LLaVA-1.5: no newline tokens, nothing to agree on
    next_model = next(f for f in FAMILIES if f.name == "llava_next").model()
    with pytest.raises(ValueError, match="separators="):
        vtprune.apply(next_model, vtprune.compose(*methods))


def test_compose_needs_two_methods_and_known_names():
    with pytest.raises(ValueError, match="at least two"):
        vtprune.compose("fastv")
    with pytest.raises(ValueError, match="unknown method"):
        vtprune.compose("fastv", "fastest")
    with pytest.raises(TypeError, match="compose"):
        vtprune.compose("fastv", 3)
    assert vtprune.compose("fastv", "mustdrop_decode").name == "fastv+mustdrop_decode"
