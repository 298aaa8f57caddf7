"""Methods x shots evaluation statistics that do not depend on any model: confidence intervals, paired comparisons,
a Markdown table, plots and a JSON file.

Input is per-query accuracy (one float per evaluated query, in the same query order for every method and shot
count), e.g. the `soft` component the in-context reward computes for each (query, demonstrations) pair. Keeping the
per-query values, not just means, is what makes paired tests possible: two selectors evaluated on the same 800 queries
differ by much less noise than two independent means suggest (the prior research compared means whose standard
errors, ~1.7 points, exceeded most of the differences it reported, with no interval at all).

- `mean_ci`: Student-t interval by default (exact coverage for normal data, the standard choice for a mean over
  hundreds of queries); `method="bootstrap"` gives the percentile bootstrap, `"normal"` the z interval.
- `paired_comparison`: mean of the per-query differences a - b, its t interval, and a two-sided sign-flip
  permutation p-value (exact enumeration when at most `exact_max` differences are non-zero, else Monte Carlo with
  `n_resamples` seeded draws, p = (1 + #extreme) / (1 + n_resamples)).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from statistics import NormalDist

import numpy as np

logger = logging.getLogger(__name__)

CI_METHODS = ("t", "normal", "bootstrap")


# ---------------------------------------------------------------------------------------------------------------
# Student-t quantiles without SciPy (SciPy is not a dependency).


def _log_beta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta (modified Lentz; Numerical Recipes `betacf`)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            return h
    raise ArithmeticError("incomplete beta continued fraction did not converge")  # pragma: no cover


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must be in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    front = math.exp(a * math.log(x) + b * math.log1p(-x) - _log_beta(a, b))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_continued_fraction(a, b, x) / a
    return 1.0 - front * _beta_continued_fraction(b, a, 1.0 - x) / b


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    if df <= 0:
        raise ValueError("df must be positive")
    tail = 0.5 * regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


@lru_cache(maxsize=256)
def student_t_ppf(p: float, df: float) -> float:
    """The p-quantile of Student's t (bisection on `student_t_cdf` to ~1e-12)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -student_t_ppf(1.0 - p, df)
    low, high = 0.0, 1.0
    while student_t_cdf(high, df) < p:
        high *= 2.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        if student_t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
        if high - low < 1e-12 * max(1.0, high):
            break
    return 0.5 * (low + high)


# ---------------------------------------------------------------------------------------------------------------
# Intervals and paired comparisons.


@dataclass(frozen=True)
class Interval:
    """A mean with its confidence interval. `low`/`high` are NaN when undefined (fewer than two values)."""

    mean: float
    low: float
    high: float
    n: int
    level: float
    method: str

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2.0


def _as_values(values: Iterable[float], name: str = "values") -> np.ndarray:
    array = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=np.float64).ravel()
    if array.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} holds {int((~np.isfinite(array)).sum())} non-finite values (NaN/inf)")
    return array


