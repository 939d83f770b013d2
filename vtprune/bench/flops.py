"""Analytic prefill FLOPs of the language model, from the visual tokens that enter each decoder layer.

Per decoder layer with n tokens, hidden d, key/value width d_kv (grouped-query attention), MLP width m, counting a
multiply-accumulate as 2 FLOPs:

    F(n) = 2 * [ n*d*(2*d + 2*d_kv)      q, o and k, v projections
               + 2*n^2*d                 QK^T and AV
               + 3*n*d*m ]               LLaMA's 3-matrix (gate, up, down) MLP

Prefill FLOPs = sum over layers of F(n_l). The ViT, projector and LM head are not in ``prefill_flops`` (the same
for every LLM-side method; ToMe's and MustDrop's ViT savings are counted separately by ``vision_flops``, from the
tokens each vision block received). FastV's paper formula
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


def vision_block_flops(sequences: int, tokens: int, hidden: int, mlp: int, mlp_matrices: int = 2,
                       attended: int | None = None) -> float:
    """One vision-transformer block over ``sequences`` sequences (views) of ``tokens`` tokens each: q, k, v, o
    projections, QK^T and AV over ``attended`` keys per query (default: all ``tokens``; windowed blocks: the window),
    and an MLP of ``mlp_matrices`` hidden x mlp matrices (CLIP: 2; Qwen2.5-VL's SwiGLU: 3). Patch embedding, merger
    and projector are not counted."""
    keys = tokens if attended is None else min(attended, tokens)
    per_sequence = 4 * tokens * hidden * hidden + 2 * tokens * keys * hidden + mlp_matrices * tokens * hidden * mlp
    return 2.0 * sequences * per_sequence


def vision_flops(counts: Sequence[tuple[int, int]], vision_config, family: str) -> float:
    """Vision-tower FLOPs of a forward from the tokens each block received (``counts``: (sequences, tokens) per
    block run, in order). Qwen2.5-VL: windowed blocks attend within their window (``window_size`` px), the
    ``fullatt_block_indexes`` blocks over the whole image."""
    if family.startswith("qwen"):
        window = (vision_config.window_size // vision_config.patch_size) ** 2
        full = set(getattr(vision_config, "fullatt_block_indexes", []) or [])
        return sum(vision_block_flops(s, n, vision_config.hidden_size, vision_config.intermediate_size, 3,
                                      None if block in full else window)
                   for block, (s, n) in enumerate(counts))
    return sum(vision_block_flops(s, n, vision_config.hidden_size, vision_config.intermediate_size)
               for s, n in counts)
