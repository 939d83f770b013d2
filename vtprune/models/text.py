"""The language-model side shared by every family: which decoder layers vtprune can drive, and attention rows
recomputed from a layer's own projections.

The query/key computation mirrors ``LlamaAttention.forward`` in transformers 5.x, with the two variants found in
the supported backbones: per-head q/k RMS norms before RoPE (``Qwen3Attention``) and a fused ``qkv_proj`` with partial
rotary dims (``Phi3Attention``). ``tests/test_attention_rows.py`` checks every variant against eager attention.
"""
from __future__ import annotations

import torch
from torch import nn

from vtprune.ops import apply_rotary, attention_probs

# Decoder layers whose forward takes (hidden_states, attention_mask=, position_ids=, past_key_values=,
# position_embeddings=) and whose attention is one of the q/k variants below.
SUPPORTED_DECODER_LAYERS = (
    "LlamaDecoderLayer",
    "MistralDecoderLayer",
    "Qwen2DecoderLayer",
    "Qwen3DecoderLayer",
    "Phi3DecoderLayer",
    "Qwen2VLDecoderLayer",
    "Qwen2_5_VLDecoderLayer",
)
SUPPORTED_ATTENTION = ("sdpa", "eager")


def check_language_model(language_model: nn.Module) -> None:
    """Refuse, with the fix, a text backbone whose layers vtprune would drive wrongly."""
    config = language_model.config
    classes = sorted({type(layer).__name__ for layer in language_model.layers})
    unknown = [name for name in classes if name not in SUPPORTED_DECODER_LAYERS]
    if unknown:
        raise TypeError(
            f"vtprune does not support the text backbone's {', '.join(unknown)}; supported decoder layers: "
            f"{', '.join(SUPPORTED_DECODER_LAYERS)}"
        )
    implementation = config._attn_implementation
    if implementation not in SUPPORTED_ATTENTION:
        raise TypeError(
            f"attn_implementation={implementation!r} is not supported by vtprune; load the model with "
            "attn_implementation='sdpa' (default) or 'eager'"
        )
    layer_types = getattr(config, "layer_types", None) or []
    window = getattr(config, "sliding_window", None)
    if window is not None or any(kind != "full_attention" for kind in layer_types):
        raise TypeError(
            f"the text backbone uses sliding-window attention (sliding_window={window}); vtprune builds each layer's "
            "mask itself and does not model the window yet. If every prompt plus its answer fits in the window, "
            "load the model with the window switched off (config.text_config.sliding_window = None; Qwen2: "
            "use_sliding_window=False), which is then exact"
        )


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[B, n, H*d] -> [B, H, n, d]."""
    return x.view(*x.shape[:2], -1, head_dim).transpose(1, 2)


def query_key(
    attention: nn.Module, normed: torch.Tensor, query_rows: torch.Tensor | None,
    rope: tuple[torch.Tensor, torch.Tensor] | None, keys: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated queries of ``query_rows`` [B, q] (None: no query) and keys of every token of ``normed`` [B, n, D],
    as ``attention`` computes them: ([B, H, q, d], [B, H_kv, n, d]). ``rope`` None: no rotation (criteria that
    ignore positions, as FEATHER's). ``keys``: the layer's own rotated keys of these tokens (its KV-cache entries),
    returned as they are instead of being projected again."""
    head_dim = attention.head_dim
    if hasattr(attention, "qkv_proj"):  # Phi-3: one fused projection, queries first
        q_width = attention.config.num_attention_heads * head_dim
        k_width = attention.num_key_value_heads * head_dim
        query = None
        if keys is None:
            fused = attention.qkv_proj(normed)
            query_all, key = fused[..., :q_width], fused[..., q_width:q_width + k_width]
            query = None if query_rows is None else query_all.gather(1, query_rows[..., None].expand(-1, -1, q_width))
        elif query_rows is not None:
            picked = normed.gather(1, query_rows[..., None].expand(-1, -1, normed.shape[-1]))
            query = attention.qkv_proj(picked)[..., :q_width]
    else:
        key = attention.k_proj(normed) if keys is None else None
        query = None
        if query_rows is not None:
            picked = normed.gather(1, query_rows[..., None].expand(-1, -1, normed.shape[-1]))
            query = attention.q_proj(picked)
    if keys is not None:
        key = keys
    else:
        key = _heads(key, head_dim)
        if hasattr(attention, "k_norm"):  # Qwen3: RMS norm per head before RoPE
            key = attention.k_norm(key.transpose(1, 2)).transpose(1, 2)
        if rope is not None:
            key = apply_rotary(key, *rope)
    if query is not None:
        query = _heads(query, head_dim)
        if hasattr(attention, "q_norm"):
            query = attention.q_norm(query.transpose(1, 2)).transpose(1, 2)
        if rope is not None:
            cos, sin = rope
            rows = query_rows[..., None].expand(-1, -1, cos.shape[-1])
            query = apply_rotary(query, cos.gather(1, rows), sin.gather(1, rows))
    return query, key


def decoder_attention_rows(
    layer: nn.Module,
    layer_input: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor] | None,
    query_rows: torch.Tensor,
    key_mask: torch.Tensor,
    keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention probabilities [B, H, q, n] (float32) of decoder ``layer`` for ``query_rows`` [B, q] over its own input
    tokens ``layer_input`` [B, n, D]; ``key_mask`` [B, q, n] says which keys each row sees; ``rope`` None: q and k
    without their rotary embedding; ``keys``: the layer's cached keys of these tokens (see ``query_key``)."""
    normed = layer.input_layernorm(layer_input)
    batch = normed.shape[0]
    if rope is not None:
        rope = tuple(x.expand(batch, -1, -1) for x in rope)
    query, key = query_key(layer.self_attn, normed, query_rows, rope, keys)
    return attention_probs(query, key, layer.self_attn.scaling, key_mask)
