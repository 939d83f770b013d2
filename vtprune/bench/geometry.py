"""Random-weight models at the geometry users run, for ``vtprune speed``: real transformers config classes with the
published checkpoints' dimensions, and prompts with the placeholder runs the real processors would make.

Nothing is downloaded: the dimensions below are copied from the checkpoints' ``config.json`` (llava-hf/llava-1.5-7b-hf,
llava-hf/llava-v1.6-vicuna-7b-hf, Qwen/Qwen2.5-VL-7B-Instruct). Speed depends on shapes, not on trained weights, except
that the tokens a score-based method keeps differ (their number does not). ``layers`` truncates the language model
(CPU runs: a 32-layer 7B LLM does not fit in memory); the vision tower is always built whole, since it is the same
cost for every method that leaves it alone and the part pre-LLM methods cannot speed up.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

# Prompt text around the image: a system/user preamble and a question, as token counts (LLaVA-1.5's chat template
# gives about 35 text tokens before and after an image for a short question).
TEXT_BEFORE, TEXT_AFTER = 20, 40


@dataclass(frozen=True)
class Geometry:
    """A model family at one size, with the image it is measured on."""

    name: str
    family: str  # llava, llava_next, qwen2_5_vl
    description: str
    image: tuple[int, int]  # (height, width) in pixels
    default_budgets: tuple[int | float, ...]

    def config(self, layers: int | None):
        """The transformers config (``layers``: decoder layers of the LLM; None: the checkpoint's depth)."""
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig, Qwen2_5_VLConfig

        if self.family == "qwen2_5_vl":
            text = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=layers or 28,
                        num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                        max_position_embeddings=128000,
                        rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                                            "mrope_section": [16, 24, 24]},
                        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None)
            vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                          patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                          fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu")
            return Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=151655,
                                    video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)
        if self.name == "small":
            vision = CLIPVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
                                      num_attention_heads=8, image_size=336, patch_size=14, projection_dim=256)
            text = LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=layers or 8,
                               num_attention_heads=8, num_key_value_heads=8, vocab_size=32064,
                               max_position_embeddings=4096)
        else:  # CLIP ViT-L/14-336 and Vicuna/LLaMA-7B
            vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                      num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768,
                                      hidden_act="quick_gelu")
            text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers or 32,
                               num_attention_heads=32, num_key_value_heads=32, vocab_size=32064,
                               max_position_embeddings=4096, rms_norm_eps=1e-5)
        common = dict(vision_config=vision, text_config=text, image_token_id=32000, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu")
        if self.family == "llava_next":
            pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
            return LlavaNextConfig(image_grid_pinpoints=pinpoints, **common)
        return LlavaConfig(**common)

    def full_depth(self) -> int:
        return self.config(None).text_config.num_hidden_layers

    def parameter_bytes(self, layers: int | None, dtype: torch.dtype) -> int:
        """Weights' bytes of the model as built (counted on the meta device: nothing allocated)."""
        with torch.device("meta"):
            model = _model_class(self.family)._from_config(self.config(layers))
        size = torch.empty((), dtype=dtype).element_size()
        return sum(p.numel() for p in model.parameters()) * size

    def build(self, layers: int | None, dtype: torch.dtype, device: str, attn: str = "sdpa",
              seed: int = 0) -> nn.Module:
        """The random-weight model (transformers' own initialisation), in eval mode on ``device``."""
        torch.manual_seed(seed)
        config = self.config(layers)
        config._attn_implementation = attn
        model = _model_class(self.family)._from_config(config, dtype=dtype, attn_implementation=attn)
        model.generation_config.pad_token_id = 0
        model.generation_config.eos_token_id = None
        return model.to(device).eval()

    def inputs(self, model: nn.Module, batch: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
        """A batch of ``batch`` identical prompts: text, one image of ``self.image`` pixels, text; random pixels."""
        generator = torch.Generator().manual_seed(seed)
        config = model.config
        height, width = self.image
        text = torch.randint(100, 30000, (TEXT_BEFORE + TEXT_AFTER,), generator=generator)
        extra: dict[str, torch.Tensor] = {}
        if self.family == "qwen2_5_vl":
            patch, merge, temporal = 14, 2, 2
            grid = (1, height // patch, width // patch)
            extra["pixel_values"] = torch.randn(grid[0] * grid[1] * grid[2] * batch, 3 * temporal * patch * patch,
                                                generator=generator)
            extra["image_grid_thw"] = torch.tensor([grid] * batch)
            tokens = grid[1] * grid[2] // merge**2
            image = torch.cat([torch.tensor([config.vision_start_token_id]),
                               torch.full((tokens,), config.image_token_id),
                               torch.tensor([config.vision_end_token_id])])
        else:
            side = config.vision_config.image_size
            if self.family == "llava_next":
                views = _next_views(model, height, width)
                extra["pixel_values"] = torch.randn(batch, views, 3, side, side, generator=generator)
                extra["image_sizes"] = torch.tensor([[height, width]] * batch)
                tokens = _next_tokens(model, height, width, views)
            else:
                extra["pixel_values"] = torch.randn(batch, 3, side, side, generator=generator)
                tokens = (side // config.vision_config.patch_size) ** 2
            image = torch.full((tokens,), config.image_token_id)
        ids = torch.cat([text[:TEXT_BEFORE], image, text[TEXT_BEFORE:]])[None].expand(batch, -1).contiguous()
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), **extra}
        if self.family == "qwen2_5_vl":
            inputs["mm_token_type_ids"] = (ids == config.image_token_id).int()
        return inputs

    def visual_tokens(self, inputs: dict[str, torch.Tensor], model: nn.Module) -> int:
        """Placeholder tokens of one image (LLaVA-NeXT: base view, crops and newlines)."""
        return int((inputs["input_ids"][0] == model.config.image_token_id).sum())


def _model_class(family: str):
    import transformers

    return getattr(transformers, {"llava": "LlavaForConditionalGeneration",
                                  "llava_next": "LlavaNextForConditionalGeneration",
                                  "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}[family])


def _next_views(model: nn.Module, height: int, width: int) -> int:
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    config = model.config
    return image_size_to_num_patches(image_size=(height, width), grid_pinpoints=config.image_grid_pinpoints,
                                     patch_size=config.vision_config.image_size)


def _next_tokens(model: nn.Module, height: int, width: int, views: int) -> int:
    """Placeholders of an anyres image, read from the model's own packing (as the processor counts them)."""
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    index = torch.zeros(views, side * side, 1, dtype=torch.float64)
    packed, _ = model.model.pack_image_features([index], torch.tensor([[height, width]]), "default",
                                                image_newline=torch.zeros(1, dtype=torch.float64))
    return packed[0].shape[0]


GEOMETRIES = {
    geometry.name: geometry for geometry in (
        Geometry("small", "llava", "LLaVA-1.5 layout at small width: CLIP 336/14 (576 tokens), 8 x 256-wide ViT "
                 "blocks, 8 x 512-wide LLaMA layers", (336, 336), (64, 192)),
        Geometry("llava-1.5-7b", "llava", "LLaVA-1.5-7B: CLIP ViT-L/14-336 (576 tokens) + 32 x 4096-wide LLaMA "
                 "layers", (336, 336), (64, 192)),
        Geometry("llava-next-7b", "llava_next", "LLaVA-NeXT-7B (Vicuna): 672x672 image, 2x2 grid + base view = "
                 "2,928 tokens with newlines", (672, 672), (0.1, 0.2)),
        Geometry("qwen2.5-vl-7b", "qwen2_5_vl", "Qwen2.5-VL-7B: 1344x1344 image = 9,216 patches, 2,304 tokens after "
                 "the 2x2 merger; 28 x 3584-wide layers (GQA 28/4)", (1344, 1344), (0.1, 0.2)),
    )
}


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None."""
    meminfo = Path("/proc/meminfo")
    if not meminfo.exists():
        return None
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None
