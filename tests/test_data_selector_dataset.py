"""The selector dataset: prompt / query_id / candidate_ids rows built from candidate pools."""

import pytest

from trl_icd.data import Corpus, build_selector_dataset, sample_candidate_pools
from trl_icd.selector.vocabulary import SelectorVocabulary


@pytest.fixture(scope="module")
def corpus():
    # ids are not rows: row i holds id 1000 + 7 * i, so a prompt naming ids instead of rows would be caught
    return Corpus.from_records(
        {"id": 1000 + 7 * i, "question": f"q{i}", "answers": ["a"], "image_id": i // 2,
         "split": "train" if i < 16 else "val"}
        for i in range(20)
    )


def test_columns_and_prompts_name_feature_rows(corpus):
    vocabulary = SelectorVocabulary(num_slots=4, item_vocab="token", num_items=len(corpus))
    pools = {1000 + 7 * 17: [1000 + 7 * 3, 1000 + 7 * 0, 1000 + 7 * 9], 1000 + 7 * 16: [1000 + 7 * 5]}
    dataset = build_selector_dataset(corpus, pools, vocabulary=vocabulary)
    assert dataset.column_names == ["prompt", "query_id", "candidate_ids"]
    assert dataset["query_id"] == list(pools)
    assert dataset["candidate_ids"] == list(pools.values())
    assert dataset[0]["prompt"] == "<item_17> <item_3> <item_0> <item_9> <empty>"
    assert dataset[1]["prompt"] == "<item_16> <item_5> <empty> <empty> <empty>"


def test_from_sampled_pools_with_default_slots(corpus):
    train, val = corpus.ids_in_split("train"), corpus.ids_in_split("val")
    pools = sample_candidate_pools(corpus, None, val, train, k=5, seed=1, show_progress=False)
    from trl_icd.selector import selector_prompt

    dataset = build_selector_dataset(corpus, pools)  # num_slots = longest pool = 5
    assert len(dataset) == len(val)
    for row in dataset:
        expected = selector_prompt(corpus.row_of(row["query_id"]), [corpus.row_of(c) for c in row["candidate_ids"]], 5)
        assert row["prompt"] == expected and row["candidate_ids"] == pools[row["query_id"]]


def test_errors(corpus):
    ids = corpus.ids
    with pytest.raises(ValueError, match="no pools"):
        build_selector_dataset(corpus, {})
    with pytest.raises(ValueError, match="num_slots=2"):
        build_selector_dataset(corpus, {ids[0]: ids[2:5]}, num_slots=2)
    with pytest.raises(ValueError, match="in its own candidate pool"):
        build_selector_dataset(corpus, {ids[0]: [ids[0], ids[3]]})
    with pytest.raises(ValueError, match="duplicates"):
        build_selector_dataset(corpus, {ids[0]: [ids[3], ids[3]]})
    with pytest.raises(KeyError, match="unknown corpus id"):
        build_selector_dataset(corpus, {ids[0]: [-1]})
