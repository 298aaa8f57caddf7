"""A plan study: train research plans side by side (or take their finished output folders), evaluate every run on the
same held-out queries, and compare the plans with paired statistics and their training diagnostics
(`examples/compare_plans.py` is the command line; `recipes/demo/plans.yaml` the demo study).

A study file has four blocks:

- `study`: `output_dir`, `seeds` (training seeds), `references` (plans every plan is compared with), `grpo_steps`,
  `scale_learning_rates`, `eval_shots`, `eval_queries` (first N held-out queries; null = all), `baselines`;
- `base`: the options every run shares (data, reward backend, selector size, logging) as in a training recipe, or
  `base_recipe: path.yaml` plus `base` keys on top;
- `rl_data`: options of `examples/generate_rl_data.py` for the RCE warm-up data (generated once per study);
- `plans`: one entry per plan: `recipe` (an OK-VQA recipe whose plan settings are mirrored), `overrides` (recipe
  settings the plan changes, in the recipe's units), `demo_overrides` (run settings applied after scaling),
  `output_dirs` (finished runs, one per seed: evaluated, never trained), `note`.

Mirroring: the keys of `MIRRORED_KEYS` are copied from the recipe (advantages, KL, clipping, learning rates, reward
shaping, RCE schedule, group and batch sizes, shot range); data, backend and paths come from `base`. Scaling
(`scale_learning_rates`): every GRPO run takes `grpo_steps` optimiser steps instead of the recipe's epochs, and its
learning rate is multiplied by (recipe steps / grpo_steps), recipe steps = epochs × max_train_queries ×
num_generations / per_device_train_batch_size, so the product learning rate × steps (how far Adam can move the
weights along a consistent gradient) is the recipe's; the RCE warm-up keeps the recipe's epochs, batch and τ schedule
over the study's training queries, its learning rate multiplied by (recipe queries / study queries) for the same
reason. Runs that share seed, warm-up settings and reward start from one warm-up (so paired differences between them
come from GRPO alone).

Statistics (all from `trl_icd.evaluation`): per plan and column (exactly s shots, the mean over shots, the selector's
own stop) the per-query accuracy averaged over seeds, its 95% t interval over queries, and paired comparisons
(`paired_comparison`: mean difference, t interval, sign-flip p) against each reference on the same queries. The
intervals are over queries for these training seeds; the per-seed differences are listed so seed-to-seed spread is
visible too.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

MIRRORED_KEYS = (
    "advantage_mode", "advantage_min_std", "advantage_clip", "beta", "adaptive_kl", "learning_rate",
    "lr_scheduler_type", "epsilon", "loss_type", "num_generations", "per_device_train_batch_size",
    "max_completion_length", "reward_mode", "hard_weight", "soft_weight", "rel_weight", "run_grpo",
    "rce_num_train_epochs", "rce_learning_rate", "rce_temperature_start", "rce_temperature_end",
    "rce_per_device_train_batch_size", "selector_min_shots", "selector_max_shots",
    "zero_contrast_groups", "selective_rollout", "selective_rollout_keep_prob", "selective_rollout_min_keep_prob",
    "dynamic_sampling_max_rounds", "plateau_stopping_metric",
)
"""Plan settings copied from an OK-VQA recipe (keys a recipe does not set are left to `base`)."""

WARMUP_KEYS = ("rce_num_train_epochs", "rce_learning_rate", "rce_temperature_start", "rce_temperature_end",
               "rce_per_device_train_batch_size", "rce_weighting", "rce_drop_flat_groups", "reward_mode",
               "hard_weight", "soft_weight", "rel_weight", "seed", "model_name_or_path", "selector_min_shots",
               "selector_max_shots", "selector_overrides")
"""What decides a run's RCE warm-up (with the data and pool settings of `base`, shared by all runs)."""

DIAGNOSTIC_COLUMNS = (
    ("advantages/std", "adv. std"),
    ("policy_loss_abs", "abs. policy loss"),
    ("kl_share_of_loss", "KL share of loss"),
    ("rewards/within_group_std", "within-group reward std"),
    ("frac_reward_zero_std", "flat groups"),
    ("reward_calls", "reward calls"),
)

RCE_DEFAULT_BATCH = 8  # RCEArguments.rce_per_device_train_batch_size's default


@dataclass
class PlanSpec:
    name: str
    recipe: str | None = None
    overrides: dict = field(default_factory=dict)
    demo_overrides: dict = field(default_factory=dict)
    output_dirs: list[str] | None = None
    note: str = ""


