"""RCE warm-up: weights and temperature schedule on hand-computed cases, the loss against a direct computation,
the scored-file grouping, and a learning check (RCE raises the likelihood of each group's best sequence)."""

import json
import math

import pytest
import torch

from trl_icd.rce import (
    RCECollator,
    RCEConfig,
    RCETrainer,
    build_rce_dataset,
    group_scored_records,
    rce_group_weights,
    rce_loss,
    rce_temperature,
    read_scored_jsonl,
    sequence_nll,
)


def test_temperature_schedule_linear_from_start_to_end():
    # T = 11 steps: τ(0) = 2.0, τ(5) = 2.0 + (0.5 - 2.0) * 5/10 = 1.25, τ(10) = 0.5, clamped afterwards.
    assert rce_temperature(0, 11) == pytest.approx(2.0)
    assert rce_temperature(5, 11) == pytest.approx(1.25)
    assert rce_temperature(10, 11) == pytest.approx(0.5)
    assert rce_temperature(50, 11) == pytest.approx(0.5)
    assert rce_temperature(3, 4, start=1.0, end=0.1) == pytest.approx(0.1)
    assert rce_temperature(1, 4, start=1.0, end=0.1) == pytest.approx(0.7)
    assert rce_temperature(0, 1) == pytest.approx(2.0)


def test_softmax_weights_hand_computed():
    rewards = torch.tensor([2.0, 1.6, 0.0, 1.0, 1.0, float("nan"), 3.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2])
    w = rce_group_weights(rewards, groups, temperature=0.5)
    e = [math.exp(2.0 / 0.5), math.exp(1.6 / 0.5), math.exp(0.0)]
    expected = [x / sum(e) for x in e] + [0.5, 0.5, 0.0, 1.0]
    assert w.tolist() == pytest.approx(expected, abs=1e-6)
    # higher temperature -> flatter weights
    w_hot = rce_group_weights(rewards, groups, temperature=2.0)
    assert w_hot[0] < w[0] and w_hot[2] > w[2]


def test_top1_weights_pick_best_reward_not_first_and_share_ties():
    rewards = torch.tensor([0.0, 2.0, 1.0, 1.5, 1.5, 0.2])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    w = rce_group_weights(rewards, groups, temperature=1.0, weighting="top1")
    assert w.tolist() == pytest.approx([0.0, 1.0, 0.0, 0.5, 0.5, 0.0])


def test_unknown_weighting_is_an_error():
    with pytest.raises(ValueError, match="softmax"):
        rce_group_weights(torch.zeros(2), torch.zeros(2, dtype=torch.long), 1.0, weighting="nope")


def test_loss_is_mean_over_groups_of_weighted_nll():
    nll = torch.tensor([1.0, 3.0, 2.0, 5.0], requires_grad=True)
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])
    groups = torch.tensor([0, 0, 1, 1])
    w0 = math.exp(1.0) / (math.exp(1.0) + 1.0)
    expected = (w0 * 1.0 + (1 - w0) * 3.0 + 0.5 * 2.0 + 0.5 * 5.0) / 2
    loss = rce_loss(nll, rewards, groups, temperature=1.0)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert nll.grad.tolist() == pytest.approx([w0 / 2, (1 - w0) / 2, 0.25, 0.25], rel=1e-6)


