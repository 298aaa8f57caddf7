"""End to end on a tiny OK-VQA-format fixture (official JSON files + COCO-style images), the weight-free fallback
features, a tiny selector and a tiny random Qwen2.5-VL loaded from a local folder as the reward model: RL data,
RCE, GRPO with a KL reference, checkpoints, resume, evaluation; and every recipe parses into the scripts'
dataclasses."""

import hashlib
import json
from pathlib import Path

import pytest
import yaml
from e2e_scripts import ROOT, load_script

# Training recipes; plan-study files (`plans.yaml`, checked in tests/test_plan_study.py) are not recipes.
RECIPES = sorted(p for p in (ROOT / "recipes").glob("**/*.yaml") if p.name != "plans.yaml")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def okvqa(tmp_path_factory):
    """The fixture release, the tiny VLM saved as a local checkpoint, and a recipe pointing at both."""
    from trl_icd.testing.okvqa import write_okvqa_fixture
    from trl_icd.testing.qwen_vl import tiny_qwen2_5_vl

    root = tmp_path_factory.mktemp("okvqa")
    write_okvqa_fixture(root / "data", n_train=16, n_val=6, seed=0)
    model, processor = tiny_qwen2_5_vl()
    model.save_pretrained(root / "vlm")
    processor.save_pretrained(root / "vlm")
    recipe = {
        "dataset": "okvqa",
        "dataset_path": str(root / "data"),
        "pool_size": 6,
        "pool_method": "mix",
        "reward_backend": "qwen_vl",
        "reward_model_name_or_path": str(root / "vlm"),
        "reward_max_new_tokens": 3,
        "reward_batch_size": 8,
        # rel varies even when a random VLM never answers right, so groups have contrast
        "reward_mode": "hard_plus_gtprob_plus_rel",
        "rel_weight": 0.3,
        "reward_cache_path": str(root / "cache.sqlite"),
        "selector_min_shots": 1,
        "selector_max_shots": 2,
        "selector_overrides": json.dumps({"hidden_size": 32, "num_layers": 1, "num_decoder_layers": 1, "num_heads": 2}),
        "use_cpu": True,
        "bf16": False,
        "learning_rate": 1.0e-3,
        "per_device_train_batch_size": 8,
        "num_generations": 4,
        "max_completion_length": 3,
        "beta": 0.05,
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": 2,
        "report_to": "none",
        "gradient_checkpointing": False,
        "disable_tqdm": True,
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return root, path


def test_train_rce_grpo_checkpoint_and_resume(okvqa):
    from transformers import AutoModelForCausalLM

    root, recipe = okvqa
    out = root / "run"
    generate = load_script("generate_rl_data")
    summary = generate.main(
        ["--config", str(recipe), "--fresh_selector", "true", "--max_train_queries", "5", "--num_beams", "2",
         "--temperatures", "1.0", "--samples_per_temperature", "1", "--num_retrieval", "1",
         "--output_file", str(root / "rl.jsonl")]
    )
    assert summary["sequences"] > 5 and summary["unscorable_sequences"] == 0
    lines = [json.loads(line) for line in (root / "rl.jsonl").read_text().splitlines()]
    assert {"query_id", "demo_ids", "source", "components", "scorer"} <= set(lines[0])
    assert {line["source"] for line in lines} >= {"beam", "image_sim", "text_sim"}

    train = load_script("train_okvqa")
    run = train.main(
        ["--config", str(recipe), "--output_dir", str(out), "--max_steps", "2", "--max_train_queries", "5",
         "--rce_data_path", str(root / "rl.jsonl"), "--rce_num_train_epochs", "1"]
    )
    start = Path(run["start_policy"])
    # The KL reference is the policy this run started from (after RCE), saved in the output dir.
    assert run["reference_policy"] == str(start)
    assert (out / "rce").is_dir() and (out / "checkpoint-2").is_dir()
    final = AutoModelForCausalLM.from_pretrained(out)  # strict loading: any missing weight would raise
    assert type(final).__name__ == "ICDSelectorForCausalLM"
    start_hash = sha(start / "model.safetensors")

    resumed = train.main(
        ["--config", str(recipe), "--output_dir", str(out), "--max_steps", "3", "--max_train_queries", "5",
         "--rce_data_path", str(root / "rl.jsonl"), "--resume_from_checkpoint", "true"]
    )
    assert resumed["global_step"] == 3
    # Resuming neither re-ran the warm-up nor moved the reference.
    assert sha(start / "model.safetensors") == start_hash
    assert resumed["reference_policy"] == str(start)
    # metrics.jsonl of the resumed run: the lines up to the checkpoint kept, then the new step (no duplicates).
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward" in r] == [1, 2, 3]

    # The evaluation script on the fixture's val split: table, JSON, plot; the selector next to every baseline.
    evaluated = load_script("evaluate_okvqa").main(
        ["--config", str(recipe), "--selectors", str(out), "--selector_names", "grpo", "--shots", "0", "1", "2",
         "--results_dir", str(root / "eval"), "--vqa_protocol", "vqa2016"]
    )
    table = (root / "eval" / "results.md").read_text()
    for method in ("zero_shot", "random", "image_sim", "text_sim", "grpo"):
        assert f"| {method} |" in table
    assert "Best baseline" in table  # the paired comparison section
    assert "grpo choosing its own number of demonstrations (greedy): " in table
    assert 1 <= json.loads((root / "eval" / "results.json").read_text())["meta"]["own_choice"]["grpo"]["mean_shots"] <= 2
    assert (root / "eval" / "accuracy_vs_shots.png").stat().st_size > 0
    saved = json.loads((root / "eval" / "results.json").read_text())
    assert len(saved["query_ids"]) == 6  # all val questions of the fixture
    assert saved["meta"]["vqa_protocol"] == "vqa2016" and "protocol `vqa2016`" in table  # how accuracy was scored
    cell = saved["summary"]["grpo"]["2"]
    values = saved["per_query"]["grpo"]["2"]
    assert cell["n"] == 6 and cell["mean"] == pytest.approx(sum(values) / len(values))
    assert cell["low"] <= cell["mean"] <= cell["high"]
    assert evaluated["summary"]["zero_shot"].keys() == {"0"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_every_recipe_parses(recipe):
    if recipe.parent.name == "accelerate_configs":
        from accelerate.commands.config.config_args import ClusterConfig

        config = ClusterConfig.from_yaml_file(str(recipe))
        assert config.num_processes >= 1
        return
    parser = load_script("train_okvqa").make_parser()
    parsed = parser.parse_args_and_config(["--config", str(recipe), "--output_dir", "unused"])
    script_args, data_args, reward_args = parsed[:3]
    training_args = parsed[5]
    header = recipe.read_text().splitlines()[0]
    assert header.startswith("#"), "every recipe starts with a comment saying what it is"
    if recipe.parent.name == "okvqa":
        assert data_args.dataset == "okvqa" and reward_args.reward_backend == "qwen_vl"
        assert training_args.bf16 is False


def test_a_selector_trained_on_one_split_is_evaluated_on_another_split_and_corpus(okvqa):
    """Trained on the train split alone (its table holds only train items), then evaluated, as saved, on the val split
    and on a VQAv2-format corpus: other tables from the same featuriser. Another featuriser is refused."""
    from trl_icd.testing.okvqa import write_okvqa_fixture

    root, recipe = okvqa
    out = root / "train_only"
    load_script("train_okvqa").main(
        ["--config", str(recipe), "--output_dir", str(out), "--max_steps", "1", "--max_train_queries", "4",
         "--eval_split", "train", "--save_strategy", "no"]
    )
    trained_on = json.loads((out / "config.json").read_text())["feature_table"]
    assert trained_on["rows"] == 16  # the train split only

    evaluate = load_script("evaluate_okvqa").main
    common = ["--config", str(recipe), "--selectors", str(out), "--selector_names", "trained", "--shots", "0", "1"]
    on_val = evaluate([*common, "--results_dir", str(root / "eval_val")])
    assert on_val["summary"]["trained"]["1"]["n"] == 6

    write_okvqa_fixture(root / "vqav2", n_train=10, n_val=5, seed=1, dataset="vqav2")
    on_vqav2 = evaluate([*common, "--dataset", "vqav2", "--dataset_path", str(root / "vqav2"),
                         "--results_dir", str(root / "eval_vqav2")])
    assert on_vqav2["summary"]["trained"]["1"]["n"] == 5
    saved = json.loads((root / "eval_vqav2" / "results.json").read_text())
    assert saved["meta"]["features"]["rows"] == 15 and saved["meta"]["features"]["hash"] != trained_on["hash"]

    with pytest.raises(ValueError, match=r"fallback \(image 248 \+ text 256.*fallback \(image 248 \+ text 128"):
        evaluate([*common, "--fallback_text_dim", "128", "--results_dir", str(root / "eval_other")])
