"""MiniLISA: MiniLLaVA extended LISA-style for referring and reasoning segmentation (SynthSeg).

As LISA (Lai et al., CVPR 2024) does with LLaVA and SAM: a ``[SEG]`` token is added to the vocabulary, the prompt ends
with it (teacher forced, as LISA's evaluation feeds "[SEG]"), and its last hidden state, projected, conditions a mask
decoder. The decoder has its own image path -- a frozen copy of the VLM's vision tower (as SAM has its own image
encoder) plus a small convolutional pixel branch -- so token pruning inside the VLM never touches what the decoder
sees: apply pruners to ``MiniLisa.vlm``, a stock ``LlavaForConditionalGeneration``.

Checkpoint folder: the VLM and processor as saved by HuggingFace (``config.json`` carries ``seg_token_id``), plus
``mask_decoder.json`` (its widths) and ``mask_decoder.safetensors``. The copied vision tower is not stored: it is
rebuilt from the VLM's, which training leaves frozen.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vtprune.bench import synthseg, synthvqa as sv

SEG_TOKEN = "[SEG]"
#: words MiniLISA adds to MiniLLaVA's vocabulary (appended: every MiniLLaVA id keeps its meaning)
EXTRA_WORDS: tuple[str, ...] = tuple(w for w in synthseg.prompt_vocabulary() if w not in (
    "above", "below", "left", "right")) + (SEG_TOKEN,)
PROMPT_TEMPLATE = "USER: <image>\n{prompt} ASSISTANT: " + SEG_TOKEN
DECODER_CONFIG = "mask_decoder.json"
DECODER_WEIGHTS = "mask_decoder.safetensors"


def format_prompt(prompt: str) -> str:
    """MiniLISA's input for a SynthSeg prompt: the assistant turn is the ``[SEG]`` token (teacher forced)."""
    return PROMPT_TEMPLATE.format(prompt=prompt)


class MaskDecoder(nn.Module):
    """The [SEG] embedding and the decoder's own image features -> mask logits [B, H, W].

    Coarse path: patch features (``grid`` x ``grid``) plus fixed place features, modulated by the projected [SEG]
    state (FiLM), a 3x3 and a 1x1 conv, one logit per patch (a 1x1 head plus a dot product with a [SEG] query). Fine
    path: the normalised image average-pooled by ``pixel_stride`` and a small conv net, fused with the upsampled
    coarse logit and features; the sum is upsampled bilinearly to the image size.
    """

    def __init__(self, vision_hidden: int, text_hidden: int, width: int = 48, pixel_width: int = 16,
                 grid: int = sv.GRID, image_size: int = sv.IMAGE_SIZE, pixel_stride: int = 3) -> None:
        super().__init__()
        self.config = dict(vision_hidden=vision_hidden, text_hidden=text_hidden, width=width,
                           pixel_width=pixel_width, grid=grid, image_size=image_size, pixel_stride=pixel_stride)
        self.grid, self.image_size, self.pixel_stride = grid, image_size, pixel_stride
        self.seg_proj = nn.Sequential(nn.Linear(text_hidden, width), nn.GELU(), nn.Linear(width, 3 * width))
        self.patch_in = nn.Sequential(nn.LayerNorm(vision_hidden), nn.Linear(vision_hidden, width))
        # where each patch is, so that the [SEG] state can select by place (relations), not only by look
        self.register_buffer("place", _place_features(grid, width), persistent=False)
        self.mix = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.GELU(), nn.Conv2d(width, width, 1),
                                 nn.GELU())
        self.coarse = nn.Conv2d(width, 1, 1)
        self.squeeze = nn.Conv2d(width, pixel_width, 1)
        self.pixel = nn.Sequential(nn.Conv2d(3, pixel_width, 3, padding=1), nn.GELU(),
                                   nn.Conv2d(pixel_width, pixel_width, 3, padding=1), nn.GELU())
        # 1x1 then one 3x3: the part that runs once per prompt stays cheap at 1/3 resolution
        self.fuse = nn.Sequential(nn.Conv2d(2 * pixel_width + 1, pixel_width, 1), nn.GELU(),
                                  nn.Conv2d(pixel_width, 1, 3, padding=1))

    def pixel_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The fine path's image features [B, pixel_width, H / stride, W / stride] (prompt-independent)."""
        return self.pixel(F.avg_pool2d(pixel_values.to(self.coarse.weight.dtype), self.pixel_stride))

    def forward(self, patch_features: torch.Tensor, seg_hidden: torch.Tensor, pixel_values: torch.Tensor,
                full_size: bool = True, pixel_features: torch.Tensor | None = None) -> torch.Tensor:
        """``patch_features`` [B, grid², Dv], ``seg_hidden`` [B, Dt], ``pixel_values`` [B, 3, H, W] (the CLIP
        processor's) -> logits [B, H, W] (``full_size=False``: at 1/``pixel_stride`` of H and W).
        ``pixel_features``: ``pixel_features(pixel_values)`` when already computed (one image, many prompts)."""
        b = patch_features.shape[0]
        gamma, beta, query = self.seg_proj(seg_hidden.to(patch_features.dtype)).chunk(3, dim=-1)
        x = (self.patch_in(patch_features) + self.place).transpose(1, 2).reshape(b, -1, self.grid, self.grid)
        x = x * (1 + gamma[..., None, None]) + beta[..., None, None]
        x = x + self.mix(x)
        # a per-patch head plus SAM's hypernetwork-style dot product with a query from the [SEG] state
        coarse = self.coarse(x) + torch.einsum("bchw,bc->bhw", x, query)[:, None] / x.shape[1] ** 0.5
        fine = self.pixel_features(pixel_values) if pixel_features is None else pixel_features
        size = fine.shape[-2:]
        up_coarse = F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
        up_feats = F.interpolate(self.squeeze(x), size=size, mode="bilinear", align_corners=False)
        logits = up_coarse + self.fuse(torch.cat([fine.to(x.dtype), up_feats, up_coarse], dim=1))
        if full_size:
            logits = F.interpolate(logits, size=pixel_values.shape[-2:], mode="bilinear", align_corners=False)
        return logits[:, 0]


