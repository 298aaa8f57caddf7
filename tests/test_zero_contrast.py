"""Zero-contrast handling of ICDGRPOTrainer: flat groups taken out of the loss (exactly the loss of the contrasted
groups alone), dynamic sampling (fills a step, respects its bound, says when it cannot), selective rollout (the
documented skip probability, skipped queries return, the history survives a resume), and cost counters that add up.
The pieces of `trl_icd.zero_contrast` are checked on hand-made inputs first."""

import asyncio
import json
import logging
import math
import re

import numpy as np
import pytest
import torch
from _icd_grpo_helpers import BASE_CONFIG, prompt_dataset, tiny_policy
from datasets import Dataset
from trl import GRPOTrainer

from trl_icd import ICDGRPOConfig, ICDGRPOTrainer
from trl_icd.advantages import group_has_contrast
from trl_icd.zero_contrast import (
    ROW_INDEX_COLUMN,
    SKIP_COLUMN,
    PromptStream,
    ZeroContrastState,
    concat_rows,
    keep_probability,
    skippable,
    take_rows,
    with_row_index,
)

GROUP = 4


def question_number(prompt) -> int:
    return int(re.search(r"Question (\d+)", prompt[0]["content"]).group(1))


def flat_unless_odd(prompts, completions, **kwargs):
    """Flat (constant) for even question numbers; contrasted for odd ones (the reward is the row's position in its
    group's parity, so every odd group has both values)."""
    out = []
    for i, prompt in enumerate(prompts):
        out.append(0.5 if question_number(prompt) % 2 == 0 else float(i % 2))
    return out


def always_flat(prompts, completions, **kwargs):
    return [1.0] * len(prompts)


