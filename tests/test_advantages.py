"""Group advantage estimators: hand-computed vectors for every mode, edge cases, registry, diagnostics."""

import math

import pytest
import torch

from trl_icd.advantages import (
    ADVANTAGE_MODES,
    advantage_stats,
    aggregate_rewards,
    compute_group_advantages,
    group_mean,
    register_advantage,
)

NAN = float("nan")
MODES = ["zscore", "rank", "mean", "batch", "rloo"]


def assert_close(actual, expected, atol=1e-6):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


# --- hand-computed vectors -------------------------------------------------------------------------------------------
# Group A = [1, 2, 3, 4]: mean 2.5, unbiased std sqrt(5/3) = 1.2909944.
# Group B = [0, NaN, 1, 1]: scorable [0, 1, 1], mean 2/3, unbiased std sqrt(1/3) = 0.5773503.

Z_A = [-1.5 / math.sqrt(5 / 3), -0.5 / math.sqrt(5 / 3), 0.5 / math.sqrt(5 / 3), 1.5 / math.sqrt(5 / 3)]


def test_zscore_hand_computed():
    adv = compute_group_advantages(torch.tensor([1.0, 2, 3, 4, 0, NAN, 1, 1]), 4, "zscore")
    s = math.sqrt(1 / 3)
    assert_close(adv, Z_A + [-(2 / 3) / s, 0.0, (1 / 3) / s, (1 / 3) / s])
    assert_close(adv[:4], [-1.161895, -0.387298, 0.387298, 1.161895], atol=5e-6)  # rounded


def test_rank_hand_computed_with_ties_and_nan():
    rewards = torch.tensor([1.0, 2, 3, 4, 1, 1, 0, 2, 5, 5, 5, 0, NAN, 2, 1, NAN])
    adv = compute_group_advantages(rewards, 4, "rank")
    expected = (
        [-1, -1 / 3, 1 / 3, 1]  # distinct: best +1, worst -1
        + [0, 0, -1, 1]  # the two 1s share rank 1.5 -> 1 - 2 * 1.5 / 3 = 0
        + [1 / 3, 1 / 3, 1 / 3, -1]  # three-way tie at the top: average rank 1
        + [0, 1, -1, 0]  # two scorable rows: n = 2
    )
    assert_close(adv, expected)
    # ranks are centred per group whatever the ties
    assert_close(adv.view(-1, 4).sum(dim=1), [0.0, 0.0, 0.0, 0.0])


def test_rank_is_scale_free():
    small = compute_group_advantages(torch.tensor([0.0, 1e-6, 2e-6, 3e-6]), 4, "rank")
    large = compute_group_advantages(torch.tensor([0.0, 10.0, 20.0, 30.0]), 4, "rank")
    assert_close(small, large.tolist())


def test_mean_hand_computed():
    adv = compute_group_advantages(torch.tensor([1.0, 2, 3, 4, 0, NAN, 1, 1]), 4, "mean")
    assert_close(adv, [-1.5, -0.5, 0.5, 1.5, -2 / 3, 0.0, 1 / 3, 1 / 3])


def test_batch_hand_computed():
    # Batch of 8 scorable rewards: mean 1.375, sum of squared deviations 15.875, unbiased std sqrt(15.875 / 7).
    adv = compute_group_advantages(torch.tensor([1.0, 2, 3, 4, 0, 0, 0, 1]), 4, "batch")
    std = math.sqrt(15.875 / 7)
    assert_close(adv, [-1.5 / std, -0.5 / std, 0.5 / std, 1.5 / std, -0.25 / std, -0.25 / std, -0.25 / std, 0.75 / std])
    assert_close(adv[:4], [-0.996055, -0.332018, 0.332018, 0.996055], atol=5e-6)  # rounded


def test_batch_std_ignores_unscorable_rows():
    adv = compute_group_advantages(torch.tensor([0.0, 2.0, NAN, NAN]), 2, "batch")
    assert_close(adv, [-1 / math.sqrt(2), 1 / math.sqrt(2), 0.0, 0.0])


def test_rloo_hand_computed():
    adv = compute_group_advantages(torch.tensor([1.0, 2, 3, 4, 0, NAN, 1, 1]), 4, "rloo")
    # r_i - mean of the other scorable rows
    assert_close(adv, [1 - 3, 2 - 8 / 3, 3 - 7 / 3, 4 - 2, 0 - 1, 0.0, 1 - 0.5, 1 - 0.5])


