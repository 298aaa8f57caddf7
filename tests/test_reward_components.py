"""Reward components on hand-computed cases."""

import math

import pytest

from trl_icd.rewards.components import (
    distinct_gold_answers,
    edit_similarity,
    gt_probability,
    relevance,
    reward_components,
    token_f1,
)


def test_gt_probability_weights_each_distinct_answer_by_its_count():
    answers = ["dog"] * 4 + ["cat"] * 2 + ["puppy"] + ["", "  "] + ["dog"]
    logprobs = {"dog": math.log(0.5), "cat": math.log(0.2), "puppy": math.log(0.1)}
    # min(5/3, 1)·0.5 + (2/3)·0.2 + (1/3)·0.1; blank annotations are never scored
    assert gt_probability(answers, logprobs) == pytest.approx(0.5 + 0.2 * 2 / 3 + 0.1 / 3)


def test_gt_probability_needs_every_gold_answer():
    with pytest.raises(ValueError, match="cat"):
        gt_probability(["dog", "cat"], {"dog": -1.0})


def test_distinct_gold_answers_keeps_order_and_drops_blanks():
    assert distinct_gold_answers(["b", "a", "b", " ", "", "c", "a"]) == ["b", "a", "c"]


def test_token_f1_and_edit_similarity():
    assert token_f1("big red car", "red car") == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))  # 0.8
    assert token_f1("blue", "red") == 0.0
    assert edit_similarity("dogs", "dog") == pytest.approx(2 * 3 / 7)
    assert edit_similarity("dog", "dog") == 1.0


def test_relevance_normalises_and_takes_the_best_measure():
    # "A big red car" -> "big red car": token-F1 0.8 beats edit similarity 14/18 against "red car"
    assert relevance("A big red car", ["red car", "blue"]) == pytest.approx(0.8)
    # "Dogs" -> "dogs": no shared token, edit similarity 6/7 against "dog"
    assert relevance("Dogs", ["dog", "cat"]) == pytest.approx(6 / 7)
    assert relevance("", ["dog"]) == 0.0
    assert relevance("dog", ["", "dog"]) == 1.0


def test_reward_components_hand_computed():
    answers = ["dog"] * 2 + ["cat"] * 8
    logprobs = {"dog": math.log(0.3), "cat": math.log(0.6)}
    comps = reward_components("Dog", answers, logprobs)
    # 2 of 10 annotators: leave-one-out mean of min(1, m/3) = (2·1/3 + 8·2/3)/10 = 0.6
    assert comps["soft"] == pytest.approx(0.6)
    assert comps["hard"] == 1.0
    assert comps["gt_prob"] == pytest.approx(0.3 * 2 / 3 + 0.6 * 1.0)
    assert comps["rel"] == 1.0
    assert reward_components("Dog", answers, logprobs, hard_threshold=0.6)["hard"] == 0.0

    # Ten identical gold answers: today's official script normalises neither side ("two" != "2"); the 2016 script
    # normalised the prediction. `rel` always compares normalised answers.
    today = reward_components("two", ["2"] * 10, {"2": -0.5})
    assert (today["soft"], today["hard"], today["rel"]) == (0.0, 0.0, 1.0)
    old = reward_components("two", ["2"] * 10, {"2": -0.5}, protocol="vqa2016")
    assert old["soft"] == 1.0 and old["hard"] == 1.0
    # lmms-eval normalisation also for `rel`: commas deleted ("red,white" -> "redwhite" vs official "red white")
    assert reward_components("red,white", ["red white"] * 10, {"red white": -1.0})["rel"] == 1.0
    assert reward_components("red,white", ["redwhite"] * 10, {"redwhite": -1.0}, protocol="lmms_eval")["rel"] == 1.0
    miss = reward_components("horse", answers, logprobs)
    assert miss["soft"] == 0.0 and miss["hard"] == 0.0
    assert 0.0 < miss["rel"] < 1.0
