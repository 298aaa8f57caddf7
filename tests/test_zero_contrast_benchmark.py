"""benchmarks/zero_contrast.py: its target and ratio arithmetic by hand, and a tiny run end to end (so the benchmark
keeps working; its figures come from the full run documented in docs/zero_contrast.md)."""

import json
from pathlib import Path

import pytest

from trl_icd.cli import load_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    return load_script(ROOT / "benchmarks" / "zero_contrast.py")


def run(arm, seed, calls, curve, accuracy=0.9):
    points = [{"step": 50 * i, "calls": c, "accuracy": a} for i, (c, a) in enumerate(curve)]
    return {"arm": arm, "seed": seed, "steps": 100, "wall_time_s": 1.0, "reward_calls": calls, "rows_skipped": 0,
            "groups_dropped": 0, "curve": points, "accuracy": accuracy, "oracle": 1.0, "per_query": [accuracy] * 4}


def test_held_out_curve_takes_the_calls_logged_at_or_before_each_evaluation(bench):
    log = [
        {"step": 0, "heldout/accuracy": 0.4},
        {"step": 10, "reward_calls/sent": 100},
        {"step": 20, "reward_calls/sent": 180},
        {"step": 25, "heldout/accuracy": 0.6},
        {"step": 30, "reward_calls/sent": 200},
        {"step": 30, "heldout/accuracy": 0.7},
    ]
    assert bench.held_out_curve(log) == [
        {"step": 0, "calls": 0, "accuracy": 0.4},
        {"step": 25, "calls": 180, "accuracy": 0.6},
        {"step": 30, "calls": 200, "accuracy": 0.7},
    ]


def test_targets_and_ratios_by_hand(bench, tmp_path):
    results = [
        # reference: final curve accuracy 0.90 -> target 0.89; total 1,000 calls
        run("ref", 0, 1000, [(0, 0.5), (400, 0.85), (700, 0.9), (1000, 0.9)]),
        # first point >= 0.89 at 300 calls -> 300 / 1000
        run("fast", 0, 600, [(0, 0.5), (300, 0.89), (600, 0.92)]),
        # never reaches 0.89 -> no calls, no ratio
        run("slow", 0, 900, [(0, 0.5), (900, 0.88)]),
    ]
    text = bench.report(results, tmp_path, "idle", "ref")
    by_arm = {r["arm"]: r for r in results}
    assert by_arm["ref"]["target"] == pytest.approx(0.89)
    assert by_arm["ref"]["calls_to_target"] == 700 and by_arm["ref"]["ratio_to_reference_total"] == pytest.approx(0.7)
    assert by_arm["fast"]["calls_to_target"] == 300 and by_arm["fast"]["ratio_to_reference_total"] == pytest.approx(0.3)
    assert by_arm["slow"]["calls_to_target"] is None and by_arm["slow"]["ratio_to_reference_total"] is None
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert rows["fast"].endswith("| 300 (1/1) | 0.30 |") and rows["slow"].endswith("| - (0/1) | - |")
    assert (tmp_path / "zero_contrast.md").read_text().strip() == text


def test_a_tiny_run_writes_its_table_json_and_plot(bench, tmp_path):
    out = tmp_path / "zc"
    results = bench.main(["--arms", "off", "selective+drop", "--seeds", "0", "--max_steps", "6", "--eval_every", "3",
                          "--curve_queries", "16", "--output_dir", str(out)])
    assert [r["arm"] for r in results] == ["off", "selective+drop"]
    for r in results:
        assert r["steps"] == 6 and r["reward_calls"] > 0
        assert [p["step"] for p in r["curve"]] == [0, 3, 6]
        assert 0 < r["accuracy"] <= r["oracle"] <= 1
    assert results[0]["options"] == [] and results[1]["options"] == [
        "--selective_rollout", "true", "--zero_contrast_groups", "drop"]
    saved = json.loads((out / "zero_contrast.json").read_text())
    assert [r["arm"] for r in saved["results"]] == ["off", "selective+drop"]
    assert "| off | 1 | 6 |" in (out / "zero_contrast.md").read_text()
    assert (out / "calls_vs_accuracy.png").stat().st_size > 10_000
