"""Canary: every transformers internal the adapters and the runtime rely on, asserted in one place.

vtprune pins transformers to the range this passed on (pyproject.toml). When an upgrade breaks one of these, this
file says which assumption moved, before any pruning test fails in a harder-to-read way.
"""
from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.generation.utils import GenerationMixin, _slice_mm_encoder_output
from transformers.models.llava_next import modeling_llava_next

import vtprune
from vtprune.models import TESTED_TRANSFORMERS, EncodedImages, adapter_for
from vtprune.models.text import SUPPORTED_DECODER_LAYERS
from families import FAMILIES, Family, picture

ROOT = Path(__file__).resolve().parent.parent


def _parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def test_version_is_the_tested_release():
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    assert (major, minor) == TESTED_TRANSFORMERS, \
        "update TESTED_TRANSFORMERS and the pin in pyproject.toml after running this suite on the new version"
    pin = re.search(r'"transformers>=([\d.]+),<([\d.]+)"', (ROOT / "pyproject.toml").read_text())
    assert pin, "pyproject.toml must bound transformers"
    tested = ".".join(map(str, TESTED_TRANSFORMERS))
    assert Version(pin[1]) <= Version(tested) < Version(pin[2]) and pin[2] == f"{major}.{minor + 1}"


@pytest.mark.parametrize("version", ["5.19.0", "5.22.2", "5.24.0", "6.0.0"])
def test_other_releases_are_refused_at_apply_leaving_the_model_untouched(monkeypatch, version):
    """The package installs beside older transformers (vLLM's environment); the HF runtime refuses them."""
    model = Family("llava").model()
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    monkeypatch.setattr(transformers, "__version__", version)
    with pytest.raises(RuntimeError, match=rf"tested on transformers 5\.23\.x.*has {re.escape(version)}.*"
                                           r"pip install 'transformers>=5\.23,<5\.24'"):
        vtprune.apply(model, "fastv", keep=8)
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == hooks
    assert not any("forward" in vars(m) for m in model.modules())
    monkeypatch.setattr(transformers, "__version__", "5.23.1")
    vtprune.apply(model, "fastv", keep=8).remove()


ENCODERS = {
    "llava": {"get_image_features": ["pixel_values", "vision_feature_layer", "vision_feature_select_strategy",
                                     "image_sizes"]},
    "llava_next": {"get_image_features": ["pixel_values", "image_sizes", "vision_feature_layer",
                                          "vision_feature_select_strategy"]},
    "qwen2_vl": {"get_image_features": ["pixel_values", "image_grid_thw"],
                 "get_video_features": ["pixel_values_videos", "video_grid_thw"]},
}
ENCODERS["qwen2_5_vl"] = ENCODERS["qwen2_vl"]


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_multimodal_models(family):
    model = family.model()
    adapter = adapter_for(model)
    multimodal = adapter.multimodal_model
    forward = _parameters(type(multimodal).forward)
    # images arrive as pixel values or as pre-encoded outputs, and the forward calls the encoder by attribute
    assert {"input_ids", "attention_mask", "position_ids", "past_key_values", "inputs_embeds",
            "mm_encoder_outputs"} <= set(forward)
    source = inspect.getsource(type(multimodal).forward)
    for method, parameters in ENCODERS[family.name].items():
        assert f"self.{method}(" in source
        assert _parameters(getattr(type(multimodal), method))[1:len(parameters) + 1] == parameters
    assert "self.language_model(" in source and "inputs_embeds=inputs_embeds" in source
    language_model = multimodal.language_model
    assert {"attention_mask", "position_ids", "past_key_values", "inputs_embeds"} <= set(
        _parameters(type(language_model).forward))
    assert hasattr(language_model, "rotary_emb") and hasattr(language_model, "layers")
    lm_source = inspect.getsource(type(language_model).forward)
    assert "position_embeddings=position_embeddings" in lm_source and "decoder_layer(" in lm_source
    for layer in language_model.layers:
        assert type(layer).__name__ in SUPPORTED_DECODER_LAYERS
        assert {"hidden_states", "attention_mask", "position_ids", "past_key_values", "position_embeddings"} <= set(
            _parameters(type(layer).forward))
        attention = layer.self_attn
        assert hasattr(layer, "input_layernorm") and hasattr(attention, "head_dim") and hasattr(attention, "scaling")
        assert (hasattr(attention, "q_proj") and hasattr(attention, "k_proj")) or hasattr(attention, "qkv_proj")


