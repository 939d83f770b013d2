"""MiniLISA: the real save/``from_pretrained`` path, the teacher-forced [SEG] state, a decoder image path that pruning
never reaches, clear errors, and the shipped checkpoint reproducing its recorded test IoUs."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

import vtprune
from vtprune import reference
from vtprune.bench import synthseg as ss
from vtprune.bench.segmentation import evaluate_segmentation
from vtprune.reference.build import build_config, build_processor, build_tokenizer
from vtprune.reference.lisa import EXTRA_WORDS, SEG_TOKEN, MaskDecoder, MiniLisa, format_prompt


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random-weight MiniLISA at toy width, saved and reloaded through ``from_pretrained``."""
    torch.manual_seed(0)
    tokenizer = build_tokenizer(EXTRA_WORDS)
    config = build_config(len(tokenizer), vision_hidden=32, vision_layers=2, vision_heads=2, text_hidden=32,
                          text_layers=3, text_heads=2, text_kv_heads=1, text_intermediate=64)
    config.seg_token_id = tokenizer.convert_tokens_to_ids(SEG_TOKEN)
    for c in (config, config.text_config, config.vision_config):
        c._attn_implementation = "sdpa"
    vlm = LlavaForConditionalGeneration(config).eval()
    model = MiniLisa(vlm, MaskDecoder(32, 32, width=8, pixel_width=4)).eval()
    folder = tmp_path_factory.mktemp("mini-lisa")
    model.save_pretrained(folder)
    build_processor(tokenizer).save_pretrained(folder)
    return model, folder


def _inputs(processor, samples):
    return processor(images=[s.image for s in samples], text=[format_prompt(s.prompt) for s in samples],
                     return_tensors="pt", padding=True)


def test_reload_gives_the_same_masks(tiny):
    model, folder = tiny
    reloaded, processor = MiniLisa.from_pretrained(folder), AutoProcessor.from_pretrained(folder)
    samples = ss.load_split("test", 2)
    inputs = _inputs(processor, samples)
    with torch.no_grad():
        a = model(**inputs).mask_logits
        b = reloaded(**inputs).mask_logits
    assert a.shape == (2, 336, 336)
    torch.testing.assert_close(a, b)
    assert json.loads((folder / "config.json").read_text())["seg_token_id"] == model.seg_token_id


def test_seg_state_is_the_last_layer_output_at_seg(tiny):
    """Independent check: the stock model's own last hidden state (after the final norm) at the [SEG] position."""
    model, folder = tiny
    processor = AutoProcessor.from_pretrained(folder)
    inputs = _inputs(processor, ss.load_split("test", 3))
    assert (inputs["input_ids"][:, -1] == model.seg_token_id).all()
    with torch.no_grad():
        out = model(**inputs)
        reference_state = model.vlm(**inputs, output_hidden_states=True).hidden_states[-1][:, -1]
    torch.testing.assert_close(out.seg_hidden, reference_state)


def test_pruning_the_vlm_never_reaches_the_decoders_image_path(tiny):
    model, folder = tiny
    processor = AutoProcessor.from_pretrained(folder)
    inputs = _inputs(processor, ss.load_split("test", 2))
    with torch.no_grad():
        features = model.decoder_features(inputs["pixel_values"])
        plain = model(**inputs)
        with vtprune.apply(model.vlm, "tome", ratio=0.5) as pruner:  # merges inside the (VLM's) vision tower
            pruned = model(**inputs)
            merged_features = model.decoder_features(inputs["pixel_values"])
    torch.testing.assert_close(merged_features, features)
    assert pruner.stats is not None
    assert not torch.allclose(pruned.seg_hidden, plain.seg_hidden)  # the VLM itself did change


def test_errors_name_the_fix(tiny, tmp_path):
    model, folder = tiny
    processor = AutoProcessor.from_pretrained(folder)
    inputs = processor(images=[ss.load_split("test", 1)[0].image],
                       text=["USER: <image>\nsegment the circle ASSISTANT:"], return_tensors="pt")
    with pytest.raises(ValueError, match="must end with the \\[SEG\\] token"):
        model(**inputs)
    model.vlm.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a MiniLISA checkpoint"):
        MiniLisa.from_pretrained(tmp_path)
    plain = LlavaForConditionalGeneration(build_config(vision_hidden=32, vision_layers=1, vision_heads=2,
                                                       text_hidden=32, text_layers=1, text_heads=2, text_kv_heads=1,
                                                       text_intermediate=64))
    with pytest.raises(ValueError, match="seg_token_id"):
        MiniLisa(plain, MaskDecoder(32, 32))


def test_masks_follow_the_evaluation_rule(tiny):
    """``evaluate_segmentation`` scores the masks ``segment`` predicts (logits > 0) with LISA's metrics."""
    model, folder = tiny
    processor = AutoProcessor.from_pretrained(folder)
    samples = ss.load_split("test", 4)
    result = evaluate_segmentation(model, processor, samples, batch_size=3, return_masks=True)
    with torch.no_grad():
        logits = model(**_inputs(processor, samples)).mask_logits
    masks = list((logits > 0).numpy())
    assert all(np.array_equal(a, b) for a, b in zip(result["masks"], masks))
    assert result["giou"] == pytest.approx(np.mean([ss.iou(m, s.mask) for m, s in zip(masks, samples)]))
    assert sum(f["n"] for f in result["per_family"].values()) == 4


@pytest.mark.skipif(not (reference.Path(reference.__file__).parent / "mini-lisa" / "config.json").is_file(),
                    reason="no shipped MiniLISA checkpoint")
def test_shipped_minilisa_reproduces_its_recorded_test_ious():
    record = json.loads((reference.path("mini-lisa") / "training_log.json").read_text())
    model, processor = reference.load_reference("mini-lisa")
    subset = record["test_subset"]
    samples = ss.load_split(subset["split"], subset["n"])
    result = evaluate_segmentation(model, processor, samples, batch_size=8)
    np.testing.assert_allclose(result["ious"], subset["ious"], atol=2e-3)
    assert record["test"]["giou"] >= 0.6
    assert record["test"]["giou"] > 5 * record["box_from_text_baseline"]["giou"]
