"""Compare research plans side by side: train each plan for each seed (or take finished runs), evaluate every run on
the same held-out queries, and write the accuracies with 95% intervals, paired differences against reference plans
and the training diagnostics of every run.

    python examples/compare_plans.py --config recipes/demo/plans.yaml                 # OK-VQA-like demo regime, CPU
    python examples/compare_plans.py --config recipes/okvqa/plans.yaml --eval_only    # finished OK-VQA runs (GPU)

Writes to the study's output_dir: `plan_study.md` (tables), `plan_study.json` (every number, per-query values per
run), `plan_comparison.png` (accuracy with the selector's own stop and paired differences), `accuracy_vs_shots.png`,
`plan_diagnostics.png`; each run's folder holds its resolved recipe (`recipe.yaml`, rerunnable with
`examples/train_okvqa.py --config`), its training log (`train.log`) and what `python -m trl_icd.diagnose` reads.
A run whose folder already holds a finished selector trained from the same recipe is reused, not retrained.
The study file format, the mirroring of the OK-VQA recipes and the learning-rate scaling: `trl_icd.plan_study`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import resource
import sys
import time

import numpy as np

from trl_icd import plan_study as ps
from trl_icd.cli import load_script
from trl_icd.diagnose import CONFIG_FILE, diagnose, format_diagnosis, load_run

logger = logging.getLogger("compare_plans")
HERE = os.path.dirname(os.path.abspath(__file__))


def load_example(name: str):
    """A sibling script of this one as a module."""
    return load_script(os.path.join(HERE, f"{name}.py"))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="Study file (e.g. recipes/demo/plans.yaml).")
    parser.add_argument("--eval_only", action="store_true",
                        help="Train nothing: evaluate the plans' existing output folders.")
    parser.add_argument("--output_dir", default=None, help="Override the study's output_dir.")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="Override the study's training seeds.")
    parser.add_argument("--grpo_steps", type=int, default=None, help="Override the study's GRPO steps per run.")
    parser.add_argument("--eval_queries", type=int, default=None, help="Evaluate the first N held-out queries only.")
    parser.add_argument("--plans", nargs="+", default=None, help="Only these plans (references are always kept).")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="Override `base` keys (YAML values), e.g. --set max_train_queries=64.")
    return parser.parse_args(argv)


def apply_cli(study: ps.Study, args) -> ps.Study:
    import yaml

    if args.output_dir:
        study.output_dir = args.output_dir
    if args.seeds:
        if any(p.output_dirs for p in study.plans.values()):
            raise ValueError("--seeds cannot change a study whose plans list finished output_dirs per seed")
        study.seeds = args.seeds
    if args.grpo_steps:
        study.grpo_steps = args.grpo_steps
    if args.eval_queries:
        study.eval_queries = args.eval_queries
    if args.plans:
        keep = set(args.plans) | set(study.references)
        unknown = keep - set(study.plans)
        if unknown:
            raise ValueError(f"unknown plans {sorted(unknown)}; the study has {sorted(study.plans)}")
        study.plans = {n: p for n, p in study.plans.items() if n in keep}
    for item in args.set:
        key, _, value = item.partition("=")
        if not key or not _:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        study.base[key] = yaml.safe_load(value)
    return study


class Progress:
    """One line per step with the elapsed time."""

    def __init__(self):
        self.start = time.perf_counter()
        self.stream = None  # the console while output is captured

    def __call__(self, text: str) -> None:
        print(f"[{time.perf_counter() - self.start:6.0f} s] {text}", file=self.stream or sys.stdout, flush=True)


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


@contextlib.contextmanager
def captured_output(path: str, keep: Progress | None = None):
    """Send console output (TRL's per-step log lines, progress bars, warnings) to `path`; `keep` still prints its
    progress lines on the console."""
    console = sys.stdout
    if keep is not None:
        keep.stream = console
    with open(path, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            yield
        finally:
            if keep is not None:
                keep.stream = None


def generate_rl_data(study: ps.Study, progress) -> str | None:
    """The RCE warm-up data of the study (once; reused when present)."""
    needs = any(p.output_dirs is None and (ps.plan_settings(study, p, 0)[0].get("rce_num_train_epochs") or 0) > 0
                for p in study.plans.values())
    if not needs or not study.rl_data:
        return None
    path = os.path.join(study.output_dir, "rl_data.jsonl")
    recipe = ps.write_recipe({**study.base, **study.rl_data, "output_file": path},
                             os.path.join(study.output_dir, "rl_data.yaml"))
    if os.path.isfile(path) and os.path.isfile(path + ".summary.json"):
        progress(f"RL data: reusing {path}")
        return path
    with captured_output(os.path.join(study.output_dir, "rl_data.log")):
        summary = load_example("generate_rl_data").main(["--config", recipe])
    progress(f"RL data: {summary['sequences']} scored sequences for {summary['queries']} queries, "
             f"{100 * summary['fraction_without_contrast']:.0f}% of them without reward contrast -> {path}")
    return path


def finished_run(run_dir: str, settings: dict) -> bool:
    """A selector saved in `run_dir` by a training with exactly these settings."""
    import yaml

    recipe = os.path.join(run_dir, "recipe.yaml")
    if not (os.path.isfile(recipe) and os.path.isfile(os.path.join(run_dir, "config.json"))
            and os.path.isfile(os.path.join(run_dir, "done"))):
        return False
    with open(recipe) as f:
        return yaml.safe_load(f) == json.loads(json.dumps(settings))


def train_plans(study: ps.Study, rl_data: str | None, progress) -> dict[str, list[str]]:
    """Train every plan for every seed (sequentially, in this process); returns {plan: [run dir per seed]}."""
    train = load_example("train_okvqa")
    warmups: dict[str, str] = {}
    runs: dict[str, list[str]] = {}
    todo = [(name, seed) for name, spec in study.plans.items() if spec.output_dirs is None for seed in study.seeds]
    for number, (name, seed) in enumerate(todo, 1):
        spec = study.plans[name]
        settings, _ = ps.plan_settings(study, spec, seed)
        run_dir = os.path.join(study.output_dir, name, f"seed{seed}")
        settings["output_dir"] = run_dir
        if rl_data and (settings.get("rce_num_train_epochs") or 0) > 0:
            settings["rce_data_path"] = rl_data
        key = ps.warmup_key(settings, study.base)
        shared = warmups.get(key) if key else None
        if shared:  # start from the same warm-up as an earlier plan of this seed: GRPO is the only difference
            settings = {k: v for k, v in settings.items() if k != "rce_data_path"} | {"model_name_or_path": shared}
        runs.setdefault(name, []).append(run_dir)
        label = f"[{number}/{len(todo)}] {name} seed {seed}"
        if finished_run(run_dir, settings):
            progress(f"{label}: reusing the finished run in {run_dir}")
        else:
            os.makedirs(run_dir, exist_ok=True)
            recipe = ps.write_recipe(settings, os.path.join(run_dir, "recipe.yaml"))
            begin = time.perf_counter()
            with captured_output(os.path.join(run_dir, "train.log")):
                result = train.main(["--config", recipe])
            with open(os.path.join(run_dir, "done"), "w") as f:
                f.write(json.dumps({"seconds": time.perf_counter() - begin, "global_step": result.get("global_step")}))
            warm = "shared warm-up" if shared else ("own warm-up" if key else "no warm-up")
            steps = result.get("global_step")
            progress(f"{label}: trained in {time.perf_counter() - begin:.0f} s ({warm}, "
                     f"{steps if steps is not None else 0} GRPO steps, LR {settings.get('learning_rate'):.3g})")
        if key and not shared:
            warmups[key] = os.path.join(run_dir, "start_policy")
    return runs


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    for name in ("transformers", "trl", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    study = apply_cli(ps.load_study(args.config), args)
    os.makedirs(study.output_dir, exist_ok=True)
    progress = Progress()
    machine = {"cpus": os.cpu_count(), "load_average_start": load_average()}
    wall, cpu0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    progress(f"study {study.path}: plans {list(study.plans)}, seeds {study.seeds}, load average "
             f"{machine['load_average_start']} on {machine['cpus']} CPUs")

    runs = {n: list(p.output_dirs) for n, p in study.plans.items() if p.output_dirs is not None}
    if args.eval_only:
        for name in study.plans:
            runs.setdefault(name, [os.path.join(study.output_dir, name, f"seed{s}") for s in study.seeds])
    else:
        rl_data = generate_rl_data(study, progress)
        runs.update(train_plans(study, rl_data, progress))
    with captured_output(os.path.join(study.output_dir, "evaluate.log"), keep=progress):
        results = evaluate_study(study, runs, progress)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    machine.update({"wall_seconds": round(time.perf_counter() - wall, 1),
                    "cpu_seconds": round(cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime, 1),
                    "load_average_end": load_average()})
    results["machine"] = machine
    results["command"] = "python examples/compare_plans.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_report(study, results, progress)
    return results


def evaluate_study(study: ps.Study, runs: dict[str, list[str]], progress) -> dict:
    """Evaluate every run (and the baselines) on the same held-out queries; diagnose every GRPO run."""
    from trl_icd.pipeline import (
        DataArguments,
        RewardArguments,
        SelectorArguments,
        build_pools,
        build_reward,
        evaluate_methods,
        load_data,
        load_or_build_selector,
        parse_script_arguments,
        pool_oracle,
    )

    base_recipe = ps.write_recipe(study.base, os.path.join(study.output_dir, "base.yaml"))
    data_args, reward_args, selector_args = parse_script_arguments(
        (DataArguments, RewardArguments, SelectorArguments), ["--config", base_recipe])
    data = load_data(data_args)
    query_ids = list(data.eval_ids)[: study.eval_queries] if study.eval_queries else list(data.eval_ids)
    if not query_ids:
        raise ValueError(f"no held-out queries in split {data_args.eval_split!r}")
    pools = build_pools(data, data_args, query_ids)
    reward = build_reward(data, reward_args)
    progress(f"evaluating on {len(query_ids)} held-out '{data_args.eval_split}' queries, shots {study.eval_shots} "
             "and each selector's own stop")

    per_plan: dict[str, list[dict]] = {}
    diagnostics: dict[str, dict | None] = {}
    run_records: dict[str, list[dict]] = {}
    for name, dirs in runs.items():
        values, diagnoses = [], []
        for seed, run_dir in zip(study.seeds, dirs, strict=True):
            model, tokenizer = load_or_build_selector(run_dir, data, data_args, selector_args)
            scores = ps.evaluate_selector(model, tokenizer, data, pools, query_ids, reward, study.eval_shots)
            values.append(scores)
            record = {"seed": seed, "output_dir": run_dir,
                      "per_query": {k: v.tolist() for k, v in scores.items()}}
            # What ran is in the run's own `run_config.json`; the plan's settings stand in for runs without one.
            settings = None
            if name in study.plans and not os.path.isfile(os.path.join(run_dir, CONFIG_FILE)):
                settings = ps.plan_settings(study, study.plans[name], seed)[0]
            try:
                diagnosis = diagnose(load_run(run_dir, config=settings))
                diagnoses.append(diagnosis)
                record["diagnosis"] = diagnosis.to_dict()
                with open(os.path.join(run_dir, "diagnosis.md"), "w") as f:
                    f.write(format_diagnosis(diagnosis) + "\n")
            except FileNotFoundError as err:  # RCE-only runs have no GRPO log
                record["diagnosis"] = None
                logger.info("no diagnosis for %s: %s", run_dir, err)
            run_records.setdefault(name, []).append(record)
        per_plan[name] = values
        diagnostics[name] = ps.average_diagnostics(diagnoses)
        own = np.mean([v["own"].mean() for v in values])
        progress(f"{name}: held-out accuracy with its own stop {100 * own:.1f} (mean over {len(values)} seeds)")

    # Reference rows: zero-shot and retrieval baselines, the warm-up the GRPO runs started from, the pool oracle.
    baselines_results = evaluate_methods(data, reward, query_ids, [0, *study.eval_shots], baselines=study.baselines,
                                         seed=data_args.pool_seed)
    baselines = {method: {"accuracy": cells}
                 for method, cells in baselines_results.to_dict(per_query=False)["summary"].items()}
    start_of: dict[str, str] = {}
    # The policies GRPO started from (each distinct RCE warm-up, saved as `start_policy` in every run): the
    # research's "Baseline" (RCE only) and the point each plan's GRPO effect is measured from.
    groups: dict[str, list[str]] = {}
    for name in per_plan:
        if name in study.plans:
            group = ps.warmup_group(ps.plan_settings(study, study.plans[name], study.seeds[0])[0], study.base)
            if group:
                groups.setdefault(group, []).append(name)
    starts: dict[str, list[dict]] = {}
    for members in groups.values():
        dirs = [os.path.join(d, "start_policy") for d in runs[members[0]]]
        if not all(os.path.isdir(p) for p in dirs):
            continue
        label = f"GRPO start ({', '.join(members)})"
        starts[label] = []
        for path in dirs:
            model, tokenizer = load_or_build_selector(path, data, data_args, selector_args)
            starts[label].append(ps.evaluate_selector(model, tokenizer, data, pools, query_ids, reward,
                                                      study.eval_shots))
        baselines.update(ps.summarize({label: starts[label]}, [], study.eval_shots))
        for name in members:
            start_of[name] = label
    if hasattr(reward.backend, "oracle_accuracy"):
        from trl_icd.evaluation import mean_ci

        model_max = max(study.eval_shots)
        oracle = pool_oracle(data, reward, pools, query_ids, max_shots=model_max)
        baselines[f"oracle (pool, 1-{model_max} shots)"] = {"accuracy": {"own": mean_ci(oracle).__dict__}}

    summary = ps.summarize(per_plan, study.references, study.eval_shots)
    for name, label in start_of.items():  # the GRPO effect: each plan against the policy it started from
        summary[name]["start"] = {"its GRPO start": ps.compare_runs(per_plan[name], starts[label], study.eval_shots)}
    return {"study": study.path, "query_ids": query_ids, "eval_split": data_args.eval_split,
            "plans": {n: {"summary": summary[n], "runs": run_records[n], "diagnostics": diagnostics[n],
                          "settings": _settings_record(study, n)}
                      for n in per_plan},
            "baselines": baselines, "references": study.references, "shots": study.eval_shots}


def _settings_record(study: ps.Study, name: str) -> dict | None:
    if name not in study.plans:
        return None
    settings, scaling = ps.plan_settings(study, study.plans[name], study.seeds[0])
    return {"settings": settings, "scaling": scaling}


def write_report(study: ps.Study, results: dict, progress) -> None:
    from trl_icd.evaluation import EvaluationResults, plot_accuracy_vs_shots

    out = study.output_dir
    shots = study.eval_shots
    summary = {n: p["summary"] for n, p in results["plans"].items()}
    diagnostics = {n: p["diagnostics"] for n, p in results["plans"].items()}
    machine = results["machine"]
    sections = [
        "# Plan study",
        f"Command: `{results['command']}`  \nStudy file: `{study.path}`; seeds {study.seeds}; "
        f"{len(results['query_ids'])} held-out '{results['eval_split']}' queries; wall time {machine['wall_seconds']} s, "
        f"CPU time {machine['cpu_seconds']} s on {machine['cpus']} CPUs, load average (1/5/15 min) "
        f"{machine['load_average_start']} at the start, {machine['load_average_end']} at the end.",
        "## Held-out accuracy (%)",
        "Per-query accuracy averaged over the seeds, ± half-width of the 95% t interval over queries; `own stop` = "
        "the selector choosing its number of demonstrations; `avg` = mean over the shot columns.",
        ps.accuracy_table(summary, results["baselines"], shots),
    ]
    for ref in results["references"]:
        sections += [f"## Paired difference against {ref} (points)",
                     "Mean per-query difference with its 95% t interval, sign-flip permutation p, and the difference "
                     "per seed.",
                     ps.comparison_table(summary, ref, shots)]
    if any(entry.get("start") for entry in summary.values()):
        sections += ["## GRPO effect: each plan against the policy its GRPO started from (points)",
                     "The same seeds' RCE warm-up (`GRPO start` rows above); what GRPO itself added.",
                     ps.comparison_table(summary, "its GRPO start", shots, key="start")]
    sections += ["## Training diagnostics (averaged over each run, then over seeds)",
                 "`KL share of loss` = β·kl / (β·kl + |loss − β·kl|); reward calls = distinct (query, demonstrations) "
                 "pairs sent to the scorer. Bottleneck and cause from `python -m trl_icd.diagnose` on each run "
                 "(`diagnosis.md` in the run's folder).",
                 ps.diagnostics_table(diagnostics)]
    notes = []
    for name, plan in results["plans"].items():
        record = plan.get("settings")
        if record:
            scaling = record["scaling"]
            text = f"- **{name}**"
            if scaling.get("recipe"):
                text += f": mirrors `{os.path.relpath(scaling['recipe'])}`"
            if "grpo" in scaling:
                g = scaling["grpo"]
                text += (f"; GRPO {g['steps']} steps instead of {g['recipe_steps']:.0f}, LR {g['lr_recipe']:g} × "
                         f"{g['lr_factor']:.3g} = {g['lr']:.3g}")
            if "rce" in scaling:
                r = scaling["rce"]
                text += (f"; RCE over {r['queries']} queries instead of {r['recipe_queries']}, LR {r['lr_recipe']:g} × "
                         f"{r['lr_factor']:.3g} = {r['lr']:.3g}")
            spec = study.plans.get(name)
            if spec and spec.note:
                text += f". {spec.note}"
            notes.append(text)
    if notes:
        sections += ["## Plan settings and scaling", "\n".join(notes)]
    sections += ["Plots: `plan_comparison.png`, `accuracy_vs_shots.png`, `plan_diagnostics.png`."]
    with open(os.path.join(out, "plan_study.md"), "w") as f:
        f.write("\n\n".join(sections) + "\n")
    with open(os.path.join(out, "plan_study.json"), "w") as f:
        json.dump(results, f, indent=2, default=str)

    ps.plot_comparisons(summary, results["references"], os.path.join(out, "plan_comparison.png"))
    curves = EvaluationResults(query_ids=results["query_ids"])
    for name, plan in results["plans"].items():
        for s in shots:
            per_seed = [r["per_query"].get(str(s)) for r in plan["runs"]]
            if all(v is not None for v in per_seed):
                curves.add(name, s, np.mean(per_seed, axis=0))
    plot_accuracy_vs_shots(curves, os.path.join(out, "accuracy_vs_shots.png"),
                           title="held-out accuracy per plan (seed-averaged, 95% CI over queries)")
    if any(diagnostics.values()):
        ps.plot_diagnostics(diagnostics, os.path.join(out, "plan_diagnostics.png"))
    progress(f"wrote {out}/plan_study.md, plan_study.json and the plots")


if __name__ == "__main__":
    main(sys.argv[1:])
