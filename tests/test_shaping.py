"""Reward shaping: every research mode on hand-computed components, against the research formulas."""

import itertools

import pytest

from trl_icd.rewards import REWARD_MODES, shape_reward

ALL_MODES = [
    "hard_plus_soft",
    "hard_plus_soft_v2",
    "separated",
    "hard_only",
    "soft_only",
    "hard01_plus_gtprob",
    "hard01_plus_gtprob_separated",
    "hard_plus_gtprob_plus_rel",
]

CORRECT = {"hard": 1, "soft": 0.6, "gt_prob": 0.2, "rel": 0.9}
WRONG = {"hard": 0, "soft": 0.0, "gt_prob": 0.05, "rel": 0.5}


@pytest.mark.parametrize(
    ("components", "weights", "expected"),
    [
        # default weights (1, 1, 0.1), a correct answer: h=1, s=0.6, p=0.2, rel=0.9
        (CORRECT, {}, {
            "hard_plus_soft": 1.6, "hard_plus_soft_v2": 2.6, "separated": 2.6, "hard_only": 1.0, "soft_only": 0.6,
            "hard01_plus_gtprob": 1.2, "hard01_plus_gtprob_separated": 2.2, "hard_plus_gtprob_plus_rel": 1.2,
        }),
        # weights (2, 0.5, 0.3), the same correct answer
        (CORRECT, {"hard_weight": 2.0, "soft_weight": 0.5, "rel_weight": 0.3}, {
            "hard_plus_soft": 2.3, "hard_plus_soft_v2": 4.3, "separated": 4.3, "hard_only": 2.0, "soft_only": 0.3,
            "hard01_plus_gtprob": 2.1, "hard01_plus_gtprob_separated": 4.1, "hard_plus_gtprob_plus_rel": 2.1,
        }),
        # weights (2, 0.5, 0.3), a wrong answer: h=0, s=0, p=0.05, rel=0.5 -> only p and rel count
        (WRONG, {"hard_weight": 2.0, "soft_weight": 0.5, "rel_weight": 0.3}, {
            "hard_plus_soft": 0.0, "hard_plus_soft_v2": 0.0, "separated": 0.0, "hard_only": 0.0, "soft_only": 0.0,
            "hard01_plus_gtprob": 0.025, "hard01_plus_gtprob_separated": 0.025,
            "hard_plus_gtprob_plus_rel": 0.025 + 0.3 * 0.5,
        }),
    ],
)  # fmt: skip
def test_every_mode_hand_computed(components, weights, expected):
    assert set(expected) == set(ALL_MODES)
    for mode, value in expected.items():
        assert shape_reward(components, mode, **weights) == pytest.approx(value), mode


def test_plan_eight_configuration():
    """hard_plus_gtprob_plus_rel with weights 1 / 0.5 / 0.3: positives 1 + 0.5 p, negatives 0.5 p + 0.3 rel."""
    weights = {"hard_weight": 1.0, "soft_weight": 0.5, "rel_weight": 0.3}
    positive = shape_reward({"hard": 1, "gt_prob": 0.4, "rel": 1.0}, "hard_plus_gtprob_plus_rel", **weights)
    negative = shape_reward({"hard": 0, "gt_prob": 0.4, "rel": 0.7}, "hard_plus_gtprob_plus_rel", **weights)
    assert positive == pytest.approx(1.2)  # relevance is not added to a correct answer
    assert negative == pytest.approx(0.2 + 0.21)


def _research_formula(mode, h, s, p, rel, w_h, w_s, w_r):
    """The research code's formulas (one branch per mode), as the independent reference."""
    if mode == "hard_plus_soft":
        r = w_h * h + w_s * s
    elif mode == "hard_plus_soft_v2":
        r = w_s * s + 2.0 * w_h * h
    elif mode == "separated":
        r = 2.0 * w_h + w_s * s if h == 1.0 else w_s * s
    elif mode == "hard_only":
        r = w_h * h
    elif mode == "soft_only":
        r = w_s * s
    elif mode == "hard01_plus_gtprob":
        r = w_h * h + w_s * p
    elif mode == "hard01_plus_gtprob_separated":
        r = 2.0 * w_h + w_s * p if h == 1.0 else w_s * p
    elif mode == "hard_plus_gtprob_plus_rel":
        r = w_h * h + w_s * p + w_r * (1 - h) * rel
    return max(-5.0, min(5.0, r))