def _place_features(grid: int, width: int) -> torch.Tensor:
    """Fixed sinusoidal features of each patch's (row, col) [grid², width] (half for rows, half for columns)."""
    quarter = width // 4
    frequencies = 2 * torch.pi * torch.linspace(0.5, grid / 4, quarter) / grid  # periods from 2 grids to 4 patches
    steps = torch.arange(grid, dtype=torch.float32)[:, None] * frequencies
    axis = torch.cat([steps.sin(), steps.cos()], dim=1)  # [grid, width / 2]
    rows = axis[:, None, :].expand(grid, grid, -1)
    cols = axis[None, :, :].expand(grid, grid, -1)
    out = torch.cat([rows, cols], dim=-1).reshape(grid * grid, -1)
    return torch.nn.functional.pad(out, (0, width - out.shape[1]))


@dataclass
class SegmentationOutput:
    """``mask_logits`` [B, H, W] (a pixel is in the mask where > 0) and ``seg_hidden`` [B, D] (the [SEG] token's
    last hidden state)."""

    mask_logits: torch.Tensor
    seg_hidden: torch.Tensor


class MiniLisa(nn.Module):
    """A LISA-style segmentation model: ``vlm`` (LLaVA with ``[SEG]``), ``image_encoder`` (the decoder's frozen copy of
    the vision tower) and ``mask_decoder``. Build with ``from_pretrained``; prompts from ``format_prompt``."""

    def __init__(self, vlm: nn.Module, mask_decoder: MaskDecoder) -> None:
        super().__init__()
        if getattr(vlm.config, "seg_token_id", None) is None:
            raise ValueError("the VLM's config has no seg_token_id: MiniLisa needs a model whose vocabulary has [SEG]")
        self.vlm = vlm
        self.mask_decoder = mask_decoder
        self.image_encoder = copy.deepcopy(vlm.model.vision_tower).requires_grad_(False)

    @property
    def seg_token_id(self) -> int:
        return int(self.vlm.config.seg_token_id)

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, dtype: torch.dtype = torch.float32) -> MiniLisa:
        from safetensors.torch import load_file
        from transformers import LlavaForConditionalGeneration

        folder = Path(folder)
        if not (folder / DECODER_CONFIG).is_file():
            raise FileNotFoundError(f"{folder} has no {DECODER_CONFIG}: not a MiniLISA checkpoint (train one with "
                                    "`vtprune train-reference --model mini-lisa --output DIR`)")
        vlm = LlavaForConditionalGeneration.from_pretrained(folder, dtype=dtype)
        decoder = MaskDecoder(**json.loads((folder / DECODER_CONFIG).read_text()))
        decoder.load_state_dict(load_file(str(folder / DECODER_WEIGHTS)))
        return cls(vlm, decoder.to(dtype)).eval()

    def save_pretrained(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        self.vlm.save_pretrained(folder)
        (folder / DECODER_CONFIG).write_text(json.dumps(self.mask_decoder.config, indent=2))
        save_file({k: v.contiguous() for k, v in self.mask_decoder.state_dict().items()}, str(folder / DECODER_WEIGHTS))

    def decoder_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The decoder's patch features [B, grid², Dv]: the block LLaVA feeds its projector, [CLS] dropped, from the
        decoder's own (never pruned) copy of the tower."""
        layer = self.vlm.config.vision_feature_layer
        out = self.image_encoder(pixel_values=pixel_values.to(self.image_encoder.dtype), output_hidden_states=True)
        return out.hidden_states[layer][:, 1:]

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> SegmentationOutput:
        """One teacher-forced forward: every (left-padded) prompt must end with ``[SEG]``."""
        if not bool((input_ids[:, -1] == self.seg_token_id).all()):
            raise ValueError("every prompt must end with the [SEG] token (left padding): build prompts with "
                             "vtprune.reference.lisa.format_prompt and a left-padding processor")
        captured: list[torch.Tensor] = []
        norm = self.vlm.model.language_model.norm
        handle = norm.register_forward_hook(lambda module, args, output: captured.append(output))
        try:
            self.vlm(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, logits_to_keep=1)
        finally:
            handle.remove()
        seg_hidden = captured[0][:, -1]
        logits = self.mask_decoder(self.decoder_features(pixel_values), seg_hidden, pixel_values)
        return SegmentationOutput(logits, seg_hidden)

    @torch.no_grad()
    def segment(self, processor, images: list, prompts: list[str]) -> list[np.ndarray]:
        """Predicted bool masks [H, W], one per (image, SynthSeg prompt)."""
        inputs = processor(images=images, text=[format_prompt(p) for p in prompts], return_tensors="pt",
                           padding=True)
        device = next(self.parameters()).device
        out = self(input_ids=inputs["input_ids"].to(device), attention_mask=inputs["attention_mask"].to(device),
                   pixel_values=inputs["pixel_values"].to(device, self.vlm.dtype))
        return list((out.mask_logits > 0).cpu().numpy())
