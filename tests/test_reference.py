"""MiniLLaVA reference model: the shipped checkpoint, its tokenizer, processor and training recipe."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vtprune.bench.evaluate import evaluate
from vtprune.reference import build
from vtprune.reference import train as ref
from vtprune.bench import synthvqa as sv

TINY = dict(n_scenes=12, question_sets=2, vit_steps=2, vit_batch=4, lm_steps=3, lm_batch=4, eval_every=2,
            n_val=12, n_test=12, vision_hidden=32, vision_layers=2, vision_heads=2, text_hidden=32, text_layers=2,
            text_heads=2, text_kv_heads=1, text_intermediate=64, log_every=0, verbose=False,
            question_layers=(0,), ground_layers=(1,), ground_weight=1.0, subset_tokens=32, subset_steps=2,
            curriculum_steps=2)


@pytest.fixture(scope="module")
def shipped():
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    assert (ref.REFERENCE_DIR / "config.json").is_file(), f"no checkpoint in {ref.REFERENCE_DIR}"
    model = LlavaForConditionalGeneration.from_pretrained(ref.REFERENCE_DIR)
    processor = AutoProcessor.from_pretrained(ref.REFERENCE_DIR)
    log = json.loads((ref.REFERENCE_DIR / "training_log.json").read_text())
    return model.eval(), processor, log


def test_shipped_checkpoint_is_a_llava_1_5_geometry_in_float32(shipped):
    model, processor, log = shipped
    assert next(model.parameters()).dtype == torch.float32
    assert model.config.image_seq_length == build.NUM_IMAGE_TOKENS
    assert model.config.vision_feature_layer == -2 and model.config.vision_feature_select_strategy == "default"
    assert model.config.text_config.num_hidden_layers >= 8
    assert processor.tokenizer.padding_side == "left"
    assert sum(p.stat().st_size for p in ref.REFERENCE_DIR.glob("*.safetensors")) < 30e6
    assert log["test"]["accuracy"] >= 0.8


def test_shipped_checkpoint_reproduces_recorded_subset_accuracy(shipped):
    """Loaded with from_pretrained, it answers the first test questions exactly as recorded at training time."""
    model, processor, log = shipped
    recorded = log["test_subset"]
    samples = sv.load_split("test", recorded["first"])
    res = evaluate(model, processor, samples, batch_size=16, return_predictions=True)
    same = sum(p["prediction"] == q for p, q in zip(res["predictions"], recorded["predictions"]))
    assert same >= len(samples) - 1  # one flip allowed for a different BLAS summation order
    assert abs(round(res["accuracy"] * len(samples)) - recorded["correct"]) <= 1


def test_tokenizer_round_trips_every_question_word():
    tok = build.build_tokenizer()
    for word in sv.question_vocabulary() + sv.answer_vocabulary() + list(build.ROLE_TOKENS):
        ids = tok(word, add_special_tokens=False).input_ids
        assert len(ids) == 1 and ids[0] != tok.unk_token_id, word
        assert tok.convert_ids_to_tokens(ids[0]) == word
    for s in sv.load_split("val", 30):
        ids = tok(s.question, add_special_tokens=False).input_ids
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == s.question
        assert tok.convert_tokens_to_ids(s.answer) != tok.unk_token_id


def test_processor_expands_image_to_576_tokens_with_left_padding():
    proc = build.build_processor()
    samples = sv.load_split("val", 6)
    inputs = proc(images=[s.image for s in samples], text=[build.format_prompt(s.question) for s in samples],
                  return_tensors="pt", padding=True)
    image_id = proc.tokenizer.convert_tokens_to_ids(build.IMAGE_TOKEN)
    assert ((inputs.input_ids == image_id).sum(1) == build.NUM_IMAGE_TOKENS).all()
    assert inputs.pixel_values.shape == (6, 3, sv.IMAGE_SIZE, sv.IMAGE_SIZE)
    assert (inputs.attention_mask[:, -1] == 1).all()  # left padded: prompts end together
    assert (inputs.input_ids[:, -1] == proc.tokenizer.convert_tokens_to_ids("ASSISTANT:")).all()
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": samples[0].question}]}]
    assert proc.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == \
        build.format_prompt(samples[0].question)


def test_shared_prefix_training_path_matches_full_forward():
    """Logits and the attention masses of the grounding auxiliary equal those of the ordinary full forward."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    tok = build.build_tokenizer()
    proc = build.build_processor(tok)
    cfg = build.build_config(vision_hidden=32, vision_layers=2, vision_heads=2, text_hidden=64, text_layers=2,
                           text_heads=4, text_kv_heads=2, text_intermediate=64, rope_theta=1e5)
    model = LlavaForConditionalGeneration(cfg).eval()
    samples = sv.load_split("val", 8)
    images, questions = ref._group_by_scene(samples, tok)
    feats = ref._extract_features(model, images, proc.image_processor, device="cpu", batch=8, log=print)
    plm = ref._PrefixLM(model, tok)
    packed = ref._pack(questions, tok.pad_token_id, plm.prefix_len)
    with torch.no_grad():
        fast, grounding = plm.logits(feats.float(), packed, ground_layers=(0, 1))
    seeds = list(dict.fromkeys(s.scene_seed for s in samples))
    ordered = [s for seed in seeds for s in samples if s.scene_seed == seed]
    inputs = proc(images=[s.image for s in ordered], text=[build.format_prompt(s.question) for s in ordered],
                  return_tensors="pt", padding=True)
    model.set_attn_implementation("eager")  # only to read the reference attention maps
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    torch.testing.assert_close(fast, out.logits[:, -1], atol=1e-4, rtol=1e-3)
    is_image = inputs.input_ids == cfg.image_token_id
    after_image = torch.cumsum(is_image.int().flip(1), 1).flip(1) == 0
    relevant = torch.zeros_like(is_image)
    relevant[is_image] = torch.from_numpy(np.stack([s.relevant_patches.reshape(-1) for s in ordered])).reshape(-1)
    assert relevant.any()
    for j, attentions in enumerate(out.attentions):
        last_row = attentions[:, :, -1]  # [questions, heads, keys]
        expected = torch.stack([(last_row * relevant[:, None]).sum(-1), (last_row * after_image[:, None]).sum(-1)],
                               -1)
        torch.testing.assert_close(grounding[:, j], expected, atol=1e-5, rtol=1e-4)


