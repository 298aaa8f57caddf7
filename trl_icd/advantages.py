"""Group advantage estimators for GRPO-style training, and the diagnostics that explain a run's learning signal.

Rewards arrive as a flat vector in which every `group_size` consecutive rows are the completions of one prompt (the
layout TRL's `RepeatSampler` produces). An estimator turns one *group matrix* `[num_groups, group_size]` into
advantages of the same shape. NaN marks an unscorable row (every reward function returned `None`): it is excluded
from its group's statistics and its advantage is 0.

Estimators live in a registry, so a new one is a decorated function:

```python
from trl_icd.advantages import register_advantage, group_mean

@register_advantage("sign")
def sign_advantage(grouped, *, min_std):
    return torch.sign(grouped - group_mean(grouped))
```
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

__all__ = [
    "ADVANTAGE_MODES",
    "AdvantageEstimator",
    "advantage_stats",
    "aggregate_rewards",
    "compute_group_advantages",
    "get_advantage_estimator",
    "group_count",
    "group_has_contrast",
    "group_mean",
    "group_std",
    "register_advantage",
]

AdvantageEstimator = Callable[..., torch.Tensor]
"""`fn(grouped: Tensor[num_groups, group_size], *, min_std: float) -> Tensor[num_groups, group_size]`; NaN entries of
`grouped` are unscorable rows (their output is ignored and set to 0)."""

ADVANTAGE_MODES: dict[str, AdvantageEstimator] = {}


def register_advantage(name: str) -> Callable[[AdvantageEstimator], AdvantageEstimator]:
    """Decorator adding an estimator to `ADVANTAGE_MODES` under `name` (re-registering a name replaces it)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"An advantage mode name must be a non-empty string, got {name!r}.")

    def decorator(fn: AdvantageEstimator) -> AdvantageEstimator:
        ADVANTAGE_MODES[name] = fn
        return fn

    return decorator


def get_advantage_estimator(name: str) -> AdvantageEstimator:
    """The registered estimator called `name`; a `ValueError` naming the valid modes otherwise."""
    try:
        return ADVANTAGE_MODES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"Unknown advantage mode {name!r}. Valid modes: {', '.join(sorted(ADVANTAGE_MODES))}."
        ) from None


# --- NaN-aware statistics over the group axis (dim 1), broadcastable back to `[num_groups, group_size]` ----------


def group_count(grouped: torch.Tensor) -> torch.Tensor:
    """Number of scorable (non-NaN) rows per group, `[num_groups, 1]`."""
    return (~torch.isnan(grouped)).sum(dim=1, keepdim=True)


def group_mean(grouped: torch.Tensor) -> torch.Tensor:
    """Mean of the scorable rows per group, `[num_groups, 1]` (NaN for a group with none)."""
    return torch.nanmean(grouped, dim=1, keepdim=True)


def group_std(grouped: torch.Tensor) -> torch.Tensor:
    """Unbiased (Bessel-corrected) std of the scorable rows per group, `[num_groups, 1]` (NaN below two rows)."""
    return _nan_unbiased_std(grouped, dim=1)


