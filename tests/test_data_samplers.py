"""Candidate samplers: exclusions (the query, other questions on its image, ties), exactness against brute force,
determinism, mix de-duplication, short pools."""

import logging

import numpy as np
import pytest

from trl_icd.data import SAMPLERS, Corpus, FeatureTable, sample_candidate_pools
from trl_icd.data.samplers import mix_quotas

METHODS = ("random", "image_sim", "text_sim", "mix")


def make_world(n_images=30, per_image=(1, 2, 3), dim=8, seed=0, split_every=5):
    """Items grouped by image (several questions per image); questions on one image share its image vector, as a
    featuriser that encodes each image once gives them."""
    rng = np.random.default_rng(seed)
    records, image_rows, text_rows = [], [], []
    next_id = 100
    for image_id in range(n_images):
        image_vector = rng.standard_normal(dim)
        for _ in range(per_image[image_id % len(per_image)]):
            records.append(
                {"id": next_id, "question": f"q{next_id}", "answers": ["a"] * 10, "image_id": image_id,
                 "split": "val" if image_id % split_every == 0 else "train"}
            )
            image_rows.append(image_vector)
            text_rows.append(rng.standard_normal(dim))
            next_id += 1
    corpus = Corpus.from_records(records)

    def unit(rows):
        rows = np.asarray(rows, dtype=np.float32)
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)

    return corpus, FeatureTable(corpus.ids, unit(image_rows), unit(text_rows))


@pytest.fixture(scope="module")
def world():
    return make_world()


def eligible(corpus, query_id, pool_ids):
    image = corpus[query_id].image_id
    return [c for c in pool_ids if c != query_id and corpus[c].image_id != image]


def brute_force_nearest(corpus, table, modality, query_id, pool_ids, k):
    vectors = getattr(table, modality)
    allowed = eligible(corpus, query_id, pool_ids)
    scores = np.array([vectors[corpus.row_of(c)] @ vectors[corpus.row_of(query_id)] for c in allowed])
    order = sorted(range(len(allowed)), key=lambda i: (-scores[i], pool_ids.index(allowed[i])))
    return [allowed[i] for i in order[:k]]


def test_registry_names():
    assert set(METHODS) <= set(SAMPLERS)


@pytest.mark.parametrize("method", METHODS)
def test_pools_exclude_query_and_same_image_questions(world, method):
    corpus, table = world
    everything = corpus.ids  # queries inside the pool: the hardest case for exclusion
    pools = sample_candidate_pools(corpus, table, everything, everything, k=10, method=method, show_progress=False)
    assert list(pools) == everything
    for query_id, pool in pools.items():
        assert len(pool) == 10 and len(set(pool)) == 10
        assert query_id not in pool
        assert all(corpus[c].image_id != corpus[query_id].image_id for c in pool)
        assert set(pool) <= set(everything)


@pytest.mark.parametrize("modality", ["image", "text"])
def test_similarity_pools_equal_brute_force(world, modality):
    corpus, table = world
    train, val = corpus.ids_in_split("train"), corpus.ids_in_split("val")
    queries = val + train[:10]
    pools = sample_candidate_pools(corpus, table, queries, train, k=7, method=f"{modality}_sim", show_progress=False)
    for query_id in queries:
        assert pools[query_id] == brute_force_nearest(corpus, table, modality, query_id, train, 7)


def test_exact_ties_cannot_leak_same_image_questions():
    """The query and its same-image siblings have identical image vectors (a tie at the very top): all must be
    excluded however the tie falls, and tied items from other images are ordered by pool position."""
    corpus, table = make_world(n_images=6, per_image=(4,), dim=4)
    image = np.array(table.image)
    image[corpus.row_of(120)] = image[corpus.row_of(100)]  # image 5 now looks exactly like image 0
    image[corpus.row_of(121)] = image[corpus.row_of(100)]
    tied = FeatureTable(corpus.ids, image, table.text)
    pools = sample_candidate_pools(corpus, tied, [100], corpus.ids, k=3, method="image_sim", show_progress=False)
    assert pools[100][:2] == [120, 121]  # exact tie, broken by position; 101..103 (same image) absent
    assert not {101, 102, 103} & set(pools[100])
    # with k so small that only tied items fit, the chosen ones are still the earliest-positioned
    reversed_pool = list(reversed(corpus.ids))
    pools = sample_candidate_pools(corpus, tied, [100], reversed_pool, k=1, method="image_sim", show_progress=False)
    assert pools[100] == [121]


