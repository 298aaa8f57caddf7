"""Explain a GRPO run from its logged metrics: how much reward contrast the groups had, where a small advantage std
comes from, whether the KL term dominates the loss, whether the signal or the update size limits learning, and what
to try next (each with the option that does it).

    python -m trl_icd.diagnose OUTPUT_DIR                       # a finished or running training
    python -m trl_icd.diagnose OUTPUT_DIR --config recipe.yaml  # settings for runs that did not record them
    python -m trl_icd.diagnose OUTPUT_DIR --json                # the numbers, machine-readable

What is read (all optional but one source of per-step metrics):
- per-step metrics: `metrics.jsonl` in OUTPUT_DIR (one JSON object per logged step), else TRL's `log_history` from
  `trainer_state.json` in OUTPUT_DIR or in its newest `checkpoint-*/` (a running training); the source reaching the
  latest step wins;
- settings: `--config`, else `run_config.json` (written by `examples/train_okvqa.py`), else the settings block of
  `run_summary.json`; missing settings are reported as unknown and the checks that need them are skipped;
- `run_summary.json`: reward calls and zero-contrast counts, when the run wrote them.

How the checks are derived (G = group size, c = share of groups with reward contrast = 1 - frac_reward_zero_std,
s = mean within-group reward std over the contrasted groups = rewards/within_group_std / c):

- Flat groups get advantage 0 in every mode, so over the batch advantages/std ≈ sqrt(c · m2), with m2 the mean
  squared advantage of a contrasted row. `zscore`: a group's z-scores have unbiased std 1, so m2 = (G-1)/G (0.935²
  for G = 8); when the group std is below `advantage_min_std` they shrink by s / min_std. `rank`: for G distinct
  rewards m2 = (G+1)/(3(G-1)) (0.655² for G = 8; the within-group std with n-1 is 0.70), less with ties (binary
  rewards, k of G right: k(G-k)/(G-1)²). `mean`/`rloo`: m2 = s² (G-1)/G (times (G/(G-1))² for rloo): the reward
  scale itself. So the logged std factors into sqrt(c) (flat groups) × the floor or reward-scale factor × ties.
- The KL term: TRL's loss per token is -A·ratio + β·KL (k3 estimator), so the logged loss minus β·kl is the policy
  term. Its value is near 0 by construction (advantages have mean 0), so the share of the loss *value* overstates
  the KL term's grip on the update; the gradient weights compare better: both terms multiply ∇log π of the sampled
  tokens, the policy term by |A| (rms ≈ advantages/std), the KL term by β·|1 - π_ref/π| ≈ β·sqrt(2·KL).
- Adam normalises the step: a gradient made of noise (flat groups) or of the KL pull still moves the weights by
  about the learning rate per step. A higher learning rate therefore scales whatever direction the gradient has; it
  cannot create reward contrast. The update size is the bottleneck only when the signal is healthy and the policy
  still does not move (entropy, KL and reward flat).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

METRICS_FILE = "metrics.jsonl"
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "run_config.json"
SUMMARY_FILE = "run_summary.json"

# Settings the checks use, with where they live in TRL / this package.
SETTINGS = ("advantage_mode", "advantage_min_std", "advantage_clip", "num_generations", "beta", "adaptive_kl",
            "adaptive_kl_beta_max", "learning_rate", "reward_mode", "loss_type", "max_steps", "temperature",
            "zero_contrast_groups", "selective_rollout")

AVERAGED_KEYS = ("advantages/std", "advantages/max_abs", "rewards/within_group_std", "frac_reward_zero_std",
                 "reward", "reward_std", "kl", "kl_beta", "loss", "entropy", "grad_norm", "learning_rate",
                 "zero_contrast/frac_rows_with_gradient", "in_context_reward/gt_prob", "in_context_reward/soft",
                 "in_context_reward/num_shots")
# `ICDGRPOTrainer` logs its counts as running totals (the last logged value is the total so far); the reward's own
# `backend_pairs` is a per-call mean (its total is the sum over steps).
CUMULATIVE_CALL_KEY = "reward_calls/sent"
PER_STEP_CALL_KEY = "in_context_reward/backend_pairs"
COUNT_KEYS = ("zero_contrast/groups_dropped", "zero_contrast/queries_skipped")


# ---------------------------------------------------------------------------------------------------------------
# Reading a run.


@dataclass
class RunLog:
    """A run's per-step train metrics (sorted by step), its settings and its summary."""

    output_dir: str
    history: list[dict]
    source: str
    settings: dict = field(default_factory=dict)
    settings_source: str | None = None
    summary: dict = field(default_factory=dict)
    finished: bool = False