def test_all_modes_match_the_research_formulas_on_a_grid():
    grid = itertools.product(
        ALL_MODES, [0, 0.5, 1], [0.0, 0.3, 1.0], [0.0, 0.7], [0.0, 0.6], [1.0, 3.0, -4.0], [1.0, 0.5], [0.1, 2.0]
    )
    for mode, h, s, p, rel, w_h, w_s, w_r in grid:
        components = {"hard": h, "soft": s, "gt_prob": p, "rel": rel}
        weights = {"hard_weight": w_h, "soft_weight": w_s, "rel_weight": w_r}
        assert shape_reward(components, mode, **weights) == pytest.approx(
            _research_formula(mode, h, s, p, rel, w_h, w_s, w_r)
        ), (mode, components, weights)


def test_separated_differs_from_v2_only_for_a_fractional_hard():
    assert shape_reward({"hard": 1, "soft": 0.5}, "separated") == shape_reward({"hard": 1, "soft": 0.5}, "hard_plus_soft_v2")
    assert shape_reward({"hard": 0.5, "soft": 0.5}, "separated") == pytest.approx(0.5)
    assert shape_reward({"hard": 0.5, "soft": 0.5}, "hard_plus_soft_v2") == pytest.approx(1.5)


def test_clip_to_plus_minus_five():
    assert shape_reward(CORRECT, "hard_plus_soft_v2", hard_weight=3.0) == 5.0  # 6.6 before clipping
    assert shape_reward({"soft": 1.0}, "soft_only", soft_weight=-10.0) == -5.0


def test_missing_and_none_components_count_as_zero():
    for mode in ALL_MODES:
        assert shape_reward({}, mode) == 0.0
        assert shape_reward({"hard": None, "soft": None, "gt_prob": None, "rel": None}, mode) == 0.0
    assert shape_reward({"soft": 0.6}, "hard_plus_soft") == pytest.approx(0.6)
    # relevance alone: a missing `hard` is a wrong answer, so relevance counts
    assert shape_reward({"rel": 0.5}, "hard_plus_gtprob_plus_rel") == pytest.approx(0.05)


def test_extra_keys_are_ignored():
    assert shape_reward({**CORRECT, "answer": "two dogs"}, "hard_plus_soft") == pytest.approx(1.6)


def test_default_mode_is_hard_plus_soft():
    assert shape_reward(CORRECT) == pytest.approx(1.6)


def test_registry_lists_all_modes():
    assert set(REWARD_MODES) == set(ALL_MODES)


def test_unknown_mode_lists_valid_modes():
    with pytest.raises(ValueError, match="Unknown reward mode 'hybrid'") as info:
        shape_reward(CORRECT, "hybrid")
    for mode in ALL_MODES:
        assert mode in str(info.value)


def test_boolean_hard_counts_as_zero_or_one():
    assert shape_reward({"hard": True, "soft": 0.6}, "separated") == pytest.approx(2.6)
    assert shape_reward({"hard": False, "rel": 0.5}, "hard_plus_gtprob_plus_rel") == pytest.approx(0.05)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "1", [1.0]])
def test_bad_component_values_raise(bad):
    with pytest.raises(ValueError, match="soft"):
        shape_reward({"hard": 1, "soft": bad}, "hard_plus_soft")


def test_non_mapping_components_raise():
    with pytest.raises(TypeError):
        shape_reward([1, 0.6], "hard_plus_soft")


def test_a_user_preset_is_one_more_weighted_form():
    REWARD_MODES["soft_plus_rel"] = {"soft": 1.0, "rel_if_wrong": 1.0}
    try:
        assert shape_reward(WRONG, "soft_plus_rel", rel_weight=0.2) == pytest.approx(0.1)
    finally:
        del REWARD_MODES["soft_plus_rel"]
    REWARD_MODES["typo"] = {"sofft": 1.0}
    try:
        with pytest.raises(ValueError, match="unknown terms"):
            shape_reward(WRONG, "typo")
    finally:
        del REWARD_MODES["typo"]
