"""The plan study: plans mirror their OK-VQA recipes with the stated scaling, statistics come from
`trl_icd.evaluation`, and a shortened study trains, evaluates, diagnoses and reports, then re-evaluates the same
folders evaluation-only."""

import json
import math

import numpy as np
import pytest
import yaml
from e2e_scripts import ROOT, load_script

from trl_icd import plan_study as ps
from trl_icd.evaluation import mean_ci, paired_comparison

DEMO_STUDY = ROOT / "recipes" / "demo" / "plans.yaml"


def test_demo_plans_mirror_their_recipes():
    study = ps.load_study(str(DEMO_STUDY))
    assert {"rank_baseline", "plan5", "plan6", "plan6b", "plan7", "plan8", "plan10", "best"} <= set(study.plans)
    assert study.references == ["rank_baseline", "plan5"]
    for name, spec in study.plans.items():
        recipe = yaml.safe_load(open(spec.recipe))
        settings, notes = ps.plan_settings(study, spec, seed=3)
        assert settings["seed"] == 3 and settings["max_steps"] == study.grpo_steps
        for key in ps.MIRRORED_KEYS:
            if key in recipe and key not in spec.overrides and key not in ("learning_rate", "rce_learning_rate"):
                assert settings[key] == recipe[key], (name, key)
        # Learning rates: LR x steps equals the recipe's (GRPO), RCE LR x queries equals the recipe's.
        recipe_lr = spec.overrides.get("learning_rate", recipe["learning_rate"])
        steps = recipe["num_train_epochs"] * recipe["max_train_queries"] * recipe["num_generations"] / recipe[
            "per_device_train_batch_size"]
        assert settings["learning_rate"] * study.grpo_steps == pytest.approx(recipe_lr * steps)
        assert settings["rce_learning_rate"] * settings["max_train_queries"] == pytest.approx(
            recipe["rce_learning_rate"] * recipe["max_train_queries"])
        assert notes["grpo"]["lr_factor"] == pytest.approx(steps / study.grpo_steps)
    # Hand-computed: plan 5 = 50 epochs x 800 queries x 8 / 64 = 5,000 steps.
    plan5, _ = ps.plan_settings(study, study.plans["plan5"], 0)
    assert plan5["learning_rate"] == pytest.approx(5e-6 * 5000 / study.grpo_steps)
    zero_contrast, _ = ps.plan_settings(study, study.plans["plan5_zero_contrast"], 0)
    assert zero_contrast == {**plan5, "selective_rollout": True, "zero_contrast_groups": "drop"}
    best, _ = ps.plan_settings(study, study.plans["best"], 0)
    assert best["beta"] == 0.0 and best["reward_mode"] == "hard_plus_gtprob_plus_rel"
    assert best["learning_rate"] == pytest.approx(5e-5 * 5000 / study.grpo_steps)


def test_warmups_are_shared_only_when_identical():
    study = ps.load_study(str(DEMO_STUDY))

    def key(name, seed=0):
        settings, _ = ps.plan_settings(study, study.plans[name], seed)
        return ps.warmup_key({**settings, "rce_data_path": "rl.jsonl"}, study.base)

    assert key("rank_baseline") == key("plan5") == key("plan6") == key("plan6b") == key("plan7") == key(
        "plan5_zero_contrast")
    assert key("plan8") == key("best") != key("plan5")  # another reward shapes the warm-up's weights
    assert key("plan10") not in (key("plan5"), key("plan8"))
    assert key("plan5", 0) != key("plan5", 1)
    assert ps.warmup_key({"seed": 0}, study.base) is None


def test_study_file_checks(tmp_path):
    def write(content):
        path = tmp_path / "study.yaml"
        path.write_text(yaml.safe_dump(content))
        return str(path)

    with pytest.raises(ValueError, match="unknown top-level"):
        ps.load_study(write({"plans": {"a": {}}, "extra": 1}))
    with pytest.raises(ValueError, match="references"):
        ps.load_study(write({"study": {"references": ["b"]}, "plans": {"a": {}}}))
    with pytest.raises(ValueError, match="output_dirs"):
        ps.load_study(write({"study": {"seeds": [0, 1]}, "plans": {"a": {"output_dirs": ["x"]}}}))
    with pytest.raises(ValueError, match="unknown keys"):
        ps.load_study(write({"plans": {"a": {"lr": 1}}}))
    with pytest.raises(FileNotFoundError):
        ps.load_study(write({"plans": {"a": {"recipe": "no/such/recipe.yaml"}}}))


