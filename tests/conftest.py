"""Tiny random-weight LLaVA models built from real transformers configs (no downloads)."""
from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

IMAGE_TOKEN = 99
PAD = 0
GRID = 6  # 84 px / patch 14
N_VISUAL = GRID * GRID


def pytest_addoption(parser):
    parser.addoption("--hf-reference", default=None,
                     help="tests/test_vllm.py: vtprune's HF-path outputs, made by tests/vllm_reference.py")


def tiny_llava(attn: str = "sdpa", layers: int = 4, kv_heads: int = 2, seed: int = 0) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        image_size=GRID * 14, patch_size=14, projection_dim=32,
    )
    text = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=kv_heads, vocab_size=100, max_position_embeddings=512, pad_token_id=PAD,
    )
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, vision_feature_layer=-2)
    config._attn_implementation = attn
    model = LlavaForConditionalGeneration(config).eval()
    model.config.text_config._attn_implementation = attn
    model.config.vision_config._attn_implementation = attn
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = None
    return model


def prompt(prefix: list[int], suffix: list[int], images: int = 1) -> list[int]:
    return prefix + ([IMAGE_TOKEN] * N_VISUAL + [3]) * images + suffix


def batch(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded input_ids and attention_mask."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, tokens in enumerate(prompts):
        ids[row, width - len(tokens):] = torch.tensor(tokens)
        mask[row, width - len(tokens):] = 1
    return ids, mask


def images(count: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 3, GRID * 14, GRID * 14, generator=generator)


@pytest.fixture(scope="module")
def model() -> LlavaForConditionalGeneration:
    return tiny_llava()


@pytest.fixture(scope="module")
def eager_model() -> LlavaForConditionalGeneration:
    return tiny_llava(attn="eager")


def greedy(model, ids, mask, pixels, steps: int = 5, **kwargs):
    """Greedy generate returning (tokens [B, steps], per-step logits [B, steps, V])."""
    out = model.generate(
        input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=steps, do_sample=False,
        output_logits=True, return_dict_in_generate=True, **kwargs,
    )
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, dim=1)
