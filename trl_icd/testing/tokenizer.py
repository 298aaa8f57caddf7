"""A tiny offline Qwen-style chat tokenizer: byte-level BPE (encodes any text), Qwen's special tokens and a
Qwen2.5-VL-style chat template that renders `{"type": "image"}` parts as `<|vision_start|><|image_pad|><|vision_end|>`."""

from __future__ import annotations

from functools import lru_cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2.5-VL's template, reduced to what the tiny models need (text and image parts, no tools, no video).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_TRAINING_TEXT = [
    "Question: What is in the image? Short answer: a red circle",
    "Question: what colour is the square? Short answer: blue",
    "You will see examples of an image with a question and its short answer. Answer in one to three words.",
    "How many animals are there? Short answer: four. Is this a cat or a dog? yes no",
    "The quick brown fox jumps over the lazy dog 0123456789 , . ? ! : ; ' \" ( ) [ ] { } - _ / \\",
    "system user assistant",
]


@lru_cache(maxsize=4)
def _trained_bpe(vocab_size: int) -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TRAINING_TEXT * 4, trainer=trainer)
    return tok.to_str()


def tiny_chat_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A fresh tokenizer (deterministic: same vocabulary every call); left padding, eos `<|im_end|>`."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_bpe(vocab_size)),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:2] + SPECIAL_TOKENS[3:],
        padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