@dataclass
class Study:
    path: str
    output_dir: str
    seeds: list[int]
    references: list[str]
    grpo_steps: int | None
    scale_learning_rates: bool
    eval_shots: list[int]
    eval_queries: int | None
    baselines: list[str]
    base: dict
    rl_data: dict
    plans: dict[str, PlanSpec]


def _read_yaml(path: str) -> dict:
    import yaml

    with open(path) as f:
        return yaml.safe_load(f) or {}


def _resolve(path: str, relative_to: str) -> str:
    """A path written in a study file: as given if it exists from the working directory, else relative to the
    study file's folder, else relative to the repository (two folders above `recipes/<x>/`)."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    here = os.path.dirname(os.path.abspath(relative_to))
    for root in (here, os.path.dirname(os.path.dirname(here))):
        candidate = os.path.join(root, path)
        if os.path.exists(candidate):
            return candidate
    raise FileNotFoundError(f"{path} (named in {relative_to}) not found")


def load_study(path: str) -> Study:
    """Parse and check a study file (module docstring)."""
    raw = _read_yaml(path)
    unknown = set(raw) - {"study", "base", "base_recipe", "rl_data", "plans"}
    if unknown:
        raise ValueError(f"{path}: unknown top-level keys {sorted(unknown)}")
    study = dict(raw.get("study") or {})
    base = {}
    if raw.get("base_recipe"):
        base.update(_read_yaml(_resolve(raw["base_recipe"], path)))
    base.update(raw.get("base") or {})
    plans = {}
    for name, entry in (raw.get("plans") or {}).items():
        entry = dict(entry or {})
        extra = set(entry) - {"recipe", "overrides", "demo_overrides", "output_dirs", "note"}
        if extra:
            raise ValueError(f"{path}: plan {name!r} has unknown keys {sorted(extra)}")
        recipe = _resolve(entry["recipe"], path) if entry.get("recipe") else None
        dirs = entry.get("output_dirs")
        plans[str(name)] = PlanSpec(str(name), recipe, dict(entry.get("overrides") or {}),
                                    dict(entry.get("demo_overrides") or {}), list(dirs) if dirs else None,
                                    str(entry.get("note", "")))
    if not plans:
        raise ValueError(f"{path}: no plans")
    references = list(study.get("references") or [])
    missing = [r for r in references if r not in plans]
    if missing:
        raise ValueError(f"{path}: references {missing} are not plans ({sorted(plans)})")
    seeds = [int(s) for s in study.get("seeds", [0])]
    for spec in plans.values():
        if spec.output_dirs is not None and len(spec.output_dirs) != len(seeds):
            raise ValueError(f"{path}: plan {spec.name!r} lists {len(spec.output_dirs)} output_dirs for "
                             f"{len(seeds)} seeds")
    shots = [int(s) for s in study.get("eval_shots", [1, 2, 3, 4])]
    if not shots or min(shots) < 1:
        raise ValueError(f"{path}: eval_shots must be positive shot counts, got {shots}")
    return Study(
        path=path,
        output_dir=str(study.get("output_dir", "outputs/plan_study")),
        seeds=seeds,
        references=references,
        grpo_steps=int(study["grpo_steps"]) if study.get("grpo_steps") else None,
        scale_learning_rates=bool(study.get("scale_learning_rates", True)),
        eval_shots=shots,
        eval_queries=int(study["eval_queries"]) if study.get("eval_queries") else None,
        baselines=list(study.get("baselines", ["random"])),
        base=base,
        rl_data=dict(raw.get("rl_data") or {}),
        plans=plans,
    )


# ---------------------------------------------------------------------------------------------------------------
# Plan settings: mirror, scale, override.


def recipe_grpo_steps(recipe: Mapping) -> float | None:
    """Optimiser steps of a recipe's GRPO run (single process): epochs × queries × generations / batch."""
    if (recipe.get("max_steps") or -1) > 0:
        return float(recipe["max_steps"])
    needed = ("num_train_epochs", "max_train_queries", "num_generations", "per_device_train_batch_size")
    if any(recipe.get(k) is None for k in needed):
        return None
    return (float(recipe["num_train_epochs"]) * recipe["max_train_queries"] * recipe["num_generations"]
            / recipe["per_device_train_batch_size"])


