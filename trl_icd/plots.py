"""The two figures of a run, made to be read without the docs: accuracy against the number of demonstrations for
every method (with the selector's own choice of shot count and the oracle), and the training curves.

Both draw on a private Agg `Figure` (no pyplot state: safe in scripts, tests and notebooks) at 150 dpi.
"""

from __future__ import annotations

import logging
import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .evaluation import EvaluationResults

logger = logging.getLogger(__name__)

DPI = 150
METHOD_LABELS = {
    "zero_shot": "Zero-shot (no demonstrations)",
    "random": "Random demonstrations",
    "image_sim": "Image similarity (RICES)",
    "text_sim": "Question similarity (text)",
    "selector": "Trained selector, exactly that many shots",
    "oracle (pool)": "Oracle: best selection from the pool",
}
DATASET_LABELS = {"demo": "Demo world", "okvqa": "OK-VQA", "vqav2": "VQAv2"}


def _new_figure(width: float, height: float, nrows: int = 1, ncols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure, figure.subplots(nrows, ncols, squeeze=False).ravel()


def _save(figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=DPI, bbox_inches="tight")
    return path


def _errors(intervals, scale: float) -> np.ndarray:
    return np.nan_to_num(np.array([[i.mean - i.low, i.high - i.mean] for i in intervals]).T * scale)


def plot_accuracy_vs_shots(results: EvaluationResults, path: str | os.PathLike, *args, **kwargs) -> Path:
    """`accuracy_vs_shots_figure(results, ...)` written to `path` as PNG."""
    return _save(accuracy_vs_shots_figure(results, *args, **kwargs), path)


def accuracy_vs_shots_figure(
    results: EvaluationResults,
    methods: Sequence[str] | None = None,
    scale: float = 100.0,
    title: str | None = None,
    labels: Mapping[str, str] | None = None,
    own_choice: Mapping[str, tuple[Sequence[float], float]] | None = None,
    reference: Sequence[str] = (),
    dataset: str | None = None,
):
    """Accuracy (mean with its confidence interval) against the number of demonstrations: a matplotlib `Figure`.

    - each of `methods` (default: all in `results` but `reference`) is a line over its shot counts; the lines are
      dodged sideways a little so their error bars do not overlap;
    - `own_choice`: {name: (per-query accuracies, mean number of shots)} of a selector choosing its own number of
      demonstrations: a star at its mean shot count, value in the legend (the run's headline figure);
    - `reference`: methods drawn as a horizontal line with its interval as a band across all shot counts (the
      oracle, whose value is not tied to one shot count), value in the legend;
    - `labels` names methods in the legend (default: `METHOD_LABELS`, else the method's own name); the title names
      the dataset (`dataset`, else `results.meta["dataset"]`) and the number of queries."""
    from .evaluation import mean_ci

    labels = {**METHOD_LABELS, **(labels or {})}
    reference = [m for m in reference if m in results.per_query]
    methods = [m for m in (methods if methods is not None else results.methods) if m not in reference]
    lines = [m for m in methods if results.per_query.get(m)]
    for missing in set(methods) - set(lines):
        logger.warning("no results for %r; left out of the plot", missing)
    if not lines and not own_choice and not reference:
        raise ValueError("no methods to plot")
    figure, (axis,) = _new_figure(7.5, 4.8)
    shots = results.shots
    # Dodge: at each shot count the methods present there are spread symmetrically around it.
    present_at = {s: [m for m in lines if s in results.per_query[m]] for s in shots}
    width = 0.08
    markers = iter("osD^vP<>X")  # markers tell the lines apart in grey print too
    handles = {}
    for method in lines:
        xs = sorted(results.per_query[method])
        intervals = [results.interval(method, s) for s in xs]
        dodged = [s + (present_at[s].index(method) - (len(present_at[s]) - 1) / 2) * width for s in xs]
        handles[method] = axis.errorbar(
            dodged, [i.mean * scale for i in intervals], yerr=_errors(intervals, scale), marker=next(markers, "o"),
            markersize=5, capsize=3, linewidth=1.5, label=labels.get(method, method))
    x_low, x_high = min(shots, default=0) - 0.4, max(shots, default=1) + 0.4
    for method in reference:
        values = np.concatenate([results.per_query[method][s] for s in sorted(results.per_query[method])])
        interval = mean_ci(values, level=results.level, method=results.ci_method)
        line = axis.axhline(interval.mean * scale, linestyle="--", linewidth=1.5, color="0.25",
                            label=f"{labels.get(method, method)}: {interval.mean * scale:.1f}")
        handles[method] = line
        if not math.isnan(interval.half_width):
            axis.axhspan(interval.low * scale, interval.high * scale, color=line.get_color(), alpha=0.12, linewidth=0)
    for name, (accuracies, mean_shots) in (own_choice or {}).items():
        interval = mean_ci(accuracies, level=results.level, method=results.ci_method)
        base = labels.get(name, name).split(",")[0]
        handles[f"own:{name}"] = axis.errorbar(
                      [mean_shots], [interval.mean * scale], yerr=_errors([interval], scale), marker="*",
                      markersize=16, capsize=4, linestyle="none", color="crimson", markeredgecolor="black",
                      zorder=5, label=f"{base}, own number of shots (mean {mean_shots:.2f}): "
                                      f"{interval.mean * scale:.1f}")
    axis.set_xlim(x_low, x_high)
    axis.set_xticks(shots)
    axis.set_xlabel("number of demonstrations in the prompt (shots)")
    axis.set_ylabel("VQA accuracy (%)" if scale == 100 else "VQA accuracy")
    axis.grid(alpha=0.3)
    # Legend in reading order: the curves, then the selector's own choice, then the reference lines.
    order = [*lines, *(f"own:{n}" for n in own_choice or {}), *reference]
    axis.legend([handles[k] for k in order], [handles[k].get_label() for k in order], fontsize="small",
                loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    dataset = dataset or DATASET_LABELS.get(results.meta.get("dataset"), results.meta.get("dataset"))
    axis.set_title(title or (f"{dataset + ': ' if dataset else ''}accuracy vs. number of demonstrations\n"
                             f"n = {results.num_queries} queries; bars and band: "
                             f"{results.level:.0%} {results.ci_method} confidence intervals"), fontsize="medium")
    return figure


@dataclass(frozen=True)
class Curve:
    """One training-curve panel: the first of `keys` ((log key, offset added)) found in the log history, times
    `scale`; `smooth` draws an exponential moving average over the faint raw values."""

    title: str
    ylabel: str
    keys: tuple[tuple[str, float], ...]
    scale: float = 1.0
    smooth: bool = True


DEFAULT_CURVES = (
    Curve("Reward of sampled selections", "mean shaped reward", (("reward", 0.0),)),
    Curve("Held-out accuracy (greedy)", "VQA accuracy (%)", (("heldout/accuracy", 0.0),), scale=100.0, smooth=False),
    Curve("Demonstrations per selection", "mean shots",
          (("in_context_reward/num_shots", 0.0), ("completions/mean_length", -1.0))),  # length - the stop token
    Curve("Advantage spread", "std of advantages", (("advantages/std", 0.0),)),
    Curve("Groups without reward contrast", "fraction of groups", (("frac_reward_zero_std", 0.0),)),
    Curve("Policy entropy", "nats per token", (("entropy", 0.0),)),
)


def ema(values: Sequence[float], weight: float) -> np.ndarray:
    """Debiased exponential moving average (TensorBoard's smoothing): s_t = w·s_{t-1} + (1-w)·x_t, divided by
    1 - w^t so the start is not pulled toward 0."""
    out, state = np.empty(len(values)), 0.0
    for t, value in enumerate(values, start=1):
        state = weight * state + (1.0 - weight) * value
        out[t - 1] = state / (1.0 - weight**t)
    return out


def smoothing_weight(num_points: int) -> float:
    """EMA weight for a curve of `num_points`: a memory of about num_points/25 points (at least 2, at most 10) so
    the smoothed line follows trends with little lag; none under 8 points."""
    if num_points < 8:
        return 0.0
    memory = min(10.0, max(2.0, num_points / 25.0))
    return round(1.0 - 1.0 / memory, 2)


def _as_curve(spec) -> Curve:
    if isinstance(spec, Curve):
        return spec
    key, label = spec  # the (log key, label) pairs of earlier versions
    return Curve(label, label, ((key, 0.0),))


def plot_training_curves(log_history: Sequence[Mapping], path: str | os.PathLike, *args, **kwargs) -> Path:
    """`training_curves_figure(log_history, ...)` written to `path` as PNG."""
    return _save(training_curves_figure(log_history, *args, **kwargs), path)


def training_curves_figure(
    log_history: Sequence[Mapping],
    curves: Sequence[Curve | tuple[str, str]] = DEFAULT_CURVES,
    title: str | None = None,
):
    """A matplotlib `Figure` with one panel per curve against the optimiser step, from a Trainer's `state.log_history` (or `metrics.jsonl`
    rows); entries without the key (e.g. the end-of-run summary) are skipped, curves never logged are left out (and
    logged); none at all raises."""
    present = []
    for curve in map(_as_curve, curves):
        for key, offset in curve.keys:
            points = [(entry.get("step", n), entry[key]) for n, entry in enumerate(log_history) if key in entry]
            points = [(s, (float(v) + offset) * curve.scale) for s, v in points
                      if v is not None and math.isfinite(float(v))]
            if points:
                present.append((curve, key, points))
                break
        else:
            logger.warning("%r was never logged; its panel is left out", curve.keys[0][0])
    if not present:
        raise ValueError(f"none of {[c.keys[0][0] for c in map(_as_curve, curves)]} is in the log history")
    ncols = min(3, len(present))
    nrows = math.ceil(len(present) / ncols)
    figure, axes = _new_figure(4.3 * ncols, 3.3 * nrows + 0.4, nrows, ncols)
    weights, sources = set(), []
    for axis, (curve, key, points) in zip(axes, present, strict=False):
        steps, values = (np.array(v) for v in zip(*points, strict=True))
        weight = smoothing_weight(len(values)) if curve.smooth else 0.0
        if weight:
            axis.plot(steps, values, color="C0", alpha=0.25, linewidth=1)
            axis.plot(steps, ema(values, weight), color="C0", linewidth=2)
            weights.add(weight)
        else:
            axis.plot(steps, values, color="C1" if not curve.smooth else "C0", marker="o", markersize=4,
                      linewidth=1.5)
        axis.set_title(curve.title, fontsize="medium")
        axis.set_xlabel("optimiser step")
        axis.set_ylabel(curve.ylabel)
        axis.grid(alpha=0.3)
        offset = dict(curve.keys)[key]
        sources.append(f"{curve.title}: {key}" + (f" {offset:+g}" if offset else "")
                       + (f" x {curve.scale:g}" if curve.scale != 1 else ""))
    for axis in axes[len(present):]:
        axis.set_visible(False)
    if title:
        figure.suptitle(title)
    notes = ["Faint: the value logged at each logging step; bold: its exponential moving average "
             f"(weight {', '.join(f'{w:.2f}' for w in sorted(weights))})." if weights else "",
             "Logged keys (metrics.jsonl): " + "; ".join(sources) + "."]
    figure.tight_layout(rect=(0, 0.06 if nrows > 1 else 0.1, 1, 1))
    figure.text(0.01, 0.005, textwrap.fill(" ".join(n for n in notes if n), 190), fontsize="x-small", color="0.35",
                va="bottom")
    return figure


__all__ = ["Curve", "DEFAULT_CURVES", "METHOD_LABELS", "accuracy_vs_shots_figure", "ema", "plot_accuracy_vs_shots",
           "plot_training_curves", "smoothing_weight", "training_curves_figure"]