def _nan_unbiased_std(values: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    keep = dim is not None
    count = (~torch.isnan(values)).sum(dim=dim, keepdim=keep)
    mean = torch.nanmean(values, dim=dim, keepdim=True)
    squared = torch.nansum((values - mean) ** 2, dim=dim, keepdim=keep)
    variance = squared / (count - 1).clamp(min=1)
    return torch.where(count > 1, variance.sqrt(), torch.full_like(variance, float("nan")))


def _divide_by_floored_std(centred: torch.Tensor, std: torch.Tensor, min_std: float) -> torch.Tensor:
    """`centred / max(std, min_std)`; 0 where the std is undefined (fewer than two rows) or the divisor is 0 (an
    all-equal group with `min_std=0`), since such rows carry no contrast."""
    divisor = std.clamp(min=min_std)
    usable = ~torch.isnan(divisor) & (divisor > 0)
    return torch.where(usable, centred / torch.where(usable, divisor, torch.ones_like(divisor)), 0.0)


def group_has_contrast(rewards: torch.Tensor | Sequence[float], group_size: int) -> torch.Tensor:
    """Per group of `group_size` consecutive rows: True when its scorable (non-NaN) rewards are not all equal. A group
    without contrast (all equal, or fewer than two scorable rows) gets zero advantage in every built-in mode."""
    grouped = _as_reward_vector(rewards, group_size).double().reshape(-1, group_size)
    count = group_count(grouped).squeeze(1)
    highest = grouped.nan_to_num(nan=-math.inf).amax(dim=1)
    lowest = grouped.nan_to_num(nan=math.inf).amin(dim=1)
    return (count >= 2) & (highest != lowest)


# --- the built-in estimators ------------------------------------------------------------------------------------


@register_advantage("zscore")
def zscore_advantage(grouped: torch.Tensor, *, min_std: float) -> torch.Tensor:
    """GRPO: `(r - group mean) / max(group std, min_std)`, unbiased std."""
    return _divide_by_floored_std(grouped - group_mean(grouped), group_std(grouped), min_std)


@register_advantage("rank")
def rank_advantage(grouped: torch.Tensor, *, min_std: float) -> torch.Tensor:
    """Within-group rank, magnitudes discarded: `1 - 2 * rank / (n - 1)` with rank 0 = the best reward, so the best
    gets +1 and the worst -1. Ties share their average rank (an all-equal group is 0 everywhere); `n` counts the
    scorable rows, and a group with one scorable row gets 0."""
    del min_std  # ranks are scale-free
    # rank_i = #{j: r_j > r_i} + #{j != i: r_j = r_i} / 2 -- the average of the tied positions (NaN compares False).
    greater = (grouped.unsqueeze(1) > grouped.unsqueeze(2)).sum(dim=2)
    ties = (grouped.unsqueeze(1) == grouped.unsqueeze(2)).sum(dim=2) - 1
    rank = greater.to(grouped.dtype) + ties.to(grouped.dtype) / 2
    n = group_count(grouped).to(grouped.dtype)
    return torch.where(n > 1, 1 - 2 * rank / (n - 1).clamp(min=1), 0.0)


@register_advantage("mean")
def mean_advantage(grouped: torch.Tensor, *, min_std: float) -> torch.Tensor:
    """Dr. GRPO: `r - group mean`, no std scaling (so no question-difficulty weighting)."""
    del min_std
    return grouped - group_mean(grouped)


@register_advantage("batch")
def batch_advantage(grouped: torch.Tensor, *, min_std: float) -> torch.Tensor:
    """`(r - group mean) / max(batch std, min_std)`: the std of every scorable reward in the (global) batch."""
    return _divide_by_floored_std(grouped - group_mean(grouped), _nan_unbiased_std(grouped), min_std)


@register_advantage("rloo")
def rloo_advantage(grouped: torch.Tensor, *, min_std: float) -> torch.Tensor:
    """REINFORCE leave-one-out: `r_i - mean_{j != i} r_j` over the scorable rows; 0 for a group of one."""
    del min_std
    n = group_count(grouped).to(grouped.dtype)
    others_mean = (torch.nansum(grouped, dim=1, keepdim=True) - grouped) / (n - 1).clamp(min=1)
    return torch.where(n > 1, grouped - others_mean, 0.0)


# --- public entry points ------------------------------------------------------------------------------------------


def _as_reward_vector(rewards: torch.Tensor | Sequence[float], group_size: int) -> torch.Tensor:
    rewards = torch.as_tensor(rewards)
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.float32)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be a 1-D tensor, got shape {tuple(rewards.shape)}.")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}.")
    if rewards.numel() % group_size != 0:
        raise ValueError(
            f"The number of rewards ({rewards.numel()}) is not divisible by group_size ({group_size}): every group "
            "must be complete."
        )
    if torch.isinf(rewards).any():
        raise ValueError("rewards contain +/-inf; use NaN (a reward function returning None) for unscorable rows.")
    return rewards


def compute_group_advantages(
    rewards: torch.Tensor | Sequence[float],
    group_size: int,
    mode: str = "zscore",
    min_std: float = 0.1,
    clip: float | None = 5.0,
) -> torch.Tensor:
    """Advantages for a flat reward vector whose consecutive `group_size` rows form a group.

    Args:
        rewards: 1-D rewards; NaN = unscorable row (advantage 0, excluded from its group's statistics).
        group_size: rows per group (`num_generations`).
        mode: a key of `ADVANTAGE_MODES` (`zscore`, `rank`, `mean`, `batch`, `rloo` or one you registered).
        min_std: floor of the std a mode divides by (`zscore`: group std, `batch`: batch std), so a group whose
            rewards differ by almost nothing is not blown up to unit-variance advantages.
        clip: advantages are clipped to `[-clip, clip]`; `None` disables clipping.

    Returns:
        A tensor with the shape, dtype and device of `rewards`.
    """
    estimator = get_advantage_estimator(mode)
    rewards = _as_reward_vector(rewards, group_size)
    if not (isinstance(min_std, (int, float)) and math.isfinite(min_std) and min_std >= 0):
        raise ValueError(f"min_std must be a finite number >= 0, got {min_std!r}.")
    if clip is not None and not (isinstance(clip, (int, float)) and clip > 0):
        raise ValueError(f"clip must be None (no clipping) or a number > 0, got {clip!r}.")
    if rewards.numel() == 0:
        return rewards.clone()

    grouped = rewards.reshape(-1, group_size)
    advantages = estimator(grouped, min_std=float(min_std))
    if advantages.shape != grouped.shape:
        raise ValueError(
            f"Advantage mode {mode!r} returned shape {tuple(advantages.shape)}, expected {tuple(grouped.shape)}."
        )
    unscorable = torch.isnan(grouped)
    if torch.isnan(advantages[~unscorable]).any():
        raise ValueError(f"Advantage mode {mode!r} returned NaN for a scorable row.")
    advantages = advantages.to(rewards.dtype).masked_fill(unscorable, 0.0)
    if clip is not None:
        advantages = advantages.clamp(-clip, clip)
    return advantages.reshape(rewards.shape)


