"""Evaluation statistics on inputs with known answers; tables, JSON and plots written."""

import json
import math

import numpy as np
import pytest

from trl_icd.evaluation import (
    EvaluationResults,
    markdown_comparison_table,
    markdown_table,
    mean_ci,
    paired_comparison,
    plot_accuracy_vs_shots,
    plot_training_curves,
    sign_flip_p_value,
    student_t_cdf,
    student_t_ppf,
)

# Two-sided 95% critical values of Student's t (standard tables) and the normal limit.
T_TABLE = {
    1: 12.706204736, 2: 4.302652730, 3: 3.182446305, 4: 2.776445105, 9: 2.262157163, 29: 2.045229642, 120: 1.979930405
}


@pytest.mark.parametrize("df,value", sorted(T_TABLE.items()))
def test_student_t_quantiles_match_tables(df, value):
    assert student_t_ppf(0.975, df) == pytest.approx(value, abs=1e-8)
    assert student_t_ppf(0.025, df) == pytest.approx(-value, abs=1e-8)
    assert student_t_cdf(value, df) == pytest.approx(0.975, abs=1e-9)
    assert student_t_ppf(0.975, 1e7) == pytest.approx(1.959963985, abs=1e-6)


def test_student_t_against_scipy():
    from scipy import stats
    for df in (1, 3, 7.5, 50, 1000):
        for p in (0.55, 0.8, 0.95, 0.999):
            assert student_t_ppf(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-9)


def test_constant_array_has_zero_width():
    for method in ("t", "normal", "bootstrap"):
        interval = mean_ci([0.6] * 25, method=method)
        assert interval.mean == pytest.approx(0.6) and interval.half_width == pytest.approx(0.0, abs=1e-15)
        assert interval.low == pytest.approx(0.6) and interval.high == pytest.approx(0.6)


def test_t_interval_on_a_known_sample():
    x = np.array([0.1, 0.4, 0.35, 0.8, 0.5, 0.9, 0.2, 0.6, 0.55, 0.45])
    interval = mean_ci(x)
    half = T_TABLE[9] * x.std(ddof=1) / math.sqrt(10)  # hand formula: mean ± t_{.975,9} s / sqrt(n)
    assert interval.mean == pytest.approx(0.485)
    assert (interval.low, interval.high) == pytest.approx((0.485 - half, 0.485 + half), abs=1e-9)
    normal = mean_ci(x, method="normal", level=0.9)
    assert normal.half_width == pytest.approx(1.6448536270 * x.std(ddof=1) / math.sqrt(10), abs=1e-9)


def test_t_interval_coverage_on_normal_samples():
    rng = np.random.default_rng(0)
    covered = [(lambda i: i.low <= 1.0 <= i.high)(mean_ci(rng.normal(1.0, 2.0, size=15))) for _ in range(2000)]
    assert np.mean(covered) == pytest.approx(0.95, abs=0.015)


def test_bootstrap_close_to_t_for_a_large_sample_and_seeded():
    x = np.random.default_rng(1).binomial(1, 0.4, size=400).astype(float)
    boot, t = mean_ci(x, method="bootstrap", seed=3), mean_ci(x)
    assert boot == mean_ci(x, method="bootstrap", seed=3)
    assert boot.low == pytest.approx(t.low, abs=0.01) and boot.high == pytest.approx(t.high, abs=0.01)


def test_ci_input_checks():
    assert math.isnan(mean_ci([0.5]).low)
    with pytest.raises(ValueError):
        mean_ci([])
    with pytest.raises(ValueError):
        mean_ci([0.1, float("nan")])
    with pytest.raises(ValueError):
        mean_ci([0.1, 0.2], method="jackknife")


def test_paired_identical_arrays():
    x = np.random.default_rng(2).random(300)
    cmp = paired_comparison(x, x.copy())
    assert (cmp.mean_diff, cmp.low, cmp.high, cmp.p_value) == (0.0, 0.0, 0.0, 1.0)
    assert (cmp.wins, cmp.losses, cmp.ties) == (0, 0, 300) and not cmp.significant


def test_sign_flip_exact_p_values():
    # d = (1, 1, 1): of the 8 sign patterns only +++ and --- reach |sum| = 3
    assert sign_flip_p_value(np.array([1.0, 1.0, 1.0])) == (0.25, "exact")
    # d = (1, -1, 2): the 8 signed sums are 2, -2, 4, 0, 0, -4, 2, -2; six reach |2|
    assert sign_flip_p_value(np.array([1.0, -1.0, 2.0])) == (0.75, "exact")
    # zeros carry no information and are dropped
    assert sign_flip_p_value(np.array([0.0, 1.0, 0.0, 1.0, 1.0])) == (0.25, "exact")


