"""The interface the runtime needs from a model family."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn


@dataclass
class VisionOutput:
    """What the vision tower delivered for a batch of images.

    ``features``: tokens fed to the projector [n_images, N, D_vit] (CLS removed); ``hidden_states``: the tower's
    hidden states, ``hidden_states[i]`` = input of block i (used to recompute attention rows).
    """

    features: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...]


class Adapter:
    """Per-family access to a VLM. Subclasses implement every method below."""

    model_classes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return type(model).__name__ in cls.model_classes

    # --- structure -------------------------------------------------------------------------------------------
    @property
    def multimodal_model(self) -> nn.Module:
        """The module whose forward receives ``pixel_values`` and calls the language model."""
        raise NotImplementedError

    @property
    def decoder_layers(self) -> nn.ModuleList:
        raise NotImplementedError

    @property
    def vision_layers(self) -> nn.ModuleList:
        raise NotImplementedError

    @property
    def feature_block(self) -> int:
        """Index of the ViT block whose output is fed to the projector."""
        raise NotImplementedError

    @property
    def image_token_id(self) -> int:
        raise NotImplementedError

    @property
    def tokens_per_image(self) -> int:
        raise NotImplementedError

    @property
    def grid(self) -> tuple[int, int]:
        raise NotImplementedError

    @property
    def attn_implementation(self) -> str:
        raise NotImplementedError

    # --- computation ------------------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_images(self, pixel_values: torch.Tensor) -> VisionOutput:
        raise NotImplementedError

    def project(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def rotary(self, hidden_states: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def vit_block_step(
        self,
        block: int,
        hidden_states: torch.Tensor,
        attention_bias: torch.Tensor | None,
        between: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """Run ViT ``block`` with an additive ``attention_bias`` on the keys, calling
        ``between(hidden_after_attention, head_mean_keys)`` before the MLP (where ToMe-style merges happen)."""
        raise NotImplementedError

    def vit_cls_attention(self, block: int, block_input: torch.Tensor) -> torch.Tensor:
        """[CLS]-query attention of ViT ``block`` over all its tokens, per head: [n_images, heads, N+1]."""
        raise NotImplementedError

    def llm_attention(
        self,
        layer: int,
        layer_input: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        query_index: torch.Tensor,
        key_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Attention of decoder ``layer`` for query rows ``query_index`` [B, q] over the layer's own input tokens
        (``key_mask`` [B, q, n] says which are visible): [B, heads, q, n]. RoPE and grouped-query heads included."""
        raise NotImplementedError