def test_training_subset_keeps_positions_and_matches_a_pruned_forward():
    """Training on a subset of the image tokens = the decoder run on just those tokens at their own positions."""
    torch.manual_seed(0)
    tok = build.build_tokenizer()
    cfg = build.build_config(vision_hidden=32, vision_layers=1, vision_heads=2, text_hidden=64, text_layers=2,
                           text_heads=4, text_kv_heads=2, text_intermediate=64)
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration(cfg).eval()
    _, questions = ref._group_by_scene(sv.load_split("val", 6), tok)
    feats = torch.randn(len(questions), build.NUM_IMAGE_TOKENS, 32)
    keep = ref._training_subset(questions, 40, torch.Generator().manual_seed(0))
    for qs, row in zip(questions, keep):
        assert row.tolist() == sorted(set(row.tolist()))
        assert set(torch.cat([q[3].long() for q in qs]).tolist()) <= set(row.tolist())
    assert keep.shape[1] >= 40
    plm = ref._PrefixLM(model, tok)
    with torch.no_grad():
        fast, grounding = plm.logits(feats, ref._pack(questions, tok.pad_token_id, plm.prefix_len, keep), (1,))
        everything = torch.arange(build.NUM_IMAGE_TOKENS).expand(len(questions), -1)
        torch.testing.assert_close(
            plm.logits(feats, ref._pack(questions, tok.pad_token_id, plm.prefix_len, everything))[0],
            plm.logits(feats, ref._pack(questions, tok.pad_token_id, plm.prefix_len))[0])
    model.set_attn_implementation("eager")  # only to read the reference attention maps
    lm, embed = model.model.language_model, model.model.language_model.get_input_embeddings()
    head_len, k = len(plm.head_ids), 0
    for image, (qs, kept) in enumerate(zip(questions, keep)):
        for ids, _, _, relevant in qs:
            embeds = torch.cat([embed(plm.head_ids), model.model.multi_modal_projector(feats[image, kept]),
                                embed(torch.tensor(ids))])[None]
            positions = torch.cat([torch.arange(head_len), head_len + kept,
                                   plm.prefix_len + torch.arange(len(ids))])[None]
            with torch.no_grad():
                # an explicit mask, or HF reads the position jumps as packed sequences
                out = lm(inputs_embeds=embeds, position_ids=positions, output_attentions=True,
                         attention_mask=torch.ones(positions.shape, dtype=torch.long))
            torch.testing.assert_close(fast[k], model.lm_head(out.last_hidden_state[0, -1]), atol=1e-4, rtol=1e-3)
            on = torch.isin(kept, relevant.long())
            mass = out.attentions[1][0, :, -1, head_len:head_len + len(kept)][:, on].sum(-1)
            torch.testing.assert_close(grounding[k, 0, :, 0], mass, atol=1e-5, rtol=1e-4)
            k += 1


