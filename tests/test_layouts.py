"""Layouts follow the models exactly, and methods use them right: LLaVA-NeXT views, unpadding and newline tokens;
Qwen2-VL grids; per-view [CLS] rankings; the newline (separator) policies."""
from __future__ import annotations

import pytest
import torch

import vtprune
from vtprune.models import TokenKind, adapter_for
from vtprune.ops import uniform_grid_indices
from vtprune.runtime import encode_images
from families import FAMILIES, Family, picture

SIZES = [(100, 190), (190, 100), (160, 150), (60, 60)]


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_carriers_are_the_stock_features_and_layouts_count_the_placeholders(family):
    model = family.model()
    inputs = family.inputs([["a", picture(h, w, i)] for i, (h, w) in enumerate(SIZES)])
    image_inputs = {k: v for k, v in inputs.items() if k in ("pixel_values", "image_sizes", "image_grid_thw")}
    with torch.no_grad():
        stock = model.model.get_image_features(**image_inputs).pooler_output
        encoded = encode_images(model, **image_inputs)
    placeholders = (inputs["input_ids"] == 99).sum(1)
    for b, (carrier, reference, record) in enumerate(zip(encoded.pooler_output, stock, encoded.images())):
        assert torch.equal(carrier, reference)
        assert len(record.layout) == int(placeholders[b])
        layout = record.layout
        for g, (height, width) in enumerate(layout.grid_shapes):
            on_grid = (layout.grid == g) & (layout.kind != TokenKind.SEPARATOR)
            assert int(on_grid.sum()) == height * width
            assert set(zip(layout.row[on_grid].tolist(), layout.col[on_grid].tolist())) == {
                (r, c) for r in range(height) for c in range(width)}


def test_llava_next_layout_rows_views_and_newlines():
    model = Family("llava_next").model()
    inputs = Family("llava_next").inputs([["a", picture(100, 190, 1)]])
    encoded = encode_images(model, pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    layout = encoded.images()[0].layout
    height, width = layout.grid_shapes[1]
    separator = layout.kind == TokenKind.SEPARATOR
    assert layout.grid_shapes[0] == (6, 6) and int(separator.sum()) == height  # one newline per canvas row
    assert torch.equal(layout.row[separator], torch.arange(height))
    # every canvas row is `width` crop tokens then its newline, in raster order
    canvas = layout.kind != TokenKind.BASE
    rows = layout.row[canvas].view(height, width + 1)
    assert bool((rows == torch.arange(height)[:, None]).all())
    crops = layout.partition[canvas & ~separator]
    views = int(inputs["pixel_values"].shape[1])
    assert set(crops.tolist()) == set(range(1, views)) and layout.num_partitions == views  # base view + crops
    # the carrier's newline rows are the model's image_newline
    carrier = encoded.pooler_output[0]
    assert torch.equal(carrier[separator], model.model.image_newline.expand(height, -1).to(carrier))


def test_fastervlm_per_view_top_k_equals_eager_cls_rows():
    family = Family("llava_next")
    model = family.model(attn="eager")
    inputs = family.inputs([["a", picture(100, 190, 1), "?"]])
    keep = 5
    with torch.no_grad():
        with vtprune.apply(model, "fastervlm", keep=keep) as pruner:
            model(**inputs)
        count = int(encode_images(model, pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]
                                  ).images()[0].layout.num_partitions)
        views = inputs["pixel_values"][0, :count]
        tower = model.model.vision_tower(views, output_hidden_states=True, output_attentions=True)
        block = len(tower.hidden_states) - 2 - 1
        cls = tower.attentions[block][:, :, 0, 1:].mean(1)  # [views, 36], eager, head-mean
        layout = encode_images(model, pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]
                               ).images()[0].layout
    kept = pruner.stats.kept_patches(0)
    for view in range(count):
        on_view = (layout.partition == view).nonzero().flatten()
        patch = layout.vision_index[on_view] % 36
        expected = on_view[cls[view, patch].topk(min(keep, len(on_view))).indices]
        assert torch.equal(kept.nonzero().flatten()[torch.isin(kept.nonzero().flatten(), on_view)],
                           expected.sort().values)
    assert bool(kept[layout.kind == TokenKind.SEPARATOR].all())  # the reference keeps every newline


@pytest.mark.parametrize("policy", ["rows", "keep", "candidates"])
def test_newline_policies(policy):
    family = Family("llava_next")
    model = family.model()
    inputs = family.inputs([["a", picture(160, 150, 2), "?"]])
    layout = encode_images(model, pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]
                           ).images()[0].layout
    separator = layout.kind == TokenKind.SEPARATOR
    with torch.no_grad(), vtprune.apply(model, "uniform", keep=10, separators=policy) as pruner:
        model(**inputs)
    kept = pruner.stats.kept_patches(0)
    content = kept & ~separator
    if policy == "rows":
        rows_with_tokens = set(layout.row[content & (layout.grid == 1)].tolist())
        assert set(layout.row[kept & separator].tolist()) == rows_with_tokens
        assert int(content.sum()) == 10
    elif policy == "keep":
        assert bool(kept[separator].all()) and int(content.sum()) == 10
    else:  # newlines are candidates; uniform never picks one, and counts them in the budget base
        assert not bool(kept[separator].any()) and int(content.sum()) == 10


