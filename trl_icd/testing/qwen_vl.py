"""Randomly initialised `Qwen2_5_VLForConditionalGeneration` models and an offline processor, built from configs.

Three sizes (`QWEN2_5_VL_SIZES`): `tiny` for tests, `small` for CPU benchmarks, `3b` (the real Qwen2.5-VL-3B shapes)
for GPU speed runs. The default initialiser (std 0.02) gives an almost input-blind model — every greedy answer the
same, an image change moving the answer log-prob by ~1e-3 nats — so a parity test on it proves nothing. These
builders use a large `init_std` (0.5 tiny, 0.1 small): a changed image then moves the score by a large margin.
`3b` keeps std 0.02 (the real model's initialiser); it has the real 151,936-token vocabulary over the small offline
tokenizer, so the output rows the tokenizer cannot decode are zeroed: greedy answers are then text and still differ
between inputs (six different 0-shot prompts gave six different answers).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw
from transformers import (
    PreTrainedTokenizerBase,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLImageProcessor,
)

from ..data.corpus import Corpus
from ..rewards.qwen_vl import Qwen2_5_VLImageOnlyProcessor
from .tokenizer import tiny_chat_tokenizer


@dataclass(frozen=True)
class QwenVLSize:
    """The shape of one random Qwen2.5-VL; `mrope_section` must sum to head_dim / 2."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    mrope_section: tuple[int, ...]
    vision_hidden_size: int
    vision_intermediate_size: int
    vision_depth: int
    vision_num_heads: int
    fullatt_block_indexes: tuple[int, ...]
    init_std: float
    max_pixels: int
    vocab_size: int | None = None  # None: the tokenizer's size
    tie_word_embeddings: bool = False


QWEN2_5_VL_SIZES: dict[str, QwenVLSize] = {
    "tiny": QwenVLSize(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        mrope_section=(1, 1), vision_hidden_size=16, vision_intermediate_size=32, vision_depth=2,
        vision_num_heads=4, fullatt_block_indexes=(1,), init_std=0.5, max_pixels=112 * 112,
    ),
    "small": QwenVLSize(
        hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        mrope_section=(8, 12, 12), vision_hidden_size=128, vision_intermediate_size=256, vision_depth=4,
        vision_num_heads=4, fullatt_block_indexes=(1, 3), init_std=0.1, max_pixels=448 * 448,
    ),
    # Qwen2.5-VL-3B-Instruct (values: the released config.json).
    "3b": QwenVLSize(
        hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
        num_key_value_heads=2, mrope_section=(16, 24, 24), vision_hidden_size=1280, vision_intermediate_size=3420,
        vision_depth=32, vision_num_heads=16, fullatt_block_indexes=(7, 15, 23, 31), init_std=0.02,
        max_pixels=448 * 448, vocab_size=151936, tie_word_embeddings=True,
    ),
}


def qwen2_5_vl_config(
    size: str | QwenVLSize = "tiny", tokenizer: PreTrainedTokenizerBase | None = None, init_std: float | None = None
) -> Qwen2_5_VLConfig:
    """A `Qwen2_5_VLConfig` of the named size whose special-token ids are the tokenizer's (default: the tiny one)."""
    spec = QWEN2_5_VL_SIZES[size] if isinstance(size, str) else size
    tokenizer = tokenizer if tokenizer is not None else tiny_chat_tokenizer()
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in _SPECIAL_TOKENS.items()}
    std = spec.init_std if init_std is None else init_std
    vocab_size = spec.vocab_size or len(tokenizer)
    if vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size {vocab_size} < tokenizer size {len(tokenizer)}")
    text_config = dict(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        hidden_act="silu",
        rms_norm_eps=1e-6,
        max_position_embeddings=128000,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": list(spec.mrope_section)},
        initializer_range=std,
        bos_token_id=ids["pad"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
        tie_word_embeddings=spec.tie_word_embeddings,
    )
    vision_config = dict(
        depth=spec.vision_depth,
        hidden_size=spec.vision_hidden_size,
        intermediate_size=spec.vision_intermediate_size,
        num_heads=spec.vision_num_heads,
        out_hidden_size=spec.hidden_size,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=list(spec.fullatt_block_indexes),
        hidden_act="silu",
        initializer_range=std,
    )
    return Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["image"],
        video_token_id=ids["video"],
        vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"],
        tie_word_embeddings=spec.tie_word_embeddings,
        initializer_range=std,
    )


_SPECIAL_TOKENS = {
    "pad": "<|endoftext|>",
    "eos": "<|im_end|>",
    "vision_start": "<|vision_start|>",
    "vision_end": "<|vision_end|>",
    "image": "<|image_pad|>",
    "video": "<|video_pad|>",
}


def qwen2_5_vl_3b_config(tokenizer: PreTrainedTokenizerBase | None = None) -> Qwen2_5_VLConfig:
    """The real Qwen2.5-VL-3B sizes (vocabulary 151,936), for random-weight speed and memory runs."""
    return qwen2_5_vl_config("3b", tokenizer=tokenizer)


