"""The offline demo learns: a short run of the demo recipe (smaller world, fewer steps) trains a selector that clearly
beats random demonstrations and the policy it started from on held-out queries, and writes the evaluation files."""

import json
from pathlib import Path

import pytest

from e2e_scripts import ROOT, load_script


def start_policy_accuracy(start_dir, out) -> float:
    """Greedy held-out accuracy of the saved start policy, on the same world, pools and scorer as the run."""
    import numpy as np

    from trl_icd import pipeline

    train = load_script("train_okvqa")
    _, data_args, reward_args, selector_args, *_ = train.make_parser().parse_args_and_config(
        ["--config", str(ROOT / "recipes" / "demo" / "cpu.yaml"), "--output_dir", str(out),
         "--demo_num_test", "0"]
    )
    data = pipeline.load_data(data_args)
    model, tokenizer = pipeline.load_or_build_selector(start_dir, data, data_args, selector_args)
    pools = pipeline.build_pools(data, data_args, data.eval_ids)
    picks = pipeline.select_with_selector(model, tokenizer, data, pools, data.eval_ids, show_progress=False)
    reward = pipeline.build_reward(data, reward_args)
    return float(np.mean(pipeline.score_selections(reward, data.eval_ids, picks)))


def test_short_demo_learns(tmp_path, capsys):
    out = tmp_path / "demo"
    run = load_script("train_okvqa").main(
        [
            "--config", str(ROOT / "recipes" / "demo" / "cpu.yaml"),
            "--output_dir", str(out),
            "--demo_num_test", "0", "--max_steps", "400", "--logging_steps", "20", "--disable_tqdm", "true",
        ]
    )
    results = json.loads((out / "eval_results.json").read_text())
    assert set(results) == {"random", "image_sim", "text_sim", "selector", "oracle"}
    assert results == run["eval_results"]
    assert results["selector"] >= results["random"] + 0.3, results
    assert results["selector"] > results["image_sim"], results
    # Learning, not just the pools: the start policy (uniform) picks from the same image-similarity pools.
    start = start_policy_accuracy(run["start_policy"], out)
    assert results["selector"] >= start + 0.2, (results, start)
    assert results["selector"] <= results["oracle"] + 1e-9
    for name in ("eval_table.md", "eval_details.json", "accuracy_vs_shots.png", "training_curves.png"):
        assert (out / name).stat().st_size > 0, name
    assert "| selector |" in (out / "eval_table.md").read_text()
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["eval_results"] == results and summary["training_cost"]["reward_calls/sent"] > 0
    assert Path(run["start_policy"]).is_dir()
    # The console: compact lines, no metric dicts, and where everything went; every log in metrics.jsonl, with the
    # held-out accuracy at step 0 and every 100 steps, its last value the end-of-run greedy selector's.
    printed = capsys.readouterr().out
    assert "| reward " in printed and "{'loss'" not in printed and "Outputs written to" in printed
    assert {"trained selector", "metrics of every log", "evaluation", "plots"} <= set(run["outputs"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    heldout = [r for r in rows if "heldout/accuracy" in r]
    assert [r["step"] for r in heldout] == [0, 100, 200, 300, 400]
    assert heldout[-1]["heldout/accuracy"] == pytest.approx(results["selector"])
    assert [r["step"] for r in rows if "reward" in r] == list(range(20, 401, 20))


def test_lora_run_saves_a_loadable_merged_selector(tmp_path):
    """A LoRA run keeps its adapter in `output_dir/adapter` and saves the merged selector, which loads strictly and
    computes exactly what the trained (adapter-wrapped) policy computed."""
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    run = load_script("train_okvqa").main(
        [
            "--config", str(ROOT / "recipes" / "demo" / "cpu.yaml"),
            "--output_dir", str(out),
            "--demo_num_test", "0", "--max_steps", "3", "--evaluate", "false", "--disable_tqdm", "true",
            "--use_peft", "true", "--lora_r", "4", "--lora_target_modules", "all-linear",
        ]
    )
    assert run["global_step"] == 3
    assert (out / "adapter" / "adapter_config.json").is_file()
    summary = json.loads((out / "run_summary.json").read_text())  # written without an evaluation too
    assert summary["global_step"] == 3 and summary["eval_results"] is None and summary["wall_time_s"] > 0
    cost = summary["training_cost"]
    assert cost["reward_calls/rows_scored"] == 3 * 64 == cost["reward_calls/sent"] + cost["reward_calls/cached"] + (
        cost["reward_calls/rejected"])
    loaded = AutoModelForCausalLM.from_pretrained(out)
    start = AutoModelForCausalLM.from_pretrained(run["start_policy"])
    # Training moved the merged weights away from the start policy (LoRA deltas were folded in).
    changed = [
        name for name, p in loaded.named_parameters() if not torch.equal(p, dict(start.named_parameters())[name])
    ]
    assert changed, "the merged selector equals the start policy: LoRA weights were not merged"
    # An independent path to the trained policy: the start policy with the saved adapter on top.
    from peft import PeftModel

    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run["start_policy"]), out / "adapter")
    from transformers import AutoTokenizer

    from trl_icd.selector import selector_prompt

    tokenizer = AutoTokenizer.from_pretrained(out)
    text = selector_prompt(0, list(range(1, 1 + loaded.config.num_slots)), vocabulary=tokenizer)
    prompt = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(loaded(prompt).logits, adapted(prompt).logits, atol=1e-5, rtol=1e-5)