# --- edge cases shared by all modes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("min_std", [0.0, 0.1])
def test_all_equal_group_gets_zero(mode, min_std):
    adv = compute_group_advantages(torch.tensor([3.0, 3, 3, 3, 0.1, 0.1, 0.1, 0.1]), 4, mode, min_std=min_std)
    assert_close(adv, [0.0] * 8)


@pytest.mark.parametrize("mode", MODES)
def test_groups_of_one_get_zero(mode):
    assert_close(compute_group_advantages(torch.tensor([5.0, -7.0, 0.5]), 1, mode), [0.0, 0.0, 0.0])
    # a group with a single scorable row
    assert_close(compute_group_advantages(torch.tensor([NAN, NAN, 2.0, NAN]), 4, mode), [0.0] * 4)


@pytest.mark.parametrize("mode", MODES)
def test_unscorable_rows_get_zero_and_do_not_shift_the_statistics(mode):
    with_nan = compute_group_advantages(torch.tensor([1.0, NAN, 2.0, 4.0]), 4, mode)
    assert with_nan[1] == 0
    if mode != "batch":  # the batch std is taken over the whole batch, so compare group-local modes only
        without = compute_group_advantages(torch.tensor([1.0, 2.0, 4.0]), 3, mode)
        assert_close(with_nan[[0, 2, 3]], without.tolist())


def test_all_unscorable_group():
    adv = compute_group_advantages(torch.tensor([NAN, NAN, 1.0, 2.0]), 2, "zscore")
    assert_close(adv, [0.0, 0.0, -1 / math.sqrt(0.5) / 2, 1 / math.sqrt(0.5) / 2])


def test_min_std_floor():
    rewards = torch.tensor([0.0, 0.01, 0.0, 0.01])  # std = 0.0057735
    assert_close(compute_group_advantages(rewards, 4, "zscore", min_std=0.1), [-0.05, 0.05, -0.05, 0.05])
    unfloored = 0.005 / (0.01 / math.sqrt(3))
    assert_close(compute_group_advantages(rewards, 4, "zscore", min_std=0.0), [-unfloored, unfloored] * 2)
    # the floor does not touch groups whose std is above it
    assert_close(compute_group_advantages(torch.tensor([1.0, 2, 3, 4]), 4, "zscore", min_std=1.0), Z_A)
    assert_close(compute_group_advantages(torch.tensor([1.0, 2, 3, 4]), 4, "zscore", min_std=2.0), [-0.75, -0.25, 0.25, 0.75])


def test_clip_on_and_off():
    rewards = torch.tensor([0.0, 0, 0, 100])
    assert_close(compute_group_advantages(rewards, 4, "mean", clip=5.0), [-5.0, -5.0, -5.0, 5.0])
    assert_close(compute_group_advantages(rewards, 4, "mean", clip=None), [-25.0, -25.0, -25.0, 75.0])
    assert_close(compute_group_advantages(torch.tensor([1.0, 2, 3, 4]), 4, "zscore", clip=1.0), [-1.0, Z_A[1], Z_A[2], 1.0])
    # default clip is 5: a z-score of 63/8 = 7.875 (one outlier among 64) is clipped
    outlier = torch.zeros(64)
    outlier[0] = 1.0
    assert compute_group_advantages(outlier, 64, "zscore")[0] == 5.0
    assert compute_group_advantages(outlier, 64, "zscore", clip=None)[0] == pytest.approx(7.875, abs=1e-5)


def test_dtype_device_shape_and_sequence_input():
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0], dtype=torch.float64)
    adv = compute_group_advantages(rewards, 2)
    assert adv.dtype == torch.float64 and adv.shape == (4,)
    assert_close(compute_group_advantages([1.0, 2.0], 2, "mean"), [-0.5, 0.5])
    assert compute_group_advantages(torch.tensor([1, 2]), 2, "mean").dtype == torch.float32  # ints become float
    assert compute_group_advantages(torch.tensor([]), 4).numel() == 0


def test_input_is_not_modified():
    rewards = torch.tensor([1.0, NAN, 3.0, 4.0])
    before = rewards.clone()
    compute_group_advantages(rewards, 2, "rank")
    torch.testing.assert_close(rewards, before, equal_nan=True)


# --- errors --------------------------------------------------------------------------------------------------------