def _read_jsonl(path: str) -> list[dict]:
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                if number > 1 and not f.read().strip():  # a running writer's half-written last line
                    break
                raise ValueError(f"{path}:{number} is not JSON: {err}") from None
            if isinstance(row, dict):
                rows.append(row)
    return rows


def _step_of(entry: Mapping) -> int | None:
    for key in ("step", "global_step"):
        if isinstance(entry.get(key), (int, float)):
            return int(entry[key])
    return None


def is_train_entry(entry: Mapping) -> bool:
    """A per-step training log (not the end-of-training summary, not an evaluation)."""
    if "train_runtime" in entry or any(str(k).startswith("eval_") for k in entry):
        return False
    return any(k in entry for k in ("loss", "reward", "advantages/std", "frac_reward_zero_std"))


def _train_history(entries: Sequence[Mapping]) -> list[dict]:
    rows = [dict(e) for e in entries if is_train_entry(e)]
    for n, row in enumerate(rows):
        if _step_of(row) is None:
            row["step"] = n + 1
    rows.sort(key=_step_of)
    return rows


def _state_files(output_dir: str) -> list[str]:
    """The run's own trainer state and its newest checkpoint's (each holds the whole history up to its step)."""
    paths = [os.path.join(output_dir, STATE_FILE)]
    checkpoints = glob.glob(os.path.join(output_dir, "checkpoint-*", STATE_FILE))
    if checkpoints:
        paths.append(max(checkpoints, key=lambda p: int(re.search(r"checkpoint-(\d+)", p).group(1))))
    return [p for p in paths if os.path.isfile(p)]


def _flat_settings(mapping: Mapping) -> dict:
    """`SETTINGS` found anywhere in a (possibly nested by argument group) mapping."""
    out = {}
    for key, value in mapping.items():
        if isinstance(value, Mapping):
            for k, v in _flat_settings(value).items():
                out.setdefault(k, v)
        elif key in SETTINGS:
            out[key] = value
    return out


def _read_config(config: str | Mapping | None) -> dict:
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return _flat_settings(config)
    with open(config) as f:
        if config.endswith((".yaml", ".yml")):
            import yaml

            return _flat_settings(yaml.safe_load(f) or {})
        return _flat_settings(json.load(f))


