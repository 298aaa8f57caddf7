"""Reward shaping: one scalar reward from the components of a scored in-context prompt.

Every research mode is a preset of one weighted form over five terms of the components
(`h` = hard, `s` = soft, `p` = gt_prob, `rel` = relevance):

    reward = clip( Σ_term  multiplier · weight · term ,  -5, 5 )

| term           | value                              | why                                                        |
|----------------|------------------------------------|------------------------------------------------------------|
| `hard`         | h                                  | correct / not correct                                      |
| `correct_bonus`| 1 if h == 1 else 0                 | a fixed gap between right and wrong answers ("separated")  |
| `soft`         | s                                  | official VQA accuracy of the answer                        |
| `gt_prob`      | p                                  | the VLM's probability mass on the gold answers (dense)     |
| `rel_if_wrong` | (1 - h) · rel                      | graded signal for wrong answers only (no double reward)    |

and `weight` is `hard_weight` (hard terms), `soft_weight` (`soft`, `gt_prob`) or `rel_weight`. With h ∈ {0, 1},
`separated` and `hard_plus_soft_v2` agree; they differ only for a fractional `hard`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType

__all__ = ["REWARD_MODES", "REWARD_TERMS", "RewardPreset", "shape_reward"]

REWARD_CLIP = 5.0

REWARD_TERMS: Mapping[str, str] = MappingProxyType(
    {
        "hard": "hard_weight",
        "correct_bonus": "hard_weight",
        "soft": "soft_weight",
        "gt_prob": "soft_weight",
        "rel_if_wrong": "rel_weight",
    }
)
"""Each term and the weight argument that scales it."""

RewardPreset = Mapping[str, float]
"""`{term: multiplier}`; terms not listed have multiplier 0."""

REWARD_MODES: dict[str, RewardPreset] = {
    "hard_plus_soft": {"hard": 1.0, "soft": 1.0},  # w_h·h + w_s·s
    "hard_plus_soft_v2": {"hard": 2.0, "soft": 1.0},  # w_s·s + 2·w_h·h
    "separated": {"correct_bonus": 2.0, "soft": 1.0},  # h=1: 2·w_h + w_s·s; else w_s·s
    "hard_only": {"hard": 1.0},  # w_h·h
    "soft_only": {"soft": 1.0},  # w_s·s
    "hard01_plus_gtprob": {"hard": 1.0, "gt_prob": 1.0},  # w_h·h + w_s·p
    "hard01_plus_gtprob_separated": {"correct_bonus": 2.0, "gt_prob": 1.0},  # h=1: 2·w_h + w_s·p; else w_s·p
    "hard_plus_gtprob_plus_rel": {"hard": 1.0, "gt_prob": 1.0, "rel_if_wrong": 1.0},  # w_h·h + w_s·p + w_r·(1-h)·rel
}
"""Named presets of the weighted form (add your own: a dict of term multipliers)."""


def _component(components: Mapping[str, object], name: str) -> float:
    """A component as a float: missing or `None` counts as 0 (as in the research code), a bool as 0/1; anything
    non-finite or non-numeric is an error rather than a silently wrong reward."""
    value = components.get(name)
    if value is None:
        return 0.0
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"Reward component {name!r} must be a finite number or None, got {value!r}.")
    return float(value)


def _term_values(components: Mapping[str, object]) -> dict[str, float]:
    hard = _component(components, "hard")
    return {
        "hard": hard,
        "correct_bonus": 1.0 if hard == 1.0 else 0.0,
        "soft": _component(components, "soft"),
        "gt_prob": _component(components, "gt_prob"),
        "rel_if_wrong": (1.0 - hard) * _component(components, "rel"),
    }


def shape_reward(
    components: Mapping[str, object],
    mode: str = "hard_plus_soft",
    hard_weight: float = 1.0,
    soft_weight: float = 1.0,
    rel_weight: float = 0.1,
) -> float:
    """The shaped reward of one scored prompt.

    Args:
        components: mapping with (some of) `hard`, `soft`, `gt_prob`, `rel`; a missing key or `None` counts as 0,
            other keys (e.g. `answer`) are ignored.
        mode: a key of `REWARD_MODES`.
        hard_weight, soft_weight, rel_weight: the weights of the weighted form (module docstring).

    Returns:
        The reward, clipped to [-5, 5].
    """
    try:
        preset = REWARD_MODES[mode]
    except (KeyError, TypeError):
        raise ValueError(f"Unknown reward mode {mode!r}. Valid modes: {', '.join(sorted(REWARD_MODES))}.") from None
    if not isinstance(components, Mapping):
        raise TypeError(f"components must be a mapping, got {type(components).__name__}.")
    unknown_terms = set(preset) - set(REWARD_TERMS)
    if unknown_terms:
        raise ValueError(f"Reward mode {mode!r} uses unknown terms {sorted(unknown_terms)}; valid: {list(REWARD_TERMS)}.")
    weights = {"hard_weight": hard_weight, "soft_weight": soft_weight, "rel_weight": rel_weight}
    values = _term_values(components)
    reward = sum(multiplier * weights[REWARD_TERMS[term]] * values[term] for term, multiplier in preset.items())
    return min(REWARD_CLIP, max(-REWARD_CLIP, reward))