def mean_ci(
    values: Iterable[float],
    level: float = 0.95,
    method: str = "t",
    n_resamples: int = 10_000,
    seed: int = 0,
) -> Interval:
    """The mean of `values` and its `level` confidence interval.

    `method`: "t" (default) mean ± t_{(1+level)/2, n-1} · s / sqrt(n) with the sample standard deviation s;
    "normal" the same with the normal quantile; "bootstrap" the percentile interval of `n_resamples` seeded
    resampled means. A constant array has a zero-width interval under every method.
    """
    if method not in CI_METHODS:
        raise ValueError(f"method must be one of {CI_METHODS}, got {method!r}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    x = _as_values(values)
    n, mean = x.size, float(x.mean())
    if n < 2:
        return Interval(mean, math.nan, math.nan, n, level, method)
    if method == "bootstrap":
        rng = np.random.default_rng(seed)
        means = np.empty(n_resamples)
        for start in range(0, n_resamples, 1000):  # bounded memory for large n
            stop = min(n_resamples, start + 1000)
            means[start:stop] = x[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
        alpha = (1.0 - level) / 2.0
        low, high = np.quantile(means, [alpha, 1.0 - alpha])
        return Interval(mean, float(min(low, mean)), float(max(high, mean)), n, level, method)
    sem = float(x.std(ddof=1)) / math.sqrt(n)
    q = (1.0 + level) / 2.0
    quantile = student_t_ppf(q, n - 1) if method == "t" else NormalDist().inv_cdf(q)
    return Interval(mean, mean - quantile * sem, mean + quantile * sem, n, level, method)


@dataclass(frozen=True)
class PairedComparison:
    """a vs b on the same queries: mean difference (a - b), its interval, a two-sided p-value, and counts of
    queries where a is better / worse / equal."""

    mean_diff: float
    low: float
    high: float
    p_value: float
    n: int
    wins: int
    losses: int
    ties: int
    level: float
    p_method: str

    @property
    def significant(self) -> bool:
        return self.p_value < 1.0 - self.level


def sign_flip_p_value(
    differences: np.ndarray, n_resamples: int = 10_000, seed: int = 0, exact_max: int = 16
) -> tuple[float, str]:
    """Two-sided p-value of "mean difference = 0" by flipping signs of the per-query differences (valid when, under
    the null, each difference is symmetric about 0). Returns (p, "exact" | "monte_carlo")."""
    d = differences[differences != 0]
    if d.size == 0:
        return 1.0, "exact"
    observed = abs(d.sum())
    tolerance = 1e-9 * max(1.0, float(np.abs(d).sum()))
    if d.size <= exact_max:
        signs = 1 - 2 * ((np.arange(2**d.size)[:, None] >> np.arange(d.size)) & 1)
        sums = np.abs(signs @ d)
        return float(np.mean(sums >= observed - tolerance)), "exact"
    rng = np.random.default_rng(seed)
    extreme = 0
    for start in range(0, n_resamples, 1000):
        stop = min(n_resamples, start + 1000)
        signs = rng.choice(np.array([-1.0, 1.0]), size=(stop - start, d.size))
        extreme += int(np.count_nonzero(np.abs(signs @ d) >= observed - tolerance))
    return (1.0 + extreme) / (1.0 + n_resamples), "monte_carlo"


def paired_comparison(
    a: Iterable[float],
    b: Iterable[float],
    level: float = 0.95,
    n_resamples: int = 10_000,
    seed: int = 0,
    exact_max: int = 16,
) -> PairedComparison:
    """Compare two methods on the same queries (`a[i]`, `b[i]` = accuracies on query i): mean of a - b with its t
    interval and a sign-flip permutation p-value. Identical arrays give difference 0 and p = 1."""
    x, y = _as_values(a, "a"), _as_values(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"paired arrays must have the same length, got {x.size} and {y.size}")
    d = x - y
    interval = mean_ci(d, level=level, method="t")
    p, p_method = sign_flip_p_value(d, n_resamples=n_resamples, seed=seed, exact_max=exact_max)
    return PairedComparison(
        mean_diff=interval.mean,
        low=interval.low,
        high=interval.high,
        p_value=p,
        n=int(d.size),
        wins=int((d > 0).sum()),
        losses=int((d < 0).sum()),
        ties=int((d == 0).sum()),
        level=level,
        p_method=p_method,
    )


# ---------------------------------------------------------------------------------------------------------------
# Results of a methods x shots evaluation.


@dataclass
class EvaluationResults:
    """Per-query accuracies per (method, shots), all over the same queries in the same order (`query_ids`)."""

    query_ids: list | None = None
    per_query: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)
    level: float = 0.95
    ci_method: str = "t"
    meta: dict = field(default_factory=dict)

    def add(self, method: str, shots: int, accuracies: Iterable[float]) -> None:
        """Record one cell. Every cell must cover the same number of queries (and `query_ids`, when given)."""
        values = _as_values(accuracies, f"accuracies of {method!r} at {shots} shots")
        expected = len(self.query_ids) if self.query_ids is not None else self.num_queries
        if expected is not None and values.size != expected:
            raise ValueError(f"{method!r} at {shots} shots: {values.size} values, expected {expected} (one per query)")
        self.per_query.setdefault(str(method), {})[int(shots)] = values

    @property
    def num_queries(self) -> int | None:
        """Queries per cell (None before the first cell)."""
        if self.query_ids is not None:
            return len(self.query_ids)
        for cells in self.per_query.values():
            for values in cells.values():
                return values.size
        return None

    @property
    def methods(self) -> list[str]:
        return list(self.per_query)

    @property
    def shots(self) -> list[int]:
        return sorted({s for cells in self.per_query.values() for s in cells})

    def values(self, method: str, shots: int) -> np.ndarray:
        try:
            return self.per_query[method][shots]
        except KeyError:
            raise KeyError(f"no results for method {method!r} at {shots} shots") from None

    def interval(self, method: str, shots: int) -> Interval:
        return mean_ci(self.values(method, shots), level=self.level, method=self.ci_method)

    def mean(self, method: str, shots: int | None = None) -> float:
        """Mean accuracy of a cell, or (shots=None) over all of the method's cells."""
        if shots is not None:
            return float(self.values(method, shots).mean())
        return float(np.mean([v.mean() for v in self.per_query[method].values()]))

    def best_method(self, shots: int, among: Sequence[str]) -> str | None:
        """The method of `among` with the highest mean at `shots` (ties: the first listed), None if none has it."""
        present = [m for m in among if shots in self.per_query.get(m, {})]
        return max(present, key=lambda m: (self.mean(m, shots), -present.index(m))) if present else None

    def compare_to_best(
        self, method: str, baselines: Sequence[str], **kwargs
    ) -> dict[int, tuple[str, PairedComparison]]:
        """Per shot count: (best baseline there, paired comparison of `method` against it)."""
        out = {}
        for shots in sorted(self.per_query.get(method, {})):
            best = self.best_method(shots, [b for b in baselines if b != method])
            if best is not None:
                out[shots] = (best, paired_comparison(self.values(method, shots), self.values(best, shots),
                                                      level=self.level, **kwargs))
        return out

    def to_dict(self, per_query: bool = True) -> dict:
        """JSON-able: summary (mean, CI) per cell, and the per-query values unless `per_query=False`."""
        summary = {
            method: {str(s): asdict(self.interval(method, s)) for s in sorted(cells)}
            for method, cells in self.per_query.items()
        }
        out = {"level": self.level, "ci_method": self.ci_method, "meta": self.meta, "summary": summary}
        if per_query:
            out["query_ids"] = self.query_ids
            out["per_query"] = {
                m: {str(s): v.tolist() for s, v in cells.items()} for m, cells in self.per_query.items()
            }
        return out

    def save_json(self, path: str | os.PathLike, per_query: bool = True) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_jsonable(self.to_dict(per_query)), indent=2, allow_nan=True))
        return path

    @classmethod
    def load_json(cls, path: str | os.PathLike) -> EvaluationResults:
        data = json.loads(Path(path).read_text())
        if "per_query" not in data:
            raise ValueError(f"{path} has no per-query values (saved with per_query=False); cannot rebuild results")
        results = cls(query_ids=data.get("query_ids"), level=data["level"], ci_method=data["ci_method"],
                      meta=data.get("meta", {}))
        for method, cells in data["per_query"].items():
            for shots, values in cells.items():
                results.add(method, int(shots), values)
        return results


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    if isinstance(obj, Hashable):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


