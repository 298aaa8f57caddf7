"""ICDGRPOTrainer / ICDGRPOConfig on a tiny Qwen2 policy: each advantage mode trains, the loss receives exactly the
advantages computed from the gathered rewards (checked against an independent implementation), logs agree with
them, eval uses num_generations_eval, adaptive KL moves beta the right way and survives a resume."""

import math
import statistics

import pytest
import torch
from _icd_grpo_helpers import (
    BASE_CONFIG,
    RecordingTrainer,
    completion_reward,
    parity_reward,
    position_reward,
    prompt_dataset,
    tiny_policy,
)
from trl import GRPOConfig, TrlParser

from trl_icd import ICDGRPOConfig, ICDGRPOTrainer, advantage_stats, compute_group_advantages
from trl_icd.advantages import aggregate_rewards
from trl_icd.trainer import AdaptiveKLCallback, adapt_kl_beta

MODES = ["zscore", "rank", "mean", "batch", "rloo"]


def reference_advantages(rewards, group_size, mode, min_std=0.1, clip=5.0):
    """Plain-Python advantages (DESIGN.md definitions), independent of trl_icd.advantages."""
    rewards = [float(r) for r in rewards]
    scorable_all = [r for r in rewards if not math.isnan(r)]
    batch_std = statistics.stdev(scorable_all) if len(scorable_all) > 1 else math.nan
    out = []
    for start in range(0, len(rewards), group_size):
        group = rewards[start : start + group_size]
        values = [r for r in group if not math.isnan(r)]
        n = len(values)
        for r in group:
            if math.isnan(r) or n < 2:
                out.append(0.0)
                continue
            mean = sum(values) / n
            if mode == "zscore":
                divisor = max(statistics.stdev(values), min_std)
                a = (r - mean) / divisor if divisor > 0 else 0.0
            elif mode == "rank":
                rank = sum(v > r for v in values) + (sum(v == r for v in values) - 1) / 2
                a = 1 - 2 * rank / (n - 1)
            elif mode == "mean":
                a = r - mean
            elif mode == "batch":
                a = (r - mean) / max(batch_std, min_std)
            elif mode == "rloo":
                a = r - (sum(values) - r) / (n - 1)
            out.append(a if clip is None else max(-clip, min(clip, a)))
    return torch.tensor(out)


def reference_sum(rewards_per_func, weights):
    rows = []
    for row in rewards_per_func.tolist():
        present = [w * r for w, r in zip(weights, row, strict=True) if not math.isnan(r)]
        rows.append(sum(present) if present else math.nan)
    return rows


def make_trainer(
    tmp_path, reward_funcs=(position_reward, completion_reward), model=None, tokenizer=None, peft_config=None, **overrides
):
    if model is None:
        model, tokenizer = tiny_policy()
    config = dict(BASE_CONFIG, output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=2)
    config.update(overrides)
    return RecordingTrainer(
        model=model,
        reward_funcs=list(reward_funcs),
        args=ICDGRPOConfig(**config),
        train_dataset=prompt_dataset(),
        processing_class=tokenizer,
        peft_config=peft_config,
    )


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_trains_and_the_loss_gets_its_advantages(tmp_path, mode):
    weights = [1.0, 0.5]
    trainer = make_trainer(tmp_path, advantage_mode=mode, reward_weights=weights, advantage_clip=1.2)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()

    records = [r for r in trainer.records if r["mode"] == "train"]
    assert len(records) == 2
    for record in records:
        rewards = reference_sum(record["rewards_per_func"], weights)
        assert any(math.isnan(r) for r in rewards)  # unscorable rows are exercised
        expected = reference_advantages(rewards, 4, mode, min_std=0.1, clip=1.2)
        torch.testing.assert_close(record["local_advantages"], expected, atol=1e-5, rtol=1e-5)
        # the loss sees the same advantages, in TRL's shuffled order
        used = torch.cat(record["loss_advantages"])
        torch.testing.assert_close(used.sort().values, expected.sort().values, atol=1e-5, rtol=1e-5)
        assert used.abs().max() <= 1.2 + 1e-6

    # TRL's per-sample log holds the advantages used, not its own
    assert list(trainer._logs["advantages"]) == pytest.approx(records[-1]["local_advantages"].tolist())
    logged = trainer.state.log_history[1]  # the second step
    stats = advantage_stats(records[1]["local_advantages"], reference_sum(records[1]["rewards_per_func"], weights), 4)
    for name, value in stats.items():
        assert logged[name] == pytest.approx(value, abs=1e-6), name
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))


def test_logged_diagnostics_replace_trl_numbers_for_flat_groups(tmp_path):
    """With scale_rewards='batch' TRL would log frac_reward_zero_std = 0; ours counts the flat groups."""

    def even_prompts_flat(prompts, completions, **kwargs):
        rewards = position_reward(prompts, completions)
        return [1.0 if int(p[0]["content"].split()[1][:-1]) % 2 == 0 else r for p, r in zip(prompts, rewards, strict=True)]

    trainer = make_trainer(tmp_path, reward_funcs=[even_prompts_flat], scale_rewards="batch", max_steps=1)
    trainer.train()
    record = trainer.records[0]
    rewards = record["rewards_per_func"][:, 0]
    expected = advantage_stats(compute_group_advantages(rewards, 4), rewards, 4)["frac_reward_zero_std"]
    assert expected > 0
    assert trainer.state.log_history[0]["frac_reward_zero_std"] == pytest.approx(expected)


