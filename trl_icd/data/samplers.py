"""Candidate pools: for each query, the K corpus ids the selector (or a baseline) may choose demonstrations from.

One function, `sample_candidate_pools`, builds the pools for training, RL-data generation and evaluation alike, so a
method is always judged on pools drawn the way it was trained on. Rules every sampler obeys:

- never the query itself, never another question on the query's image (same `CorpusItem.image_key`): excluded by
  identity, not by dropping "the first neighbour", so ties between questions sharing an image cannot leak;
- no duplicates; fewer than K only when fewer than K eligible items exist (logged);
- deterministic: a query's pool depends only on (seed, method, query id, pool, features, k), not on which other
  queries are sampled in the same call or in which order.

Similarity search is exact (chunked matrix product + `argpartition`), feasible for a 443k-item VQAv2 pool.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from .corpus import Corpus
from .features import FeatureTable

logger = logging.getLogger(__name__)

DEFAULT_MIX = {"random": 0.5, "image_sim": 0.25, "text_sim": 0.25}
_SCORE_BUDGET = 1 << 25  # float32 scores held at once by the similarity search (128 MiB)


@dataclass
class PoolSpace:
    """The candidate pool as the samplers see it: ids, feature rows, and which pool positions share each image."""

    ids: list
    rows: np.ndarray  # feature-table row of each pool position
    code_of_image_key: dict[str, int]  # a small int per distinct image_key in the pool
    positions_of_image: dict[int, np.ndarray]  # image code -> sorted pool positions showing that image
    features: FeatureTable | None
    _vectors: dict = field(default_factory=dict)

    def tensor(self, modality: str, device=None) -> torch.Tensor:
        """`[pool, d]` float32 image or text features of the pool on `device` (on CPU, no copy when the pool is the
        whole feature table in order, memory-mapped or not)."""
        key = (modality, str(device))
        if key not in self._vectors:
            table = getattr(self.features, modality)
            whole = len(self.rows) == len(table) and np.array_equal(self.rows, np.arange(len(table)))
            array = np.asarray(table if whole else table[self.rows], dtype=np.float32)
            with warnings.catch_warnings():  # a read-only memory map: we never write to it
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                self._vectors[key] = torch.from_numpy(array).to(device or "cpu")
        return self._vectors[key]


@dataclass
class QueryBatch:
    """Queries as the samplers see them: ids, feature rows (of `features`: the pool's table, or the queries' own for
    items outside the pool's corpus), and the pool positions each must never receive."""

    ids: list
    rows: np.ndarray
    excluded: list[np.ndarray]  # per query: sorted pool positions (itself and same-image items)
    features: FeatureTable | None = None


Sampler = Callable[..., list[np.ndarray]]
SAMPLERS: dict[str, Sampler] = {}


def register_sampler(name: str):
    """Register `fn(pool, queries, k, seed, **options) -> per query, an array of eligible pool positions, ranked,
    at most k` (`options` carries method-specific settings such as `mix`; ignore what you do not use)."""

    def decorator(fn: Sampler) -> Sampler:
        if name in SAMPLERS:
            raise ValueError(f"sampler {name!r} already registered")
        SAMPLERS[name] = fn
        return fn

    return decorator


def _id_seed(item_id: Hashable) -> list[int]:
    """Stable integer words from an id (ints as themselves, anything else through blake2b; never Python's `hash`)."""
    if isinstance(item_id, (int, np.integer)) and not isinstance(item_id, bool):
        value = int(item_id)
        return [value & 0xFFFFFFFF, (value >> 32) & 0xFFFFFFFF, int(value < 0)]
    digest = hashlib.blake2b(repr(item_id).encode("utf-8"), digest_size=12).digest()
    return [int.from_bytes(digest[i : i + 4], "little") for i in (0, 4, 8)]


_METHOD_SALT = {"random": 1, "shuffle": 2}


def query_rng(seed: int, purpose: str, query_id: Hashable) -> np.random.Generator:
    """The random stream of one query for one purpose: independent of every other query."""
    return np.random.default_rng([seed & 0xFFFFFFFF, _METHOD_SALT[purpose], *_id_seed(query_id)])


@register_sampler("random")
def random_pools(pool: PoolSpace, queries: QueryBatch, k: int, seed: int, **options) -> list[np.ndarray]:
    """Uniform without replacement over the eligible pool, per-query random streams."""
    size = len(pool.ids)
    out = []
    for query_id, excluded in zip(queries.ids, queries.excluded, strict=True):
        take = min(size, k + len(excluded))  # enough draws to keep k after removing the excluded ones
        drawn = query_rng(seed, "random", query_id).choice(size, size=take, replace=False)
        out.append(drawn[~np.isin(drawn, excluded)][:k])
    return out


def _nearest(scores: torch.Tensor, excluded: Sequence[np.ndarray], k: int) -> list[np.ndarray]:
    """Per query (row of `scores`, `[queries, pool]`), the k eligible pool positions of highest score, best first,
    ties broken by pool position. Every item tied with the boundary score is considered, so the result does not
    depend on `topk`'s arbitrary choice among equal scores (identical features, e.g. questions sharing an image,
    tie exactly)."""
    size = scores.shape[1]
    want = min(size, k + max((len(e) for e in excluded), default=0))  # k survive any exclusion
    values, candidates = torch.topk(scores, want, dim=1, sorted=False)
    threshold = values.min(dim=1, keepdim=True).values
    straddling = ((scores >= threshold).sum(dim=1) > want).cpu().numpy()
    values, candidates = values.cpu().numpy(), candidates.cpu().numpy()
    out = []
    for n, excluded_positions in enumerate(excluded):
        top, top_scores = candidates[n], values[n]
        if straddling[n]:  # ties across the boundary: take every tied item, then order them by position
            row = scores[n].cpu().numpy()
            top = np.flatnonzero(row >= row[candidates[n]].min())
            top_scores = row[top]
        order = np.lexsort((top, -top_scores))
        top = top[order]
        out.append(top[~np.isin(top, excluded_positions)][:k])
    return out


def _similarity_pools(modality: str, pool: PoolSpace, queries: QueryBatch, k: int, device=None) -> list[np.ndarray]:
    pool_vectors = pool.tensor(modality, device)
    table = getattr(queries.features if queries.features is not None else pool.features, modality)
    chunk = max(1, _SCORE_BUDGET // max(1, len(pool.ids)))
    out: list[np.ndarray] = []
    for start in range(0, len(queries.ids), chunk):
        rows = queries.rows[start : start + chunk]
        query_vectors = torch.from_numpy(np.asarray(table[rows], dtype=np.float32)).to(pool_vectors.device)
        out.extend(_nearest(query_vectors @ pool_vectors.T, queries.excluded[start : start + chunk], k))
    return out


@register_sampler("image_sim")
def image_similarity_pools(pool: PoolSpace, queries: QueryBatch, k: int, seed: int, **options) -> list[np.ndarray]:
    """The k pool items whose image features are nearest the query's (RICES-style retrieval)."""
    return _similarity_pools("image", pool, queries, k, options.get("device"))


@register_sampler("text_sim")
def text_similarity_pools(pool: PoolSpace, queries: QueryBatch, k: int, seed: int, **options) -> list[np.ndarray]:
    """The k pool items whose question features are nearest the query's."""
    return _similarity_pools("text", pool, queries, k, options.get("device"))


def mix_quotas(k: int, mix: Mapping[str, float]) -> dict[str, int]:
    """Split k over the methods in proportion to `mix` (largest remainder; ties to the earlier method)."""
    if not mix or any(w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
        raise ValueError(f"mix weights must be non-negative with a positive sum, got {dict(mix)}")
    total = sum(mix.values())
    exact = {name: k * w / total for name, w in mix.items()}
    quotas = {name: int(np.floor(v)) for name, v in exact.items()}
    order = sorted(mix, key=lambda name: (-(exact[name] - quotas[name]), list(mix).index(name)))
    for name in order[: k - sum(quotas.values())]:
        quotas[name] += 1
    return quotas


@register_sampler("mix")
def mix_pools(
    pool: PoolSpace, queries: QueryBatch, k: int, seed: int, mix: Mapping[str, float] = DEFAULT_MIX, **options
) -> list[np.ndarray]:
    """Each method contributes its quota of its own ranking, skipping items an earlier method already gave; a
    shortfall (overlaps) is filled from the methods' rankings in turn. Order: by method, then rank."""
    unknown = [name for name in mix if name not in SAMPLERS or name == "mix"]
    if unknown:
        raise ValueError(f"unknown mix methods {unknown}; known: {sorted(SAMPLERS)}")
    quotas = mix_quotas(k, mix)
    rankings = {name: SAMPLERS[name](pool, queries, k, seed, **options) for name in mix if quotas[name] > 0}
    out = []
    for n in range(len(queries.ids)):
        chosen: list[int] = []
        seen: set[int] = set()
        cursor = dict.fromkeys(rankings, 0)

        def take(name: str, count: int) -> None:
            ranking = rankings[name][n]
            while count > 0 and cursor[name] < len(ranking):
                position = int(ranking[cursor[name]])
                cursor[name] += 1
                if position not in seen:
                    seen.add(position)
                    chosen.append(position)
                    count -= 1

        for name in rankings:
            take(name, quotas[name])
        for name in rankings:  # every ranking holds min(k, eligible) distinct items, so this reaches that size
            take(name, k - len(chosen))
        out.append(np.asarray(chosen, dtype=np.int64))
    return out


def build_pool_space(corpus: Corpus, features: FeatureTable, pool_ids: Sequence[Hashable]) -> PoolSpace:
    pool_ids = list(pool_ids)
    if len(set(pool_ids)) != len(pool_ids):
        raise ValueError("pool_ids contains duplicates")
    rows = np.fromiter((corpus.row_of(i) for i in pool_ids), dtype=np.int64, count=len(pool_ids))
    code_of_key: dict[str, int] = {}
    codes = np.fromiter(
        (code_of_key.setdefault(corpus.item_at(r).image_key, len(code_of_key)) for r in rows),
        dtype=np.int64,
        count=len(rows),
    )
    order = np.argsort(codes, kind="stable")
    boundaries = np.flatnonzero(np.diff(codes[order])) + 1
    positions_of_image = {int(codes[group[0]]): np.sort(group) for group in np.split(order, boundaries) if len(group)}
    return PoolSpace(pool_ids, rows, code_of_key, positions_of_image, features)


def build_query_batch(
    corpus: Corpus, pool: PoolSpace, query_ids: Sequence[Hashable], features: FeatureTable | None = None
) -> QueryBatch:
    """`corpus` holds the queries (the pool's corpus, or another one for new items whose rows index `features`)."""
    empty = np.empty(0, dtype=np.int64)
    excluded = []
    for query_id in query_ids:
        code = pool.code_of_image_key.get(corpus[query_id].image_key)
        excluded.append(pool.positions_of_image.get(code, empty) if code is not None else empty)
    rows = np.fromiter((corpus.row_of(i) for i in query_ids), dtype=np.int64, count=len(query_ids))
    return QueryBatch(list(query_ids), rows, excluded, features)


def _check_features(corpus: Corpus, features: FeatureTable | None, method: str, mix: Mapping[str, float]) -> None:
    needs_features = method in ("image_sim", "text_sim") or (method == "mix" and set(mix) - {"random"})
    if features is None:
        if needs_features:
            raise ValueError(f"method {method!r} needs a FeatureTable")
        return
    features.check_aligned(corpus)


def nearest_first(table: np.ndarray, row: int, rows: Sequence[int]) -> list[int]:
    """Positions in `rows` ranked by similarity (dot product) of their `table` rows to `table[row]`, most similar
    first, ties by position: the order similarity retrieval (RICES) takes demonstrations in."""
    return list(np.argsort(-(table[list(rows)] @ table[row]), kind="stable"))


def sample_candidate_pools(
    corpus: Corpus,
    features: FeatureTable | None,
    query_ids: Sequence[Hashable],
    pool_ids: Sequence[Hashable],
    k: int,
    method: str = "random",
    seed: int = 0,
    mix: Mapping[str, float] | None = None,
    shuffle: bool = False,
    batch_size: int = 1024,
    device: str | None = None,
    show_progress: bool = True,
    query_corpus: Corpus | None = None,
    query_features: FeatureTable | None = None,
) -> dict[Hashable, list]:
    """`{query_id: [candidate corpus ids]}`: k eligible pool items per query, by `method` (a `SAMPLERS` name).

    `features` (rows in corpus order) is needed by the similarity methods; `mix` weights methods for
    `method="mix"` (default `DEFAULT_MIX`: half random, a quarter each image/text similarity). Pools are ranked (best
    first for similarity; by method then rank for mix) unless `shuffle=True`, which applies a per-query seeded
    permutation so a position carries no information about how an item was found. `device` (e.g. "cuda") runs the
    similarity search there; the result is the same up to float rounding of near-equal scores.

    Queries that are not items of `corpus` (new images and questions) come with their own `query_corpus` and
    `query_features` (rows in `query_corpus` order, from the featuriser of `features`); the pool stays in `corpus`.
    Same-image exclusion then compares image keys across the two corpora."""
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    if method not in SAMPLERS:
        raise ValueError(f"unknown sampler {method!r}; known: {sorted(SAMPLERS)}")
    if mix is not None and method != "mix":
        raise ValueError("`mix` is only used with method='mix'")
    mix = dict(mix if mix is not None else DEFAULT_MIX)
    query_ids = list(query_ids)
    if len(set(query_ids)) != len(query_ids):
        raise ValueError("query_ids contains duplicates")
    if not query_ids:
        return {}
    _check_features(corpus, features, method, mix)
    if query_corpus is not None:
        _check_features(query_corpus, query_features, method, mix)
        if query_features is not None and features is not None:
            reason = features.featurizer.mismatch(query_features.featurizer)
            if reason:
                raise ValueError(f"query features come from {query_features.featurizer.describe()}, the pool's from "
                                 f"{features.featurizer.describe()} ({reason}): similarities would be meaningless")
    elif query_features is not None:
        raise ValueError("query_features needs query_corpus (the queries' own items)")
    pool = build_pool_space(corpus, features, pool_ids)
    sampler = SAMPLERS[method]
    pools: dict[Hashable, list] = {}
    short = []
    with tqdm(total=len(query_ids), desc=f"{method} pools", disable=not show_progress) as progress:
        for start in range(0, len(query_ids), batch_size):
            chunk = query_ids[start : start + batch_size]
            batch = (build_query_batch(corpus, pool, chunk) if query_corpus is None
                     else build_query_batch(query_corpus, pool, chunk, query_features))
            ranked = sampler(pool, batch, k, seed, mix=mix, device=device)
            for query_id, positions in zip(batch.ids, ranked, strict=True):
                if shuffle:
                    positions = query_rng(seed, "shuffle", query_id).permutation(positions)
                if len(positions) < k:
                    short.append(query_id)
                pools[query_id] = [pool.ids[p] for p in positions]
            progress.update(len(batch.ids))
    if short:
        logger.warning(
            "%d of %d queries have fewer than k=%d eligible candidates (e.g. %s): their pools are shorter",
            len(short), len(query_ids), k, short[:5],
        )
    return pools


__all__ = [
    "DEFAULT_MIX",
    "SAMPLERS",
    "mix_quotas",
    "query_rng",
    "register_sampler",
    "sample_candidate_pools",
]