@pytest.mark.parametrize("name", ["llava", "llava_next"])
def test_clip_tower(name):
    model = Family(name).model()
    tower = model.model.vision_tower
    out = tower(torch.zeros(1, 3, 84, 84), output_hidden_states=True, return_dict=True)
    layers = adapter_for(model).vision_layers
    assert len(out.hidden_states) == len(layers) + 1 and out.hidden_states[0].shape[1] == 37  # [CLS] + 6x6
    layer = layers[0]
    for name_ in ("layer_norm1", "self_attn", "mlp", "layer_norm2"):
        assert hasattr(layer, name_)
    for name_ in ("q_proj", "k_proj", "num_heads", "head_dim", "scale"):
        assert hasattr(layer.self_attn, name_)
    assert _parameters(type(layer.self_attn).forward)[1:3] == ["hidden_states", "attention_mask"]


def test_llava_next_packing_helpers():
    assert _parameters(modeling_llava_next.get_anyres_image_grid_shape) == ["image_size", "grid_pinpoints",
                                                                             "patch_size"]
    assert _parameters(modeling_llava_next.image_size_to_num_patches) == ["image_size", "grid_pinpoints",
                                                                           "patch_size"]
    model = Family("llava_next").model()
    assert _parameters(model.model.pack_image_features) == ["image_features", "image_sizes",
                                                           "vision_feature_select_strategy", "image_newline"]
    assert hasattr(model.model, "image_newline")


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_vision_and_positions(name):
    family = Family(name)
    model = family.model()
    inputs = family.inputs([["a", picture(100, 190, 1)]])
    out = model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    merged = int(inputs["image_grid_thw"].prod(-1).sum()) // model.config.vision_config.spatial_merge_size ** 2
    assert out.pooler_output.shape[0] == merged
    positions, deltas = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                   image_grid_thw=inputs["image_grid_thw"],
                                                   attention_mask=inputs["attention_mask"])
    assert positions.shape == (3, *inputs["input_ids"].shape) and deltas.shape == (1, 1)
    assert "position_ids.ndim == 3 and position_ids.shape[0] == 4" in inspect.getsource(
        type(model.model.language_model).forward)


def test_generation_helpers():
    source = inspect.getsource(GenerationMixin._expand_multimodal_outputs)
    assert "len(out) for out in modalily_outputs.pooler_output" in source  # placeholder counts per image
    assert "list(inputs) * repeat_times" in source  # a list of per-image features is repeated, not rebuilt
    prepare = inspect.getsource(GenerationMixin._prepare_multimodal_encoder_kwargs_for_generation)
    assert "self.base_model" in prepare and "inspect.signature(encoder_fn).parameters" in prepare
    sliced = _slice_mm_encoder_output(EncodedImages(pooler_output=[torch.zeros(3, 2)]), torch.tensor([0, 1]))
    assert isinstance(sliced, EncodedImages) and getattr(sliced, "records", None) is None
    assert "cache.get_seq_length()" in inspect.getsource(GenerationMixin._prefill)


def test_dynamic_cache():
    cache = DynamicCache()
    keys = torch.randn(2, 1, 5, 4)
    cache.update(keys, keys, 0)
    layer = cache.layers[0]
    assert isinstance(layer, DynamicLayer) and layer.keys.shape == (2, 1, 5, 4)
    cache.crop(-2)  # a negative count removes that many entries from every layer
    assert cache.layers[0].keys.shape[2] == 3
    for method in ("get_seq_length", "reorder_cache", "batch_select_indices", "batch_repeat_interleave", "reset"):
        assert callable(getattr(cache, method))
    assert _parameters(DynamicCache.get_seq_length) == ["self", "layer_idx"]