def test_normalize_then_sum_aggregation_is_respected(tmp_path):
    weights = [2.0, 1.0]
    trainer = make_trainer(
        tmp_path, reward_funcs=[position_reward, parity_reward], multi_objective_aggregation="normalize_then_sum",
        reward_weights=weights, max_steps=1,
    )  # fmt: skip
    trainer.train()
    record = trainer.records[0]
    combined = aggregate_rewards(record["rewards_per_func"], weights, 4, "normalize_then_sum")
    expected = reference_advantages(combined.tolist(), 4, "zscore")
    torch.testing.assert_close(record["local_advantages"], expected, atol=1e-5, rtol=1e-5)


def test_eval_uses_num_generations_eval(tmp_path):
    model, tokenizer = tiny_policy()
    trainer = RecordingTrainer(
        model=model,
        reward_funcs=[position_reward],
        args=ICDGRPOConfig(
            **dict(BASE_CONFIG, output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=1),
            num_generations_eval=2,
            per_device_eval_batch_size=4,
            advantage_mode="rank",
        ),
        train_dataset=prompt_dataset(),
        eval_dataset=prompt_dataset(2),
        processing_class=tokenizer,
    )
    metrics = trainer.evaluate()
    records = [r for r in trainer.records if r["mode"] == "eval"]
    assert records
    for record in records:
        rewards = record["rewards_per_func"][:, 0]
        assert rewards.numel() == 4
        torch.testing.assert_close(record["local_advantages"], reference_advantages(rewards.tolist(), 2, "rank"))
    for name in ("eval_advantages/std", "eval_advantages/max_abs", "eval_frac_reward_zero_std"):
        assert name in metrics


# --- adaptive KL ---------------------------------------------------------------------------------------------------


def test_adapt_kl_beta_rule():
    assert adapt_kl_beta(0.1, kl=0.2) == pytest.approx(0.15)
    assert adapt_kl_beta(0.1, kl=0.005) == pytest.approx(0.1 / 1.5)
    assert adapt_kl_beta(0.1, kl=0.05) == 0.1
    assert adapt_kl_beta(0.1, kl=0.1) == 0.1 and adapt_kl_beta(0.1, kl=0.01) == 0.1  # band edges: no change
    assert adapt_kl_beta(9.0, kl=1.0) == 10.0  # clamped above
    assert adapt_kl_beta(0.0012, kl=0.0) == 0.001  # clamped below


def test_adaptive_kl_callback_state_round_trip():
    callback = AdaptiveKLCallback(beta=0.2, lower=0.02, upper=0.2, factor=2.0, beta_min=0.01, beta_max=1.0)
    for kl in (0.5, 0.7):  # one optimiser step, mean KL 0.6 > 0.2
        callback.observe(kl)
    callback.observe(float("nan"))  # ignored
    callback.on_step_end(args=None, state=type("S", (), {"global_step": 1})(), control=None)
    assert callback.beta == pytest.approx(0.4)
    restored = AdaptiveKLCallback(**callback.state()["args"])
    assert restored.state() == callback.state()
    # on_train_begin reads a resumed TrainerState
    fresh = AdaptiveKLCallback(beta=0.2)
    state = type("S", (), {"stateful_callbacks": {"AdaptiveKLCallback": callback.state()}})()
    fresh.on_train_begin(args=None, state=state, control=None)
    assert fresh.beta == pytest.approx(0.4)


def _saved_policy(tmp_path):
    model, tokenizer = tiny_policy()
    path = tmp_path / "policy"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path), tokenizer


def _beta_trace(trainer):
    steps = [h for h in trainer.state.log_history if "kl" in h]
    return [h["kl_beta"] for h in steps], [h["kl"] for h in steps]


def test_adaptive_kl_lowers_beta_when_kl_is_below_the_band(tmp_path):
    path, tokenizer = _saved_policy(tmp_path)
    trainer = make_trainer(
        tmp_path, model=path, tokenizer=tokenizer, beta=0.5, adaptive_kl=True, max_steps=3,
        save_strategy="steps", save_steps=2,
    )  # fmt: skip
    trainer.train()
    betas, kls = _beta_trace(trainer)
    assert betas[0] == 0.5
    for beta, next_beta, kl in zip(betas, betas[1:], kls, strict=False):
        assert kl < 0.01
        assert next_beta == pytest.approx(beta / 1.5)
    assert trainer.beta == pytest.approx(0.5 / 1.5**3)

    # resuming from the step-2 checkpoint continues from the adapted beta, not from args.beta
    resumed = make_trainer(tmp_path, model=path, tokenizer=tokenizer, beta=0.5, adaptive_kl=True, max_steps=3)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert resumed.records[0]["beta"] == pytest.approx(0.5 / 1.5**2)