def plan_settings(study: Study, plan: PlanSpec, seed: int) -> tuple[dict, dict]:
    """(run settings, scaling notes) of `plan` for training seed `seed` (module docstring: mirroring, scaling)."""
    settings = copy.deepcopy(study.base)
    notes: dict[str, Any] = {}
    mirrored: dict[str, Any] = {}
    recipe: dict = {}
    if plan.recipe:
        recipe = _read_yaml(plan.recipe)
        mirrored = {k: recipe[k] for k in MIRRORED_KEYS if k in recipe}
        notes["recipe"] = plan.recipe
    mirrored.update(plan.overrides)
    settings.update(mirrored)
    if study.grpo_steps:
        settings["max_steps"] = study.grpo_steps
        settings.pop("num_train_epochs", None)
    if plan.recipe and study.scale_learning_rates:
        steps = recipe_grpo_steps({**recipe, **plan.overrides})
        if steps and study.grpo_steps and "learning_rate" in mirrored:
            factor = steps / study.grpo_steps
            settings["learning_rate"] = float(mirrored["learning_rate"]) * factor
            notes["grpo"] = {"recipe_steps": steps, "steps": study.grpo_steps, "lr_recipe": mirrored["learning_rate"],
                             "lr": settings["learning_rate"], "lr_factor": factor}
        queries, ours = recipe.get("max_train_queries"), settings.get("max_train_queries")
        if queries and ours and "rce_learning_rate" in mirrored:
            factor = float(queries) / float(ours)
            settings["rce_learning_rate"] = float(mirrored["rce_learning_rate"]) * factor
            notes["rce"] = {"recipe_queries": queries, "queries": ours, "lr_recipe": mirrored["rce_learning_rate"],
                            "lr": settings["rce_learning_rate"], "lr_factor": factor}
    settings.update(plan.demo_overrides)
    settings["seed"] = int(seed)
    return settings, notes


def warmup_key(settings: Mapping, base: Mapping) -> str | None:
    """Identity of a run's RCE warm-up (None without one)."""
    if not settings.get("rce_data_path"):
        return None
    data = {k: v for k, v in base.items() if k.startswith(("demo_", "pool_", "dataset", "features", "max_train"))}
    key = {k: settings.get(k) for k in WARMUP_KEYS} | {"data": data, "rce_data_path": settings["rce_data_path"]}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def warmup_group(settings: Mapping, base: Mapping) -> str | None:
    """The warm-up a GRPO run starts from (None: no warm-up, or an RCE-only run whose result is its final policy)."""
    if not (settings.get("rce_num_train_epochs") or 0) > 0 or settings.get("run_grpo", True) is False:
        return None
    return warmup_key({**settings, "rce_data_path": settings.get("rce_data_path") or "the study's RL data"}, base)


def write_recipe(settings: Mapping, path: str) -> str:
    import yaml

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(dict(settings), f, sort_keys=True)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Evaluation of one run.


def evaluate_selector(model, tokenizer, data, pools: Mapping, query_ids: Sequence, reward, shots: Sequence[int]
                      ) -> dict[str, np.ndarray]:
    """Per-query accuracy of a selector: `"<s>"` exactly s demonstrations (s <= its max_shots), `"avg"` their mean,
    `"own"` its own stop, plus `"own_shots"` (the number it chose per query)."""
    from .pipeline import score_selections, select_with_selector

    out = {}
    for s in shots:
        if s > model.config.max_shots:
            continue
        picks = select_with_selector(model, tokenizer, data, pools, query_ids, num_shots=s, show_progress=False)
        out[str(s)] = np.array(score_selections(reward, query_ids, picks))
    own = select_with_selector(model, tokenizer, data, pools, query_ids, show_progress=False)
    out["own"] = np.array(score_selections(reward, query_ids, own))
    out["own_shots"] = np.array([len(own[q]) for q in query_ids], dtype=float)
    return with_average(out, shots)


def with_average(values: Mapping[str, np.ndarray], shots: Sequence[int]) -> dict[str, np.ndarray]:
    """Add `"avg"`: the per-query mean over the shot columns (the research's 'avg' over shots 1-4)."""
    out = dict(values)
    present = [values[str(s)] for s in shots if str(s) in values]
    if present and len(present) == len(shots):
        out["avg"] = np.mean(present, axis=0)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Statistics and report.


def columns(shots: Sequence[int]) -> list[str]:
    return [str(s) for s in shots] + ["avg", "own"]


def column_label(column: str) -> str:
    return {"avg": "avg", "own": "own stop"}.get(column, f"{column}-shot")


def _seed_average(runs: Sequence[Mapping], column: str) -> np.ndarray | None:
    arrays = [r[column] for r in runs if column in r]
    return np.mean(arrays, axis=0) if arrays and len(arrays) == len(runs) else None


