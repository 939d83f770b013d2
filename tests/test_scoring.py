"""Answers scored the way benchmarks score them, on a real-format checkpoint: a tiny random LLaVA saved with a
byte-level BPE tokenizer built here, so answers such as "top-left" are several tokens. Likelihood scoring must equal
an independent full-sequence computation, cached continuation must equal token-by-token decoding under a pruner,
and ``vtprune bench --model PATH`` must run through both scoring modes from the saved folder."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vtprune.bench import synthvqa as sv
from vtprune.bench.evaluate import choice_scores, continuation_ids, evaluate, normalise, prompt_builder
from vtprune.bench.intervals import bootstrap_interval
from vtprune.reference.build import CHAT_TEMPLATE, build_config, build_image_processor

SAMPLES = 6


def _bpe_processor():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlavaProcessor, PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "USER:", "ASSISTANT:"]
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    text = [s.question + " " + " ".join(s.choices) for s in sv.load_split("train", 60)]
    core.train_from_iterator(text, trainers.BpeTrainer(vocab_size=330, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"}, padding_side="left", clean_up_tokenization_spaces=False)
    return LlavaProcessor(image_processor=build_image_processor(), tokenizer=tokenizer, patch_size=sv.PATCH_SIZE,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE, image_token="<image>")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A real-format folder (config, safetensors, tokenizer.json, processor) loaded back with from_pretrained."""
    from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

    processor = _bpe_processor()
    tokenizer = processor.tokenizer
    config = build_config(vocab_size=len(tokenizer), vision_hidden=32, vision_layers=3, text_hidden=64,
                          text_layers=4, text_intermediate=128)
    config.image_token_index = tokenizer.convert_tokens_to_ids("<image>")
    config.text_config.pad_token_id = tokenizer.pad_token_id
    config.text_config.eos_token_id = tokenizer.eos_token_id
    config.text_config.bos_token_id = tokenizer.bos_token_id
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    with torch.no_grad():  # sharper next-token distributions than the 0.02 init, so choices really differ
        model.lm_head.weight.mul_(20)
    path = tmp_path_factory.mktemp("bpe-llava")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    loaded = AutoModelForImageTextToText.from_pretrained(path).eval()
    return path, loaded, AutoProcessor.from_pretrained(path)


def _full_sequence_scores(model, processor, sample) -> list[float]:
    """Independent rule: each choice appended to the prompt as text, one forward without cache, summed log-probs."""
    prompt = prompt_builder(processor)(sample.question)
    scores = []
    for choice in sample.choices:
        ids = continuation_ids(processor.tokenizer, prompt, " " + choice)
        inputs = processor(images=[sample.image], text=[prompt], return_tensors="pt")
        full = torch.cat([inputs["input_ids"], torch.tensor([ids])], 1)
        with torch.no_grad():
            logits = model(input_ids=full, pixel_values=inputs["pixel_values"]).logits[0]
        logprobs = F.log_softmax(logits.float(), -1)
        n = inputs["input_ids"].shape[1]
        scores.append(float(sum(logprobs[n - 1 + t, token] for t, token in enumerate(ids))))
    return scores


def test_answers_are_several_tokens_with_this_tokenizer(checkpoint):
    _, _, processor = checkpoint
    prompt = prompt_builder(processor)("where is the red circle ?")
    lengths = {c: len(continuation_ids(processor.tokenizer, prompt, " " + c)) for c in sv.REGIONS}
    assert max(lengths.values()) > 1, lengths  # otherwise this file would not test multi-token scoring
    assert processor.tokenizer.decode(continuation_ids(processor.tokenizer, prompt, " top-left")).strip() == "top-left"


def test_likelihood_equals_full_sequence_computation(checkpoint):
    _, model, processor = checkpoint
    samples = sv.load_split("test", SAMPLES)
    result = evaluate(model, processor, samples, batch_size=3, return_predictions=True, token_stats=False)
    for sample, prediction, correct in zip(samples, result["predictions"], result["correct"]):
        scores = _full_sequence_scores(model, processor, sample)
        expected = sample.choices[int(np.argmax(scores))]
        assert prediction["prediction"] == expected
        assert correct == (expected == sample.answer)


