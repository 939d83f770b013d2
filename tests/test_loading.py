"""The code path a hub model takes: save_pretrained, then from_pretrained (+ AutoProcessor where the processor can be
built here), then prune — for every family."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor

import vtprune
from families import FAMILIES, IMAGE, picture


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_saved_checkpoint_loads_and_prunes_end_to_end(family, tmp_path):
    model = family.model(seed=7)
    model.save_pretrained(tmp_path)
    processor = family.processor()
    if processor is not None:
        processor.save_pretrained(tmp_path)
    else:  # Qwen2-VL's processor class needs torchvision here (see families.py); its image processor does not
        family.image_processor().save_pretrained(tmp_path)

    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    if processor is not None:
        loaded_processor = AutoProcessor.from_pretrained(tmp_path)
        assert type(loaded_processor) is type(processor)
    else:
        assert type(AutoImageProcessor.from_pretrained(tmp_path)).__name__.startswith("Qwen2VLImageProcessor")
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 100, 3), dtype=np.uint8))
    inputs = family.inputs([["user:", photo, "what", "is", "in", "the", "image", "?", "assistant:"],
                            ["user:", picture(90, 150, 3), "what", "?", "assistant:"]])
    loaded.generation_config.pad_token_id = 0
    with torch.no_grad():
        reference = loaded.generate(**inputs, max_new_tokens=4, do_sample=False)
        with vtprune.apply(loaded, "fastv", ratio=1.0):
            full = loaded.generate(**inputs, max_new_tokens=4, do_sample=False)
        with vtprune.apply(loaded, "divprune", keep=9) as pruner:
            pruned = loaded.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(full, reference)
    assert pruned.shape == reference.shape
    assert pruner.stats.llm_input_visual_tokens.tolist() == [9, 9]
    assert pruner.stats.original_visual_tokens.tolist() == (inputs["input_ids"] == IMAGE).sum(1).tolist()