# ---------------------------------------------------------------------------------------------------------------
# Tables.


def _cell(interval: Interval, scale: float, digits: int) -> str:
    mean = f"{interval.mean * scale:.{digits}f}"
    if math.isnan(interval.half_width):
        return mean
    return f"{mean} ± {interval.half_width * scale:.{digits}f}"


def markdown_table(
    results: EvaluationResults, methods: Sequence[str] | None = None, scale: float = 100.0, digits: int = 1
) -> str:
    """Methods (rows) x shots (columns), each cell "accuracy ± CI half-width" (in % with the default `scale`)."""
    methods = list(methods) if methods is not None else results.methods
    shots = results.shots
    level = f"{results.level:.0%}"
    header = "| Method | " + " | ".join(f"{s}-shot" for s in shots) + " |"
    lines = [header, "|---|" + "---|" * len(shots)]
    for method in methods:
        cells = [
            _cell(results.interval(method, s), scale, digits) if s in results.per_query.get(method, {}) else "–"
            for s in shots
        ]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    n = results.num_queries
    protocol = results.meta.get("vqa_protocol")
    scored = f" (VQA accuracy, protocol `{protocol}`)" if protocol else ""
    lines.append("")
    lines.append(f"Accuracy{' (%)' if scale == 100 else ''}{scored} ± half-width of the {level} {results.ci_method} "
                 f"confidence interval over {n} queries.")
    return "\n".join(lines)


def markdown_comparison_table(
    results: EvaluationResults, methods: Sequence[str], baselines: Sequence[str], scale: float = 100.0, digits: int = 1,
    **kwargs,
) -> str:
    """Each of `methods` against the best of `baselines` at each shot count: paired difference, CI, p-value."""
    level = f"{results.level:.0%}"
    lines = [
        f"| Method | Shots | Best baseline | Δ ({level} CI) | p | wins/losses/ties |",
        "|---|---|---|---|---|---|",
    ]
    for method in methods:
        for shots, (best, cmp) in results.compare_to_best(method, baselines, **kwargs).items():
            low, high = cmp.low * scale, cmp.high * scale
            delta = f"{cmp.mean_diff * scale:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"
            lines.append(
                f"| {method} | {shots} | {best} | {delta} | {cmp.p_value:.3g} | {cmp.wins}/{cmp.losses}/{cmp.ties} |"
            )
    lines.append("")
    lines.append("Δ: mean per-query difference (method − baseline) with its t interval; p: two-sided sign-flip "
                 "permutation test on the same queries.")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Plots live in `trl_icd.plots`; their names stay importable from here.

from .plots import DEFAULT_CURVES, plot_accuracy_vs_shots, plot_training_curves  # noqa: E402


__all__ = [
    "CI_METHODS",
    "DEFAULT_CURVES",
    "EvaluationResults",
    "Interval",
    "PairedComparison",
    "markdown_comparison_table",
    "markdown_table",
    "mean_ci",
    "paired_comparison",
    "plot_accuracy_vs_shots",
    "plot_training_curves",
    "sign_flip_p_value",
    "student_t_cdf",
    "student_t_ppf",
]
