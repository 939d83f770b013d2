"""The CLIP vision tower used by LLaVA-1.5 and LLaVA-NeXT: attention rows and a merge-aware block step.

``block_step`` mirrors ``CLIPEncoderLayer.forward`` in transformers 5.x (pre-norm attention, residual, pre-norm MLP,
residual), with two additions ToMe needs: an additive bias on the keys and a callback between attention and MLP.
``tests/test_attention_rows.py`` checks both against the stock block and eager attention.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from vtprune.ops import attention_probs

CLIP_TOWERS = ("clip_vision_model",)


def check_clip_tower(vision_config) -> None:
    model_type = getattr(vision_config, "model_type", None)
    if model_type not in CLIP_TOWERS:
        raise TypeError(
            f"vision tower {model_type!r}: vtprune's LLaVA adapters support the CLIP tower ({', '.join(CLIP_TOWERS)}), "
            "whose [CLS] token and patch grid they rely on"
        )


def encoder_layers(tower: nn.Module) -> nn.ModuleList:
    # transformers 5 flattened CLIPVisionModel; older checkpoints' wrappers keep a .vision_model
    return getattr(tower, "vision_model", tower).encoder.layers


def attention_rows(layer: nn.Module, block_input: torch.Tensor, query_rows: torch.Tensor) -> torch.Tensor:
    """Attention of CLIP block ``layer`` for ``query_rows`` [q] (0 = [CLS]) over all its tokens, per head:
    [views, heads, q, T]. Recomputed from the block's own q/k projections of ``layer_norm1(block_input)``."""
    attention = layer.self_attn
    normed = layer.layer_norm1(block_input)
    views, n, _ = normed.shape
    query = attention.q_proj(normed[:, query_rows]).view(views, len(query_rows), attention.num_heads, -1)
    key = attention.k_proj(normed).view(views, n, attention.num_heads, -1)
    return attention_probs(query.transpose(1, 2), key.transpose(1, 2), attention.scale)


def block_step(
    layer: nn.Module,
    hidden_states: torch.Tensor,
    attention_bias: torch.Tensor | None,
    between: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Run CLIP block ``layer`` with an additive ``attention_bias`` on the keys, calling
    ``between(hidden_after_attention, head_mean_keys)`` before the MLP (where ToMe-style merges happen)."""
    attention = layer.self_attn
    normed = layer.layer_norm1(hidden_states)
    # The keys are the ones the attention itself projects, kept by a hook on k_proj: projecting them again would
    # cost a D x D matmul per block (~8% of CLIP-L's FLOPs).
    projected: list[torch.Tensor] = []
    handle = attention.k_proj.register_forward_hook(lambda module, args, output: projected.append(output))
    try:
        attended, _ = attention(hidden_states=normed, attention_mask=attention_bias)
    finally:
        handle.remove()
    hidden_states = hidden_states + attended
    views, n, _ = normed.shape
    keys = projected[0].view(views, n, attention.num_heads, attention.head_dim).mean(dim=2)
    hidden_states = between(hidden_states, keys)
    return hidden_states + layer.mlp(layer.layer_norm2(hidden_states))