def compare_runs(runs: Sequence[Mapping], other: Sequence[Mapping], shots: Sequence[int]) -> dict:
    """Per column: `paired_comparison` of the seed-averaged per-query values of `runs` against `other` (same
    queries), plus the difference of each seed's run with the other's run of the same seed."""
    from .evaluation import paired_comparison

    out = {}
    for column in columns(shots):
        a, b = _seed_average(runs, column), _seed_average(other, column)
        if a is None or b is None:
            continue
        seed_diffs = [float((x[column] - y[column]).mean()) for x, y in zip(runs, other, strict=False)
                      if column in x and column in y]
        out[column] = {**paired_comparison(a, b).__dict__, "per_seed": seed_diffs}
    return out


def summarize(per_plan: Mapping[str, list[dict]], references: Sequence[str], shots: Sequence[int]) -> dict:
    """Per plan: accuracy intervals per column (seed-averaged per-query values), paired comparisons against each
    reference, per-seed means and per-seed differences."""
    from .evaluation import mean_ci

    out: dict[str, dict] = {}
    for name, runs in per_plan.items():
        entry = {"accuracy": {}, "per_seed": {}, "vs": {}}
        for column in columns(shots):
            values = _seed_average(runs, column)
            if values is None:
                continue
            entry["accuracy"][column] = mean_ci(values).__dict__
            entry["per_seed"][column] = [float(r[column].mean()) for r in runs]
        own_shots = _seed_average(runs, "own_shots")
        entry["own_mean_shots"] = float(own_shots.mean()) if own_shots is not None else None
        for ref in references:
            if ref != name and ref in per_plan:
                entry["vs"][ref] = compare_runs(runs, per_plan[ref], shots)
        out[name] = entry
    return out