def test_adaptive_kl_raises_beta_when_kl_is_above_the_band(tmp_path):
    path, tokenizer = _saved_policy(tmp_path)
    trainer = make_trainer(
        tmp_path, model=path, tokenizer=tokenizer, beta=0.05, adaptive_kl=True, adaptive_kl_lower=0.0,
        adaptive_kl_upper=1e-9, learning_rate=0.05, max_steps=3,
    )  # fmt: skip
    trainer.train()
    betas, kls = _beta_trace(trainer)
    for beta, next_beta, kl in zip(betas, betas[1:], kls, strict=False):
        assert next_beta == pytest.approx(adapt_kl_beta(beta, kl, 0.0, 1e-9, 1.5, 0.001, 10.0))
    assert kls[1] > 1e-9  # the policy moved after the first update
    assert trainer.beta > 0.05


# --- configuration -------------------------------------------------------------------------------------------------


def test_config_defaults_and_help():
    config = ICDGRPOConfig(output_dir="unused", use_cpu=True)
    assert (config.advantage_mode, config.advantage_min_std, config.advantage_clip) == ("zscore", 0.1, 5.0)
    assert not config.adaptive_kl
    assert (config.adaptive_kl_lower, config.adaptive_kl_upper, config.adaptive_kl_factor) == (0.01, 0.1, 1.5)
    assert (config.adaptive_kl_beta_min, config.adaptive_kl_beta_max) == (0.001, 10.0)
    for name, field in ICDGRPOConfig.__dataclass_fields__.items():
        if name.startswith(("advantage_", "adaptive_kl")):
            assert field.metadata.get("help"), name


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"advantage_mode": "ranked"}, "Valid modes: batch, mean, rank, rloo, zscore"),
        ({"advantage_min_std": -1.0}, "advantage_min_std"),
        ({"advantage_clip": 0.0}, "advantage_clip"),
        ({"adaptive_kl_lower": 0.2}, "adaptive KL band"),
        ({"adaptive_kl_factor": 1.0}, "adaptive_kl_factor"),
        ({"adaptive_kl_beta_min": 0.0}, "adaptive KL bounds"),
        ({"adaptive_kl": True}, "beta=0.0"),
        ({"adaptive_kl": True, "beta": 20.0}, "must lie in"),
    ],
)
def test_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        ICDGRPOConfig(output_dir="unused", use_cpu=True, **overrides)


def test_config_from_yaml_with_trl_parser(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "output_dir: unused\nuse_cpu: true\nadvantage_mode: rank\nadvantage_clip: null\n"
        "adaptive_kl: true\nbeta: 0.1\nadaptive_kl_upper: 0.2\n"
    )
    (config,) = TrlParser((ICDGRPOConfig,)).parse_args_and_config(["--config", str(recipe)])
    assert (config.advantage_mode, config.advantage_clip, config.adaptive_kl, config.adaptive_kl_upper) == (
        "rank", None, True, 0.2,
    )  # fmt: skip


def test_trainer_rejects_a_plain_grpo_config(tmp_path):
    model, tokenizer = tiny_policy()
    with pytest.raises(TypeError, match="ICDGRPOConfig"):
        ICDGRPOTrainer(model=model, reward_funcs=[position_reward], args=GRPOConfig(output_dir=str(tmp_path), use_cpu=True))


# --- other policies: a vision-language model, a LoRA adapter -----------------------------------------------------


def test_vision_language_policy(tmp_path):
    from datasets import Dataset

    from trl_icd.testing.qwen_vl import synthetic_image, tiny_qwen2_5_vl

    model, processor = tiny_qwen2_5_vl()
    colours = ["red", "green", "blue", "yellow"]
    dataset = Dataset.from_dict(
        {
            "prompt": [
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"Question {i}: colour?"}]}]
                for i in range(4)
            ],
            "image": [synthetic_image(colours[i], "circle", (56, 56), seed=i) for i in range(4)],
        }
    )
    config = dict(BASE_CONFIG, output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=1)
    trainer = RecordingTrainer(
        model=model,
        reward_funcs=[position_reward, completion_reward],
        args=ICDGRPOConfig(**config, advantage_mode="rank"),
        train_dataset=dataset,
        processing_class=processor,
    )
    trainer.train()
    record = trainer.records[0]
    expected = reference_advantages(reference_sum(record["rewards_per_func"], [1.0, 1.0]), 4, "rank")
    torch.testing.assert_close(record["local_advantages"], expected)
    assert sorted(torch.cat(record["loss_advantages"]).tolist()) == pytest.approx(sorted(expected.tolist()))


def test_peft_policy(tmp_path):
    from peft import LoraConfig

    trainer = make_trainer(
        tmp_path, peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), advantage_mode="rloo", max_steps=1
    )
    trainer.train()
    record = trainer.records[0]
    expected = reference_advantages(reference_sum(record["rewards_per_func"], [1.0, 1.0]), 4, "rloo")
    torch.testing.assert_close(record["local_advantages"], expected)
