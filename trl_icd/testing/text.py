"""A tiny random `Qwen2ForCausalLM` for tests and benchmarks: any TRL trainer can sample and train it on CPU in
well under a second per step."""

from __future__ import annotations

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase, Qwen2Config, Qwen2ForCausalLM

__all__ = ["tiny_qwen2_lm"]


def tiny_qwen2_lm(
    tokenizer: PreTrainedTokenizerBase,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    seed: int = 0,
    **config_overrides,
) -> Qwen2ForCausalLM:
    """A randomly initialised (fp32) Qwen2 causal LM sized to `tokenizer`, e.g.
    `trl_icd.testing.tokenizer.tiny_chat_tokenizer()`.

    Its eos and pad ids are the tokenizer's, also in `generation_config` (TRL stops sampling at eos); there is no BOS.
    The same `seed` gives the same weights. `config_overrides` go to `Qwen2Config`.
    """
    if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
        raise ValueError("The tokenizer needs an eos and a pad token.")
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=config_overrides.pop("max_position_embeddings", 512),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        **config_overrides,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None
    )
    return model
