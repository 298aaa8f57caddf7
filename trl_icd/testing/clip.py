"""A tiny, randomly initialised CLIP (`transformers.CLIPModel`) and a matching `CLIPProcessor`, built offline.

The tokenizer is a character-level byte BPE (every byte, with and without CLIP's `</w>` end-of-word marker, so any
text encodes without unknown tokens); the image processor is the PIL backend (no torchvision).
"""

from __future__ import annotations

import torch
from tokenizers import pre_tokenizers
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTokenizer

_SPECIALS = ("<|startoftext|>", "<|endoftext|>")


def tiny_clip_tokenizer(model_max_length: int = 64) -> CLIPTokenizer:
    """A CLIP tokenizer whose vocabulary is the two specials plus the 256 byte symbols, each also with `</w>`."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(_SPECIALS)}
    for symbol in alphabet:
        vocab[symbol] = len(vocab)
        vocab[symbol + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def tiny_clip(
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 32,
    projection_dim: int = 16,
    num_layers: int = 2,
    max_text_length: int = 64,
    seed: int = 0,
) -> tuple[CLIPModel, CLIPProcessor]:
    """`(model, processor)`: a random fp32 CLIP in eval mode and its processor (images resized/cropped to
    `image_size`, texts truncated to `max_text_length` tokens)."""
    tokenizer = tiny_clip_tokenizer(model_max_length=max_text_length)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    common = {"hidden_size": hidden_size, "intermediate_size": 2 * hidden_size, "num_hidden_layers": num_layers,
              "num_attention_heads": 2}
    config = CLIPConfig(
        text_config={
            **common,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": max_text_length,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={**common, "image_size": image_size, "patch_size": patch_size},
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
