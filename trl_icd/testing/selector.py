"""A tiny random ICD selector with its tokenizer, and random candidate pools, for tests and benchmarks."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerFast

from ..selector import ICDSelectorForCausalLM, build_selector_tokenizer, selector_prompt

__all__ = ["random_pools", "selector_prompts", "tiny_selector"]


def tiny_selector(
    num_items: int = 40,
    feature_dim: int = 16,
    num_slots: int = 6,
    min_shots: int = 1,
    max_shots: int = 3,
    seed: int = 0,
    peaked: bool = False,
    hidden_size: int = 32,
    num_heads: int = 4,
    num_layers: int = 1,
    num_decoder_layers: int = 1,
    **config_overrides,
) -> tuple[ICDSelectorForCausalLM, PreTrainedTokenizerFast]:
    """(model, tokenizer): a selector over `num_items` random unit feature rows. The same `seed` gives the same model.

    A fresh selector starts uniform over the allowed actions; `peaked=True` re-draws its pointer and stop heads with
    large weights so the policy is far from uniform (probes masking with confident scores)."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.nn.functional.normalize(torch.randn(num_items, feature_dim, generator=generator), dim=-1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ICDSelectorForCausalLM.from_features(
            features,
            num_slots=num_slots,
            min_shots=min_shots,
            max_shots=max_shots,
            hidden_size=hidden_size,
            num_heads=num_heads,
            num_layers=num_layers,
            num_decoder_layers=num_decoder_layers,
            **config_overrides,
        )
        if peaked:
            with torch.no_grad():
                for parameter in model.model.pointer.parameters():
                    parameter.normal_(0.0, 3.0)
    return model, build_selector_tokenizer(model.config)


def random_pools(
    num_queries: int, num_items: int, num_slots: int, seed: int = 0, sizes: list[int] | None = None
) -> list[tuple[int, list[int]]]:
    """`num_queries` (query_row, candidate_rows) pairs: distinct rows, the query never among its candidates. Pool
    sizes cycle through `sizes` (default 0..num_slots, so short pools with empty slots are included)."""
    generator = torch.Generator().manual_seed(seed)
    sizes = list(range(num_slots + 1)) if sizes is None else sizes
    pools = []
    for index in range(num_queries):
        rows = torch.randperm(num_items, generator=generator)[: sizes[index % len(sizes)] + 1].tolist()
        pools.append((rows[0], rows[1:]))
    return pools


def selector_prompts(pools: list[tuple[int, list[int]]], tokenizer) -> list[str]:
    return [selector_prompt(query, candidates, vocabulary=tokenizer) for query, candidates in pools]