def test_grouping_dedups_and_drops_flat_groups(tmp_path):
    path = tmp_path / "scored.jsonl"
    lines = [
        {"query_id": 1, "demo_ids": [5, 6], "source": "beam", "components": {"hard": 1, "soft": 1.0}},
        {"query_id": 1, "demo_ids": [5, 6], "source": "sample", "components": {"hard": 0, "soft": 0.0}},
        {"query_id": 1, "demo_ids": [6, 5], "source": "random", "components": {"hard": 0, "soft": 0.0}},
        {"query_id": 2, "demo_ids": [7], "source": "beam", "components": {"hard": 0, "soft": 0.0}},
        {"query_id": 2, "demo_ids": [8], "source": "random", "components": {"hard": 0, "soft": 0.0}},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    records = read_scored_jsonl(str(path))
    groups, counts = group_scored_records(records, lambda c: c["hard"] + c["soft"])
    assert groups == {1: [((5, 6), 2.0), ((6, 5), 0.0)]}  # order matters: (5, 6) and (6, 5) are different prompts
    assert counts["duplicates"] == 1 and counts["flat_groups"] == 1 and counts["dropped_flat_groups"] == 1
    kept, counts = group_scored_records(records, lambda c: c["hard"] + c["soft"], drop_flat_groups=False)
    assert set(kept) == {1, 2} and counts["flat_groups"] == 1

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query_id": 1}\n')
    with pytest.raises(ValueError, match="demo_ids"):
        read_scored_jsonl(str(bad))


def _record(query_id, demo_ids, soft, scorer="s1"):
    return {"query_id": query_id, "demo_ids": list(demo_ids), "source": "beam", "scorer": scorer,
            "components": {"hard": float(soft > 0), "soft": soft}}


def _reward(components):
    return components["hard"] + components["soft"]


def test_grouping_drops_sequences_outside_the_shot_range(caplog):
    records = [
        _record(1, [5], 1.0),  # 1 shot: below min_shots = 2
        _record(1, [5, 6], 0.6),
        _record(1, [6, 5], 0.0),
        _record(1, [5, 6, 7], 1.0),  # 3 shots: above max_shots = 2
        _record(2, [8], 0.3),
        _record(2, [8, 9, 10], 0.9),
    ]
    with caplog.at_level("WARNING", logger="trl_icd.rce"):
        groups, counts = group_scored_records(records, _reward, min_shots=2, max_shots=2)
    assert groups == {1: [((5, 6), 1.6), ((6, 5), 0.0)]}  # query 2 has nothing left
    assert counts["outside_shot_range"] == 4 and counts["sequences"] == 2 and counts["queries"] == 1
    assert "4 of 6 scored sequences have a number of demonstrations outside [2, 2]" in caplog.text
    # Without bounds (the old behaviour) every sequence is kept.
    assert group_scored_records(records, _reward)[1]["sequences"] == 6
    with pytest.raises(ValueError, match=r"none of the 2 scored sequences is usable \(2 with a number of demo"):
        group_scored_records([_record(1, [5], 1.0), _record(1, [5, 6, 7], 0.0)], _reward, min_shots=2, max_shots=2)


def test_grouping_never_compares_rewards_of_different_scorers(caplog):
    records = [
        _record(1, [5, 6], 1.0, "a"),
        _record(1, [6, 5], 0.0, "a"),
        _record(1, [5, 7], 0.3, "b"),  # the same query scored by another scorer: not comparable
        _record(1, [7, 8], 0.0, "a"),
        _record(2, [9, 10], 0.9, "b"),
        _record(2, [10, 9], 0.0, "b"),
        _record(2, [9, 11], 0.6, "a"),
    ]
    with caplog.at_level("WARNING", logger="trl_icd.rce"):
        groups, counts = group_scored_records(records, _reward)
    # each query keeps the scorer with the most sequences: "a" for query 1, "b" for query 2
    assert groups == {1: [((5, 6), 2.0), ((6, 5), 0.0), ((7, 8), 0.0)], 2: [((9, 10), 1.9), ((10, 9), 0.0)]}
    assert counts["mixed_scorer_queries"] == 2 and counts["mixed_scorer_sequences"] == 2
    assert "2 queries hold sequences of several scorers" in caplog.text
    # the same selection scored by two scorers is not a duplicate of itself
    same = [_record(1, [5, 6], 1.0, "a"), _record(1, [5, 6], 0.0, "b"), _record(1, [6, 5], 0.0, "b")]
    assert group_scored_records(same, _reward)[0] == {}  # "b" keeps the query, and its group is flat
    kept, counts = group_scored_records(same, _reward, drop_flat_groups=False)
    assert kept == {1: [((5, 6), 0.0), ((6, 5), 0.0)]} and counts.get("duplicates", 0) == 0
    # an explicit scorer keeps only its records
    only_a, counts = group_scored_records(records, _reward, scorer="a")
    assert set(only_a) == {1} and counts["other_scorer"] == 3  # query 2's lone "a" sequence is a flat group
    with pytest.raises(ValueError, match="from other scorers than c"):
        group_scored_records(records, _reward, scorer="c")


def test_rce_loss_stays_in_nll_scale_once_unreachable_shot_counts_are_dropped():
    """A selector built for exactly 2 shots gives 1- and 3-shot sequences an NLL of ~1e4 (masked actions); with the
    shot-range rule the RCE loss is back to the scale of log-probabilities over 6 slots."""
    from trl_icd.selector.vocabulary import SelectorVocabulary
    from trl_icd.testing.selector import random_pools, selector_prompts, tiny_selector

    model, tokenizer = tiny_selector(num_items=40, num_slots=6, min_shots=2, max_shots=2)
    pools = random_pools(3, 40, 6, seed=0, sizes=[6])
    prompts = dict(zip(range(3), selector_prompts(pools, tokenizer)))
    records = []
    for q, (_, candidates) in enumerate(pools):
        for positions, soft in [((0,), 1.0), ((0, 1), 0.6), ((2, 3), 0.0), ((1, 4), 0.3), ((0, 1, 2), 1.0)]:
            records.append(_record(q, [candidates[k] for k in positions], soft))

    def completion(q, demo_ids):
        position = {c: k for k, c in enumerate(pools[q][1])}
        return " ".join(SelectorVocabulary.slot_word(position[d]) for d in demo_ids)

    def loss_of(groups):
        dataset = build_rce_dataset(groups, prompts.__getitem__, completion)
        batch = RCECollator(tokenizer)(list(dataset))
        with torch.no_grad():
            nll = sequence_nll(model.eval(), batch)
        return rce_loss(nll, batch["rewards"], batch["group_index"], temperature=1.0).item(), nll

    unfiltered, nll = loss_of(group_scored_records(records, _reward)[0])
    assert unfiltered > 1e3 and nll.max() > 1e3  # the failure: 1- and 3-shot sequences are impossible actions
    groups, counts = group_scored_records(records, _reward, min_shots=2, max_shots=2)
    assert counts["outside_shot_range"] == 6 and counts["sequences"] == 9
    filtered, nll = loss_of(groups)
    # a fresh selector is uniform: 2 slots of 6 then a forced stop -> NLL = log 6 + log 5 for every sequence
    assert nll.tolist() == pytest.approx([math.log(6) + math.log(5)] * 9, abs=1e-3)
    assert filtered == pytest.approx(math.log(30), abs=1e-3)


def _tiny_lm(tokenizer):
    from trl_icd.testing.text import tiny_qwen2_lm

    return tiny_qwen2_lm(tokenizer, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1)


@pytest.fixture(scope="module")
def tokenizer():
    from trl_icd.testing.tokenizer import tiny_chat_tokenizer

    return tiny_chat_tokenizer()


def test_collator_layout_matches_grpo(tokenizer):
    collator = RCECollator(tokenizer)
    batch = collator(
        [
            {"prompt": "Question: what", "completions": ["red", "a blue square"], "rewards": [1.0, 0.0]},
            {"prompt": "dog", "completions": ["yes"], "rewards": [None]},
        ]
    )
    assert batch["group_index"].tolist() == [0, 0, 1]
    assert math.isnan(batch["rewards"][2])
    # prompts left-padded, completions right-padded and ended by eos
    assert batch["prompt_mask"][2, 0] == 0 and batch["prompt_mask"][2, -1] == 1
    for j in range(3):
        n = int(batch["completion_mask"][j].sum())
        assert batch["completion_ids"][j, n - 1] == tokenizer.eos_token_id
        assert batch["completion_mask"][j, n:].sum() == 0


def test_sequence_nll_equals_direct_computation(tokenizer):
    model = _tiny_lm(tokenizer).eval()
    rows = [{"prompt": "Question: what colour", "completions": ["blue", "a red circle"], "rewards": [1.0, 0.0]}]
    batch = RCECollator(tokenizer)(rows)
    nll = sequence_nll(model, batch)
    for j, text in enumerate(rows[0]["completions"]):
        p = tokenizer(rows[0]["prompt"])["input_ids"]
        c = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([p + c])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        direct = -sum(logp[len(p) - 1 + t, tok].item() for t, tok in enumerate(c))
        assert nll[j].item() == pytest.approx(direct, rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("weighting", ["softmax", "top1"])
def test_rce_raises_likelihood_of_best_sequences(tokenizer, tmp_path, weighting):
    # Four queries; in each group one completion has a clearly higher reward. After RCE the best completion must be
    # more likely than before, and more likely than every other member of its group.
    words = ["red", "blue", "circle", "square", "dog", "cat"]
    groups = {}
    for q, prompt in enumerate(["what colour", "what shape", "which animal", "Question: what"]):
        best = words[(2 * q) % len(words)]
        others = [w for w in words if w != best][:3]
        groups[q] = [((best,), 2.0)] + [((w,), 0.0 if i else 0.6) for i, w in enumerate(others)]
    prompts = {0: "what colour", 1: "what shape", 2: "which animal", 3: "Question: what"}
    dataset = build_rce_dataset(groups, prompt_fn=prompts.__getitem__, completion_fn=lambda q, d: " ".join(d))

    model = _tiny_lm(tokenizer)
    collator = RCECollator(tokenizer)
    batch = collator(list(dataset))
    best = torch.tensor([r == 2.0 for row in dataset["rewards"] for r in row])
    model.eval()
    with torch.no_grad():
        before = sequence_nll(model, batch)

    args = RCEConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        max_steps=120,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        rce_weighting=weighting,
        logging_steps=10,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = RCETrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "rce/temperature" in h]
    assert logged[0]["rce/temperature"] > 1.8 and logged[-1]["rce/temperature"] == pytest.approx(0.5, abs=0.1)
    model.eval()
    with torch.no_grad():
        after = sequence_nll(model, batch)
    assert (after[best] < before[best] - 1.0).all(), (before[best], after[best])
    group_index = batch["group_index"]
    for g in range(4):
        members = group_index == g
        assert after[members & best].item() < after[members & ~best].min().item()
