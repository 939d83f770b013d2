"""What the last pruned prefill did, per sample, image and partition. Computed on first access (one host copy),
so a run that never reads its stats pays nothing for them."""
from __future__ import annotations

from collections.abc import Callable
from functools import cached_property

import torch

from vtprune.ops import Sources
from vtprune.runtime.prefill import Prefill


class Stats:
    """Token accounting of the last prefill.

    - ``visual_tokens`` [B, L]: visual tokens entering each decoder layer; ``original_visual_tokens`` [B]: the
      placeholder tokens the prompt had; ``llm_input_visual_tokens`` / ``mean_visual_tokens``: the two budget
      conventions (tokens entering the LLM; layer average); ``tokens`` [B, L]: all tokens (text and visual) entering
      each layer; ``visual_flops(layer_flops)``: the prefill FLOPs due to visual tokens, pruned and unpruned.
    - ``tokens_per_image[b]`` [images, L] and ``tokens_per_partition[b][i]`` [partitions, L]: the same per image and
      per view of the image (LLaVA-NeXT: 0 = base image, k = k-th crop; Qwen video: frames); ``separator_tokens``
      [B, L]: LLaVA-NeXT newline tokens among the visual tokens.
    - ``sources[b]``: for each visual token that entered the LLM, its weights over the sample's original visual
      tokens (its images' layouts concatenated); ``final_tokens[b]``: rows of ``sources[b]`` alive after the last
      layer; ``kept_patches(b)``: original tokens represented by a token alive at the end (merges included);
      ``kept_share(b)``: the same weighted by the share each makes up of its token; ``layouts(b)``: the images'
      layouts.
    - ``output_positions`` [B, n_out]: the input column each output row (logits) belongs to; -1 for visual tokens
      and padding.
    """

    def __init__(self, prefill: Prefill, num_layers: int) -> None:
        self._prefill = prefill
        self._layers = num_layers

    @cached_property
    def _counts(self) -> torch.Tensor:
        """[L, B, images, partitions + 1] visual tokens per layer, image and partition (last slot: separators)."""
        universe = self._prefill.universe
        batch = universe.valid.shape[0]
        images = max(1, universe.image_candidates.shape[1])
        partitions = max([image.record.layout.num_partitions for row in universe.images for image in row] + [1])
        per_rows: dict[int, torch.Tensor] = {}
        counts = []
        for layer in range(self._layers):
            rows = self._prefill.tracks[layer][0]
            if id(rows) not in per_rows:
                safe = rows.clamp_min(0)
                visual = universe.visual.gather(1, safe) & (rows >= 0)
                slot = universe.partition.gather(1, safe).clamp_min(0)
                slot = torch.where(universe.separator.gather(1, safe), partitions, slot)
                bucket = universe.image.gather(1, safe).clamp_min(0) * (partitions + 1) + slot
                out = torch.zeros(batch, images * (partitions + 1), dtype=torch.long, device=rows.device)
                per_rows[id(rows)] = out.scatter_add_(1, bucket, visual.long()).view(batch, images, partitions + 1)
            counts.append(per_rows[id(rows)])
        return torch.stack(counts).cpu()

    @property
    def visual_tokens(self) -> torch.Tensor:
        return self._counts.sum((2, 3)).T.contiguous()

    @property
    def separator_tokens(self) -> torch.Tensor:
        return self._counts[..., -1].sum(2).T.contiguous()

    @cached_property
    def original_visual_tokens(self) -> torch.Tensor:
        return torch.tensor([sum(sizes) for sizes in self._prefill.universe.layout_sizes])

    @property
    def images(self) -> list[int]:
        return [len(sizes) for sizes in self._prefill.universe.layout_sizes]

    @property
    def tokens_per_image(self) -> list[torch.Tensor]:
        per_image = self._counts.sum(3).permute(1, 2, 0)  # [B, images, L]
        return [per_image[b, :count] for b, count in enumerate(self.images)]

    @property
    def tokens_per_partition(self) -> list[list[torch.Tensor]]:
        out = []
        for b, row in enumerate(self._prefill.universe.images):
            out.append([self._counts[:, b, i, :image.record.layout.num_partitions].T for i, image in enumerate(row)])
        return out

    @property
    def llm_input_visual_tokens(self) -> torch.Tensor:
        """Visual tokens entering layer 0 (the 'tokens into the LLM' budget convention) [B]."""
        return self.visual_tokens[:, 0]

    @property
    def mean_visual_tokens(self) -> torch.Tensor:
        """Layer-averaged visual tokens (SparseVLM / PyramidDrop / MustDrop budget convention) [B]."""
        return self.visual_tokens.float().mean(dim=1)

    @cached_property
    def tokens(self) -> torch.Tensor:
        """Real tokens (text and visual) entering each decoder layer [B, L]."""
        return torch.stack([(self._prefill.tracks[layer][0] >= 0).sum(1) for layer in range(self._layers)], 1).cpu()

    def visual_flops(self, layer_flops: Callable[[float], float]) -> tuple[torch.Tensor, torch.Tensor]:
        """(pruned, unpruned) [B] (float64): the prefill FLOPs visual tokens add to the text, summed over layers:
        ``layer_flops(n_l) - layer_flops(n_l - v_l)`` with n_l tokens and v_l visual tokens entering layer l; unpruned:
        the same with every original visual token at every layer. ``layer_flops`` gives one decoder layer's FLOPs for
        n tokens, e.g. ``functools.partial(vtprune.bench.flops.layer_flops, hidden=d, kv_width=d_kv, mlp=m)``. The
        image-token FLOPs reduction is ``1 - pruned / unpruned``."""
        text = (self.tokens - self.visual_tokens).double()
        visual, original = self.visual_tokens.double(), self.original_visual_tokens.double()[:, None]

        def added(count: torch.Tensor) -> torch.Tensor:
            per_layer = [[layer_flops(float(t + v)) - layer_flops(float(t)) for t, v in zip(row_t, row_v)]
                         for row_t, row_v in zip(text.tolist(), count.tolist())]
            return torch.tensor(per_layer, dtype=torch.float64).sum(1)

        return added(visual), added(original.expand_as(visual))

    @cached_property
    def sources(self) -> list[Sources]:
        return [s.to(torch.device("cpu")) for s in self._prefill.universe.sources]

    @cached_property
    def final_tokens(self) -> list[torch.Tensor]:
        universe, rows = self._prefill.universe, self._prefill.tokens.rows
        index = universe.visual_index.gather(1, rows.clamp_min(0)).masked_fill(rows < 0, -1).cpu()
        return [row[row >= 0] for row in index]

    @cached_property
    def _represented(self) -> list[torch.Tensor]:
        universe = self._prefill.universe
        owned = (self._prefill.owner >= 0) & universe.visual
        index = universe.visual_index.masked_fill(~owned, -1).cpu()
        return [row[row >= 0] for row in index]

    def kept_patches(self, sample: int) -> torch.Tensor:
        """Bool [V_b]: original visual tokens that a token alive after the last layer represents."""
        size = sum(self._prefill.universe.layout_sizes[sample])
        return self.sources[sample].select(self._represented[sample]).coverage(size) > 0

    def kept_share(self, sample: int) -> torch.Tensor:
        """Float [V_b]: for each original visual token, the share it makes up of the tokens alive after the last layer
        that represent it (1: kept as its own token; 1/m: one of m tokens merged evenly into one; 0: dropped), capped
        at 1. Unlike ``kept_patches``, a token holding a sliver of a merged group barely counts."""
        size = sum(self._prefill.universe.layout_sizes[sample])
        alive = self.sources[sample].select(self._represented[sample])
        share = Sources(alive.index, alive.weight / alive.total().clamp_min(1e-12)[:, None])
        return share.coverage(size).clamp(max=1.0)

    def layouts(self, sample: int) -> list:
        """The ``ImageLayout`` of each of the sample's images, in prompt order (their tokens are concatenated in
        ``sources``, ``kept_patches`` and ``kept_share``)."""
        return [image.record.layout for image in self._prefill.universe.images[sample]]

    def dense_sources(self, sample: int) -> torch.Tensor:
        """``sources[sample]`` as a dense [k, V_b] matrix."""
        return self.sources[sample].to_dense(sum(self._prefill.universe.layout_sizes[sample]))

    @cached_property
    def output_positions(self) -> torch.Tensor:
        universe, rows = self._prefill.universe, self._prefill.tokens.rows
        return universe.origin.gather(1, rows.clamp_min(0)).masked_fill(rows < 0, -1).cpu()

    def __repr__(self) -> str:
        per_sample = []
        for b in range(self.visual_tokens.shape[0]):
            counts = self.visual_tokens[b].tolist()
            per_sample.append(
                f"  sample {b}: {self.images[b]} image(s), {int(self.original_visual_tokens[b])} visual tokens -> "
                f"per layer {counts} (mean {self.mean_visual_tokens[b]:.1f})"
            )
        return "Stats(\n" + "\n".join(per_sample) + "\n)"