def test_summary_statistics_are_the_evaluation_modules():
    rng = np.random.default_rng(0)
    shots = [1, 2]

    def run(offset):
        values = {str(s): np.clip(rng.uniform(0, 1, 50) + offset, 0, 1) for s in shots}
        values["own"] = values["1"]
        return ps.with_average(values, shots)

    per_plan = {"ref": [run(0.0), run(0.0)], "new": [run(0.1), run(0.1)]}
    summary = ps.summarize(per_plan, ["ref"], shots)
    new = np.mean([r["avg"] for r in per_plan["new"]], axis=0)
    ref = np.mean([r["avg"] for r in per_plan["ref"]], axis=0)
    assert summary["new"]["accuracy"]["avg"] == mean_ci(new).__dict__
    expected = paired_comparison(new, ref)
    got = summary["new"]["vs"]["ref"]["avg"]
    assert got["mean_diff"] == pytest.approx(expected.mean_diff) and got["p_value"] == expected.p_value
    assert got["per_seed"] == pytest.approx([float((a["avg"] - b["avg"]).mean())
                                             for a, b in zip(per_plan["new"], per_plan["ref"], strict=True)])
    assert "ref" not in summary["ref"]["vs"]
    table = ps.comparison_table(summary, "ref", shots)
    assert table.count("\n") == 2 and "| new |" in table


def _short_study(tmp_path) -> str:
    """Three plans (rank baseline, plan 5, plan 10), one seed, a few steps, a small world, 24 held-out queries."""
    study = yaml.safe_load(DEMO_STUDY.read_text())
    study["study"].update({"output_dir": str(tmp_path / "study"), "seeds": [0], "grpo_steps": 4,
                           "eval_queries": 24, "eval_shots": [1, 2]})
    study["base"].update({"demo_num_train": 300, "demo_num_eval": 24, "demo_num_test": 0, "max_train_queries": 16,
                          "pool_size": 8, "logging_steps": 2, "selector_max_shots": 2})
    study["plans"] = {name: {**study["plans"][name], "recipe": str(ROOT / study["plans"][name]["recipe"])}
                      for name in ("rank_baseline", "plan5", "plan10")}
    for plan in study["plans"].values():
        plan["demo_overrides"] = {"selector_max_shots": 2, "max_completion_length": 3,
                                  "rce_num_train_epochs": 1}
    path = tmp_path / "plans.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return str(path)


def test_short_study_trains_evaluates_and_reevaluates(tmp_path, capsys):
    compare = load_script("compare_plans")
    config = _short_study(tmp_path)
    results = compare.main(["--config", config])
    out = tmp_path / "study"
    for name in ("plan_study.md", "plan_study.json", "plan_comparison.png", "accuracy_vs_shots.png",
                 "plan_diagnostics.png"):
        assert (out / name).stat().st_size > 0, name
    printed = capsys.readouterr().out
    assert "[1/3] rank_baseline seed 0: trained" in printed and "[2/3] plan5 seed 0: trained" in printed
    assert "shared warm-up" in printed  # plan 5 starts from the rank baseline's warm-up (same RCE settings)
    saved = json.loads((out / "plan_study.json").read_text())
    assert set(saved["plans"]) == {"rank_baseline", "plan5", "plan10"} and len(saved["query_ids"]) == 24
    plan5 = saved["plans"]["plan5"]
    assert set(plan5["summary"]["accuracy"]) == {"1", "2", "avg", "own"}
    assert set(plan5["summary"]["vs"]) == {"rank_baseline"}
    assert plan5["diagnostics"]["averages"]["reward_calls"] > 0
    assert saved["plans"]["plan10"]["diagnostics"] is None  # RCE only: no GRPO log
    assert saved["plans"]["plan10"]["summary"]["vs"]["plan5"]["own"]["n"] == 24
    assert (out / "plan5" / "seed0" / "diagnosis.md").is_file()
    assert any(name.startswith("GRPO start") for name in saved["baselines"])
    report = (out / "plan_study.md").read_text()
    assert "## Paired difference against plan5" in report and "load average" in report
    assert math.isfinite(saved["machine"]["wall_seconds"])

    # Evaluation only, on the folders just written: same numbers, nothing trained.
    again = compare.main(["--config", config, "--eval_only"])
    assert "trained" not in capsys.readouterr().out
    for name in results["plans"]:
        assert again["plans"][name]["summary"]["accuracy"] == results["plans"][name]["summary"]["accuracy"]
    # A rerun reuses finished runs instead of training them again.
    compare.main(["--config", config, "--plans", "plan5"])
    assert "plan5 seed 0: reusing the finished run" in capsys.readouterr().out


def test_okvqa_study_evaluates_finished_runs_unscaled():
    """The GPU study lists finished output folders (one per seed) and keeps the recipes' settings as they are."""
    study = ps.load_study(str(ROOT / "recipes" / "okvqa" / "plans.yaml"))
    assert study.grpo_steps is None and study.seeds == [42]
    assert study.base["dataset"] == "okvqa" and study.base["reward_backend"] == "qwen_vl"
    for name, spec in study.plans.items():
        assert len(spec.output_dirs) == 1
        recipe = yaml.safe_load(open(spec.recipe))
        settings, notes = ps.plan_settings(study, spec, 42)
        assert settings["learning_rate"] == recipe["learning_rate"] and "grpo" not in notes
        assert spec.output_dirs[0] == recipe["output_dir"]
