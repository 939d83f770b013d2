"""Analytic prefill FLOPs of the language model, from the visual tokens that enter each decoder layer.

Per decoder layer with n tokens, hidden d, key/value width d_kv (grouped-query attention), MLP width m, counting a
multiply-accumulate as 2 FLOPs:

    F(n) = 2 * [ n*d*(2*d + 2*d_kv)      q, o and k, v projections
               + 2*n^2*d                 QK^T and AV
               + 3*n*d*m ]               LLaMA's 3-matrix (gate, up, down) MLP

Prefill FLOPs = sum over layers of F(n_l). The ViT, projector and LM head are not counted (they are the same for
every LLM-side method; ToMe's and MustDrop's ViT savings are therefore not in this number). FastV's paper formula
(4nd^2 + 2n^2d + 2ndm, MACs, 2-matrix MLP) differs by the MLP term and the factor 2; ratios are close but not equal.
"""
from __future__ import annotations

from collections.abc import Sequence


def layer_flops(n: float, hidden: int, kv_width: int, mlp: int) -> float:
    return 2.0 * (n * hidden * (2 * hidden + 2 * kv_width) + 2 * n * n * hidden + 3 * n * hidden * mlp)


def prefill_flops(tokens_per_layer: Sequence[float], hidden: int, kv_width: int, mlp: int) -> float:
    return sum(layer_flops(n, hidden, kv_width, mlp) for n in tokens_per_layer)


def text_config_dims(text_config) -> tuple[int, int, int]:
    """(hidden, kv_width, mlp) of a Llama-style text config."""
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    return text_config.hidden_size, head_dim * text_config.num_key_value_heads, text_config.intermediate_size