class LossRecorder(ICDGRPOTrainer):
    """Keeps, per micro-step, the inputs `_compute_loss` received and the loss it returned."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps = []

    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)
        self.steps.append({"inputs": {k: v for k, v in inputs.items()}, "loss": loss})
        return loss


def make(tmp_path, reward, dataset=None, trainer_cls=ICDGRPOTrainer, model=None, **overrides):
    if model is None:
        model, tokenizer = tiny_policy()
    else:
        _, tokenizer = tiny_policy()
    config = dict(BASE_CONFIG, output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=2,
                  num_generations=GROUP)
    config.update(overrides)
    return trainer_cls(
        model=model,
        reward_funcs=[reward],
        args=ICDGRPOConfig(**config),
        train_dataset=dataset if dataset is not None else prompt_dataset(8),
        processing_class=tokenizer,
    )


# --------------------------------------------------------------------------------------------------------------------
# The pieces
# --------------------------------------------------------------------------------------------------------------------


def test_keep_probability_is_the_documented_rule():
    streak = np.array([0, 1, 2, 3, 10])
    assert keep_probability(streak, 0.5, 0.05).tolist() == [1.0, 0.5, 0.25, 0.125, 0.05]
    assert keep_probability(streak, 1.0, 0.05).tolist() == [1.0] * 5  # keep_prob 1: never skip


def test_group_has_contrast_hand_cases():
    rewards = torch.tensor([1, 1, 1, 1, 0, 1, 0, 0, math.nan, 2, 2, math.nan, math.nan, 3, math.nan, math.nan])
    assert group_has_contrast(rewards, 4).tolist() == [False, True, False, False]


def test_state_records_streaks_and_round_trips(tmp_path):
    state = ZeroContrastState(num_rows=5)
    state.record([0, 1, 0, 2], [True, True, True, False])
    state.record([1], [False])
    assert state.flat_streak.tolist() == [2, 0, 0, 0, 0]
    assert state.times_scored.tolist() == [2, 2, 1, 0, 0]
    state.counters.add(groups_skipped=3)
    state.stream_position = 17
    state.add_reward_usage({"backend_calls": 4})
    saved = json.loads(json.dumps(state.state()))  # what trainer_state.json holds
    restored = ZeroContrastState(num_rows=5)
    restored.restore(saved)
    assert restored.flat_streak.tolist() == state.flat_streak.tolist()
    assert restored.times_scored.tolist() == state.times_scored.tolist()
    assert restored.counters == state.counters and restored.stream_position == 17
    assert restored.reward_usage == {"backend_calls": 4}
    with pytest.raises(ValueError, match="covers 5 training rows"):
        ZeroContrastState(num_rows=6).restore(saved)


def test_prompt_stream_is_a_seeded_sequence_of_permutations():
    stream = PromptStream(5, seed=3)
    first_pass = stream.take(0, 5)
    assert sorted(first_pass) == list(range(5))
    assert stream.take(0, 12) == first_pass + stream.take(5, 7)
    assert sorted(stream.take(5, 5)) == list(range(5))
    assert PromptStream(5, seed=3).take(2, 6) == stream.take(2, 6)  # a resumed stream continues identically


def test_with_row_index_adds_a_column_or_wraps():
    dataset = with_row_index(Dataset.from_dict({"prompt": ["a", "b", "c"]}))
    assert dataset[2][ROW_INDEX_COLUMN] == 2 and dataset[0]["prompt"] == "a"
    wrapped = with_row_index([{"prompt": "x"}, {"prompt": "y"}])
    assert wrapped[1] == {"prompt": "y", ROW_INDEX_COLUMN: 1}
    iterable = Dataset.from_dict({"prompt": ["a"]}).to_iterable_dataset()
    with pytest.raises(ValueError, match="map-style"):
        with_row_index(iterable)


def test_skippable_reward_never_sees_skipped_rows():
    seen = []

    def reward(prompts, completions, completion_ids=None, query=None, log_extra=None, **kwargs):
        seen.append((list(prompts), list(query)))
        log_extra("note", [f"n{p}" for p in prompts])
        return [float(p) for p in prompts]

    logged = {}
    wrapped = skippable(reward)
    assert wrapped.__name__ == "reward"
    out = wrapped(
        prompts=[1, 2, 3, 4], completions=["a", "b", "c", "d"], completion_ids=None, query=["q1", "q2", "q3", "q4"],
        log_extra=lambda column, values: logged.setdefault(column, values), trainer_state=None,
        **{SKIP_COLUMN: [False, True, True, False]},
    )
    assert seen == [([1, 4], ["q1", "q4"])]
    assert out == [1.0, 0.0, 0.0, 4.0]  # skipped rows get a placeholder; the trainer marks them NaN
    assert logged["note"] == ["n1", None, None, "n4"]
    # nothing skipped: the call is passed through unchanged
    assert wrapped(prompts=[7], completions=["x"], query=["q"], log_extra=lambda *a: None) == [7.0]


def test_skippable_async_reward():
    async def reward(prompts, completions, **kwargs):
        return [float(p) for p in prompts]

    wrapped = skippable(reward)
    out = asyncio.run(wrapped(prompts=[1, 2], completions=["a", "b"], **{SKIP_COLUMN: [True, False]}))
    assert out == [0.0, 2.0]


def test_take_and_concat_rows_repad_prompts_left_and_completions_right():
    pad = 9
    a = {
        "prompt_ids": torch.tensor([[9, 1, 2], [3, 4, 5]]),
        "prompt_mask": torch.tensor([[0, 1, 1], [1, 1, 1]]),
        "completion_ids": torch.tensor([[6, 9], [7, 8]]),
        "completion_mask": torch.tensor([[1, 0], [1, 1]]),
        "mm_token_type_ids": torch.tensor([[0, 1, 0, 0, 0], [1, 0, 0, 0, 0]]),
        "advantages": torch.tensor([0.5, -0.5]),
        "num_images": [1, 1],
        "num_items_in_batch": torch.tensor(3.0),
    }
    b = {
        "prompt_ids": torch.tensor([[1, 2, 3, 4]]),
        "prompt_mask": torch.tensor([[1, 1, 1, 1]]),
        "completion_ids": torch.tensor([[5]]),
        "completion_mask": torch.tensor([[1]]),
        "mm_token_type_ids": torch.tensor([[1, 1, 0, 0, 0]]),
        "advantages": torch.tensor([2.0]),
        "num_images": [2],
        "num_items_in_batch": torch.tensor(1.0),
    }
    merged = concat_rows([a, b], pad_token_id=pad)
    assert merged["prompt_ids"].tolist() == [[9, 9, 1, 2], [9, 3, 4, 5], [1, 2, 3, 4]]
    assert merged["prompt_mask"].tolist() == [[0, 0, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1]]
    assert merged["completion_ids"].tolist() == [[6, 9], [7, 8], [5, 9]]
    assert merged["completion_mask"].tolist() == [[1, 0], [1, 1], [1, 0]]
    assert merged["mm_token_type_ids"].tolist() == [[0, 0, 1, 0, 0, 0], [0, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]]
    assert merged["advantages"].tolist() == [0.5, -0.5, 2.0] and merged["num_images"] == [1, 1, 2]
    picked = take_rows(merged, [2, 0])
    assert picked["prompt_ids"].tolist() == [[1, 2, 3, 4], [9, 9, 1, 2]] and picked["num_images"] == [2, 1]
    assert picked["num_items_in_batch"].item() == 3.0
    with pytest.raises(ValueError, match="does not know how to merge"):
        concat_rows([dict(a, mystery=torch.zeros(2, 3)), dict(b, mystery=torch.zeros(1, 3))], pad_token_id=pad)


def test_config_validation():
    base = dict(BASE_CONFIG, output_dir="unused", per_device_train_batch_size=4, num_generations=4)
    with pytest.raises(ValueError, match="zero_contrast_groups"):
        ICDGRPOConfig(**base, zero_contrast_groups="skip")
    with pytest.raises(ValueError, match="dynamic_sampling_max_rounds"):
        ICDGRPOConfig(**base, zero_contrast_groups="resample", dynamic_sampling_max_rounds=0)
    with pytest.raises(ValueError, match="selective_rollout_keep_prob"):
        ICDGRPOConfig(**base, selective_rollout_keep_prob=0.0)
    with pytest.raises(ValueError, match="selective_rollout_min_keep_prob"):
        ICDGRPOConfig(**base, selective_rollout_min_keep_prob=1.5)


# --------------------------------------------------------------------------------------------------------------------
# Drop: flat groups out of the loss, exactly
# --------------------------------------------------------------------------------------------------------------------


# One generation batch holding questions 0-3: two flat groups (even) and two contrasted ones (odd).
ALL_FOUR_PROMPTS = dict(dataset=prompt_dataset(4), per_device_train_batch_size=16)


def stock_loss_of_rows(trainer, inputs, rows):
    """TRL's own loss (stock `GRPOTrainer._compute_loss`) on a batch made of `rows` only, as if the flat rows had
    never been in it: no loss mask, the token count of those rows."""
    sub = {}
    for key, value in inputs.items():
        if key.startswith("__icd_") or key == "tool_mask":
            continue
        sub[key] = value[rows] if isinstance(value, torch.Tensor) and value.dim() > 0 else value
    sub["num_items_in_batch"] = sub["completion_mask"].sum()
    return GRPOTrainer._compute_loss(trainer, trainer.model, sub)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "bnpo", "dr_grpo"])
def test_drop_gives_exactly_the_loss_of_the_contrasted_groups(tmp_path, loss_type):
    trainer = make(tmp_path, flat_unless_odd, trainer_cls=LossRecorder, zero_contrast_groups="drop",
                   loss_type=loss_type, max_steps=1, learning_rate=0.0, **ALL_FOUR_PROMPTS)
    trainer.train()
    (step,) = trainer.steps
    inputs = step["inputs"]
    active = inputs["__icd_active_rows__"].bool()
    assert 0 < int(active.sum()) < len(active)  # a real mix of flat and contrasted groups
    assert inputs["tool_mask"][~active].sum() == 0  # flat rows: no token reaches the loss (policy, KL, entropy)
    trainer.model.zero_grad()
    expected = stock_loss_of_rows(trainer, inputs, active)
    assert step["loss"].item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)

    # flat rows get no gradient: the gradient equals the contrasted rows' alone
    trainer.model.zero_grad()
    trainer._compute_loss(trainer.model, inputs).backward()
    grad_drop = [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None]
    trainer.model.zero_grad()
    stock_loss_of_rows(trainer, inputs, active).backward()
    grad_alone = [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None]
    for g1, g2 in zip(grad_drop, grad_alone, strict=True):
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-8)


def test_drop_hand_computed_grpo_loss_with_kl(tmp_path):
    """On-policy (ratio 1) GRPO loss with KL, by hand: mean over contrasted rows of the per-token mean of
    `-A + beta * (exp(ref - logp) - (ref - logp) - 1)`."""
    from transformers import AutoModelForCausalLM

    model, _ = tiny_policy()
    policy_dir = tmp_path / "policy"
    model.save_pretrained(policy_dir)  # beta > 0: TRL builds the reference model from this path
    policy = AutoModelForCausalLM.from_pretrained(policy_dir)
    torch.manual_seed(0)
    with torch.no_grad():  # the policy has moved away from its reference, so the KL term is not 0
        for parameter in policy.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    trainer = make(tmp_path, flat_unless_odd, trainer_cls=LossRecorder, model=policy,
                   zero_contrast_groups="drop", loss_type="grpo", beta=0.3, max_steps=1, learning_rate=0.0,
                   **ALL_FOUR_PROMPTS)
    trainer.train()
    inputs = trainer.steps[0]["inputs"]
    active = inputs["__icd_active_rows__"].bool()
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.no_grad():
        logits = trainer.model(input_ids=ids, attention_mask=mask).logits.float()
    width = inputs["completion_ids"].shape[1]
    logp = logits[:, -width - 1 : -1].log_softmax(-1).gather(-1, inputs["completion_ids"][..., None])[..., 0]
    ref = inputs["ref_per_token_logps"]
    kl = torch.exp(ref - logp) - (ref - logp) - 1
    per_token = -inputs["advantages"][:, None] + 0.3 * kl
    completion_mask = inputs["completion_mask"].float()
    per_row = (per_token * completion_mask).sum(1) / completion_mask.sum(1).clamp(min=1)
    expected = per_row[active].mean()
    assert trainer.steps[0]["loss"].item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-6)
    assert expected.abs() > 1e-6  # the KL term makes it non-trivial


def test_drop_with_gradient_accumulation_weights_every_contrasted_row_equally(tmp_path):
    """Two micro-batches holding different numbers of contrasted rows: the summed loss is the mean over all
    contrasted rows of the generation batch, as one batch."""
    trainer = make(tmp_path, flat_unless_odd, trainer_cls=LossRecorder, zero_contrast_groups="drop",
                   loss_type="grpo", max_steps=1, learning_rate=0.0, gradient_accumulation_steps=2,
                   per_device_train_batch_size=8, dataset=prompt_dataset(4))
    trainer.train()
    assert len(trainer.steps) == 2
    total = sum(s["loss"].item() for s in trainer.steps)
    merged = {k: torch.cat([s["inputs"][k] for s in trainer.steps]) if isinstance(trainer.steps[0]["inputs"][k],
              torch.Tensor) and trainer.steps[0]["inputs"][k].dim() > 0 else trainer.steps[0]["inputs"][k]
              for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages",
                        "__icd_active_rows__", "num_items_in_batch")}
    active = merged["__icd_active_rows__"].bool()
    trainer.current_gradient_accumulation_steps = 1
    expected = stock_loss_of_rows(trainer, merged, active)
    assert total == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)


# --------------------------------------------------------------------------------------------------------------------
# Dynamic sampling
# --------------------------------------------------------------------------------------------------------------------


def test_resample_fills_the_step_with_contrasted_groups(tmp_path):
    trainer = make(tmp_path, flat_unless_odd, trainer_cls=LossRecorder, zero_contrast_groups="resample",
                   dynamic_sampling_max_rounds=4, max_steps=3, learning_rate=0.0,
                   dataset=prompt_dataset(12))
    trainer.train()
    for step in trainer.steps:
        assert bool(step["inputs"]["__icd_active_rows__"].bool().all())  # every group in the loss has contrast
    summary = trainer.cost_summary()
    assert summary["zero_contrast/refill_rounds"] >= 1
    assert summary["zero_contrast/groups_replaced"] > 0
    assert summary["zero_contrast/refill_bound_hits"] == 0
    assert summary["zero_contrast/groups_dropped"] == 0
    assert summary["zero_contrast/frac_rows_with_gradient"] == 1.0
    # every replaced group came from a scored refill group
    assert summary["zero_contrast/groups_generated"] == 3 * 2 + summary["zero_contrast/refill_rounds"] * 2
    history = [entry for entry in trainer.state.log_history if "zero_contrast/refill_rounds" in entry]
    assert history and history[-1]["zero_contrast/refill_rounds"] == summary["zero_contrast/refill_rounds"]


def test_resample_respects_its_bound_and_says_so(tmp_path, caplog):
    trainer = make(tmp_path, always_flat, trainer_cls=LossRecorder, zero_contrast_groups="resample",
                   dynamic_sampling_max_rounds=2, max_steps=2, learning_rate=0.0)
    with caplog.at_level(logging.WARNING, logger="trl_icd.trainer"):
        trainer.train()
    summary = trainer.cost_summary()
    assert summary["zero_contrast/refill_rounds"] == 4  # 2 per step, never more
    assert summary["zero_contrast/refill_bound_hits"] == 2
    assert summary["zero_contrast/groups_dropped"] == 4  # the 2 groups of each step stay flat: dropped
    assert summary["zero_contrast/groups_generated"] == 2 * (2 + 2 * 2)
    assert any("flat group(s) left after 2 refill round(s)" in r.getMessage() for r in caplog.records)
    for step in trainer.steps:
        assert step["loss"].item() == 0.0 and not step["inputs"]["__icd_active_rows__"].any()


# --------------------------------------------------------------------------------------------------------------------
# Selective rollout
# --------------------------------------------------------------------------------------------------------------------


def test_skip_probability_matches_the_rule_seeded(tmp_path):
    trainer = make(tmp_path, always_flat, selective_rollout=True, selective_rollout_keep_prob=0.5,
                   selective_rollout_min_keep_prob=0.1)
    state = trainer.zero_contrast_state
    state.flat_streak[:] = [0, 1, 2, 3, 5, 0, 1, 2]
    rows = torch.tensor([0, 1, 2, 3, 4])
    draws = []
    for step in range(4000):
        trainer.state.global_step = step
        draws.append(trainer._skip_decisions(rows, 0).numpy())
    skipped = np.mean(draws, axis=0)
    expected = 1 - np.array([1.0, 0.5, 0.25, 0.125, 0.1])
    assert np.abs(skipped - expected).max() < 0.025  # 4000 seeded draws: sd <= 0.008
    trainer.state.global_step = 7
    again = trainer._skip_decisions(rows, 0).numpy()
    assert (again == draws[7]).all()  # same seed, step and round: same decisions (every process, any resume)


def test_selective_rollout_skips_flat_queries_and_retries_them(tmp_path):
    scored_rows = []

    def recording_flat(prompts, completions, **kwargs):
        scored_rows.append(len(prompts))
        return [1.0] * len(prompts)

    trainer = make(tmp_path, recording_flat, selective_rollout=True, selective_rollout_keep_prob=0.5,
                   selective_rollout_min_keep_prob=0.2, max_steps=30, learning_rate=0.0,
                   dataset=prompt_dataset(4), per_device_train_batch_size=8)
    trainer.train()
    summary = trainer.cost_summary()
    state = trainer.zero_contrast_state
    total_groups = 30 * 2
    assert summary["zero_contrast/queries_skipped"] > 0
    assert summary["zero_contrast/groups_scored"] + summary["zero_contrast/queries_skipped"] == total_groups
    assert sum(scored_rows) == summary["zero_contrast/groups_scored"] * GROUP  # the reward never saw a skipped row
    assert (state.times_scored >= 2).all()  # every query came back after being skipped ...
    assert (state.flat_streak == state.times_scored).all()  # ... and all its scored outcomes were flat
    assert summary["zero_contrast/groups_scored_flat"] == summary["zero_contrast/groups_scored"]


def test_selective_rollout_never_skips_contrasted_queries(tmp_path):
    trainer = make(tmp_path, flat_unless_odd, selective_rollout=True, max_steps=12, learning_rate=0.0,
                   dataset=prompt_dataset(4))
    trainer.train()
    state = trainer.zero_contrast_state
    # questions 1 and 3 (rows 1, 3) always have contrast: streak 0, scored whenever drawn
    assert state.flat_streak[[1, 3]].tolist() == [0, 0]
    assert state.flat_streak[[0, 2]].min() >= 1


def test_history_survives_save_and_resume(tmp_path):
    # every step holds all four prompts in a fixed order, so both runs see the same batches
    common = dict(selective_rollout=True, selective_rollout_keep_prob=0.5, selective_rollout_min_keep_prob=0.2,
                  learning_rate=0.0, save_strategy="steps", save_steps=4, shuffle_dataset=False, **ALL_FOUR_PROMPTS)
    straight = make(tmp_path / "a", flat_unless_odd, max_steps=8, **common)
    straight.train()
    first = make(tmp_path / "b", flat_unless_odd, max_steps=4, **common)
    first.train()
    saved = json.loads((tmp_path / "b" / "out" / "checkpoint-4" / "trainer_state.json").read_text())
    stored = saved["stateful_callbacks"]["ZeroContrastState"]["attributes"]
    assert stored["flat_streak"] == first.zero_contrast_state.flat_streak.tolist()
    resumed = make(tmp_path / "b", flat_unless_odd, max_steps=8, **common)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "out" / "checkpoint-4"))
    a, b = straight.zero_contrast_state, resumed.zero_contrast_state
    assert a.flat_streak.tolist() == b.flat_streak.tolist()
    assert a.times_scored.tolist() == b.times_scored.tolist()
    assert a.counters == b.counters
    assert a.counters.groups_skipped > 0  # the history decided something


# --------------------------------------------------------------------------------------------------------------------
# Counters: what was sent, answered from the cache, rejected or skipped adds up to what a plain run scores
# --------------------------------------------------------------------------------------------------------------------


class CountingCachedReward:
    """A reward with a cache and `usage()`, like `InContextReward`: a row is a backend call the first time its
    (prompt, completion) pair is seen, cached after that; an empty completion is rejected."""

    __name__ = "counting_cached_reward"

    def __init__(self):
        self.cache = {}
        self.counts = {"rows": 0, "backend_calls": 0, "cached": 0, "rejected": 0}

    def __call__(self, prompts, completions, **kwargs):
        out = []
        for prompt, completion in zip(prompts, completions, strict=True):
            self.counts["rows"] += 1
            text = completion[0]["content"]
            if not text:
                self.counts["rejected"] += 1
                out.append(0.0)
                continue
            key = (prompt[0]["content"], text)
            if key in self.cache:
                self.counts["cached"] += 1
            else:
                self.counts["backend_calls"] += 1
                self.cache[key] = float(len(text) % 3) if question_number(prompt) % 2 else 1.0
            out.append(self.cache[key])
        return out

    def usage(self):
        return dict(self.counts)


@pytest.mark.parametrize("options", [
    {},
    {"selective_rollout": True, "selective_rollout_min_keep_prob": 0.2},
    {"selective_rollout": True, "zero_contrast_groups": "resample", "selective_rollout_min_keep_prob": 0.2},
])
def test_counters_add_up_to_the_plain_runs_rows(tmp_path, options):
    reward = CountingCachedReward()
    steps = 10
    trainer = make(tmp_path, reward, max_steps=steps, learning_rate=0.0, dataset=prompt_dataset(4),
                   max_completion_length=2, **options)
    trainer.train()
    summary = trainer.cost_summary()
    rows_generated = summary["zero_contrast/groups_generated"] * GROUP
    plain_rows = steps * 8 + summary.get("zero_contrast/refill_rounds", 0) * 8
    assert rows_generated == plain_rows
    sent, cached, rejected = (summary[f"reward_calls/{k}"] for k in ("sent", "cached", "rejected"))
    assert sent + cached + rejected + summary["reward_calls/rows_skipped"] == plain_rows
    assert summary["reward_calls/rows_scored"] == reward.counts["rows"] == sent + cached + rejected
    assert sent == len(reward.cache)
    last_log = [entry for entry in trainer.state.log_history if "reward_calls/sent" in entry][-1]
    assert last_log["reward_calls/sent"] == sent
    if options.get("selective_rollout"):
        assert summary["reward_calls/rows_skipped"] > 0
