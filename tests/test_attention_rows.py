"""Recomputed attention rows equal eager attention weights (float32), with RoPE and grouped-query attention."""
from __future__ import annotations

import pytest
import torch

from vtprune.models import adapter_for
from conftest import batch, images, prompt, tiny_llava


def test_vit_cls_row_matches_eager():
    model = tiny_llava(attn="eager")
    adapter = adapter_for(model)
    pixels = images(2)
    with torch.no_grad():
        out = model.model.vision_tower(pixels, output_hidden_states=True, output_attentions=True)
        for block in range(len(adapter.vision_layers)):
            row = adapter.vit_cls_attention(block, out.hidden_states[block])
            torch.testing.assert_close(row, out.attentions[block][:, :, 0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_llm_rows_match_eager_with_rope_and_gqa(kv_heads):
    model = tiny_llava(attn="eager", kv_heads=kv_heads)
    adapter = adapter_for(model)
    ids, mask = batch([prompt([1, 5, 6], [7, 8, 9]), prompt([2], [4])])  # second row is left-padded
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=images(2), output_attentions=True,
                    output_hidden_states=True)
        n = ids.shape[1]
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        lm = model.model.language_model
        for layer in range(len(lm.layers)):
            hidden = out.hidden_states[layer]
            rope = lm.rotary_emb(hidden, positions)
            rows = torch.tensor([[n - 1, n - 3]] * 2)
            order = torch.arange(n)
            key_mask = (order[None, None, :] <= rows[..., None]) & mask.bool()[:, None, :]
            probs = adapter.llm_attention(layer, hidden, rope, rows, key_mask)
            eager = out.attentions[layer][:, :, [n - 1, n - 3]]
            torch.testing.assert_close(probs, eager, atol=1e-5, rtol=0)