def _pct(x: float | None, digits: int = 1, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{100 * x:+.{digits}f}" if signed else f"{100 * x:.{digits}f}"


def accuracy_table(summary: Mapping, baselines: Mapping, shots: Sequence[int]) -> str:
    rows = {**summary, **baselines}
    cols = (["0"] if any("0" in e["accuracy"] for e in rows.values()) else []) + columns(shots)
    lines = ["| Plan | " + " | ".join(column_label(c) for c in cols) + " | shots (own stop) |",
             "|---|" + "---|" * (len(cols) + 1)]
    for name, entry in rows.items():
        cells = []
        for c in cols:
            cell = entry["accuracy"].get(c)
            cells.append(f"{_pct(cell['mean'])} ± {_pct((cell['high'] - cell['low']) / 2)}" if cell else "–")
        shots_cell = f"{entry['own_mean_shots']:.2f}" if entry.get("own_mean_shots") is not None else "–"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {shots_cell} |")
    return "\n".join(lines)


def comparison_table(summary: Mapping, reference: str, shots: Sequence[int], key: str = "vs") -> str:
    """Paired differences of every plan against `reference` (`key="start"`: against each plan's own GRPO start)."""
    cols = columns(shots)
    lines = [f"| Plan − {reference} | " + " | ".join(column_label(c) for c in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for name, entry in summary.items():
        comparisons = entry.get(key, {}).get(reference)
        if not comparisons:
            continue
        cells = []
        for c in cols:
            cmp = comparisons.get(c)
            if cmp is None:
                cells.append("–")
                continue
            seeds = ", ".join(_pct(d, signed=True) for d in cmp["per_seed"])
            cells.append(f"{_pct(cmp['mean_diff'], signed=True)} [{_pct(cmp['low'], signed=True)}, "
                         f"{_pct(cmp['high'], signed=True)}] p={cmp['p_value']:.2g} (seeds: {seeds})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def diagnostics_table(diagnostics: Mapping[str, Mapping]) -> str:
    header = "| Plan | " + " | ".join(label for _, label in DIAGNOSTIC_COLUMNS) + " | bottleneck (cause) |"
    lines = [header, "|---|" + "---|" * (len(DIAGNOSTIC_COLUMNS) + 1)]
    for name, diag in diagnostics.items():
        if not diag:
            lines.append(f"| {name} | " + " | ".join("–" for _ in DIAGNOSTIC_COLUMNS) + " | no GRPO run |")
            continue
        cells = []
        for key, _ in DIAGNOSTIC_COLUMNS:
            value = diag["averages"].get(key)
            if value is None:
                cells.append("–")
            elif key == "reward_calls":
                cells.append(f"{value:,.0f}")
            elif key in ("kl_share_of_loss", "frac_reward_zero_std"):
                cells.append(f"{100 * value:.0f}%")
            else:
                cells.append(f"{value:.3g}")
        runs = len(diag["bottlenecks"])
        verdict = ", ".join(f"{b} ({n}/{runs})" if n < runs else b
                            for b, n in Counter(diag["bottlenecks"]).most_common())
        cause = ", ".join(sorted({c for c in diag["causes"] if c}))
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {verdict}{f' ({cause})' if cause else ''} |")
    return "\n".join(lines)


def average_diagnostics(diagnoses: Sequence) -> dict | None:
    """Seed-averaged `run_averages` of a plan's runs, with each run's bottleneck and small-std cause."""
    if not diagnoses:
        return None
    keys = [k for k, _ in DIAGNOSTIC_COLUMNS] + ["reward", "kl", "entropy/first_quarter", "entropy/last_quarter",
                                                   "kl_share_of_gradient_weight"]
    averages = {}
    for key in keys:
        values = [d.averages.get(key) for d in diagnoses if d.averages.get(key) is not None]
        averages[key] = float(np.mean(values)) if values else None
    return {"averages": averages, "bottlenecks": [d.bottleneck for d in diagnoses],
            "causes": [d.cause_of_small_std for d in diagnoses]}


# ---------------------------------------------------------------------------------------------------------------
# Plots (Agg canvas on a private Figure, as in `trl_icd.evaluation`).


def _figure(width: float, height: float, ncols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure, figure.subplots(1, ncols, squeeze=False)[0]


def plot_comparisons(summary: Mapping, references: Sequence[str], path: str, column: str = "own") -> str:
    """Left: each plan's held-out accuracy at `column` (95% CI); then one panel per reference: paired differences."""
    names = list(summary)
    figure, axes = _figure(4.2 * (1 + len(references)), 0.45 * len(names) + 1.6, ncols=1 + len(references))
    y = np.arange(len(names))[::-1]
    cells = [summary[n]["accuracy"].get(column) for n in names]
    means = np.array([100 * c["mean"] if c else np.nan for c in cells])
    errors = np.array([[100 * (c["mean"] - c["low"]), 100 * (c["high"] - c["mean"])] if c else [0, 0] for c in cells]).T
    axes[0].errorbar(means, y, xerr=np.nan_to_num(errors), fmt="o", capsize=3)
    axes[0].set_yticks(y, names)
    axes[0].set_xlabel(f"held-out accuracy, {column_label(column)} (%)")
    axes[0].grid(alpha=0.3)
    for axis, ref in zip(axes[1:], references, strict=True):
        diffs = [summary[n]["vs"].get(ref, {}).get(column) for n in names]
        mean = np.array([100 * d["mean_diff"] if d else np.nan for d in diffs])
        err = np.array([[100 * (d["mean_diff"] - d["low"]), 100 * (d["high"] - d["mean_diff"])] if d else [0, 0]
                        for d in diffs]).T
        axis.errorbar(mean, y, xerr=np.nan_to_num(err), fmt="o", capsize=3, color="tab:red")
        for yi, d in zip(y, diffs, strict=True):
            if d:
                axis.annotate(f"p={d['p_value']:.2g}", (100 * d["high"], yi), xytext=(4, -3),
                              textcoords="offset points", fontsize="x-small")
        axis.axvline(0, color="grey", lw=1)
        axis.set_yticks(y, names)
        axis.set_xlabel(f"paired difference vs {ref} (points)")
        axis.grid(alpha=0.3)
    figure.suptitle(f"plans on the same held-out queries, {column_label(column)} (95% CI)")
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path


def plot_diagnostics(diagnostics: Mapping[str, Mapping], path: str) -> str:
    """One bar panel per training diagnostic (seed-averaged over the run)."""
    names = [n for n, d in diagnostics.items() if d]
    figure, axes = _figure(3.0 * len(DIAGNOSTIC_COLUMNS), 0.4 * len(names) + 1.6, ncols=len(DIAGNOSTIC_COLUMNS))
    y = np.arange(len(names))[::-1]
    for axis, (key, label) in zip(axes, DIAGNOSTIC_COLUMNS, strict=True):
        values = [diagnostics[n]["averages"].get(key) for n in names]
        axis.barh(y, [v if v is not None else 0 for v in values], color="tab:blue")
        axis.set_yticks(y, names if axis is axes[0] else [""] * len(names))
        axis.set_title(label, fontsize="small")
        if key == "policy_loss_abs" and all(v and v > 0 for v in values):
            axis.set_xscale("log")
        axis.grid(alpha=0.3, axis="x")
    figure.suptitle("training diagnostics, averaged over each run and the seeds")
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path


__all__ = ["MIRRORED_KEYS", "PlanSpec", "Study", "accuracy_table", "average_diagnostics", "compare_runs",
           "comparison_table", "warmup_group",
           "diagnostics_table", "evaluate_selector", "load_study", "plan_settings", "plot_comparisons",
           "plot_diagnostics", "recipe_grpo_steps", "summarize", "warmup_key", "with_average", "write_recipe"]
