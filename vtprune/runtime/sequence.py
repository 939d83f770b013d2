"""Sequence surgery: shrinking the LLM input after a pre-LLM reduction, gathering kept tokens inside the LLM,
and the per-layer attention masks that go with ragged, left-padded rows."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vtprune.runtime.operators import Reduction


@dataclass
class Sequence:
    """A left-padded batch of token rows as it flows through the decoder.

    ``token_id`` is -1 for text and padding, else the index of the visual token in ``Stats.sources[b]``.
    """

    hidden: torch.Tensor  # [B, n, D]
    valid: torch.Tensor  # [B, n] bool
    positions: torch.Tensor  # [B, n] long (RoPE positions)
    token_id: torch.Tensor  # [B, n] long

    @property
    def visual(self) -> torch.Tensor:
        return self.token_id >= 0


def left_pad(rows: list[torch.Tensor], fill: float | int | bool) -> torch.Tensor:
    """Stack rows of different lengths (dim 0) into one tensor, padding on the left so the last token aligns."""
    width = max(row.shape[0] for row in rows)
    out = rows[0].new_full((len(rows), width, *rows[0].shape[1:]), fill)
    for b, row in enumerate(rows):
        if row.shape[0]:
            out[b, width - row.shape[0] :] = row
    return out


def build_reduced_sequence(
    embeds: torch.Tensor,
    is_image: torch.Tensor,
    valid: torch.Tensor,
    positions: torch.Tensor,
    reductions: list[Reduction],
    tokens_per_image: int,
) -> tuple[Sequence, list[torch.Tensor]]:
    """Replace each image's placeholder run with its reduced tokens.

    ``embeds`` [B, n, D] text embeddings; ``is_image`` [B, n] placeholder positions (runs of ``tokens_per_image``,
    images assigned to runs in batch order as LLaVA's masked_scatter does). Reduced tokens get the original position
    of their (weighted-mean) source patch. Returns the new sequence and, per sample, the source weights of its
    visual tokens over all of its original visual tokens [k_b, n_images_b * N].
    """
    rows_hidden, rows_valid, rows_pos, rows_id, sample_sources = [], [], [], [], []
    image = 0
    patch_index = torch.arange(tokens_per_image, device=embeds.device, dtype=torch.float32)
    for b in range(embeds.shape[0]):
        starts = is_image[b].nonzero().flatten()[::tokens_per_image].tolist()
        pieces_h, pieces_v, pieces_p, pieces_id, sources = [], [], [], [], []
        cursor, n_images, n_visual = 0, len(starts), 0
        for j, start in enumerate(starts):
            red = reductions[image + j]
            k = red.features.shape[0]
            pieces_h += [embeds[b, cursor:start], red.features.to(embeds.dtype)]
            pieces_v += [valid[b, cursor:start], valid.new_ones(k)]
            centre = (red.sources.float() @ patch_index) / red.sources.float().sum(-1).clamp_min(1e-12)
            pieces_p += [positions[b, cursor:start], positions[b, start] + centre.round().long()]
            pieces_id += [torch.full((start - cursor,), -1, device=embeds.device), torch.arange(n_visual, n_visual + k)]
            block = red.sources.new_zeros(k, n_images * tokens_per_image)
            block[:, j * tokens_per_image : (j + 1) * tokens_per_image] = red.sources
            sources.append(block)
            n_visual += k
            cursor = start + tokens_per_image
        image += n_images
        pieces_h.append(embeds[b, cursor:])
        pieces_v.append(valid[b, cursor:])
        pieces_p.append(positions[b, cursor:])
        pieces_id.append(torch.full((embeds.shape[1] - cursor,), -1, device=embeds.device))
        rows_hidden.append(torch.cat(pieces_h))
        rows_valid.append(torch.cat(pieces_v))
        rows_pos.append(torch.cat(pieces_p))
        rows_id.append(torch.cat(pieces_id).long())
        sample_sources.append(torch.cat(sources) if sources else embeds.new_zeros(0, 0))
    sequence = Sequence(
        hidden=left_pad(rows_hidden, 0.0),
        valid=left_pad(rows_valid, False),
        positions=left_pad(rows_pos, 0),
        token_id=left_pad(rows_id, -1),
    )
    return sequence, sample_sources


def renumber(valid: torch.Tensor) -> torch.Tensor:
    """Contiguous positions 0..n'-1 over the valid tokens of each row (what LLaVA's own pipeline feeds)."""
    return (valid.long().cumsum(-1) - 1).clamp_min(0)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x`` [B, n, ...] gathered along dim 1 with ``index`` [B, m]."""
    expanded = index.view(*index.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return x.gather(1, expanded)


def keep_index(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded gather index for a keep mask [B, n]: returns (index [B, m], valid [B, m])."""
    counts = keep.sum(1)
    width = int(counts.max())
    order = torch.arange(keep.shape[1], device=keep.device)
    # Kept entries sort first (in order), then pick the last `width` of the reversed arrangement for left padding.
    rank = torch.where(keep, order, order + keep.shape[1])
    sorted_idx = rank.argsort(dim=1)[:, :width]
    slot = torch.arange(width, device=keep.device)
    shift = (width - counts)[:, None]
    valid = slot[None, :] >= shift
    index = sorted_idx.gather(1, (slot[None, :] - shift).clamp_min(0))
    return index, valid


def attention_mask(
    past_valid: torch.Tensor | None, valid: torch.Tensor, dtype: torch.dtype, implementation: str
) -> torch.Tensor:
    """4-D mask [B, 1, q, past + q] for one decoder layer: every valid cached key, causal among the new tokens.

    Padding queries may see themselves so that no softmax row is empty (their outputs are never used). Returns
    ``None`` for SDPA when nothing is padded: the plain causal case, which SDPA runs on its faster causal kernels.
    """
    batch, q = valid.shape
    if implementation == "sdpa" and bool(valid.all()) and (past_valid is None or bool(past_valid.all())):
        return None
    causal = torch.ones(q, q, dtype=torch.bool, device=valid.device).tril()
    current = causal[None] & valid[:, None, :]
    current |= torch.eye(q, dtype=torch.bool, device=valid.device)[None] & ~valid[:, :, None]
    if past_valid is not None and past_valid.shape[1]:
        current = torch.cat([past_valid[:, None, :].expand(batch, q, -1), current], dim=-1)
    mask = current[:, None]
    if implementation == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=valid.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask
