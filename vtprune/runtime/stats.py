"""What the last pruned forward did, per sample."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Stats:
    """Token accounting of the last prefill.

    ``visual_tokens`` [B, L]: visual tokens entering each decoder layer. ``original_visual_tokens`` [B]: visual
    tokens before any reduction. ``sources[b]`` [k_b, V_b]: for each visual token that entered the LLM, its weights
    over the sample's original visual tokens (all images concatenated, raster order). ``final_tokens[b]``: indices
    into ``sources[b]`` of the visual tokens still alive after the last layer.
    """

    visual_tokens: torch.Tensor
    original_visual_tokens: torch.Tensor
    vision_tokens_per_image: int
    sources: list[torch.Tensor]
    final_tokens: list[torch.Tensor]

    @property
    def llm_input_visual_tokens(self) -> torch.Tensor:
        """Visual tokens entering layer 0 (the 'tokens into the LLM' budget convention) [B]."""
        return self.visual_tokens[:, 0]

    @property
    def mean_visual_tokens(self) -> torch.Tensor:
        """Layer-averaged visual tokens (SparseVLM / PyramidDrop budget convention) [B]."""
        return self.visual_tokens.float().mean(dim=1)

    def kept_patches(self, sample: int) -> torch.Tensor:
        """Bool [V_b]: original visual tokens that contribute to a token alive after the last layer."""
        sources = self.sources[sample][self.final_tokens[sample]]
        return (sources > 0).any(dim=0)

    def __repr__(self) -> str:
        per_sample = []
        for b in range(self.visual_tokens.shape[0]):
            counts = self.visual_tokens[b].tolist()
            per_sample.append(
                f"  sample {b}: {int(self.original_visual_tokens[b])} visual tokens -> per layer {counts} "
                f"(mean {self.mean_visual_tokens[b]:.1f})"
            )
        return "Stats(\n" + "\n".join(per_sample) + "\n)"
