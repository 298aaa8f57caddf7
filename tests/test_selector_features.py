"""The selector reads its item vectors from a feature table outside the model: checkpoints hold no table, outputs are
what they were when the table was a model buffer, a loaded selector finds its table (or says what it needs), tables
from another featuriser are refused, and a trained selector picks demonstrations for items in no table."""

import gc
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from trl_icd.data import Corpus, FeatureTable, fallback_features, load_okvqa
from trl_icd.data.features import FeaturizerSpec, ItemTable, find_item_table
from trl_icd.pipeline import fixed_shots, select_with_selector
from trl_icd.selector import ICDSelectorForCausalLM, build_selector_tokenizer, pick_demonstrations
from trl_icd.testing.okvqa import write_okvqa_fixture
from trl_icd.testing.selector import random_pools, selector_prompts, tiny_selector

FIXTURES = Path(__file__).with_name("fixtures")
# Recorded from the selector when its table was a persistent buffer of the model (same seed, same sequences).
REFERENCE = json.loads((FIXTURES / "selector_reference.json").read_text())
REFERENCE_SELECTOR = dict(num_items=40, feature_dim=16, num_slots=6, min_shots=1, max_shots=4, seed=7, peaked=True)


def random_table(n, image_dim=8, text_dim=8, seed=0, featurizer="synthetic"):
    rng = np.random.default_rng(seed)
    unit = lambda m: (m / np.linalg.norm(m, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    image, text = unit(rng.standard_normal((n, image_dim))), unit(rng.standard_normal((n, text_dim)))
    return FeatureTable(list(range(n)), image, text, {"featurizer": featurizer})


def greedy_completions(model, tokenizer, pools):
    encoded = tokenizer(selector_prompts(pools, tokenizer), return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**encoded, do_sample=False, max_new_tokens=model.config.max_completion_length)
    return [[t for t in row if t != tokenizer.pad_token_id] for row in out[:, encoded["input_ids"].shape[1] :].tolist()]


def completion_log_probs(model, record):
    ids, mask = torch.tensor(record["sampled_input_ids"]), torch.tensor(record["sampled_attention_mask"])
    start = record["prompt_length"]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    return logits[:, start - 1 : -1].log_softmax(-1).gather(-1, ids[:, start:, None])[..., 0]


def check_against_reference(model, tokenizer, record):
    model.eval()
    pools = [tuple(p) for p in record["pools"]]
    assert greedy_completions(model, tokenizer, pools) == record["greedy_completions"]
    with fixed_shots(model, 3):
        assert greedy_completions(model, tokenizer, pools) == record["greedy_completions_3_shots"]
    log_probs = completion_log_probs(model, record)
    scored = torch.tensor(record["sampled_attention_mask"])[:, record["prompt_length"] :].bool()
    torch.testing.assert_close(log_probs[scored], torch.tensor(record["completion_log_probs"])[scored], rtol=0, atol=1e-6)


# ---- the checkpoint holds weights only ------------------------------------------------------------------------------


def test_saved_selector_holds_no_table_and_its_size_does_not_grow_with_the_items(tmp_path):
    sizes = {}
    for n in (50, 5000):
        table = random_table(n, seed=n)
        model = ICDSelectorForCausalLM.from_features(table, num_slots=4, max_shots=2, hidden_size=16, num_heads=2)
        model.save_pretrained(tmp_path / str(n))
        weights = tmp_path / str(n) / "model.safetensors"
        sizes[n] = weights.stat().st_size
        with safe_open(weights, framework="pt") as f:
            assert not [key for key in f.keys() if "features" in key]
            assert all(f.get_slice(key).get_shape()[0] != n for key in f.keys())
        config = json.loads((tmp_path / str(n) / "config.json").read_text())
        assert config["feature_table"] == {"hash": table.content_hash, "rows": n, "source": "in memory"}
        assert config["featurizer"] == table.featurizer.to_dict()
        assert not [name for name, _ in model.named_buffers() if name != "lm_head.weight"]
    assert sizes[50] == sizes[5000]


def test_a_loaded_selector_finds_its_table_or_says_what_it_needs(tmp_path):
    table = random_table(30, seed=1)
    table.save(tmp_path / "table")
    model = ICDSelectorForCausalLM.from_features(table, num_slots=4, max_shots=2, hidden_size=16, num_heads=2)
    model.save_pretrained(tmp_path / "selector")
    tokenizer = build_selector_tokenizer(model.config)
    pools = random_pools(5, 30, 4, seed=2)
    expected = greedy_completions(model, tokenizer, pools)
    recorded_hash = table.content_hash
    del model, table
    gc.collect()
    assert find_item_table(recorded_hash) is None  # nothing in this process maps it any more

    lost = AutoModelForCausalLM.from_pretrained(tmp_path / "selector")  # strict for weights; the table is not one
    with pytest.raises(RuntimeError, match=rf"none is attached.*{recorded_hash[:12]} \(30 rows x 16"):
        greedy_completions(lost, tokenizer, pools)

    mapped = FeatureTable.load(tmp_path / "table")  # loading registers it: selectors loaded later find it
    assert isinstance(mapped.image, np.memmap) and not mapped.image.flags.writeable
    found = AutoModelForCausalLM.from_pretrained(tmp_path / "selector")
    assert greedy_completions(found, tokenizer, pools) == expected
    assert found.feature_table is mapped.item_table()
    assert greedy_completions(lost, tokenizer, pools) == expected  # resolved at its next use, too
    explicit = ICDSelectorForCausalLM.from_pretrained(tmp_path / "selector", features=mapped)
    assert greedy_completions(explicit, tokenizer, pools) == expected


def test_copies_share_the_table_instead_of_duplicating_it():
    import copy
    import pickle

    model, _ = tiny_selector()
    assert copy.deepcopy(model).feature_table is model.feature_table
    restored = pickle.loads(pickle.dumps(model))  # a pickle carries no table; the copy finds it by hash
    assert restored.model.items.attached_table is None and restored.feature_table is model.feature_table


# ---- same outputs as when the table was a model buffer -------------------------------------------------------------


@pytest.mark.parametrize("item_vocab", ["code", "token"])
def test_same_log_probs_and_greedy_selections_as_the_table_in_the_model(item_vocab):
    model, tokenizer = tiny_selector(**REFERENCE_SELECTOR, item_vocab=item_vocab)
    check_against_reference(model, tokenizer, REFERENCE["models"][item_vocab])


def test_fused_head_log_probs_still_equal_the_recorded_and_the_models_own():
    import copy

    from trl.trainer.utils import add_fused_lm_head

    record = REFERENCE["models"]["code"]
    model, _ = tiny_selector(**REFERENCE_SELECTOR)
    ids, mask = torch.tensor(record["sampled_input_ids"]), torch.tensor(record["sampled_attention_mask"])
    start = record["prompt_length"]
    fused = copy.deepcopy(model)
    add_fused_lm_head(fused, temperature=1.0, outputs=("log_probs",))
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :start] = -100
    with torch.no_grad():
        out = fused(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True).log_probs[:, start - 1 :]
    scored = mask[:, start:].bool()
    torch.testing.assert_close(out[scored], torch.tensor(record["fused_log_probs"])[scored], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[scored], completion_log_probs(model, record)[scored], rtol=0, atol=1e-5)


def test_a_checkpoint_that_stored_its_table_loads_migrated_and_resaves_without_it(tmp_path, caplog):
    legacy = FIXTURES / "legacy_selector"
    with safe_open(legacy / "model.safetensors", framework="np") as f:
        stored = f.get_tensor("model.items.features")
    with caplog.at_level(logging.WARNING):
        model = ICDSelectorForCausalLM.from_pretrained(legacy)
    assert "stores its feature table inside the checkpoint" in caplog.text and "Re-save" in caplog.text
    assert np.array_equal(model.feature_table[np.arange(40)].numpy(), stored)
    tokenizer = build_selector_tokenizer(model.config)
    check_against_reference(model, tokenizer, REFERENCE["models"]["code"])

    model.save_pretrained(tmp_path / "resaved")
    with safe_open(tmp_path / "resaved" / "model.safetensors", framework="pt") as f:
        assert "model.items.features" not in f.keys()
    resaved = ICDSelectorForCausalLM.from_pretrained(tmp_path / "resaved", features=stored)
    check_against_reference(resaved, tokenizer, REFERENCE["models"]["code"])
    # the weights are those the table-in-the-model code produced for this seed
    fresh, _ = tiny_selector(**REFERENCE_SELECTOR)
    for name, value in fresh.state_dict().items():
        assert torch.equal(resaved.state_dict()[name], value), name


# ---- featurisers: same one accepted, another refused ---------------------------------------------------------------


def test_a_table_from_another_featuriser_is_refused_naming_both(tmp_path):
    table = random_table(20, featurizer="fallback")
    model = ICDSelectorForCausalLM.from_features(table, num_slots=4, max_shots=2, hidden_size=16, num_heads=2)
    model.attach_features(random_table(35, seed=3, featurizer="fallback"))  # new items, same featuriser: fine
    assert model.config.feature_table["rows"] == 35
    clip = random_table(20, featurizer="clip")
    clip.meta["model"] = "openai/clip-vit-base-patch32"
    with pytest.raises(ValueError, match=r"fallback \(image 8 \+ text 8.* clip:clip-vit-base-patch32 \(image 8"):
        model.attach_features(clip)
    with pytest.raises(ValueError, match=r"from fallback \(image 8 \+ text 8.*from fallback \(image 16 \+ text 8.*16-dim vectors vs 24-dim"):
        model.attach_features(random_table(20, image_dim=16, featurizer="fallback"))
    model.save_pretrained(tmp_path / "s")
    with pytest.raises(ValueError, match="clip:clip-vit-base-patch32"):
        ICDSelectorForCausalLM.from_pretrained(tmp_path / "s", features=clip)
    with pytest.raises(ValueError, match=r"image_dim 8 vs 12"):
        model.check_featurizer(FeaturizerSpec("fallback", 16, 12, 4, table.featurizer.normalization))


# ---- demonstrations for new queries --------------------------------------------------------------------------------


@pytest.mark.parametrize("item_vocab", ["code", "token"])
def test_feature_path_makes_the_token_paths_choices(item_vocab):
    model, tokenizer = tiny_selector(**REFERENCE_SELECTOR, item_vocab=item_vocab)
    pools = [p for p in random_pools(30, 40, 6, seed=4) if p[1]]  # a query with an empty pool has nothing to pick
    table = model.feature_table
    queries = table[[q for q, _ in pools]]
    candidates = [table[c] for _, c in pools]
    for shots in (None, 1, 3):
        with fixed_shots(model, shots):
            expected = greedy_completions(model, tokenizer, pools)
        expected = [[t - 4 for t in row[:-1]] for row in expected]  # slot tokens (ids 4..) -> positions
        assert model.select_demonstrations(queries, candidates, num_shots=shots) == expected
    assert any(len(e) > 1 for e in expected) and len({tuple(e) for e in expected}) > 3
    # a [Q, K, D] tensor of full pools gives the same as the list
    full = [i for i, (_, c) in enumerate(pools) if len(c) == 6]
    grid = torch.stack([candidates[i] for i in full])
    assert model.select_demonstrations(queries[full], grid) == [model.select_demonstrations(queries, candidates)[i]
                                                                for i in full]


def test_items_in_no_table_get_valid_selections():
    model, _ = tiny_selector(**REFERENCE_SELECTOR)
    generator = torch.Generator().manual_seed(0)
    queries = torch.nn.functional.normalize(torch.randn(25, 16, generator=generator), dim=-1)
    pools = [torch.nn.functional.normalize(torch.randn(1 + n % 6, 16, generator=generator), dim=-1) for n in range(25)]
    for kwargs in ({}, {"num_shots": 2}, {"do_sample": True, "temperature": 1.5}):
        picks = model.select_demonstrations(queries, pools, generator=torch.Generator().manual_seed(1), **kwargs)
        for chosen, pool in zip(picks, pools, strict=True):
            assert len(set(chosen)) == len(chosen) and all(0 <= i < len(pool) for i in chosen)
            low, high = (2, 2) if "num_shots" in kwargs else (1, 4)
            assert min(low, len(pool)) <= len(chosen) <= min(high, len(pool))
    sampled = [model.select_demonstrations(queries, pools, do_sample=True, generator=torch.Generator().manual_seed(s))
               for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]
    assert model.select_demonstrations(queries[:0], []) == []


@pytest.mark.parametrize(
    "queries, pools, kwargs, match",
    [
        (torch.zeros(2, 15), [torch.zeros(3, 16)] * 2, {}, r"query_features must be \[n, 16\]"),
        (torch.zeros(16), [torch.zeros(3, 16)], {}, r"query_features must be \[n, 16\]"),
        (torch.zeros(2, 16), [torch.zeros(3, 16)], {}, "one candidate pool per query: 2 queries, 1 pools"),
        (torch.zeros(1, 16), [torch.zeros(0, 16)], {}, "query 0 has an empty candidate pool"),
        (torch.zeros(1, 16), [torch.zeros(7, 16)], {}, "7 candidates; this selector has 6 slots"),
        (torch.zeros(1, 16), [torch.zeros(3, 8)], {}, r"candidate_features\[0\] must be \[n, 16\]"),
        (torch.zeros(1, 16), torch.zeros(1, 3, 4, 16), {}, r"\[queries, K, 16\]"),
        (torch.full((1, 16), float("nan")), [torch.zeros(3, 16)], {}, "NaN"),
        (torch.zeros(1, 16), [torch.zeros(3, 16)], {"num_shots": 5}, "at most max_shots=4"),
        (torch.zeros(1, 16), [torch.zeros(3, 16)], {"do_sample": True, "temperature": 500.0}, "temperature"),
    ],
)
def test_select_demonstrations_rejects_bad_input(queries, pools, kwargs, match):
    model, _ = tiny_selector(**REFERENCE_SELECTOR)
    with pytest.raises(ValueError, match=match):
        model.select_demonstrations(queries, pools, **kwargs)


@pytest.fixture(scope="module")
def okvqa_pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("pool")
    fixture = write_okvqa_fixture(root, n_train=24, n_val=6, seed=3)
    corpus = load_okvqa(root, splits=["train"])
    return fixture, corpus, fallback_features(corpus, text_dim=64, show_progress=False)


def test_pick_demonstrations_for_new_images_and_questions(okvqa_pool):
    fixture, pool_corpus, pool_features = okvqa_pool
    val = load_okvqa(fixture.root, splits=["val"])  # images and questions the pool has never seen
    queries = [(item.image, item.question) for item in val]
    torch.manual_seed(0)
    model = ICDSelectorForCausalLM.from_features(pool_features, num_slots=8, min_shots=1, max_shots=3,
                                                 hidden_size=16, num_heads=2)
    with torch.no_grad():  # a confident policy, so the choices are not ties
        for parameter in model.model.pointer.parameters():
            parameter.normal_(0.0, 3.0)
    picks = pick_demonstrations(model, queries, pool_corpus, pool_features, k=8, method="image_sim")
    assert len(picks) == len(queries)
    for chosen in picks:
        assert 1 <= len(chosen) <= 3 and len(set(chosen)) == len(chosen) and set(chosen) <= set(pool_corpus.ids)

    # the same steps by hand: featurise, sample, select
    new = fallback_features(val, text_dim=64, show_progress=False)
    pools = {}
    for n, item in enumerate(val):  # the nearest images in the pool, exactly as the sampler ranks them
        scores = pool_features.image @ new.image[n]
        order = np.lexsort((np.arange(len(scores)), -scores))[:8]
        pools[n] = [pool_corpus.ids[i] for i in order]
    chosen = model.select_demonstrations(
        new.combined(), [pool_features.combined_rows(pool_features.rows_of(pools[n])) for n in range(len(val))]
    )
    assert picks == [[pools[n][i] for i in c] for n, c in enumerate(chosen)]
    # a new query's features are exactly what the pool's featuriser gives the same image and question
    item = pool_corpus.item_at(0)
    copy_features = fallback_features(Corpus.from_records([{"id": "x", "image": item.image, "question": item.question,
                                                            "answers": []}]), text_dim=64, show_progress=False)
    np.testing.assert_allclose(copy_features.combined()[0], pool_features.combined()[0], atol=1e-6)


def test_pick_demonstrations_refuses_other_features_and_empty_pools(okvqa_pool):
    _, pool_corpus, pool_features = okvqa_pool
    model = ICDSelectorForCausalLM.from_features(pool_features, num_slots=8, max_shots=2, hidden_size=16, num_heads=2)
    query = [(pool_corpus.item_at(0).image, "What is it?")]
    with pytest.raises(ValueError, match=r"fallback \(image 248 \+ text 64.*fallback \(image 248 \+ text 32"):
        pick_demonstrations(model, query, pool_corpus, pool_features,
                            featurizer=lambda corpus: fallback_features(corpus, text_dim=32, show_progress=False))
    with pytest.raises(ValueError, match="pool is empty"):
        pick_demonstrations(model, query, pool_corpus, pool_features, pool_ids=[])
    with pytest.raises(ValueError, match=r"\(image, question\) pair"):
        pick_demonstrations(model, ["What is it?"], pool_corpus, pool_features)
    clip_table = FeatureTable(pool_features.ids, pool_features.image, pool_features.text, {"featurizer": "clip"})
    with pytest.raises(ValueError, match="clip_model="):
        pick_demonstrations(ICDSelectorForCausalLM.from_features(clip_table, num_slots=8, hidden_size=16, num_heads=2),
                            query, pool_corpus, clip_table)


def test_selector_evaluation_helper_uses_the_table_it_is_given(okvqa_pool):
    """`select_with_selector` (the evaluation's token path) on a corpus the selector was not built on."""
    from trl_icd.pipeline import DataBundle

    fixture, pool_corpus, pool_features = okvqa_pool
    model = ICDSelectorForCausalLM.from_features(pool_features, num_slots=6, max_shots=2, hidden_size=16, num_heads=2)
    tokenizer = build_selector_tokenizer(model.config)
    both = load_okvqa(fixture.root, splits=["train", "val"])
    features = fallback_features(both, text_dim=64, show_progress=False)
    model.attach_features(features)
    data = DataBundle(both, features, both.ids_in_split("train"), both.ids_in_split("val"))
    pools = {q: data.train_ids[i : i + 6] for i, q in enumerate(data.eval_ids)}
    picks = select_with_selector(model, tokenizer, data, pools, data.eval_ids, show_progress=False)
    expected = model.select_demonstrations(
        features.combined_rows(features.rows_of(data.eval_ids)),
        [features.combined_rows(features.rows_of(pools[q])) for q in data.eval_ids],
    )
    assert picks == {q: [pools[q][i] for i in e] for q, e in zip(data.eval_ids, expected, strict=True)}
    assert isinstance(model.feature_table, ItemTable) and len(model.feature_table) == len(both)