def tiny_qwen2_5_vl_processor(
    tokenizer: PreTrainedTokenizerBase | None = None, max_pixels: int = 112 * 112, min_pixels: int = 56 * 56
) -> Qwen2_5_VLImageOnlyProcessor:
    """The image-only processor over the tiny tokenizer (no torchvision, no Hub)."""
    tokenizer = tokenizer if tokenizer is not None else tiny_chat_tokenizer()
    image_processor = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    return Qwen2_5_VLImageOnlyProcessor(image_processor, tokenizer, chat_template=tokenizer.chat_template)


def random_qwen2_5_vl(
    size: str | QwenVLSize = "tiny",
    *,
    init_std: float | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
    tokenizer: PreTrainedTokenizerBase | None = None,
    max_pixels: int | None = None,
) -> tuple[Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLImageOnlyProcessor]:
    """A random model of the named size (eval mode) and its processor; deterministic in `seed`, leaves the global
    RNG untouched."""
    spec = QWEN2_5_VL_SIZES[size] if isinstance(size, str) else size
    tokenizer = tokenizer if tokenizer is not None else tiny_chat_tokenizer()
    config = qwen2_5_vl_config(spec, tokenizer=tokenizer, init_std=init_std)
    config._attn_implementation = attn_implementation
    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        with torch.device(device):
            model = Qwen2_5_VLForConditionalGeneration._from_config(
                copy.deepcopy(config), dtype=dtype, attn_implementation=attn_implementation
            )
    unreachable = config.text_config.vocab_size - len(tokenizer)
    if unreachable > 0:
        # The real vocabulary size (3b) over the small offline tokenizer: ids past the tokenizer would decode to ""
        # and make every greedy answer empty (a parity check on them could not fail). Zero output rows put those
        # logits at 0, below the tokenizer's best token, while the full-width output matmul is kept.
        with torch.no_grad():
            model.get_output_embeddings().weight[len(tokenizer) :] = 0
    model.eval()
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    processor = tiny_qwen2_5_vl_processor(tokenizer, max_pixels=max_pixels or spec.max_pixels)
    return model, processor


def tiny_qwen2_5_vl(
    init_std: float = 0.5, seed: int = 0, **kwargs
) -> tuple[Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLImageOnlyProcessor]:
    """Text hidden 16 / 2 layers, vision hidden 16 / 2 blocks, fp32, images capped at 112x112 px (<= 16 image
    tokens); input-sensitive at the default `init_std`."""
    return random_qwen2_5_vl("tiny", init_std=init_std, seed=seed, **kwargs)


def small_qwen2_5_vl(
    init_std: float = 0.1, seed: int = 0, **kwargs
) -> tuple[Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLImageOnlyProcessor]:
    """Text hidden 256 / 4 layers, vision hidden 128 / 4 blocks, the real patch/merge/window settings and 448-px
    images (256 image tokens each): for CPU benchmarks."""
    return random_qwen2_5_vl("small", init_std=init_std, seed=seed, **kwargs)


_COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
_SHAPES = ("circle", "square", "triangle")
_QUESTIONS = ("What colour is the {s}?", "What shape is shown?", "Is the {s} {c}?", "How many shapes are there?")


def synthetic_image(colour: str, shape: str, size: tuple[int, int], seed: int) -> Image.Image:
    """A coloured shape on a noisy background: distinct content per item, deterministic in `seed`."""
    width, height = size
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 90, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    cx, cy = rng.integers(width // 4, 3 * width // 4 + 1), rng.integers(height // 4, 3 * height // 4 + 1)
    r = max(4, min(width, height) // 4)
    box = (int(cx - r), int(cy - r), int(cx + r), int(cy + r))
    fill = _COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(box[0], box[3]), (box[2], box[3]), (int(cx), box[1])], fill=fill)
    return image


def synthetic_vqa_corpus(
    num_items: int, image_sizes: Sequence[tuple[int, int]] = ((112, 112), (84, 56), (56, 98)), seed: int = 0
) -> Corpus:
    """VQA items with generated images (sizes cycle through `image_sizes`, as (width, height)), templated
    questions and 10 answers with realistic repeats; distinct `image_id`s so per-image caches never collide."""
    rng = np.random.default_rng(seed)
    colours = list(_COLOURS)
    records = []
    for i in range(num_items):
        colour, shape = colours[rng.integers(len(colours))], _SHAPES[rng.integers(len(_SHAPES))]
        question = _QUESTIONS[i % len(_QUESTIONS)].format(s=shape, c=colours[rng.integers(len(colours))])
        gold = {0: colour, 1: shape, 2: "yes" if colour in question else "no", 3: "one"}[i % len(_QUESTIONS)]
        others = [colours[rng.integers(len(colours))], _SHAPES[rng.integers(len(_SHAPES))], "two"]
        answers = [gold] * int(rng.integers(4, 9))
        answers += [others[rng.integers(len(others))] for _ in range(10 - len(answers))]
        records.append(
            {
                "id": i,
                "image": synthetic_image(colour, shape, tuple(image_sizes[i % len(image_sizes)]), seed * 100_003 + i),
                "image_id": f"s{seed}-{i}",
                "question": question,
                "answers": answers,
            }
        )
    return Corpus.from_records(records)
