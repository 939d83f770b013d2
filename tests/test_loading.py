"""The code path a hub model takes: save_pretrained, then from_pretrained + AutoProcessor, then prune."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoProcessor, CLIPImageProcessor, LlavaForConditionalGeneration, LlavaProcessor
from transformers import PreTrainedTokenizerFast

import vtprune
from conftest import GRID, IMAGE_TOKEN, N_VISUAL, tiny_llava

WORDS = ["<pad>", "<s>", "</s>", "<unk>", "user:", "assistant:", "what", "is", "in", "the", "image", "?"]


def _processor() -> LlavaProcessor:
    vocab = {word: i for i, word in enumerate(WORDS)}
    vocab["<image>"] = IMAGE_TOKEN
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"}, padding_side="left",
    )
    size = GRID * 14
    images = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=14,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


def test_saved_checkpoint_loads_and_prunes_end_to_end(tmp_path):
    model = tiny_llava(seed=7)
    model.save_pretrained(tmp_path)
    _processor().save_pretrained(tmp_path)

    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    processor = AutoProcessor.from_pretrained(tmp_path)
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 100, 3), dtype=np.uint8))
    inputs = processor(images=[picture, picture], text=["user: <image> what is in the image ? assistant:",
                                                        "user: <image> what ? assistant:"],
                       return_tensors="pt", padding=True)
    assert int((inputs["input_ids"] == IMAGE_TOKEN).sum()) == 2 * N_VISUAL
    with torch.no_grad():
        reference = loaded.generate(**inputs, max_new_tokens=4, do_sample=False)
        with vtprune.apply(loaded, "fastv", keep=N_VISUAL):
            full = loaded.generate(**inputs, max_new_tokens=4, do_sample=False)
        with vtprune.apply(loaded, "fastervlm", keep=9) as pruner:
            pruned = loaded.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(full, reference)
    assert pruned.shape == reference.shape
    assert pruner.stats.visual_tokens.tolist() == [[9] * 4, [9] * 4]