def test_paired_comparison_detects_a_shift_that_unpaired_intervals_miss():
    rng = np.random.default_rng(4)
    base = rng.random(200)  # large per-query spread
    better = np.clip(base + 0.03 + rng.normal(0, 0.02, 200), 0, 1)
    a, b = mean_ci(better), mean_ci(base)
    assert a.low < b.high  # the unpaired intervals overlap
    cmp = paired_comparison(better, base)
    assert cmp.p_method == "monte_carlo" and cmp.p_value < 0.001 and cmp.low > 0
    assert cmp.mean_diff == pytest.approx(float(np.mean(better - base)))
    from scipy import stats
    assert (cmp.low, cmp.high) == pytest.approx(
        stats.t.interval(0.95, 199, loc=np.mean(better - base), scale=stats.sem(better - base)), abs=1e-9
    )
    with pytest.raises(ValueError):
        paired_comparison([0.1, 0.2], [0.1])


def test_sign_flip_p_close_to_paired_t_for_a_moderate_effect():
    from scipy import stats
    rng = np.random.default_rng(5)
    d = rng.normal(0.15, 1.0, size=120)
    p, method = sign_flip_p_value(d, n_resamples=20_000)
    assert method == "monte_carlo"
    assert p == pytest.approx(stats.ttest_1samp(d, 0).pvalue, abs=0.02)


@pytest.fixture
def results():
    res = EvaluationResults(query_ids=list(range(4)))
    res.add("random", 1, [0.0, 1.0, 0.0, 1.0])
    res.add("random", 2, [0.0, 0.0, 0.0, 1.0])
    res.add("image_sim", 1, [1.0, 1.0, 0.0, 1.0])
    res.add("image_sim", 2, [1.0, 0.0, 1.0, 1.0])
    res.add("selector", 1, [1.0, 1.0, 1.0, 1.0])
    return res


def test_results_structure(results):
    assert results.methods == ["random", "image_sim", "selector"] and results.shots == [1, 2]
    assert results.mean("random", 1) == 0.5 and results.mean("random") == pytest.approx(0.375)
    assert results.best_method(1, ["random", "image_sim"]) == "image_sim"
    (best, cmp), = results.compare_to_best("selector", ["random", "image_sim"]).values()
    assert best == "image_sim" and cmp.mean_diff == pytest.approx(0.25) and cmp.wins == 1 and cmp.ties == 3
    with pytest.raises(ValueError):
        results.add("oracle", 1, [1.0, 1.0])  # not one value per query
    with pytest.raises(KeyError):
        results.values("selector", 2)


def test_markdown_tables(results):
    table = markdown_table(results)
    lines = table.splitlines()
    assert lines[0] == "| Method | 1-shot | 2-shot |"
    half1 = 100 * T_TABLE[3] * np.std([0, 1, 0, 1], ddof=1) / 2  # t_{.975,3} s / sqrt(4)
    half2 = 100 * T_TABLE[3] * np.std([0, 0, 0, 1], ddof=1) / 2
    assert lines[2] == f"| random | 50.0 ± {half1:.1f} | 25.0 ± {half2:.1f} |"
    assert lines[4] == "| selector | 100.0 ± 0.0 | – |"
    assert "95% t confidence interval over 4 queries" in table
    assert "protocol" not in table
    results.meta["vqa_protocol"] = "lmms_eval"
    assert "Accuracy (%) (VQA accuracy, protocol `lmms_eval`) ± half-width" in markdown_table(results)
    comparison = markdown_comparison_table(results, ["selector"], ["random", "image_sim"])
    assert "| selector | 1 | image_sim | +25.0 [" in comparison and "| 1/0/3 |" in comparison


def test_json_roundtrip(results, tmp_path):
    path = results.save_json(tmp_path / "out" / "eval.json")
    data = json.loads(path.read_text())
    assert data["summary"]["random"]["1"]["mean"] == 0.5 and data["query_ids"] == [0, 1, 2, 3]
    loaded = EvaluationResults.load_json(path)
    assert loaded.methods == results.methods
    assert np.array_equal(loaded.values("image_sim", 2), results.values("image_sim", 2))
    results.save_json(tmp_path / "summary.json", per_query=False)
    with pytest.raises(ValueError):
        EvaluationResults.load_json(tmp_path / "summary.json")


def _is_png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


def test_accuracy_plot(results, tmp_path):
    assert _is_png(plot_accuracy_vs_shots(results, tmp_path / "plots" / "acc.png"))


def test_training_curves_plot(tmp_path, caplog):
    history = [
        {"step": s, "reward": 0.1 * s, "advantages/std": 1.0 - 0.01 * s, "frac_reward_zero_std": 0.5 / (1 + s)}
        for s in range(1, 30)
    ] + [{"step": 29, "train_runtime": 12.0}]
    assert _is_png(plot_training_curves(history, tmp_path / "curves.png"))
    partial = [{"step": 1, "reward": 0.2}, {"step": 2, "reward": 0.3}]
    assert _is_png(plot_training_curves(partial, tmp_path / "partial.png"))
    assert "never logged" in caplog.text
    with pytest.raises(ValueError):
        plot_training_curves([{"step": 1, "loss": 0.1}], tmp_path / "none.png")