def load_run(output_dir: str, config: str | Mapping | None = None) -> RunLog:
    """The run in `output_dir` (module docstring: what is read). `config` (a mapping, a YAML recipe or a JSON file)
    gives or overrides settings. Raises FileNotFoundError when no per-step metrics exist."""
    if not os.path.isdir(output_dir):
        raise FileNotFoundError(f"{output_dir} is not a directory")
    candidates = []
    metrics_path = os.path.join(output_dir, METRICS_FILE)
    if os.path.isfile(metrics_path):
        candidates.append((metrics_path, _train_history(_read_jsonl(metrics_path))))
    finished = False
    for path in _state_files(output_dir):
        with open(path) as f:
            history = json.load(f).get("log_history", [])
        finished = finished or any("train_runtime" in e for e in history)
        candidates.append((path, _train_history(history)))
    candidates = [c for c in candidates if c[1]]
    if not candidates:
        raise FileNotFoundError(
            f"no logged training metrics in {output_dir}: expected {METRICS_FILE}, {STATE_FILE} or "
            f"checkpoint-*/{STATE_FILE} with a non-empty log history"
        )
    # The source reaching the latest step wins; on a tie the first listed (metrics.jsonl, then the run's own state).
    source, history = max(candidates, key=lambda c: _step_of(c[1][-1]))  # max keeps the first of equals

    summary = {}
    summary_path = os.path.join(output_dir, SUMMARY_FILE)
    if os.path.isfile(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
    settings, settings_source = {}, None
    config_path = os.path.join(output_dir, CONFIG_FILE)
    if os.path.isfile(config_path):
        settings, settings_source = _read_config(config_path), config_path
    elif _flat_settings(summary):  # settings written into the summary by other tools
        settings, settings_source = _flat_settings(summary), summary_path
    if config is not None:
        settings.update(_read_config(config))
        settings_source = config if isinstance(config, str) else "the settings passed in"
    return RunLog(output_dir, history, source, settings, settings_source, summary, finished)


# ---------------------------------------------------------------------------------------------------------------
# Numbers.


def _number(value) -> float | None:
    """A logged value as a float when it is a finite real number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _values(history: Sequence[Mapping], key: str) -> np.ndarray:
    return np.array([v for v in (_number(e.get(key)) for e in history) if v is not None], dtype=float)


def _mean(history, key) -> float | None:
    values = _values(history, key)
    return float(values.mean()) if values.size else None


def _steps_covered(history: Sequence[Mapping]) -> list[int]:
    """How many optimiser steps each log entry averages over (the gap to the previous entry)."""
    steps = [_step_of(e) for e in history]
    return [max(1, s - (steps[i - 1] if i else 0)) for i, s in enumerate(steps)]


def _total_over_steps(history: Sequence[Mapping], key: str) -> float | None:
    """Sum over steps of a per-step quantity logged as a mean over each logging window."""
    pairs = [(_number(e.get(key)), n) for e, n in zip(history, _steps_covered(history), strict=True)
             if _number(e.get(key)) is not None]
    return float(sum(v * n for v, n in pairs)) if pairs else None


def _last_value(history: Sequence[Mapping], key: str) -> float | None:
    """The last logged value of a running total."""
    values = _values(history, key)
    return float(values[-1]) if values.size else None


def _beta_per_entry(history: Sequence[Mapping], beta: float | None) -> list[float | None]:
    return [b if (b := _number(e.get("kl_beta"))) is not None else beta for e in history]


def _summary_number(summary: Mapping, name: str) -> float | None:
    """The first number called `name` in a (possibly nested) summary."""
    for key, value in summary.items():
        if key == name and _number(value) is not None:
            return _number(value)
        if isinstance(value, Mapping):
            found = _summary_number(value, name)
            if found is not None:
                return found
    return None


def run_averages(run: RunLog) -> dict:
    """The training diagnostics averaged over the run (what a plan comparison tabulates), plus totals."""
    history, settings = run.history, run.settings
    out: dict[str, Any] = {"logged_steps": len(history), "last_step": _step_of(history[-1])}
    for key in AVERAGED_KEYS:
        out[key] = _mean(history, key)
    beta = settings.get("beta")
    kl_logged = any("kl" in e for e in history)
    if beta is None and not kl_logged:
        beta = 0.0  # TRL logs `kl` whenever beta != 0
    terms, policies = [], []
    beta_per_entry = _beta_per_entry(history, beta)
    for entry, b in zip(history, beta_per_entry, strict=True):
        loss = _number(entry.get("loss"))
        if loss is None or b is None:
            continue
        kl = _number(entry.get("kl")) or 0.0
        terms.append(b * kl)
        policies.append(abs(loss - b * kl))
    out["kl_term"] = float(np.mean(terms)) if terms else None
    out["policy_loss_abs"] = float(np.mean(policies)) if policies else None
    if terms and (out["kl_term"] + out["policy_loss_abs"]) > 0:
        out["kl_share_of_loss"] = out["kl_term"] / (out["kl_term"] + out["policy_loss_abs"])
    else:
        out["kl_share_of_loss"] = 0.0 if terms else None
    betas = [b for b in beta_per_entry if b is not None]
    kl_mean, adv_std = out["kl"], out["advantages/std"]
    if betas and adv_std is not None:
        kl_weight = float(np.mean(betas)) * math.sqrt(2 * kl_mean) if kl_mean else 0.0
        out["kl_gradient_weight"] = kl_weight
        out["kl_share_of_gradient_weight"] = kl_weight / (kl_weight + adv_std) if kl_weight + adv_std > 0 else None
    else:
        out["kl_gradient_weight"] = out["kl_share_of_gradient_weight"] = None
    calls = _summary_number(run.summary, CUMULATIVE_CALL_KEY)
    if calls is None:
        calls = _last_value(history, CUMULATIVE_CALL_KEY)
    if calls is None:
        calls = _total_over_steps(history, PER_STEP_CALL_KEY)
    out["reward_calls"] = calls
    for key in COUNT_KEYS:
        out[key] = _summary_number(run.summary, key)
        if out[key] is None:
            out[key] = _last_value(history, key)
    for key in ("reward", "entropy", "kl"):
        values = _values(history, key)
        quarter = max(1, values.size // 4)
        out[f"{key}/first_quarter"] = float(values[:quarter].mean()) if values.size else None
        out[f"{key}/last_quarter"] = float(values[-quarter:].mean()) if values.size else None
    out["reward/trend"] = reward_trend(history)
    return out


def reward_trend(history: Sequence[Mapping]) -> dict | None:
    """Least-squares slope of the logged reward against the step, per 100 steps, with its 95% t interval."""
    from .evaluation import student_t_ppf

    points = [(_step_of(e), _number(e.get("reward"))) for e in history if _number(e.get("reward")) is not None]
    if len(points) < 3:
        return None
    x, y = np.array(points, dtype=float).T
    if np.ptp(x) == 0:
        return None
    xc = x - x.mean()
    slope = float((xc * (y - y.mean())).sum() / (xc**2).sum())
    residual = y - y.mean() - slope * xc
    se = math.sqrt(float((residual**2).sum()) / (len(x) - 2) / float((xc**2).sum()))
    half = student_t_ppf(0.975, len(x) - 2) * se
    return {"per_100_steps": 100 * slope, "low": 100 * (slope - half), "high": 100 * (slope + half), "points": len(x)}


# ---------------------------------------------------------------------------------------------------------------
# Expected advantage scale per mode.


def contrasted_row_m2(mode: str | None, group_size: int, within_std: float | None = None,
                      min_std: float | None = None) -> float | None:
    """Mean squared advantage of a row in a group with contrast (module docstring), None for modes it cannot tell."""
    g = group_size
    if g < 2:
        return None
    if mode == "zscore" or mode == "batch":
        m2 = (g - 1) / g
        if mode == "zscore" and min_std and within_std is not None and within_std < min_std:
            m2 *= (within_std / min_std) ** 2
        return m2
    if mode == "rank":  # g distinct rewards; ties (k of g right: k(g-k)/(g-1)^2) give less
        return (g + 1) / (3 * (g - 1))
    if mode in ("mean", "rloo") and within_std is not None:
        m2 = within_std**2 * (g - 1) / g
        return m2 * (g / (g - 1)) ** 2 if mode == "rloo" else m2
    return None


# ---------------------------------------------------------------------------------------------------------------
# The diagnosis.


@dataclass
class Finding:
    key: str
    text: str


@dataclass
class Recommendation:
    option: str
    action: str
    why: str
    priority: float  # larger = try first


@dataclass
class Diagnosis:
    output_dir: str
    source: str
    averages: dict
    settings: dict
    findings: list[Finding]
    recommendations: list[Recommendation]
    bottleneck: str  # "signal", "signal + update size", "kl", "update size", "none" or "unknown"
    cause_of_small_std: str | None

    def to_dict(self) -> dict:
        return asdict(self)


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if value != 0 and (abs(value) < 10 ** -(digits - 1) or abs(value) >= 1e5):
        return f"{value:.2e}"
    return f"{value:.{digits}f}"


def diagnose(run: RunLog) -> Diagnosis:
    """The analysis of `run` (module docstring for the derivations)."""
    a = run_averages(run)
    s = run.settings
    findings: list[Finding] = []
    recs: list[Recommendation] = []
    mode = s.get("advantage_mode")
    g = int(s["num_generations"]) if s.get("num_generations") else None
    min_std = s.get("advantage_min_std")
    clip = s.get("advantage_clip")
    lr = a["learning_rate"] if a["learning_rate"] is not None else s.get("learning_rate")

    zero = a["frac_reward_zero_std"]
    contrast = 1.0 - zero if zero is not None else None
    rows_with_gradient = a["zero_contrast/frac_rows_with_gradient"]
    adv_std = a["advantages/std"]
    within = a["rewards/within_group_std"]
    within_contrasted = within / contrast if within is not None and contrast else None
    findings.append(Finding("run", f"{run.output_dir}: {a['logged_steps']} logged steps up to step {a['last_step']} "
                                   f"({'finished' if run.finished else 'running or stopped'}), read from "
                                   f"{os.path.relpath(run.source, run.output_dir)}; settings from "
                                   f"{run.settings_source or 'nowhere (unknown)'}."))

    # 1. Contrast.
    if contrast is not None:
        text = (f"Reward contrast: {100 * contrast:.1f}% of groups had any (frac_reward_zero_std = {_fmt(zero)} "
                "averaged over the run); flat groups get advantage 0 in every mode and give no gradient.")
        if rows_with_gradient is not None:
            text += f" Rows carrying a gradient after zero-contrast handling: {100 * rows_with_gradient:.1f}%."
        findings.append(Finding("contrast", text))
    else:
        findings.append(Finding("contrast", "frac_reward_zero_std was not logged: group contrast unknown."))

    # 2. Where the advantage std comes from.
    cause = None
    if adv_std is not None and contrast is not None and g:
        m2 = contrasted_row_m2(mode, g, within_contrasted, min_std)
        ideal = contrasted_row_m2(mode, g)  # None for mean / rloo without a reward std
        factors = {"flat groups": math.sqrt(contrast)}
        parts = [f"advantages/std = {_fmt(adv_std)} ({mode or 'unknown'} mode, G = {g})"]
        if ideal is not None:
            parts.append(f"every group contrasted and no floor would give ≈ {_fmt(math.sqrt(ideal))}")
        parts.append(f"the flat groups alone scale it by sqrt({_fmt(contrast)}) = {_fmt(math.sqrt(contrast))}")
        if mode == "zscore" and min_std and within_contrasted is not None:
            floor = min(1.0, within_contrasted / min_std)
            factors["the min_std floor"] = floor
            parts.append(f"the contrasted groups' reward std ≈ {_fmt(within_contrasted)} vs advantage_min_std = "
                         f"{_fmt(min_std)}: the floor {'binds and scales them by ' + _fmt(floor) if floor < 1 else 'does not bind'}")
        if mode in ("mean", "rloo") and within_contrasted is not None:
            factors["the reward scale"] = min(1.0, within_contrasted)
            parts.append(f"{mode} advantages are reward differences: the contrasted groups' reward std "
                         f"{_fmt(within_contrasted)} sets their size")
        if m2 is not None:
            predicted = math.sqrt(contrast * m2)
            residual = adv_std / predicted if predicted > 0 else None
            parts.append(f"predicted ≈ {_fmt(predicted)}, logged/predicted = {_fmt(residual, 2)}")
            if residual is not None and residual < 0.8 and mode == "rank":
                factors["ties within groups"] = residual
                parts.append("the rest are ties (rank advantages of binary rewards are smaller than of distinct ones)")
            elif residual is not None and residual < 0.8 and mode == "zscore" and min_std:
                factors["the min_std floor"] = min(factors.get("the min_std floor", 1.0), residual)
                parts.append("the rest is the floor binding in part of the groups: their reward spread is below "
                             "advantage_min_std although the average spread is not (mixed near-ties and flips)")
        clipped = clip is not None and a["advantages/max_abs"] is not None and a["advantages/max_abs"] >= 0.999 * clip
        if clipped:
            parts.append(f"advantages/max_abs reached advantage_clip = {_fmt(clip)}: clipping is active")
        cause = min(factors, key=factors.get)
        small = ideal is not None and adv_std < 0.3 * math.sqrt(ideal) or (ideal is None and adv_std < 0.05)
        findings.append(Finding("advantage_std", "; ".join(parts) + "." + (
            f" The main reason the advantage std is small: {cause} (factor {_fmt(factors[cause])})." if small
            else " The advantage scale is healthy.")))
        if not small:
            cause = None
    elif adv_std is not None:
        findings.append(Finding("advantage_std", f"advantages/std = {_fmt(adv_std)}; group size or contrast unknown, "
                                                 "so it cannot be decomposed (pass --config)."))

    # 3. The KL term.
    kl_dominates = False
    no_kl = not any("kl" in e for e in run.history) and not s.get("beta")
    if no_kl:
        findings.append(Finding("kl", "No KL term (beta = 0: TRL logs no kl and loads no reference model)."))
    elif a["kl_term"] is not None:
        share, grad_share = a["kl_share_of_loss"], a["kl_share_of_gradient_weight"]
        beta_text = (f"kl_beta averaged {_fmt(a['kl_beta'])}" if a["kl_beta"] is not None
                     else f"beta = {_fmt(s.get('beta'))}")
        text = (f"KL term: {beta_text}, kl = {_fmt(a['kl'])}, β·kl = {_fmt(a['kl_term'])} vs |policy loss| = "
                f"{_fmt(a['policy_loss_abs'])}: {100 * share:.0f}% of the loss value")
        if grad_share is not None:
            text += (f"; per sampled token the KL term weighs ∇log π by β·sqrt(2·kl) ≈ {_fmt(a['kl_gradient_weight'])} "
                     f"against |A| ≈ {_fmt(adv_std)}: {100 * grad_share:.0f}% of the gradient weight")
            kl_dominates = grad_share > 0.5
        text += "."
        beta_max = s.get("adaptive_kl_beta_max")
        betas = _values(run.history, "kl_beta")
        if betas.size and beta_max and betas[-1] >= 0.99 * float(beta_max):
            text += (f" Adaptive β ended at its cap {_fmt(float(beta_max))}: the KL stayed above the target band, "
                     "a sign of a reference policy far from the one being trained.")
            kl_dominates = True
        findings.append(Finding("kl", text))
    else:
        findings.append(Finding("kl", f"kl = {_fmt(a['kl'])} was logged but beta is unknown (pass --config): the KL "
                                      "term's share cannot be computed."))

    # 4. Movement and the bottleneck.
    trend = a["reward/trend"]
    ent0, ent1 = a["entropy/first_quarter"], a["entropy/last_quarter"]
    moved_entropy = ent0 is not None and ent1 is not None and abs(ent1 - ent0) > 0.05 * max(abs(ent0), 1e-6)
    moved_kl = (a["kl"] or 0.0) > 0.01
    rising = trend is not None and trend["low"] > 0
    movement = []
    if trend is not None:
        movement.append(f"reward {_fmt(a['reward/first_quarter'])} → {_fmt(a['reward/last_quarter'])} (first → last "
                        f"quarter of the run; slope {_fmt(trend['per_100_steps'])} per 100 steps, 95% CI "
                        f"[{_fmt(trend['low'])}, {_fmt(trend['high'])}])")
    if ent0 is not None:
        movement.append(f"entropy {_fmt(ent0)} → {_fmt(ent1)}")
    if a["kl/last_quarter"] is not None:
        movement.append(f"kl {_fmt(a['kl/first_quarter'])} → {_fmt(a['kl/last_quarter'])}")
    if lr is not None:
        movement.append(f"learning rate {_fmt(lr)}")
    findings.append(Finding("movement", "Policy movement: " + (", ".join(movement) or "nothing logged") + "."))

    weak_signal = contrast is not None and (contrast < 0.5 or cause in ("flat groups", "the min_std floor",
                                                                         "the reward scale"))
    still = contrast is not None and not (moved_entropy or moved_kl or rising)
    if weak_signal:
        bottleneck = "signal + update size" if still else "signal"
        findings.append(Finding("bottleneck", (
            f"Bottleneck: the signal. {'Most groups are flat' if contrast < 0.5 else 'The advantages are muted'}: "
            "few rows carry a usable advantage, so much of the gradient is noise"
            + (" and the KL pull" if a["kl_term"] else "")
            + ". Adam moves the weights by about the learning rate per step whatever the gradient's size, so a "
              "higher learning rate moves them faster in the same (uninformative) direction: it scales a signal, it "
              "cannot create one."
            + (" The policy did not move at all either (entropy, KL and reward flat): at this learning rate the "
               "update size limits it too, so a larger one would show the signal's direction, not create more "
               "signal." if still else ""))))
    elif kl_dominates:
        bottleneck = "kl"
        findings.append(Finding("bottleneck", "Bottleneck: the KL term outweighs the advantages in the update; the "
                                              "policy is held near its reference."))
    elif still:
        bottleneck = "update size"
        findings.append(Finding("bottleneck", "Bottleneck: the update size. The groups have contrast and the "
                                              "advantages are healthy, yet entropy, KL and reward stay flat."))
    elif contrast is not None:
        bottleneck = "none"
        findings.append(Finding("bottleneck", "No bottleneck in the logs: the signal is there and the policy moves"
                                              + (" and the training reward rises." if rising else
                                                 "; the training reward does not rise significantly.")))
    else:
        bottleneck = "unknown"

    # 5. Recommendations, ranked by how much of the signal each would recover.
    reward_mode = s.get("reward_mode")
    if contrast is not None and contrast < 0.9:
        missing = 1.0 - contrast
        if reward_mode not in ("hard_plus_gtprob_plus_rel", "hard01_plus_gtprob") and (
                missing >= 0.3 or bottleneck == "signal"):
            recs.append(Recommendation(
                "reward_mode", "hard_plus_gtprob_plus_rel (hard_weight 1, soft_weight 0.5, rel_weight 0.3)",
                f"{100 * missing:.0f}% of groups are flat under {reward_mode or 'the current reward'}; the gold-answer "
                "probability differs between selections even when the answer does not, so groups get contrast",
                3 + missing))
        recs.append(Recommendation(
            "selective_rollout / zero_contrast_groups (ICDGRPOConfig)",
            "skip queries predicted flat before any reward call (selective_rollout: true) and take flat groups out "
            "of the loss (zero_contrast_groups: drop); docs/zero_contrast.md",
            f"{100 * missing:.0f}% of the reward calls currently feed groups that give no gradient",
            2 + missing))
        recs.append(Recommendation(
            "num_generations / temperature / pool_method",
            "larger or more diverse groups (e.g. num_generations 16, temperature 1.2, pool_method mix)",
            "more distinct selections per query make a flip between right and wrong more likely", 1 + missing))
    if cause == "the min_std floor":
        recs.append(Recommendation(
            "advantage_min_std", f"lower it below the groups' reward std (≈ {_fmt(within_contrasted)}), e.g. "
            f"{_fmt(within_contrasted / 2 if within_contrasted else 0.01)}, or advantage_mode rank",
            "the floor shrinks the contrasted groups' advantages", 4.0))
    if cause == "the reward scale":
        recs.append(Recommendation("advantage_mode", "zscore (or rank)",
                                   f"{mode} advantages are as small as the reward differences", 3.5))
    if kl_dominates:
        recs.append(Recommendation("beta / adaptive_kl", "beta 0 (or much smaller), adaptive_kl false",
                                   "the KL term outweighs the advantages in the update", 3.8))
    if bottleneck == "update size":
        recs.append(Recommendation("learning_rate", f"×10 (from {_fmt(lr)})",
                                   "the signal is healthy but the policy does not move", 5.0))
    elif bottleneck == "signal + update size":
        recs.append(Recommendation("learning_rate", f"×10 (from {_fmt(lr)}) once the groups have contrast",
                                   "nothing moved at this learning rate, but without contrast a larger step moves "
                                   "the policy in an uninformative direction", 0.5))
    elif bottleneck.startswith("signal") and lr is not None:
        recs.append(Recommendation("learning_rate", "leave it until the signal is fixed",
                                   "a higher learning rate scales the noise and the KL pull as much as the signal",
                                   0.1))
    recs.sort(key=lambda r: -r.priority)
    return Diagnosis(run.output_dir, run.source, a, dict(s), findings, recs, bottleneck, cause)


def format_diagnosis(diagnosis: Diagnosis) -> str:
    lines = [f"# Diagnosis of {diagnosis.output_dir}", ""]
    lines += [f"- {f.text}" for f in diagnosis.findings]
    if diagnosis.recommendations:
        lines += ["", "What to try, most promising first:"]
        lines += [f"{n}. `{r.option}`: {r.action} — {r.why}." for n, r in enumerate(diagnosis.recommendations, 1)]
    a = diagnosis.averages
    lines += ["", "Averages over the run: " + ", ".join(
        f"{k} {_fmt(a[k]) if k != 'reward_calls' else format(a[k], ',.0f')}"
        for k in ("advantages/std", "policy_loss_abs", "kl_share_of_loss", "rewards/within_group_std",
                  "frac_reward_zero_std", "reward_calls")
        if a.get(k) is not None)]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> Diagnosis:
    parser = argparse.ArgumentParser(prog="python -m trl_icd.diagnose", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", help="A training's output_dir (finished or running).")
    parser.add_argument("--config", default=None, help="A YAML recipe or JSON file with the run's settings.")
    parser.add_argument("--json", action="store_true", help="Print the diagnosis as JSON.")
    args = parser.parse_args(argv)
    result = diagnose(load_run(args.output_dir, args.config))
    print(json.dumps(result.to_dict(), indent=2, default=str) if args.json else format_diagnosis(result))
    return result


def write_run_log(trainer, output_dir: str, *argument_groups) -> None:
    """Leave a finished run's log history (`trainer_state.json`) and settings (`run_config.json`) in `output_dir`,
    where `diagnose` reads them: a run with `save_strategy="no"` writes no checkpoint state of its own."""
    trainer.state.save_to_json(os.path.join(output_dir, STATE_FILE))
    config = {}
    for group in argument_groups:
        values = json.loads(group.to_json_string()) if hasattr(group, "to_json_string") else asdict(group)
        config[type(group).__name__] = values
    with open(os.path.join(output_dir, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2, default=str)


__all__ = ["Diagnosis", "RunLog", "contrasted_row_m2", "diagnose", "format_diagnosis", "load_run", "reward_trend",
           "run_averages", "write_run_log"]


if __name__ == "__main__":
    main(sys.argv[1:])
