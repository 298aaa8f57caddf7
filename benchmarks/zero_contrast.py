"""Reward calls to a given held-out accuracy, per zero-contrast arm, on the offline demo (not a test).

    python benchmarks/zero_contrast.py                              # every arm, seeds 0 1 2, the demo recipe, 600 steps
    python benchmarks/zero_contrast.py --arms off selective+drop --seeds 0 --max_steps 1200

Every arm trains a fresh selector with the same recipe, world and pools (`examples/train_okvqa.py`), once per seed;
the arms differ only in their zero-contrast options: the recipe's own zero-contrast settings and plateau stopping are
switched off first (`--stop_on_plateau` keeps the plateau rule, for every arm). During training the held-out accuracy
is measured every `--eval_every` steps on `--curve_queries` held-out queries (greedy selections, the selector's own
stop, scored through a separate reward object: those calls are not counted). At the end each trained selector is
scored on every held-out query.

Printed per arm (mean over seeds, per-seed values in the JSON): reward calls that reached the scoring backend (after
the reward cache), rows skipped before any reward call, groups dropped, steps, wall time, final held-out accuracy
(95% CI over queries and seeds), selector / oracle, and the reward calls at which its held-out curve first reached
the reference arm's final curve accuracy (same seed) minus one point, as a ratio to that reference run's total calls
(`--reference_arm`; default `off_1200`, the demo recipe's plain GRPO for 1,200 steps, when it runs, else the first
arm). Runs are
sequential, so wall times are those of one run at a time. Writes `zero_contrast.json`, `zero_contrast.md` and
`calls_vs_accuracy.png` to `--output_dir`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "demo" / "cpu.yaml"

# The arms differ only in their zero-contrast options (and run `--max_steps`, 600 by default); `off_1200` is the
# reference: the demo recipe itself, plain GRPO for 1,200 steps.
ARMS = {
    "off": [],
    "drop": ["--zero_contrast_groups", "drop"],
    "resample": ["--zero_contrast_groups", "resample"],
    "selective": ["--selective_rollout", "true"],
    "selective+drop": ["--selective_rollout", "true", "--zero_contrast_groups", "drop"],
    "off_1200": ["--max_steps", "1200"],
}
# The recipe's own zero-contrast settings are reset, so "off" is plain GRPO whatever the recipe turns on.
RESET = ["--zero_contrast_groups", "keep", "--selective_rollout", "false"]
PLATEAU_OFF = ["--plateau_stopping_metric", "none"]


def load_train_script():
    from trl_icd.cli import load_script

    return load_script(ROOT / "examples" / "train_okvqa.py")


def read_log(output_dir: Path) -> list[dict]:
    path = output_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def held_out_curve(log: list[dict]) -> list[dict]:
    """(step, reward calls sent so far, held-out accuracy) at every held-out evaluation: the calls are those of the
    latest training log at or before that step (0 before the first)."""
    calls_at = {0: 0}
    for entry in log:
        if "reward_calls/sent" in entry and "step" in entry:
            calls_at[int(entry["step"])] = int(entry["reward_calls/sent"])
    steps = sorted(calls_at)
    curve = []
    for entry in log:
        if "heldout/accuracy" not in entry:
            continue
        step = int(entry["step"])
        known = [s for s in steps if s <= step]
        curve.append({"step": step, "calls": calls_at[known[-1]], "accuracy": float(entry["heldout/accuracy"])})
    return curve


def final_accuracy(output_dir: Path, argv: list[str]) -> dict:
    """Every held-out query, the trained selector's own choices, through a fresh simulated reward: mean, 95% CI, and
    the oracle over the same pools."""
    import numpy as np

    from trl_icd import pipeline
    from trl_icd.evaluation import mean_ci

    train = load_train_script()
    parsed = train.make_parser().parse_args_and_config(argv)
    data_args, reward_args, selector_args = parsed[1], parsed[2], parsed[3]
    data = pipeline.load_data(data_args)
    model, tokenizer = pipeline.load_or_build_selector(str(output_dir), data, data_args, selector_args)
    query_ids = list(data.eval_ids)
    pools = pipeline.build_pools(data, data_args, query_ids)
    reward = pipeline.build_reward(data, reward_args)
    picks = pipeline.select_with_selector(model, tokenizer, data, pools, query_ids, show_progress=False)
    accuracies = pipeline.score_selections(reward, query_ids, picks)
    backend = reward.backend
    oracle = [
        backend.oracle_accuracy(data.corpus[q], [data.corpus[c] for c in pools[q]], max_shots=model.config.max_shots,
                                min_shots=model.config.min_shots).accuracy
        for q in query_ids
    ]
    interval = mean_ci(accuracies)
    return {"accuracy": interval.mean, "ci_low": interval.low, "ci_high": interval.high,
            "oracle": float(np.mean(oracle)), "queries": len(query_ids), "per_query": list(map(float, accuracies))}


def run_arm(name: str, extra: list[str], seed: int, args) -> dict:
    output_dir = Path(args.output_dir) / f"{name.replace('+', '_')}_seed{seed}"
    argv = [
        "--config", str(args.recipe), "--output_dir", str(output_dir), "--seed", str(seed),
        "--evaluate", "false", "--disable_tqdm", "true", "--report_to", "none",
        "--heldout_eval_steps", str(args.eval_every), "--heldout_eval_queries", str(args.curve_queries),
        *RESET, *([] if args.stop_on_plateau else PLATEAU_OFF), *extra,
    ]
    if args.max_steps:
        argv[argv.index("--output_dir"):argv.index("--output_dir")] = ["--max_steps", str(args.max_steps)]
    print(f"[{name}, seed {seed}] training: {' '.join(extra) or '(plain GRPO)'}", flush=True)
    started = time.perf_counter()
    run = load_train_script().main(argv)
    wall = time.perf_counter() - started
    summary = json.loads((output_dir / "run_summary.json").read_text())
    cost = summary["training_cost"]
    final = final_accuracy(output_dir, argv)
    result = {
        "arm": name,
        "seed": seed,
        "options": extra,
        "steps": run.get("global_step"),
        "wall_time_s": wall,
        "reward_calls": cost.get("reward_calls/sent", 0),
        "rows_skipped": cost.get("reward_calls/rows_skipped", 0),
        "groups_dropped": cost.get("zero_contrast/groups_dropped", 0),
        "refill_rounds": cost.get("zero_contrast/refill_rounds", 0),
        "curve": held_out_curve(read_log(output_dir)),
        **final,
    }
    print(f"[{name}, seed {seed}] {result['steps']} steps, {result['reward_calls']} reward calls, {wall:.0f} s, held-out "
          f"{100 * final['accuracy']:.1f} (oracle {100 * final['oracle']:.1f})", flush=True)
    return result


def calls_to_reach(curve: list[dict], target: float) -> int | None:
    for point in curve:
        if point["accuracy"] >= target:
            return point["calls"]
    return None


def report(results: list[dict], output_dir: Path, load: str, reference_arm: str) -> str:
    """Per-seed targets and ratios against the reference arm's run of the same seed, then one row per arm."""
    import numpy as np

    from trl_icd.evaluation import mean_ci

    reference = {r["seed"]: r for r in results if r["arm"] == reference_arm}
    for r in results:
        ref = reference.get(r["seed"])
        r["target"] = ref["curve"][-1]["accuracy"] - 0.01 if ref and ref["curve"] else None
        r["calls_to_target"] = calls_to_reach(r["curve"], r["target"]) if r["target"] is not None else None
        r["ratio_to_reference_total"] = (r["calls_to_target"] / ref["reward_calls"]
                                         if r["calls_to_target"] is not None and ref and ref["reward_calls"] else None)
    lines = [
        f"machine load before the run: {load}",
        f"target per seed: that seed's '{reference_arm}' run's final held-out curve accuracy minus 1 point; ratio: "
        f"reward calls to reach it / that '{reference_arm}' run's total reward calls (means over seeds; 'n/m' = seeds "
        "that reached it)",
        "",
        "| arm | seeds | steps | reward calls | rows skipped | groups dropped | wall s | held-out acc (95% CI) | "
        "selector/oracle | calls to target | / reference total |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in dict.fromkeys(r["arm"] for r in results):
        runs = [r for r in results if r["arm"] == arm]
        interval = mean_ci([a for r in runs for a in r["per_query"]])
        reached = [r for r in runs if r["calls_to_target"] is not None]
        ratios = [r["ratio_to_reference_total"] for r in reached if r["ratio_to_reference_total"] is not None]
        mean = lambda key: float(np.mean([r[key] for r in runs]))  # noqa: E731
        calls = f"{np.mean([r['calls_to_target'] for r in reached]):.0f}" if reached else "-"
        lines.append(
            f"| {arm} | {len(runs)} | {mean('steps'):.0f} | {mean('reward_calls'):.0f} | {mean('rows_skipped'):.0f} | "
            f"{mean('groups_dropped'):.0f} | {mean('wall_time_s'):.0f} | {100 * interval.mean:.1f} "
            f"[{100 * interval.low:.1f}, {100 * interval.high:.1f}] | "
            f"{np.mean([r['accuracy'] / max(r['oracle'], 1e-12) for r in runs]):.3f} | {calls} "
            f"({len(reached)}/{len(runs)}) | {f'{np.mean(ratios):.2f}' if ratios else '-'} |"
        )
    text = "\n".join(lines)
    (output_dir / "zero_contrast.md").write_text(text + "\n")
    return text


def plot(results: list[dict], path: Path, reference_arm: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = sorted({r["seed"] for r in results})
    arms = list(dict.fromkeys(r["arm"] for r in results))
    colours = {arm: plt.get_cmap("tab10")(i) for i, arm in enumerate(arms)}
    figure, axes = plt.subplots(1, len(seeds), figsize=(max(7.0, 5.2 * len(seeds)), 4.8), dpi=150, sharey=True, squeeze=False)
    for axis, seed in zip(axes[0], seeds, strict=True):
        target = None
        for r in results:
            if r["seed"] != seed:
                continue
            target = r.get("target", target)
            curve = r["curve"]
            axis.plot([p["calls"] / 1000 for p in curve], [100 * p["accuracy"] for p in curve], marker="o",
                      markersize=2.5, linewidth=1.3, color=colours[r["arm"]],
                      label=f"{r['arm']}: {r['reward_calls'] / 1000:.1f}k calls, {100 * r['accuracy']:.1f}%")
        if target is not None:
            axis.axhline(100 * target, color="grey", linestyle=":", linewidth=1,
                         label=f"target: {reference_arm}'s final - 1 pt")
        axis.set_title(f"seed {seed}")
        axis.set_xlabel("reward calls sent to the scoring backend (thousands, after the cache)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, loc="lower right")
    axes[0][0].set_ylabel("held-out accuracy (%), greedy, own stop")
    figure.suptitle("Demo world: held-out accuracy vs reward calls, per zero-contrast arm\n(legend: the run's total "
                    "reward calls and its final accuracy on every held-out query)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--recipe", default=str(RECIPE))
    parser.add_argument("--output_dir", default="outputs/zero_contrast")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max_steps", type=int, default=600,
                        help="GRPO steps of every arm but the reference (default 600, half the demo recipe's 1,200; "
                             "the reference arm off_1200 keeps its 1,200; 0 = the recipe's own)")
    parser.add_argument("--reference_arm", default=None,
                        help="arm whose run of each seed sets the target (default: off_1200 if run, else off)")
    parser.add_argument("--eval_every", type=int, default=50, help="steps between held-out curve points")
    parser.add_argument("--curve_queries", type=int, default=200, help="held-out queries of each curve point")
    parser.add_argument("--stop_on_plateau", action="store_true",
                        help="keep the recipe's plateau stopping (default: every arm trains for the same steps)")
    args = parser.parse_args(argv)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    load_text = f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (1/5/15 min) on {os.cpu_count()} cores"
    reference_arm = args.reference_arm or ("off_1200" if "off_1200" in args.arms else args.arms[0])
    results = [run_arm(name, ARMS[name], seed, args) for seed in args.seeds for name in args.arms]
    text = report(results, output_dir, load_text, reference_arm)
    plot(results, output_dir / "calls_vs_accuracy.png", reference_arm)
    (output_dir / "zero_contrast.json").write_text(json.dumps({"load": load_text, "results": results}, indent=2))
    print(text)
    print(f"wrote {output_dir / 'zero_contrast.json'}, {output_dir / 'zero_contrast.md'}, "
          f"{output_dir / 'calls_vs_accuracy.png'}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
