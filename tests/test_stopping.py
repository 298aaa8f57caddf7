"""Plateau stopping: the documented rule on hand-made sequences, a real run that stops early, and its state across a
checkpoint."""

import json
import math

import pytest
from _icd_grpo_helpers import BASE_CONFIG, prompt_dataset, tiny_policy
from transformers import TrainerControl, TrainerState

from trl_icd import ICDGRPOConfig, ICDGRPOTrainer
from trl_icd.stopping import PlateauStoppingCallback


def feed(callback, values):
    """The step (1-based) at which the callback stops, or None."""
    for step, value in enumerate(values, start=1):
        if callback.observe(value):
            return step
    return None


def test_rule_on_hand_made_sequences():
    # window 1: best 3 at step 3; steps 4 and 5 do not beat it -> stop at step 5 (patience 2)
    assert feed(PlateauStoppingCallback(window=1, patience=2), [1, 2, 3, 3, 2.9, 10]) == 5
    # an improvement resets the patience
    assert feed(PlateauStoppingCallback(window=1, patience=2), [1, 2, 2, 3, 3, 3]) == 6
    # min_delta: +0.05 steps are not improvements above 0.1
    assert feed(PlateauStoppingCallback(window=1, patience=3, min_delta=0.1), [1, 1.05, 1.08, 1.09, 2]) == 4
    # window 2 smooths: moving averages 1.5, 2.5, 3.5, 3.5, 3.5 -> stop at step 6 with patience 2
    assert feed(PlateauStoppingCallback(window=2, patience=2), [1, 2, 3, 4, 3, 4]) == 6
    # mode min (a loss)
    assert feed(PlateauStoppingCallback(window=1, patience=1, mode="min"), [3, 2, 2.5]) == 3
    with pytest.raises(ValueError):
        PlateauStoppingCallback(mode="up")


def test_on_log_stops_and_ignores_eval_logs():
    callback = PlateauStoppingCallback(window=1, patience=1)
    control, state = TrainerControl(), TrainerState()
    for step, logs in enumerate([{"reward": 1.0}, {"eval_reward": 0.0}, {"reward": 0.5}], start=1):
        state.global_step = step
        callback.on_log(None, state, control, logs=logs)
    assert control.should_training_stop and callback.stopped_at == 3


def constant_reward(prompts, completions, **kwargs):
    return [float(i % 2) for i in range(len(prompts))]


def test_trainer_stops_on_a_reward_plateau_and_saves_the_state(tmp_path):
    model, tokenizer = tiny_policy()
    trainer = ICDGRPOTrainer(
        model=model,
        reward_funcs=[constant_reward],
        args=ICDGRPOConfig(**dict(BASE_CONFIG, output_dir=str(tmp_path / "out"), save_strategy="steps",
                                  save_steps=1), per_device_train_batch_size=8, max_steps=50,
                           plateau_stopping_metric="reward", plateau_stopping_patience=3,
                           plateau_stopping_window=2),
        train_dataset=prompt_dataset(8),
        processing_class=tokenizer,
    )
    trainer.train()
    # the reward is 0.5 at every step: the first full window sets the best, three more logs end the run
    assert trainer.state.global_step == 2 + 3
    assert trainer.cost_summary()["stopped_on_plateau_at_step"] == 5
    saved = json.loads((tmp_path / "out" / "checkpoint-4" / "trainer_state.json").read_text())
    attributes = saved["stateful_callbacks"]["PlateauStoppingCallback"]["attributes"]
    assert attributes["waited"] == 2 and math.isclose(attributes["best"], 0.5)