def test_cached_continuation_equals_token_by_token_decoding_under_a_pruner(checkpoint):
    import vtprune

    _, model, processor = checkpoint
    samples = [s for s in sv.load_split("test", 30) if s.family == "localisation"][:2]
    prompt = prompt_builder(processor)
    inputs = processor(images=[s.image for s in samples], text=[prompt(s.question) for s in samples],
                       return_tensors="pt", padding=True, padding_side="left")
    ids = [[continuation_ids(processor.tokenizer, prompt(s.question), " " + c) for c in s.choices] for s in samples]
    with torch.no_grad(), vtprune.apply(model, "fastv", keep=32):
        batched, greedy = choice_scores(model, inputs, ids)
        for b, sample in enumerate(samples):
            single = {k: v[b:b + 1] for k, v in inputs.items()}
            single["attention_mask"] = single["attention_mask"]
            for c, tokens in enumerate(ids[b]):
                out = model(**single, use_cache=True)
                cache, total = out.past_key_values, 0.0
                logprobs = F.log_softmax(out.logits[0, -1].float(), -1)
                mask = single["attention_mask"]
                for t, token in enumerate(tokens):
                    total += float(logprobs[token])
                    if t + 1 < len(tokens):
                        mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], 1)
                        step = model(input_ids=torch.tensor([[token]]), attention_mask=mask, past_key_values=cache,
                                     use_cache=True)
                        logprobs = F.log_softmax(step.logits[0, -1].float(), -1)
                assert batched[b][c].item() == pytest.approx(total, abs=1e-4)
    assert any(len(t) > 1 for row in ids for t in row)
    assert all(g.dtype == torch.bool for g in greedy)


def test_generate_mode_matches_per_sample_generation(checkpoint):
    _, model, processor = checkpoint
    samples = sv.load_split("test", SAMPLES)
    result = evaluate(model, processor, samples, scoring="generate", batch_size=3, return_predictions=True,
                      token_stats=False)
    prompt = prompt_builder(processor)
    for sample, prediction in zip(samples, result["predictions"]):
        inputs = processor(images=[sample.image], text=[prompt(sample.question)], return_tensors="pt")
        longest = max(len(continuation_ids(processor.tokenizer, prompt(sample.question), " " + c))
                      for c in sample.choices)
        out = model.generate(**inputs, max_new_tokens=longest + 2, do_sample=False,
                             pad_token_id=processor.tokenizer.pad_token_id)
        text = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        assert normalise(prediction["prediction"]) == normalise(text)


@pytest.mark.parametrize("scoring", ["likelihood", "generate"])
def test_bench_command_on_a_saved_checkpoint(checkpoint, tmp_path, scoring):
    from vtprune.cli import main

    path, model, processor = checkpoint
    main(["bench", "--model", str(path), "--methods", "fastv", "--budgets", "64", "--samples", str(SAMPLES),
          "--batch-size", "3", "--no-plots", "--scoring", scoring, "--out", str(tmp_path)])
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["scoring"] == scoring and report["dtype"] == "float32"
    unpruned = report["results"][0]
    direct = evaluate(model, processor, sv.load_split("test", SAMPLES), scoring=scoring, batch_size=3,
                      token_stats=False)
    assert unpruned["correct"] == direct["correct"]
    assert np.array(unpruned["keep_frequency"]).shape == (24, 24)  # the grid read from the model's layout


def test_normalise_and_bootstrap_interval():
    assert normalise("  Top-Left. ") == "top-left" and normalise("yes</s>") != "yes"
    hits = np.array([[1, 0] * 50], dtype=float)
    low, high = bootstrap_interval(hits, lambda x: x[0].mean(-1), 2000)
    assert low < 0.5 < high and 0.05 < high - low < 0.3  # binomial: about +-0.1 at n=100
    assert bootstrap_interval(np.zeros((1, 0)), lambda x: x[0].mean(-1)) is None
    paired = np.array([[1, 1, 0, 0] * 25, [1, 1, 0, 0] * 25], dtype=float)
    ratio = bootstrap_interval(paired, lambda x: x[0].mean(-1) / x[1].mean(-1))
    assert ratio == pytest.approx([1.0, 1.0])  # identical rows: retention is exactly 1 in every resample
