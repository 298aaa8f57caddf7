"""The building blocks the end-to-end scripts share: argument checks, which feature tables a selector accepts, fixed
shot counts, and how RL-data sequences are drawn from a pool."""

import numpy as np
import pytest
from e2e_scripts import load_script

from trl_icd.data import Corpus
from trl_icd.data.features import FeatureTable
from trl_icd.pipeline import DataArguments, DataBundle, RewardArguments, fixed_shots


def _bundle(n=6):
    corpus = Corpus.from_records(
        [{"id": i, "question": f"q{i}", "answers": ["a"] * 10, "image_id": i, "split": "train"} for i in range(n)]
    )
    # Image similarity to item 0 falls with the id: row i = (1 - i/10, sqrt(1 - (1 - i/10)^2)).
    x = 1.0 - np.arange(n) / 10.0
    image = np.stack([x, np.sqrt(1.0 - x**2)], axis=1).astype(np.float32)
    # Text similarity to item 0 rises with the id: row 0 = (1, 0), row i = (0.4 + i/10, ...).
    t = np.concatenate([[1.0], 0.4 + np.arange(1, n) / 10.0])
    text = np.stack([t, np.sqrt(1.0 - t**2)], axis=1).astype(np.float32)
    features = FeatureTable(corpus.ids, image, text)
    return DataBundle(corpus, features, corpus.ids, [])


def test_argument_checks():
    with pytest.raises(ValueError, match="dataset_path"):
        DataArguments(dataset="okvqa")
    with pytest.raises(ValueError, match="dataset must be"):
        DataArguments(dataset="coco")
    with pytest.raises(ValueError, match="vllm_server_url"):
        RewardArguments(reward_backend="vllm")
    assert RewardArguments().vqa_protocol == "vqa"
    with pytest.raises(ValueError, match="Unknown VQA protocol"):
        RewardArguments(vqa_protocol="vqa2021")


def test_similarity_sequences_are_ranked_windows_most_similar_last():
    generate = load_script("generate_rl_data")
    data = _bundle()
    pool = [5, 3, 1, 2, 4]
    # image similarity to query 0: 1 > 2 > 3 > 4 > 5; windows of 2, most similar last
    assert generate.similarity_sequences(data, 0, pool, "image", 2, 3) == [(2, 1), (4, 3)]
    # text similarity runs the other way
    assert generate.similarity_sequences(data, 0, pool, "text", 2, 1) == [(4, 5)]
    picks = generate.random_sequences(0, pool, 2, 3, seed=0)
    assert picks == generate.random_sequences(0, pool, 2, 3, seed=0)  # deterministic
    assert all(len(set(p)) == 2 and set(p) <= set(pool) for p in picks)


def test_selector_reads_any_table_of_its_featuriser_and_refuses_another():
    from trl_icd.selector import ICDSelectorForCausalLM

    data = _bundle()
    data.features.meta["featurizer"] = "fallback"
    model = ICDSelectorForCausalLM.from_features(data.features, num_slots=4, max_shots=2, hidden_size=16, num_heads=2)
    # new values from the same featuriser (other queries, another pool): accepted, and recorded as the table read
    shifted = FeatureTable(data.features.ids, data.features.image[::-1].copy(), data.features.text, {"featurizer": "fallback"})
    model.attach_features(shifted)
    assert model.config.feature_table["hash"] == shifted.content_hash != data.features.content_hash
    other = FeatureTable(data.features.ids, data.features.image, data.features.text, {"featurizer": "clip", "model": "x"})
    with pytest.raises(ValueError, match=r"fallback \(image 2 \+ text 2.*clip:x \(image 2 \+ text 2"):
        model.attach_features(other)

    with fixed_shots(model, 1):
        assert (model.config.min_shots, model.config.max_shots) == (1, 1)
    assert (model.config.min_shots, model.config.max_shots) == (1, 2)
    with pytest.raises(ValueError, match="1..2"):
        with fixed_shots(model, 3):
            pass
    assert (model.config.min_shots, model.config.max_shots) == (1, 2)


def test_evaluation_script_accepts_the_selector_flag_and_rejects_unknown_flags():
    """`--selector` (as in the design's command line) is an alias of `--selectors`; a typo is an error, not ignored."""
    from trl_icd.pipeline import SelectorArguments, parse_script_arguments

    types = (load_script("evaluate_okvqa").EvalArguments, DataArguments, RewardArguments, SelectorArguments)
    args, *_ = parse_script_arguments(types, ["--selector", "ckpt_a", "ckpt_b", "--shots", "0", "1"])
    assert args.selectors == ["ckpt_a", "ckpt_b"] and args.shots == [0, 1]
    with pytest.raises(SystemExit):
        parse_script_arguments(types, ["--selectorz", "ckpt"])


def test_load_features_uses_an_exact_table_as_is_subsets_a_larger_one_and_names_missing_items(tmp_path, caplog):
    import logging

    from trl_icd.pipeline import load_features

    data = _bundle()
    data.features.save(tmp_path / "t")
    args = DataArguments(features_path=str(tmp_path / "t"))
    exact = load_features(args, data.corpus)
    assert isinstance(exact.image, np.memmap)  # mapped, no copy
    subset = data.corpus.filter(lambda item: item.id in (4, 1))
    with caplog.at_level(logging.WARNING):
        smaller = load_features(args, subset)
    assert "in-memory copy of the 2 rows" in caplog.text
    assert smaller.ids == [1, 4] and np.array_equal(smaller.image, data.features.image[[1, 4]])
    larger = Corpus.from_records([{"id": i, "question": "q", "answers": ["a"] * 10, "split": "val"} for i in (3, 9)])
    with pytest.raises(ValueError, match=r"no features for some of the 2 items.*export_features"):
        load_features(args, larger)
