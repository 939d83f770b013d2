"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP ViT -> 2-layer MLP projector -> Llama-style decoder.

An image is ``tokens_per_image`` consecutive ``<image>`` placeholder tokens in ``input_ids`` (576 = 24x24 for
CLIP-L/336), filled in raster order with the projected patch features of ``vision_feature_layer`` (default -2,
i.e. the output of the second-to-last ViT block), [CLS] removed (``vision_feature_select_strategy="default"``).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from vtprune.models.base import Adapter, VisionOutput
from vtprune.ops import attention_probs, rotate_half


class LlavaAdapter(Adapter):
    model_classes = ("LlavaForConditionalGeneration", "LlavaModel")

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        config = model.config
        layer = config.vision_feature_layer
        if not isinstance(layer, int):
            raise TypeError(
                f"vision_feature_layer={layer}: vtprune supports a single feature layer (LLaVA-1.5 uses -2)"
            )
        if config.vision_feature_select_strategy != "default":
            raise TypeError(
                f"vision_feature_select_strategy={config.vision_feature_select_strategy!r}: vtprune supports "
                "'default' (patch tokens without [CLS]), as in LLaVA-1.5"
            )
        if getattr(config.vision_config, "model_type", None) != "clip_vision_model":
            raise TypeError(f"vision tower {config.vision_config.model_type!r}: vtprune's LLaVA adapter needs CLIP")
        num_blocks = config.vision_config.num_hidden_layers
        # hidden_states has num_blocks + 1 entries; entry i is the output of block i - 1.
        self._feature_block = (layer % (num_blocks + 1)) - 1

    @property
    def multimodal_model(self) -> nn.Module:
        return self.model.model if hasattr(self.model, "lm_head") else self.model

    @property
    def _language_model(self) -> nn.Module:
        return self.multimodal_model.language_model

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self._language_model.layers

    @property
    def vision_layers(self) -> nn.ModuleList:
        tower = self.multimodal_model.vision_tower
        # transformers 5 flattened CLIPVisionModel; older checkpoints' wrappers keep a .vision_model
        return getattr(tower, "vision_model", tower).encoder.layers

    @property
    def feature_block(self) -> int:
        return self._feature_block

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    @property
    def grid(self) -> tuple[int, int]:
        vision = self.model.config.vision_config
        side = vision.image_size // vision.patch_size
        return side, side

    @property
    def tokens_per_image(self) -> int:
        height, width = self.grid
        return height * width

    @property
    def attn_implementation(self) -> str:
        return self._language_model.config._attn_implementation

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.multimodal_model.get_input_embeddings()(input_ids)

    def encode_images(self, pixel_values: torch.Tensor) -> VisionOutput:
        tower = self.multimodal_model.vision_tower
        out = tower(pixel_values.to(tower.dtype), output_hidden_states=True, return_dict=True)
        features = out.hidden_states[self._feature_block + 1][:, 1:]
        return VisionOutput(features=features, hidden_states=tuple(out.hidden_states))

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.multimodal_model.multi_modal_projector(features)

    def rotary(self, hidden_states: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._language_model.rotary_emb(hidden_states, position_ids=position_ids)

    def vit_block_step(
        self,
        block: int,
        hidden_states: torch.Tensor,
        attention_bias: torch.Tensor | None,
        between: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        layer = self.vision_layers[block]
        attn = layer.self_attn
        normed = layer.layer_norm1(hidden_states)
        attn_out, _ = attn(hidden_states=normed, attention_mask=attention_bias)
        hidden_states = hidden_states + attn_out
        batch, n, _ = normed.shape
        keys = attn.k_proj(normed).view(batch, n, attn.num_heads, attn.head_dim).mean(dim=2)
        hidden_states = between(hidden_states, keys)
        return hidden_states + layer.mlp(layer.layer_norm2(hidden_states))

    def vit_cls_attention(self, block: int, block_input: torch.Tensor) -> torch.Tensor:
        layer = self.vision_layers[block]
        attn = layer.self_attn
        normed = layer.layer_norm1(block_input)
        batch, n, _ = normed.shape
        query = attn.q_proj(normed[:, :1]).view(batch, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
        key = attn.k_proj(normed).view(batch, n, attn.num_heads, attn.head_dim).transpose(1, 2)
        return attention_probs(query, key, attn.scale)[:, :, 0]

    def llm_attention(
        self,
        layer: int,
        layer_input: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        query_index: torch.Tensor,
        key_mask: torch.Tensor,
    ) -> torch.Tensor:
        decoder_layer = self.decoder_layers[layer]
        attn = decoder_layer.self_attn
        normed = decoder_layer.input_layernorm(layer_input)
        batch, n, dim = normed.shape
        cos, sin = position_embeddings
        rows = query_index[..., None]
        q_in = normed.gather(1, rows.expand(-1, -1, dim))
        q_cos = cos.expand(batch, -1, -1).gather(1, rows.expand(-1, -1, cos.shape[-1]))
        q_sin = sin.expand(batch, -1, -1).gather(1, rows.expand(-1, -1, sin.shape[-1]))
        query = attn.q_proj(q_in).view(batch, q_in.shape[1], -1, attn.head_dim).transpose(1, 2)
        key = attn.k_proj(normed).view(batch, n, -1, attn.head_dim).transpose(1, 2)
        query = query * q_cos[:, None] + rotate_half(query) * q_sin[:, None]
        key = key * cos[:, None] + rotate_half(key) * sin[:, None]
        return attention_probs(query, key, attn.scaling, key_mask)
