"""The figures read without the docs: readable legend names, the selector's own-choice headline point at its mean
shot count, the oracle as a band across all shot counts, dataset and n in the title, error bars dodged apart, 150 dpi;
training curves with y labels, EMA smoothing over the raw values, held-out accuracy and mean shots."""

import numpy as np
import pytest
from matplotlib.collections import LineCollection

from trl_icd.evaluation import EvaluationResults
from trl_icd.plots import (
    DPI,
    accuracy_vs_shots_figure,
    ema,
    plot_accuracy_vs_shots,
    smoothing_weight,
    training_curves_figure,
)


@pytest.fixture
def demo_like():
    rng = np.random.default_rng(0)
    results = EvaluationResults(query_ids=list(range(50)), meta={"dataset": "okvqa"})

    def cell(p):
        return (rng.random(50) < p).astype(float)

    results.add("zero_shot", 0, cell(0.1))
    for s in (1, 2, 3):
        for method, p in (("random", 0.3), ("image_sim", 0.6), ("text_sim", 0.35), ("selector", 0.9)):
            if method != "selector" or s <= 2:
                results.add(method, s, cell(p))
    results.add("oracle (pool)", 2, np.ones(50))
    return results, cell(0.88)


def test_accuracy_figure_shows_every_element_a_reader_needs(demo_like):
    results, own = demo_like
    figure = accuracy_vs_shots_figure(results, reference=["oracle (pool)"], own_choice={"selector": (own, 1.4)})
    axis = figure.axes[0]
    legend = [t.get_text() for t in axis.get_legend().get_texts()]
    assert legend == [
        "Zero-shot (no demonstrations)", "Random demonstrations", "Image similarity (RICES)",
        "Question similarity (text)", "Trained selector, exactly that many shots",
        f"Trained selector, own number of shots (mean 1.40): {100 * own.mean():.1f}",
        "Oracle: best selection from the pool: 100.0",
    ]
    assert axis.get_title().startswith("OK-VQA: accuracy vs. number of demonstrations\nn = 50 queries")
    assert axis.get_xlabel() and axis.get_ylabel() == "VQA accuracy (%)"
    # the own-choice star sits at the mean shot count
    stars = [line for line in axis.lines if line.get_marker() == "*"]
    assert len(stars) == 1 and stars[0].get_xdata()[0] == pytest.approx(1.4)
    assert stars[0].get_ydata()[0] == pytest.approx(100 * own.mean())
    # the oracle spans every shot count (a horizontal line across the axes), not one point
    oracle = [line for line in axis.lines if line.get_linestyle() == "--"]
    assert len(oracle) == 1 and list(oracle[0].get_xdata()) == [0, 1] and oracle[0].get_ydata()[0] == 100
    # dodged: at each shot count the methods' points (and their error bars) sit at distinct x positions
    xs = {}
    for line in axis.lines:
        if line.get_marker() in tuple("osD^vP<>X"):  # the methods' points (not the caps or the star)
            for x in line.get_xdata():
                xs.setdefault(round(float(x)), []).append(float(x))
    assert len(xs[1]) == 4 and min(np.diff(sorted(xs[1]))) >= 0.07
    assert xs[0] == [0.0]  # a method alone at its shot count stays centred
    bars = [c for c in axis.collections if isinstance(c, LineCollection)]
    assert bars  # error bars drawn
    assert figure.dpi == DPI >= 150


def test_accuracy_png_is_high_resolution(demo_like, tmp_path):
    from PIL import Image

    results, own = demo_like
    path = plot_accuracy_vs_shots(results, tmp_path / "acc.png", reference=["oracle (pool)"],
                                  own_choice={"selector": (own, 1.4)})
    width, height = Image.open(path).size
    assert width >= 1200 and height >= 600


def test_ema_matches_hand_computed_values():
    # s_t = w s_{t-1} + (1-w) x_t, debiased by 1 - w^t; w = 0.5 on 1, 2, 3: 1, 1.25/0.75, 2.125/0.875
    assert ema([1.0, 2.0, 3.0], 0.5) == pytest.approx([1.0, 1.25 / 0.75, 2.125 / 0.875])
    assert ema([4.0] * 10, 0.9) == pytest.approx([4.0] * 10)  # no pull toward 0 at the start
    assert smoothing_weight(5) == 0.0 and 0.0 < smoothing_weight(50) < smoothing_weight(120) <= 0.9


def test_training_curves_have_labels_smoothing_heldout_and_shots():
    history = [{"step": 0, "heldout/accuracy": 0.4}]
    for step in range(10, 410, 10):
        history.append({"step": step, "reward": 1 + step / 400, "advantages/std": 0.9, "frac_reward_zero_std": 0.2,
                         "completions/mean_length": 2.5, "entropy": 1.0 - step / 1000})
        if step % 100 == 0:
            history.append({"step": step, "heldout/accuracy": 0.4 + step / 1000})
    history.append({"step": 400, "train_runtime": 10.0})
    figure = training_curves_figure(history, title="run")
    panels = [a for a in figure.axes if a.get_visible()]
    assert [a.get_title() for a in panels] == [
        "Reward of sampled selections", "Held-out accuracy (greedy)", "Demonstrations per selection",
        "Advantage spread", "Groups without reward contrast", "Policy entropy"]
    assert all(a.get_ylabel() and a.get_xlabel() == "optimiser step" for a in panels)
    reward, heldout, shots = panels[0], panels[1], panels[2]
    raw, smoothed = reward.lines  # faint raw values, then their EMA
    assert raw.get_alpha() < 0.5 and smoothed.get_alpha() is None
    weight = smoothing_weight(40)
    assert smoothed.get_ydata() == pytest.approx(ema(raw.get_ydata(), weight)) and weight > 0
    assert list(heldout.lines[0].get_xdata()) == [0, 100, 200, 300, 400]
    assert heldout.lines[0].get_ydata()[-1] == pytest.approx(80.0)  # in %
    assert set(np.round(shots.lines[0].get_ydata(), 6)) == {1.5}  # completion length minus the stop token
    note = figure.texts[-1].get_text()
    assert "completions/mean_length -1" in note and "exponential moving average" in note


def test_training_curves_prefer_the_rewards_shot_count():
    history = [{"step": s, "in_context_reward/num_shots": 1.2, "completions/mean_length": 9.0} for s in range(1, 4)]
    figure = training_curves_figure(history)
    (panel,) = [a for a in figure.axes if a.get_visible()]
    assert set(panel.lines[0].get_ydata()) == {1.2}