@pytest.mark.parametrize("method", METHODS)
def test_determinism_and_independence_from_other_queries(world, method):
    corpus, table = world
    train = corpus.ids_in_split("train")
    queries = corpus.ids_in_split("val")
    a = sample_candidate_pools(corpus, table, queries, train, k=6, method=method, seed=3, show_progress=False)
    b = sample_candidate_pools(corpus, table, queries, train, k=6, method=method, seed=3, show_progress=False)
    assert a == b
    # a query's pool does not depend on which other queries are sampled, their order, or the batching
    alone = sample_candidate_pools(corpus, table, queries[::-1][:2], train, k=6, method=method, seed=3,
                                   batch_size=1, show_progress=False)
    assert all(alone[q] == a[q] for q in alone)
    if method in ("random", "mix"):
        c = sample_candidate_pools(corpus, table, queries, train, k=6, method=method, seed=4, show_progress=False)
        assert c != a


def test_random_pools_are_uniform_over_eligible_items(world):
    corpus, table = world
    train = corpus.ids_in_split("train")
    query = train[0]
    allowed = eligible(corpus, query, train)
    counts = dict.fromkeys(allowed, 0)
    for seed in range(300):
        for c in sample_candidate_pools(corpus, None, [query], train, k=5, seed=seed, show_progress=False)[query]:
            counts[c] += 1
    expected = 300 * 5 / len(allowed)
    assert min(counts.values()) > 0.4 * expected and max(counts.values()) < 1.8 * expected


def test_mix_is_deduplicated_and_follows_quotas(world):
    corpus, table = world
    train = corpus.ids_in_split("train")
    queries = corpus.ids_in_split("val")
    k = 12
    mixed = sample_candidate_pools(corpus, table, queries, train, k=k, method="mix", show_progress=False)
    image = sample_candidate_pools(corpus, table, queries, train, k=k, method="image_sim", show_progress=False)
    for query_id, pool in mixed.items():
        assert len(pool) == k and len(set(pool)) == k
        # the image-similarity quota (3 of 12) is the image ranking's best items not already taken
        assert set(image[query_id][:3]) <= set(pool)
    assert mix_quotas(12, {"random": 0.5, "image_sim": 0.25, "text_sim": 0.25}) == {
        "random": 6, "image_sim": 3, "text_sim": 3}
    assert mix_quotas(10, {"a": 1, "b": 1, "c": 1}) == {"a": 4, "b": 3, "c": 3}
    assert sum(mix_quotas(7, {"a": 0.2, "b": 0.3, "c": 0.5}).values()) == 7


def test_mix_fills_up_when_methods_overlap(world):
    """Two identical rankings overlap completely: de-duplication must still fill k from the rankings."""
    corpus, table = world
    train = corpus.ids_in_split("train")
    queries = corpus.ids_in_split("val")
    same_text = FeatureTable(corpus.ids, table.image, table.image)  # text ranking == image ranking
    pools = sample_candidate_pools(corpus, same_text, queries, train, k=8, method="mix",
                                   mix={"image_sim": 1, "text_sim": 1}, show_progress=False)
    image = sample_candidate_pools(corpus, same_text, queries, train, k=8, method="image_sim", show_progress=False)
    for query_id in queries:
        assert len(pools[query_id]) == 8 and len(set(pools[query_id])) == 8
        assert pools[query_id] == image[query_id]


def test_k_larger_than_available_returns_every_eligible_item(world, caplog):
    corpus, table = world
    pool_ids = corpus.ids[:9]  # images 0..4: sizes 1, 2, 3, 1, 2
    with caplog.at_level(logging.WARNING):
        pools = sample_candidate_pools(corpus, table, [corpus.ids[0], corpus.ids[2]], pool_ids, k=50,
                                       method="mix", show_progress=False)
    assert "fewer than k=50" in caplog.text
    for query_id, pool in pools.items():
        assert sorted(pool) == sorted(eligible(corpus, query_id, pool_ids))
    for method in ("random", "image_sim", "text_sim"):
        pools = sample_candidate_pools(corpus, table, [corpus.ids[0]], pool_ids, k=50, method=method,
                                       show_progress=False)
        assert sorted(pools[corpus.ids[0]]) == sorted(eligible(corpus, corpus.ids[0], pool_ids))