def test_uniform_on_a_qwen_grid_is_the_lattice_of_the_merged_grid():
    family = Family("qwen2_vl")
    model = family.model()
    inputs = family.inputs([["a", picture(100, 190, 1), "?"]])
    (frames, height, width), = (inputs["image_grid_thw"] // torch.tensor([1, 2, 2])).tolist()
    with torch.no_grad(), vtprune.apply(model, "uniform", keep=6) as pruner:
        model(**inputs)
    assert torch.equal(pruner.stats.kept_patches(0).nonzero().flatten(), uniform_grid_indices(height, width, 6))


def test_qwen_keeps_original_3d_positions():
    """Survivors enter the LLM with the M-RoPE positions the model computed for the full prompt."""
    family = Family("qwen2_vl")
    model = family.model()
    inputs = family.inputs([["a", picture(100, 190, 1), "what", "?"]])
    seen = {}
    with torch.no_grad():
        full_positions, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                       image_grid_thw=inputs["image_grid_thw"],
                                                       attention_mask=inputs["attention_mask"])
        with vtprune.apply(model, "random", keep=5) as pruner:
            handle = model.model.language_model.register_forward_pre_hook(
                lambda module, args, kwargs: seen.update(positions=kwargs["position_ids"]), with_kwargs=True)
            model(**inputs)
            handle.remove()
    kept = pruner.stats.kept_patches(0).nonzero().flatten()
    start = int((inputs["input_ids"][0] == 99).nonzero()[0])
    expected = torch.cat([full_positions[:, 0, :start], full_positions[:, 0, start + kept],
                          full_positions[:, 0, start + pruner.stats.original_visual_tokens[0]:]], dim=1)
    assert torch.equal(seen["positions"][:, 0], expected)


def test_stats_per_partition_on_llava_next():
    family = Family("llava_next")
    model = family.model()
    inputs = family.inputs([["a", picture(160, 150, 2), "?"]])
    with torch.no_grad(), vtprune.apply(model, "fastervlm", keep=3) as pruner:
        model(**inputs)
    per_view = pruner.stats.tokens_per_partition[0][0]
    assert per_view.shape == (5, 4) and bool((per_view == 3).all())  # base + 2x2 crops, every layer
    total = pruner.stats.tokens_per_image[0][0]
    assert torch.equal(total, per_view.sum(0) + pruner.stats.separator_tokens[0])
    assert adapter_for(model).family == "llava_next"


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_video_frames(name):
    """A video is one grid per frame (kind FRAME, partition = frame); identity at full budget, budgets per video,
    counts per frame, and cache parity with an image and a video in one prompt."""
    from families import IMAGE, VIDEO, VISION_END, VISION_START

    family = Family(name)
    model = family.model()
    image = family.inputs([["a", picture(60, 90, 1)]])
    frames, height, width = 2, 4, 6  # 4 video frames (2 temporal patches) of 56 x 84 px
    video = torch.randn(frames * height * width, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(2))
    tokens = frames * height * width // 4
    image_tokens = int((image["input_ids"] == IMAGE).sum())
    ids = torch.tensor([[4, VISION_START] + [IMAGE] * image_tokens + [VISION_END, 12, VISION_START]
                        + [VIDEO] * tokens + [VISION_END, 19, 11]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": image["pixel_values"],
              "image_grid_thw": image["image_grid_thw"], "pixel_values_videos": video,
              "video_grid_thw": torch.tensor([[frames, height, width]]),
              "mm_token_type_ids": (ids == IMAGE).int() + 2 * (ids == VIDEO).int()}
    with torch.no_grad():
        reference = model(**inputs).logits
        with vtprune.apply(model, "uniform", ratio=1.0):
            full = model(**inputs).logits
        with vtprune.apply(model, "uniform", keep=4) as pruner:
            cached = model.generate(**inputs, max_new_tokens=4, do_sample=False)
            recomputed = model.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=False)
    torch.testing.assert_close(full, reference, atol=1e-5, rtol=1e-5)
    assert torch.equal(cached, recomputed)
    assert pruner.stats.tokens_per_image[0][:, 0].tolist() == [4, 4]  # the image, then the video
    per_frame = pruner.stats.tokens_per_partition[0][1][:, 0]
    assert per_frame.tolist() == [2, 2]  # the budget shared between the video's two frame grids


def test_llava_next_accepts_image_sizes_as_a_list():
    family = Family("llava_next")
    model = family.model()
    inputs = family.inputs([["a", picture(100, 190, 1), "?"], ["b", picture(60, 60, 2), "?"]])
    with torch.no_grad():
        reference = model(**inputs).logits
        with vtprune.apply(model, "fastv", ratio=1.0):
            listed = model(**{**inputs, "image_sizes": inputs["image_sizes"].tolist()}).logits
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(listed[valid], reference[valid], atol=1e-5, rtol=1e-5)