def test_unknown_mode_lists_valid_modes():
    with pytest.raises(ValueError, match="Unknown advantage mode 'ranks'") as info:
        compute_group_advantages(torch.zeros(4), 2, mode="ranks")
    for mode in MODES:
        assert mode in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rewards": torch.zeros(6), "group_size": 4}, "not divisible by group_size"),
        ({"rewards": torch.zeros(2, 2), "group_size": 2}, "1-D"),
        ({"rewards": torch.zeros(4), "group_size": 0}, "positive integer"),
        ({"rewards": torch.zeros(4), "group_size": 2.0}, "positive integer"),
        ({"rewards": torch.zeros(4), "group_size": 2, "min_std": -0.1}, "min_std"),
        ({"rewards": torch.zeros(4), "group_size": 2, "min_std": NAN}, "min_std"),
        ({"rewards": torch.zeros(4), "group_size": 2, "clip": 0.0}, "clip"),
        ({"rewards": torch.tensor([0.0, float("inf")]), "group_size": 2}, "inf"),
    ],
)
def test_bad_input_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        compute_group_advantages(**kwargs)


# --- registry ------------------------------------------------------------------------------------------------------


@pytest.fixture
def restore_registry():
    saved = dict(ADVANTAGE_MODES)
    yield
    ADVANTAGE_MODES.clear()
    ADVANTAGE_MODES.update(saved)


def test_builtin_modes_registered():
    assert set(MODES) <= set(ADVANTAGE_MODES)


def test_register_a_new_mode(restore_registry):
    @register_advantage("sign")
    def sign_advantage(grouped, *, min_std):
        return torch.sign(grouped - group_mean(grouped))

    assert ADVANTAGE_MODES["sign"] is sign_advantage
    adv = compute_group_advantages(torch.tensor([1.0, 5.0, NAN, 3.0, 10, 10, 10, 10]), 4, "sign")
    assert_close(adv, [-1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])  # NaN row forced to 0, clip after


def test_registered_mode_gets_min_std_and_is_clipped(restore_registry):
    seen = {}

    @register_advantage("scaled")
    def scaled(grouped, *, min_std):
        seen["min_std"] = min_std
        return grouped * 100

    adv = compute_group_advantages(torch.tensor([0.01, -1.0]), 2, "scaled", min_std=0.3, clip=2.0)
    assert seen["min_std"] == 0.3
    assert_close(adv, [1.0, -2.0])


def test_registered_mode_with_wrong_output_is_rejected(restore_registry):
    register_advantage("bad_shape")(lambda grouped, *, min_std: grouped.flatten())
    register_advantage("bad_nan")(lambda grouped, *, min_std: grouped * NAN)
    with pytest.raises(ValueError, match="shape"):
        compute_group_advantages(torch.zeros(4), 2, "bad_shape")
    with pytest.raises(ValueError, match="NaN for a scorable row"):
        compute_group_advantages(torch.zeros(4), 2, "bad_nan")


def test_register_rejects_bad_name():
    with pytest.raises(ValueError):
        register_advantage("")


# --- reward aggregation (TRL's multi_objective_aggregation) ----------------------------------------------------------


def test_aggregate_sum_then_normalize():
    per_func = torch.tensor([[1.0, 2.0], [NAN, 4.0], [NAN, NAN], [3.0, NAN]])
    combined = aggregate_rewards(per_func, [1.0, 0.5], 2)
    torch.testing.assert_close(combined, torch.tensor([2.0, 2.0, NAN, 3.0]), equal_nan=True)


def test_aggregate_normalize_then_sum():
    # Group 1: f0 = [1, 3] -> -/+ 1 / (sqrt 2 + 1e-4); f1 = [2, NaN] has no std -> NaN, dropped by nansum.
    # Group 2: row 2 unscorable; row 3 has values but no within-group std in either function -> 0.
    per_func = torch.tensor([[1.0, 2.0], [3.0, NAN], [NAN, NAN], [5.0, 6.0]])
    combined = aggregate_rewards(per_func, [1.0, 2.0], 2, "normalize_then_sum")
    z = 1 / (math.sqrt(2) + 1e-4)
    torch.testing.assert_close(combined, torch.tensor([-z, z, NAN, 0.0]), equal_nan=True)


def test_aggregate_errors():
    with pytest.raises(ValueError, match="reward weights"):
        aggregate_rewards(torch.zeros(4, 2), [1.0], 2)
    with pytest.raises(ValueError, match="multi_objective_aggregation"):
        aggregate_rewards(torch.zeros(4, 1), [1.0], 2, "sum")
    with pytest.raises(ValueError, match="not divisible"):
        aggregate_rewards(torch.zeros(3, 1), [1.0], 2)