def test_shuffle_permutes_the_same_pool(world):
    corpus, table = world
    train = corpus.ids_in_split("train")
    queries = corpus.ids_in_split("val")
    ranked = sample_candidate_pools(corpus, table, queries, train, k=10, method="image_sim", show_progress=False)
    shuffled = sample_candidate_pools(corpus, table, queries, train, k=10, method="image_sim", shuffle=True,
                                      show_progress=False)
    assert all(sorted(ranked[q]) == sorted(shuffled[q]) for q in queries)
    assert any(ranked[q] != shuffled[q] for q in queries)


def test_features_loaded_memory_mapped_give_the_same_pools(world, tmp_path):
    corpus, table = world
    table.save(tmp_path / "f")
    loaded = FeatureTable.load(tmp_path / "f")
    train = corpus.ids_in_split("train")
    queries = corpus.ids_in_split("val")
    for method in ("image_sim", "mix"):
        assert sample_candidate_pools(corpus, loaded, queries, corpus.ids, k=5, method=method,
                                      show_progress=False) == sample_candidate_pools(
            corpus, table, queries, corpus.ids, k=5, method=method, show_progress=False)
    assert sample_candidate_pools(corpus, loaded, queries, train, k=5, method="text_sim", show_progress=False)


def test_bad_arguments(world):
    corpus, table = world
    ids = corpus.ids
    with pytest.raises(ValueError, match="unknown sampler"):
        sample_candidate_pools(corpus, table, ids[:1], ids, k=3, method="nearest")
    with pytest.raises(ValueError, match="k must be positive"):
        sample_candidate_pools(corpus, table, ids[:1], ids, k=0)
    with pytest.raises(ValueError, match="query_ids contains duplicates"):
        sample_candidate_pools(corpus, table, [ids[0], ids[0]], ids, k=3)
    with pytest.raises(ValueError, match="pool_ids contains duplicates"):
        sample_candidate_pools(corpus, table, ids[:1], ids + ids[:1], k=3)
    with pytest.raises(ValueError, match="needs a FeatureTable"):
        sample_candidate_pools(corpus, None, ids[:1], ids, k=3, method="image_sim")
    with pytest.raises(ValueError, match="only used with method='mix'"):
        sample_candidate_pools(corpus, table, ids[:1], ids, k=3, mix={"random": 1})
    with pytest.raises(ValueError, match="unknown mix methods"):
        sample_candidate_pools(corpus, table, ids[:1], ids, k=3, method="mix", mix={"bm25": 1})
    with pytest.raises(KeyError, match="unknown corpus id"):
        sample_candidate_pools(corpus, table, [-5], ids, k=3)
    shuffled = FeatureTable(list(reversed(table.ids)), table.image[::-1], table.text[::-1])
    with pytest.raises(ValueError, match="aligned_to"):
        sample_candidate_pools(corpus, shuffled, ids[:1], ids, k=3, method="image_sim")


def test_queries_from_another_corpus_get_the_pools_the_same_items_get_inside_it(world):
    """New items (their own corpus and features) are sampled against the pool exactly as the same items inside the
    pool's corpus: same rankings, same-image exclusion across the corpora."""
    corpus, table = world
    query_ids = corpus.ids_in_split("val")[:6] + corpus.ids_in_split("train")[:3]
    pool_ids = corpus.ids_in_split("train")
    copies = Corpus.from_records([
        {"id": f"new-{q}", "question": corpus[q].question, "answers": [], "image_id": corpus[q].image_id}
        for q in query_ids
    ])
    rows = table.rows_of(query_ids)
    copy_features = FeatureTable(copies.ids, table.image[rows], table.text[rows])
    for method in ("image_sim", "text_sim"):
        inside = sample_candidate_pools(corpus, table, query_ids, pool_ids, 5, method=method, show_progress=False)
        outside = sample_candidate_pools(corpus, table, copies.ids, pool_ids, 5, method=method, show_progress=False,
                                         query_corpus=copies, query_features=copy_features)
        assert [outside[f"new-{q}"] for q in query_ids] == [inside[q] for q in query_ids]
    named = FeatureTable(table.ids, table.image, table.text, {"featurizer": "fallback"})
    other = FeatureTable(copies.ids, table.image[rows], table.text[rows], {"featurizer": "clip"})
    with pytest.raises(ValueError, match=r"query features come from clip \(.*the pool's from fallback"):
        sample_candidate_pools(corpus, named, copies.ids, pool_ids, 5, method="image_sim", show_progress=False,
                               query_corpus=copies, query_features=other)
    with pytest.raises(ValueError, match="needs query_corpus"):
        sample_candidate_pools(corpus, table, query_ids, pool_ids, 5, query_features=copy_features)
