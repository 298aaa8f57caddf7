"""Demonstrations for new queries: images and questions that are in no corpus, picked from a pool of demonstrations
by a trained selector. Featurise the queries the way the pool was featurised, draw each query's candidates with the
same sampler as training, then let the selector choose (`ICDSelectorForCausalLM.select_demonstrations`)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


def _query_corpus(queries):
    from ..data.corpus import Corpus

    if isinstance(queries, Corpus):
        return queries
    records = []
    for n, query in enumerate(queries):
        if not (isinstance(query, Sequence) and len(query) == 2 and isinstance(query[1], str)):
            raise ValueError(f"query {n}: expected an (image, question) pair, got {type(query).__name__}")
        # answers are unknown for a new query; the corpus only carries what featurising and sampling read
        records.append({"id": f"new-query-{n}", "image": query[0], "question": query[1], "answers": []})
    return Corpus.from_records(records, split="new")


def pick_demonstrations(
    selector,
    queries,
    pool_corpus,
    pool_features,
    *,
    pool_ids: Sequence[Hashable] | None = None,
    featurizer: Callable | None = None,
    k: int | None = None,
    method: str = "image_sim",
    seed: int = 0,
    mix: Mapping[str, float] | None = None,
    num_shots: int | None = None,
    do_sample: bool = False,
    device: str | None = None,
    **select_kwargs: Any,
) -> list[list]:
    """For each query, the pool items (corpus ids of `pool_corpus`, in the order shown) the selector chooses.

    queries: `(image, question)` pairs (image: PIL image, path, bytes, ...) or a `Corpus` of new items.
    pool_corpus, pool_features: the demonstrations and their `FeatureTable` (rows in corpus order); `pool_ids`
        restricts the pool (default: every item, e.g. pass the train split's ids).
    featurizer: `Corpus -> FeatureTable` for the queries; default `featurizer_for(pool_features)` (rebuilds the
        fallback featuriser; a CLIP table needs `featurizer_for(table, clip_model=..., clip_processor=...)`).
    k, method, seed, mix: the candidate sampler (`sample_candidate_pools`); k defaults to the selector's slots.
    num_shots, do_sample, select_kwargs: passed to `select_demonstrations` (None: the selector's learned stop).

    The queries' features must come from the featuriser the selector was trained with (ValueError naming both).
    """
    from ..data.features import featurizer_for
    from ..data.samplers import sample_candidate_pools

    pool_features.check_aligned(pool_corpus)
    selector.check_featurizer(pool_features.featurizer, "the pool's feature table")
    query_corpus = _query_corpus(queries)
    if len(query_corpus) == 0:
        return []
    featurize = featurizer or featurizer_for(pool_features, show_progress=False)
    query_features = featurize(query_corpus)
    selector.check_featurizer(query_features.featurizer, "the queries' features")
    pool_ids = list(pool_corpus.ids if pool_ids is None else pool_ids)
    if not pool_ids:
        raise ValueError("the pool is empty: there are no demonstrations to choose from")
    k = selector.config.num_slots if k is None else k
    if k > selector.config.num_slots:
        raise ValueError(f"k={k} candidates do not fit the selector's {selector.config.num_slots} slots")
    pools = sample_candidate_pools(
        pool_corpus, pool_features, query_corpus.ids, pool_ids, k, method=method, seed=seed, mix=mix, device=device,
        show_progress=False, query_corpus=query_corpus, query_features=query_features,
    )
    candidates = [pools[q] for q in query_corpus.ids]
    chosen = selector.select_demonstrations(
        query_features.combined_rows(np.arange(len(query_corpus))),
        [pool_features.combined_rows(pool_features.rows_of(c)) for c in candidates],
        num_shots=num_shots,
        do_sample=do_sample,
        **select_kwargs,
    )
    return [[c[i] for i in picks] for c, picks in zip(candidates, chosen, strict=True)]
