"""The offline demo learns: a short run of the demo recipe (smaller world, fewer steps) trains a selector that clearly
beats random demonstrations on held-out queries, and writes the evaluation files."""

import json
from pathlib import Path

from e2e_scripts import ROOT, load_script


def test_short_demo_learns(tmp_path):
    out = tmp_path / "demo"
    run = load_script("train_okvqa").main(
        [
            "--config", str(ROOT / "recipes" / "demo" / "cpu.yaml"),
            "--output_dir", str(out),
            "--demo_num_train", "500", "--demo_num_eval", "120", "--demo_num_test", "0",
            "--max_steps", "40", "--logging_steps", "5", "--disable_tqdm", "true",
        ]
    )
    results = json.loads((out / "eval_results.json").read_text())
    assert set(results) == {"random", "image_sim", "text_sim", "selector", "oracle"}
    assert results == run["eval_results"]
    assert results["selector"] >= results["random"] + 0.1, results
    assert results["selector"] <= results["oracle"] + 1e-9
    for name in ("eval_table.md", "eval_details.json", "accuracy_vs_shots.png", "training_curves.png"):
        assert (out / name).stat().st_size > 0, name
    assert "| selector |" in (out / "eval_table.md").read_text()
    assert Path(run["start_policy"]).is_dir()