# --- diagnostics ---------------------------------------------------------------------------------------------------


def test_advantage_stats_hand_computed():
    rewards = torch.tensor([1.0, 2, 3, 4, 3, 3, 3, 3, NAN, NAN, 5, NAN])
    adv = compute_group_advantages(rewards, 4, "zscore")
    stats = advantage_stats(adv, rewards, 4)
    # z-scores of group A have sum of squares n - 1 = 3; the other 8 rows are 0 -> std sqrt(3 / 11)
    assert stats["advantages/std"] == pytest.approx(math.sqrt(3 / 11), abs=1e-6)
    assert stats["advantages/mean"] == pytest.approx(0.0, abs=1e-7)
    assert stats["advantages/max_abs"] == pytest.approx(1.161895, abs=1e-6)
    assert stats["rewards/within_group_std"] == pytest.approx((math.sqrt(5 / 3) + 0.0) / 2)  # group C has 1 row
    assert stats["frac_reward_zero_std"] == pytest.approx(2 / 3)  # group B flat, group C a single row
    assert stats["frac_unscorable"] == pytest.approx(0.25)


def test_rank_run_with_mostly_flat_groups_has_tiny_advantage_std():
    """How a rank-normalised run logs an advantage std near 0.006: the advantages of non-flat groups have std
    ~0.7 (G = 8), but when almost every group is flat the batch std is sqrt(fraction of non-flat rows) * 0.7."""
    flat = torch.ones(8 * 999)
    contrast = torch.arange(8.0)
    rewards = torch.cat([contrast, flat])
    adv = compute_group_advantages(rewards, 8, "rank")
    stats = advantage_stats(adv, rewards, 8)
    assert stats["frac_reward_zero_std"] == pytest.approx(0.999)
    assert stats["advantages/std"] == pytest.approx(0.0207, abs=5e-4)
    # ranks of 8 distinct rewards: a uniform grid on [-1, 1], unbiased variance G(G+1) / (3(G-1)^2)
    assert compute_group_advantages(contrast, 8, "rank").std().item() == pytest.approx(math.sqrt(72 / 147))


def test_advantage_stats_undefined_values_are_nan():
    stats = advantage_stats(torch.zeros(1), torch.tensor([1.0]), 1)
    assert math.isnan(stats["advantages/std"]) and math.isnan(stats["rewards/within_group_std"])
    assert stats["frac_reward_zero_std"] == 1.0
    with pytest.raises(ValueError, match="advantages for"):
        advantage_stats(torch.zeros(3), torch.zeros(4), 2)


def test_modes_match_trl_scale_rewards_formulas():
    """TRL 1.16's inline advantages (grpo_trainer.py, sum_then_normalize) as a second implementation: 'zscore' with no
    floor and no clip is scale_rewards='group' (up to TRL's +1e-4 in the divisor), 'mean' is 'none', 'batch' is
    'batch'."""
    from trl.trainer.utils import nanstd

    g = 4
    generator = torch.Generator().manual_seed(0)
    per_func = torch.randn(32, 2, generator=generator)
    per_func[torch.rand(32, 2, generator=generator) < 0.3] = NAN
    per_func[[5, 17]] = NAN
    weights = torch.tensor([1.0, 0.5])
    rewards = (per_func * weights).nansum(dim=1)
    rewards[torch.isnan(per_func).all(dim=1)] = NAN
    group_mean_rows = torch.nanmean(rewards.view(-1, g), dim=1).repeat_interleave(g)
    group_std_rows = nanstd(rewards.view(-1, g), dim=1).repeat_interleave(g)
    trl_group = torch.nan_to_num((rewards - group_mean_rows) / (group_std_rows + 1e-4), nan=0.0)
    trl_none = torch.nan_to_num(rewards - group_mean_rows, nan=0.0)
    trl_batch = torch.nan_to_num((rewards - group_mean_rows) / (nanstd(rewards) + 1e-4), nan=0.0)

    combined = aggregate_rewards(per_func, weights, g)
    torch.testing.assert_close(combined, rewards, equal_nan=True)
    ours = {mode: compute_group_advantages(combined, g, mode, min_std=0.0, clip=None) for mode in MODES}
    torch.testing.assert_close(ours["zscore"], trl_group, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(ours["mean"], trl_none)
    torch.testing.assert_close(ours["batch"], trl_batch, atol=1e-3, rtol=1e-3)
