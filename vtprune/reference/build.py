"""The reference models' tokenizer, processor and config: what a checkpoint is made of, without training code.

MiniLLaVA's tokenizer is word-level over SynthVQA's closed vocabulary (one id per word, so answers are single
tokens); its processor is the stock ``LlavaProcessor`` with the PIL CLIP image processor; its config is LLaVA-1.5's
geometry (patch 14, 336 px, penultimate layer, [CLS] dropped) at toy width.
"""
from __future__ import annotations

from vtprune.bench import synthvqa as sv

PROMPT_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN)
ROLE_TOKENS = ("USER:", "ASSISTANT:")
NUM_IMAGE_TOKENS = sv.GRID * sv.GRID  # 576, [CLS] dropped by the "default" strategy

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %} </s> {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


# ------------------------------------------------------------------ tokenizer / processor / config

def vocabulary(extra: tuple[str, ...] = ()) -> list[str]:
    """Every token id, in order; special tokens first so their ids never move when SynthVQA grows. ``extra`` words
    (MiniLISA's) come last, so a model extended with them keeps every id it had."""
    words = list(SPECIAL_TOKENS) + list(ROLE_TOKENS) + sv.question_vocabulary() + sv.answer_vocabulary()
    return list(dict.fromkeys(words + list(extra)))


def build_tokenizer(extra: tuple[str, ...] = ()):
    """Word-level tokenizer: SynthVQA is a closed vocabulary, so one id per word keeps answers single tokens.
    ``extra``: words appended after SynthVQA's (see ``vocabulary``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary(extra))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # split on whitespace only, so "USER:" and "top-left" stay single words
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN}, padding_side="left",
        clean_up_tokenization_spaces=False, model_max_length=1024)
    tok.padding_side = "left"
    return tok


def build_image_processor():
    """The PIL CLIP processor: torchvision is not a dependency; SynthVQA images are already 336x336."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    size = sv.IMAGE_SIZE
    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def build_processor(tokenizer=None):
    """Processor that expands ``<image>`` into the 576 placeholders the model fills with patch features."""
    from transformers import LlavaProcessor

    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    return LlavaProcessor(
        image_processor=build_image_processor(), tokenizer=tokenizer, patch_size=sv.PATCH_SIZE,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE, image_token=IMAGE_TOKEN)


def build_config(
    vocab_size: int | None = None,
    *,
    vision_hidden: int = 192,
    vision_layers: int = 6,
    vision_heads: int = 4,
    vision_intermediate: int | None = None,
    text_hidden: int = 256,
    text_layers: int = 8,
    text_heads: int = 4,
    text_kv_heads: int = 2,
    text_intermediate: int = 640,
    rope_theta: float = 10000.0,
):
    """LLaVA-1.5 geometry (patch 14, 336 px, penultimate layer, [CLS] dropped) at toy width."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vocab = vocabulary()
    vocab_size = vocab_size if vocab_size is not None else len(vocab)
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden, intermediate_size=vision_intermediate or 4 * vision_hidden,
        num_hidden_layers=vision_layers, num_attention_heads=vision_heads, image_size=sv.IMAGE_SIZE,
        patch_size=sv.PATCH_SIZE, projection_dim=vision_hidden, hidden_act="quick_gelu")
    text = LlamaConfig(
        vocab_size=vocab_size, hidden_size=text_hidden, intermediate_size=text_intermediate,
        num_hidden_layers=text_layers, num_attention_heads=text_heads, num_key_value_heads=text_kv_heads,
        max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        pad_token_id=vocab.index("<pad>"), bos_token_id=vocab.index("<s>"), eos_token_id=vocab.index("</s>"))
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=vocab.index(IMAGE_TOKEN),
        image_seq_length=NUM_IMAGE_TOKENS, projector_hidden_act="gelu",
        vision_feature_select_strategy="default", vision_feature_layer=-2,
        pad_token_id=vocab.index("<pad>"), tie_word_embeddings=False)


def format_prompt(question: str) -> str:
    """MiniLLaVA's prompt for a question (its chat template gives the same string)."""
    return PROMPT_TEMPLATE.format(question=question)


# ------------------------------------------------------------------ MiniLLaVA-NeXT

#: LLaVA-NeXT grid pinpoints (height, width) of MiniLLaVA-NeXT: grids 1x2, 2x1 and 2x2 of 336-px crops
NEXT_PINPOINTS = [[sv.IMAGE_SIZE, 2 * sv.IMAGE_SIZE], [2 * sv.IMAGE_SIZE, sv.IMAGE_SIZE],
                  [2 * sv.IMAGE_SIZE, 2 * sv.IMAGE_SIZE]]
#: longest prompt: 576 base tokens + a 48 x 48 canvas with its 48 newline tokens + the question
NEXT_MAX_POSITIONS = 4096


def build_next_processor(tokenizer=None):
    """The stock ``LlavaNextProcessor`` (PIL image processor): a base view plus 336-px crops per image."""
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    tokenizer.model_max_length = NEXT_MAX_POSITIONS
    size = sv.IMAGE_SIZE
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                                 image_grid_pinpoints=NEXT_PINPOINTS)
    return LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=sv.PATCH_SIZE,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE, image_token=IMAGE_TOKEN)


def build_next_config(base):
    """A ``LlavaNextConfig`` with the towers and widths of a MiniLLaVA ``LlavaConfig`` ``base``."""
    from transformers import LlavaNextConfig

    text = base.text_config.to_dict()
    text["max_position_embeddings"] = NEXT_MAX_POSITIONS
    return LlavaNextConfig(
        vision_config=base.vision_config.to_dict(), text_config=text, image_token_index=base.image_token_index,
        image_grid_pinpoints=NEXT_PINPOINTS, projector_hidden_act=base.projector_hidden_act,
        vision_feature_select_strategy="default", vision_feature_layer=-2, pad_token_id=base.pad_token_id,
        tie_word_embeddings=False)