def aggregate_rewards(
    rewards_per_func: torch.Tensor,
    reward_weights: torch.Tensor | Sequence[float],
    group_size: int,
    aggregation: str = "sum_then_normalize",
) -> torch.Tensor:
    """One reward per row from `rewards_per_func` `[rows, num_funcs]` (NaN = that function returned `None`), combined
    the way TRL's `multi_objective_aggregation` does before its normalisation:

    - `sum_then_normalize`: the weighted sum of the available rewards;
    - `normalize_then_sum` (GDPO): each function z-scored within its group (`(r - mean) / (std + 1e-4)`), then the
      weighted sum.

    A row where every function returned `None` is NaN (unscorable).
    """
    if rewards_per_func.dim() != 2:
        raise ValueError(f"rewards_per_func must be [rows, num_funcs], got shape {tuple(rewards_per_func.shape)}.")
    weights = torch.as_tensor(reward_weights, dtype=rewards_per_func.dtype, device=rewards_per_func.device)
    if weights.shape != (rewards_per_func.shape[1],):
        raise ValueError(f"{weights.numel()} reward weights for {rewards_per_func.shape[1]} reward functions.")
    for column in rewards_per_func.unbind(dim=1):
        _as_reward_vector(column, group_size)  # complete groups, no inf
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    if aggregation == "sum_then_normalize":
        per_func = rewards_per_func
    elif aggregation == "normalize_then_sum":
        grouped = rewards_per_func.reshape(-1, group_size, rewards_per_func.shape[1])
        mean = torch.nanmean(grouped, dim=1, keepdim=True)
        std = _nan_unbiased_std(grouped, dim=1) if group_size > 1 else torch.zeros_like(mean)
        per_func = ((grouped - mean) / (std + 1e-4)).reshape_as(rewards_per_func)
    else:
        raise ValueError(
            f"Unknown multi_objective_aggregation {aggregation!r}. Valid: 'sum_then_normalize', 'normalize_then_sum'."
        )
    combined = (per_func * weights.unsqueeze(0)).nansum(dim=1)
    return combined.masked_fill(unscorable, float("nan"))


_STAT_NAMES = (
    "advantages/std",
    "advantages/mean",
    "advantages/max_abs",
    "rewards/within_group_std",
    "frac_reward_zero_std",
    "frac_unscorable",
)


def advantage_stats(
    advantages: torch.Tensor, rewards: torch.Tensor | Sequence[float], group_size: int
) -> dict[str, float]:
    """Diagnostics of one batch of advantages (all rows, as the loss sees them) and the rewards they came from.

    - `advantages/std`, `advantages/mean`, `advantages/max_abs`: over every row, unscorable rows (advantage 0)
      included. A small std means little learning signal, whatever the reward scale.
    - `rewards/within_group_std`: mean over groups of the std of the group's scorable rewards (groups with at least
      two scorable rows): the contrast the estimator had to work with.
    - `frac_reward_zero_std`: fraction of groups with no contrast at all (all scorable rewards equal, or fewer than
      two scorable rows); these groups contribute zero advantage in every built-in mode.
    - `frac_unscorable`: fraction of rows where every reward function returned `None`.

    Undefined values (e.g. the std of a single row) are NaN; TRL's logger drops NaN entries.
    """
    rewards = _as_reward_vector(rewards, group_size)
    advantages = torch.as_tensor(advantages).reshape(-1).double()
    if advantages.numel() != rewards.numel():
        raise ValueError(f"{advantages.numel()} advantages for {rewards.numel()} rewards.")
    if rewards.numel() == 0:
        return dict.fromkeys(_STAT_NAMES, float("nan"))
    grouped = rewards.double().reshape(-1, group_size)
    no_contrast = ~group_has_contrast(rewards, group_size)
    within_std = group_std(grouped).squeeze(1)
    values = torch.stack(
        [
            advantages.std() if advantages.numel() > 1 else advantages.new_tensor(float("nan")),
            advantages.mean(),
            advantages.abs().max(),
            torch.nanmean(within_std),  # NaN when no group has two scorable rows
            no_contrast.double().mean(),
            torch.isnan(grouped).double().mean(),
        ]
    )
    return dict(zip(_STAT_NAMES, values.tolist(), strict=True))
