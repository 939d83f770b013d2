"""Recomputed attention rows equal eager attention weights (float32): CLIP [CLS] rows, and decoder rows with RoPE,
grouped-query heads, M-RoPE (Qwen2-VL, Qwen2.5-VL), per-head q/k norms (Qwen3) and a fused qkv projection with
partial rotary dims (Phi-3). CLIP's merge-aware block step equals the stock block when it merges nothing."""
from __future__ import annotations

import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    MistralConfig,
    Phi3Config,
    Qwen3Config,
)

import vtprune
from vtprune.models import adapter_for, clip
from families import FAMILIES, IMAGE, Family, picture


def _captured_layer_inputs(model):
    """Each decoder layer's hidden input and RoPE (cos, sin), as the stock forward hands them over."""
    seen = {}

    def spy(index):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            seen[index] = (hidden.clone(), kwargs["position_embeddings"])
        return hook

    layers = adapter_for(model).decoder_layers
    handles = [layer.register_forward_pre_hook(spy(i), with_kwargs=True) for i, layer in enumerate(layers)]
    return seen, handles


def _check_decoder_rows(model, inputs):
    adapter = adapter_for(model)
    seen, handles = _captured_layer_inputs(model)
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    for handle in handles:
        handle.remove()
    mask = inputs["attention_mask"].bool()
    n = mask.shape[1]
    rows = torch.tensor([[n - 1, n - 3, n - 5]] * mask.shape[0])
    order = torch.arange(n)
    key_mask = (order[None, None, :] <= rows[..., None]) & mask[:, None, :]
    for layer in range(len(adapter.decoder_layers)):
        hidden, rope = seen[layer]
        with torch.no_grad():
            probs = adapter.llm_attention(layer, hidden, rope, rows, key_mask)
        eager = out.attentions[layer][:, :, rows[0]]
        torch.testing.assert_close(probs, eager.float(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_decoder_rows_match_eager(family):
    model = family.model(attn="eager")
    inputs = family.inputs([["user:", picture(100, 190, 1), "what", "?", "assistant:"],
                            ["user:", picture(160, 150, 2), "describe", "a", "red", "image", "assistant:"]])
    _check_decoder_rows(model, inputs)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_grouped_query_rows_match_eager(kv_heads):
    family = Family("llava")
    model = family.model(attn="eager", kv_heads=kv_heads)
    _check_decoder_rows(model, family.inputs([["user:", picture(90, 90, 4), "what", "?"], ["a", picture(50, 80, 5)]]))


def _llava_with(text_config) -> LlavaForConditionalGeneration:
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=84, patch_size=14)
    config = LlavaConfig(vision_config=vision, text_config=text_config, image_token_id=IMAGE)
    model = LlavaForConditionalGeneration(config).eval()
    for c in (model.config, model.config.text_config, model.config.vision_config):
        c._attn_implementation = "eager"
    return model


BACKBONES = {
    "qwen3": lambda: Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=16, vocab_size=100),
    "phi3": lambda: Phi3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=100, partial_rotary_factor=0.5,
                               pad_token_id=0, bos_token_id=1, eos_token_id=2),
}


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_other_text_backbones_rows_match_eager(backbone):
    model = _llava_with(BACKBONES[backbone]())
    inputs = Family("llava").inputs([["user:", picture(90, 90, 4), "what", "is", "it", "?"], ["a", picture(50, 80, 5)]])
    _check_decoder_rows(model, inputs)
    model.config._attn_implementation = "sdpa"
    for c in (model.config.text_config, model.config.vision_config):
        c._attn_implementation = "sdpa"
    with torch.no_grad():
        reference = model(**inputs).logits
        with vtprune.apply(model, "fastv", ratio=1.0):
            full = model(**inputs).logits
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(full[valid], reference[valid], atol=1e-5, rtol=1e-5)


def test_sliding_window_backbone_is_refused_at_apply():
    text = MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, sliding_window=16)
    model = _llava_with(text)
    with pytest.raises(TypeError, match=r"sliding-window attention \(sliding_window=16\).*sliding_window = None"):
        vtprune.apply(model, "fastv")
    assert not any(m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("name", ["llava", "llava_next"])
def test_vit_cls_rows_match_eager(name):
    model = Family(name).model(attn="eager")
    adapter = adapter_for(model)
    pixels = torch.randn(3, 3, 84, 84, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model.model.vision_tower(pixels, output_hidden_states=True, output_attentions=True)
        for block, layer in enumerate(adapter.vision_layers):
            rows = clip.attention_rows(layer, out.hidden_states[block], torch.tensor([0, 5]))
            torch.testing.assert_close(rows, out.attentions[block][:, :, [0, 5]], atol=1e-5, rtol=0)


def test_clip_block_step_equals_the_stock_block():
    model = Family("llava").model()
    layer = adapter_for(model).vision_layers[1]
    hidden = torch.randn(2, 37, 32, generator=torch.Generator().manual_seed(2))
    bias = torch.randn(2, 1, 1, 37, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(clip.block_step(layer, hidden, None, lambda x, keys: x), layer(hidden, None))
        torch.testing.assert_close(clip.block_step(layer, hidden, bias, lambda x, keys: x), layer(hidden, bias))