def test_train_reference_tiny_end_to_end(tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    result = ref.train_reference(tmp_path / "tiny", **TINY)
    log = json.loads((tmp_path / "tiny" / "training_log.json").read_text())
    assert log["test"]["n"] == TINY["n_test"] and set(log["wall_time_s"]) >= {"vision_pretraining",
                                                                                "language_training"}
    assert result["recipe"]["lm_steps"] == TINY["lm_steps"]
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "tiny")
    processor = AutoProcessor.from_pretrained(tmp_path / "tiny")
    res = evaluate(model, processor, sv.load_split("test", TINY["n_test"]), batch_size=6)
    assert res["accuracy"] == pytest.approx(log["test"]["accuracy"])
    card = (tmp_path / "tiny" / "README.md").read_text()
    assert f"Overall {log['test']['accuracy']:.3f}" in card and "| reading |" in card


def test_curriculum_mask_shows_each_question_only_its_patches_at_zero_visibility():
    tok = build.build_tokenizer()
    _, questions = ref._group_by_scene(sv.load_split("val", 12), tok)
    prefix_len = 2 + build.NUM_IMAGE_TOKENS
    gen = torch.Generator().manual_seed(0)
    hidden = ref._pack(questions, tok.pad_token_id, prefix_len, visible_fraction=0.0, gen=gen)
    full = ref._pack(questions, tok.pad_token_id, prefix_len)
    for k, (row, last) in enumerate(zip(hidden["q_row"], hidden["q_last"])):
        keys = hidden["mask"][row, 0, last]
        assert keys[:2].all()  # "<s> USER:" stays visible
        assert torch.equal(keys[2:prefix_len], hidden["relevant"][k])
        assert torch.equal(keys[prefix_len:], full["mask"][row, 0, last, prefix_len:])  # own question only
    assert full["mask"][:, 0, :, :prefix_len].all()
    half = ref._pack(questions, tok.pad_token_id, prefix_len, visible_fraction=0.5, gen=gen)
    shown = half["mask"][half["q_row"], 0, half["q_last"], 2:prefix_len] & ~half["relevant"]
    assert 0.4 < shown.sum() / (~half["relevant"]).sum() < 0.6


def test_patch_targets_agree_with_the_object_masks_and_glyphs():
    scene = next(sv.generate_scene(seed) for seed in range(50)
                 if any(o.label is not None for o in sv.generate_scene(seed).objects))
    targets = ref.patch_targets(scene)
    assert targets.shape == (len(ref.PATCH_TARGETS), build.NUM_IMAGE_TOKENS)
    covered = np.zeros(build.NUM_IMAGE_TOKENS, bool)
    for o in scene.objects:
        cover = o.patch_mask().reshape(-1)
        covered |= cover
        only = cover & ~np.any([p.patch_mask().reshape(-1) for p in scene.objects if p is not o], axis=0)
        assert (targets[0, only] == 1 + list(sv.COLOURS).index(o.colour)).all()
        assert (targets[1, only] == 1 + sv.SHAPES.index(o.shape)).all()
        glyph = set(targets[2, only].tolist()) - {0}
        assert glyph == (set() if o.label is None else {1 + list(sv.LABELS).index(o.label)})
    assert (targets[:3, ~covered] == 0).all()
    assert targets[3].sum() <= len(scene.objects) and targets[3, ~covered].sum() == 0


def test_cli_bench_runs_the_shipped_checkpoint(shipped, tmp_path):
    """`vtprune bench` with no --model measures the shipped MiniLLaVA: its unpruned accuracy is the evaluator's."""
    from vtprune.cli import main

    model, processor, _ = shipped
    main(["bench", "--samples", "12", "--methods", "random", "--budgets", "64", "--out", str(tmp_path), "--no-plots"])
    report = json.loads((tmp_path / "bench.json").read_text())
    assert "MiniLLaVA" in report["model"]
    unpruned = report["results"][0]
    assert unpruned["method"] == "unpruned"
    expected = evaluate(model, processor, sv.load_split("test", 12))
    assert unpruned["accuracy"] == pytest.approx(expected["accuracy"])


def test_train_reference_refuses_to_overwrite_a_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="overwrite"):
        ref.train_reference(tmp_path, **TINY)
    assert (tmp_path / "config.json").read_text() == "{}"


def test_shipped_checkpoint_ends_its_answers_so_generation_agrees_with_likelihood(shipped):
    """Trained to end each answer with </s>: greedy generation stops after the answer and names the choice that
    likelihood scoring picks."""
    from vtprune.bench.evaluate import normalise

    model, processor, _ = shipped
    samples = sv.load_split("test", 24)
    likelihood = evaluate(model, processor, samples, return_predictions=True, token_stats=False)
    generated = evaluate(model, processor, samples, scoring="generate", return_predictions=True, token_stats=False)
    same = sum(normalise(a["prediction"]) == normalise(b["prediction"])
               for a, b in zip(likelihood["predictions"], generated["predictions"]))
    assert same >= len(samples) - 1
    assert all(len(p["prediction"].split()) == 1 for p in generated["predictions"])
