"""Tiny random-weight models of every supported family, built from real transformers configs, and their inputs made by
the real processor classes from PIL images of different sizes (nothing is downloaded).

Qwen2-VL's processor class needs torchvision for its video half, which has no CPU wheel on these machines; its real
image processor is used and the placeholder expansion mirrors ``Qwen2VLProcessor.replace_image_token`` (one
``<|image_pad|>`` per merged token) plus the ``mm_token_type_ids`` the processor returns.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)

WORDS = ["<pad>", "<s>", "</s>", "<unk>", "user:", "assistant:", "what", "is", "in", "the", "image", "?", "and",
         "a", "red", "blue", "left", "right", "of", "describe", "both", "pictures", "."]
PAD = 0
IMAGE, VIDEO, VISION_START, VISION_END = 99, 98, 96, 97
VIEW = 84  # CLIP input size: 6 x 6 patches of 14 px
PINPOINTS = [[84, 168], [168, 84], [168, 168]]  # LLaVA-NeXT grids 1x2, 2x1, 2x2


def tokenizer(qwen: bool = False) -> PreTrainedTokenizerFast:
    vocab = {word: i for i, word in enumerate(WORDS)}
    if qwen:
        vocab.update({"<|image_pad|>": IMAGE, "<|video_pad|>": VIDEO, "<|vision_start|>": VISION_START,
                      "<|vision_end|>": VISION_END})
    else:
        vocab["<image>"] = IMAGE
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"}, padding_side="left",
    )


def picture(height: int, width: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))


def _llama(layers: int, kv_heads: int) -> LlamaConfig:
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=kv_heads, vocab_size=100, max_position_embeddings=4096, pad_token_id=PAD)


def _clip() -> CLIPVisionConfig:
    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                            image_size=VIEW, patch_size=14, projection_dim=32)


def _finish(model: torch.nn.Module, attn: str, dtype: torch.dtype) -> torch.nn.Module:
    for config in (model.config, model.config.text_config, model.config.vision_config):
        config._attn_implementation = attn
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    return model.to(dtype).eval()


@dataclass(frozen=True)
class Family:
    """One model family: ``model()`` builds a tiny random model, ``inputs()`` a left-padded batch."""

    name: str

    def model(self, attn: str = "sdpa", layers: int = 4, kv_heads: int = 2, seed: int = 0,
              dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        torch.manual_seed(seed)
        if self.name == "llava":
            config = LlavaConfig(vision_config=_clip(), text_config=_llama(layers, kv_heads), image_token_id=IMAGE,
                                 vision_feature_layer=-2)
            model = LlavaForConditionalGeneration(config)
        elif self.name == "llava_next":
            config = LlavaNextConfig(vision_config=_clip(), text_config=_llama(layers, kv_heads), image_token_id=IMAGE,
                                     vision_feature_layer=-2, image_grid_pinpoints=PINPOINTS)
            model = LlavaNextForConditionalGeneration(config)
        else:
            text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                        num_key_value_heads=kv_heads, vocab_size=100, max_position_embeddings=4096, pad_token_id=PAD,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                        bos_token_id=None, eos_token_id=None)
            tokens = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START,
                          vision_end_token_id=VISION_END)
            if self.name == "qwen2_vl":
                vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                              temporal_patch_size=2)
                model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(vision_config=vision, text_config=text, **tokens))
            else:
                vision = dict(depth=3, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=2,
                              patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                              fullatt_block_indexes=[1])
                model = Qwen2_5_VLForConditionalGeneration(
                    Qwen2_5_VLConfig(vision_config=vision, text_config=text, **tokens))
        return _finish(model, attn, dtype)

    @property
    def qwen(self) -> bool:
        return self.name.startswith("qwen")

    def image_processor(self):
        if self.name == "llava":
            return CLIPImageProcessorPil(size={"shortest_edge": VIEW}, crop_size={"height": VIEW, "width": VIEW})
        if self.name == "llava_next":
            return LlavaNextImageProcessorPil(size={"shortest_edge": VIEW}, crop_size={"height": VIEW, "width": VIEW},
                                              image_grid_pinpoints=PINPOINTS)
        return Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 40, patch_size=14, merge_size=2,
                                        temporal_patch_size=2)

    def processor(self):
        """The family's real processor (LLaVA, LLaVA-NeXT; None for Qwen, see the module docstring)."""
        kwargs = dict(image_processor=self.image_processor(), tokenizer=tokenizer(), patch_size=14,
                      vision_feature_select_strategy="default", num_additional_image_tokens=1)
        if self.name == "llava":
            return LlavaProcessor(**kwargs)
        if self.name == "llava_next":
            return LlavaNextProcessor(**kwargs)
        return None

    def inputs(self, prompts: list[list[str | Image.Image]]) -> dict[str, torch.Tensor]:
        """A left-padded batch: each prompt is a list of words (str) and images, in order."""
        marker = "<|vision_start|> <|image_pad|> <|vision_end|>" if self.qwen else "<image>"
        texts = [" ".join(marker if isinstance(part, Image.Image) else part for part in prompt) for prompt in prompts]
        images = [part for prompt in prompts for part in prompt if isinstance(part, Image.Image)]
        if not self.qwen:
            return dict(self.processor()(images=images or None, text=texts, return_tensors="pt", padding=True))
        pixels = dict(self.image_processor()(images=images, return_tensors="pt")) if images else {}
        counts = iter((pixels["image_grid_thw"].prod(-1) // 4).tolist()) if images else iter(())
        texts = [" ".join(" ".join(["<|image_pad|>"] * next(counts)) if word == "<|image_pad|>" else word
                          for word in text.split()) for text in texts]
        batch = dict(tokenizer(qwen=True)(texts, return_tensors="pt", padding=True))
        batch.update(pixels)
        batch["mm_token_type_ids"] = (batch["input_ids"] == IMAGE).int()
        return batch


FAMILIES = [Family(name) for name in ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")]
def _registered() -> list[str]:
    from vtprune.methods import REGISTRY

    return sorted(REGISTRY)


METHODS = _registered()  # every registered method meets every runtime invariant


def supported(family: Family, method: str) -> bool:
    from vtprune.methods import support_matrix

    return support_matrix()[method][family.name]


def pairs() -> list[tuple[Family, str]]:
    return [(family, method) for family in FAMILIES for method in METHODS if supported(family, method)]


def greedy(model, inputs: dict, steps: int = 4, **kwargs):
    """Greedy generate returning (tokens [B, steps], per-step logits [B, steps, V])."""
    out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, **kwargs)
    return out.sequences[:, inputs["input_ids"].shape[1]:], torch.stack(out.logits, dim=1)
