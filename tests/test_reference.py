"""MiniLLaVA reference model: its tokenizer, processor and training recipe. (Checkpoint tests come with the
checkpoint: none is shipped yet.)"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vtprune.bench import reference as ref
from vtprune.bench import synthvqa as sv

TINY = dict(n_scenes=12, question_sets=2, vit_steps=2, vit_batch=4, lm_steps=3, lm_batch=4, eval_every=2,
            n_val=12, n_test=12, vision_hidden=32, vision_layers=2, vision_heads=2, text_hidden=32, text_layers=2,
            text_heads=2, text_kv_heads=1, text_intermediate=64, log_every=0, verbose=False,
            question_layers=(0,), ground_layers=(1,), ground_weight=1.0)


def test_tokenizer_round_trips_every_question_word():
    tok = ref.build_tokenizer()
    for word in sv.question_vocabulary() + sv.answer_vocabulary() + list(ref.ROLE_TOKENS):
        ids = tok(word, add_special_tokens=False).input_ids
        assert len(ids) == 1 and ids[0] != tok.unk_token_id, word
        assert tok.convert_ids_to_tokens(ids[0]) == word
    for s in sv.load_split("val", 30):
        ids = tok(s.question, add_special_tokens=False).input_ids
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == s.question
        assert tok.convert_tokens_to_ids(s.answer) != tok.unk_token_id


def test_processor_expands_image_to_576_tokens_with_left_padding():
    proc = ref.build_processor()
    samples = sv.load_split("val", 6)
    inputs = proc(images=[s.image for s in samples], text=[ref.format_prompt(s.question) for s in samples],
                  return_tensors="pt", padding=True)
    image_id = proc.tokenizer.convert_tokens_to_ids(ref.IMAGE_TOKEN)
    assert ((inputs.input_ids == image_id).sum(1) == ref.NUM_IMAGE_TOKENS).all()
    assert inputs.pixel_values.shape == (6, 3, sv.IMAGE_SIZE, sv.IMAGE_SIZE)
    assert (inputs.attention_mask[:, -1] == 1).all()  # left padded: prompts end together
    assert (inputs.input_ids[:, -1] == proc.tokenizer.convert_tokens_to_ids("ASSISTANT:")).all()
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": samples[0].question}]}]
    assert proc.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == \
        ref.format_prompt(samples[0].question)


def test_shared_prefix_training_path_matches_full_forward():
    """Logits and the attention masses of the grounding auxiliary equal those of the ordinary full forward."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    tok = ref.build_tokenizer()
    proc = ref.build_processor(tok)
    cfg = ref.build_config(vision_hidden=32, vision_layers=2, vision_heads=2, text_hidden=64, text_layers=2,
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
    inputs = proc(images=[s.image for s in ordered], text=[ref.format_prompt(s.question) for s in ordered],
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


def test_train_reference_tiny_end_to_end(tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    result = ref.train_reference(tmp_path / "tiny", **TINY)
    log = json.loads((tmp_path / "tiny" / "training_log.json").read_text())
    assert log["test"]["n"] == TINY["n_test"] and set(log["wall_time_s"]) >= {"vision_pretraining",
                                                                                "language_training"}
    assert result["recipe"]["lm_steps"] == TINY["lm_steps"]
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "tiny")
    processor = AutoProcessor.from_pretrained(tmp_path / "tiny")
    res = ref.evaluate(model, processor, sv.load_split("test", TINY["n_test"]), batch_size=6)
    assert res["accuracy"] == pytest.approx(log["test"]["accuracy"])
