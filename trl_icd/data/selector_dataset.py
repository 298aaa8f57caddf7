"""The selector's training/evaluation dataset: one row per query, ready for `GRPOTrainer`.

Columns: `prompt` (the selector prompt: the query's and candidates' feature-table rows as item tokens),
`query_id` and `candidate_ids` (corpus ids, in prompt order: slot i of a completion means `candidate_ids[i]`).
The reward reads the two id columns; the selector never sees corpus ids.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

from .corpus import Corpus


def build_selector_dataset(
    corpus: Corpus,
    pools: Mapping[Hashable, Sequence[Hashable]],
    num_slots: int | None = None,
    **prompt_kwargs,
):
    """A `datasets.Dataset` with `prompt`, `query_id`, `candidate_ids`, one row per entry of `pools` (in order).

    `pools` is what `sample_candidate_pools` returns. `num_slots` (the selector's K) defaults to the selector's when
    `vocabulary=<config or tokenizer>` is among `prompt_kwargs` (which go to `selector_prompt`), else to the longest
    pool; shorter pools leave empty slots; a longer pool is an error."""
    from datasets import Dataset

    from ..selector import selector_prompt

    if not pools:
        raise ValueError("no pools given")
    longest = max(len(candidates) for candidates in pools.values())
    if num_slots is None and prompt_kwargs.get("vocabulary") is None:
        num_slots = longest
    if num_slots is not None and longest > num_slots:
        raise ValueError(f"a pool has {longest} candidates but the selector has num_slots={num_slots}")
    prompts, query_ids, candidate_ids = [], [], []
    for query_id, candidates in pools.items():
        candidates = list(candidates)
        if query_id in candidates:
            raise ValueError(f"query {query_id!r} is in its own candidate pool")
        if len(set(candidates)) != len(candidates):
            raise ValueError(f"candidate pool of query {query_id!r} has duplicates")
        prompts.append(
            selector_prompt(corpus.row_of(query_id), [corpus.row_of(c) for c in candidates], num_slots, **prompt_kwargs)
        )
        query_ids.append(query_id)
        candidate_ids.append(candidates)
    return Dataset.from_dict({"prompt": prompts, "query_id": query_ids, "candidate_ids": candidate_ids})
