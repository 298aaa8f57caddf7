"""The training console: one compact line per log (fields configurable, missing keys tolerated), every log in a JSON
Lines file (a resumed run keeps its earlier lines), the end-of-run output listing, and the held-out evaluation
callback (logged like a training metric without disturbing the step's own log; a failure never stops training)."""

import json
import math

import pytest
import torch
from transformers import (
    PretrainedConfig,
    PreTrainedModel,
    PrinterCallback,
    ProgressCallback,
    Trainer,
    TrainerState,
    TrainingArguments,
)

from trl_icd.console import (
    CompactProgressCallback,
    ConsoleArguments,
    MetricsFileCallback,
    format_log_line,
    install_console,
    output_listing,
    print_output_listing,
)
from trl_icd.heldout import HeldoutEvalCallback

GRPO_LOG = {"loss": 1e-9, "reward": 1.6234, "advantages/std": 0.9123, "frac_reward_zero_std": 0.25,
            "completions/mean_length": 2.5, "entropy": 1.41, "epoch": 0.5}


def test_compact_line_shows_the_chosen_fields_in_order_and_skips_missing_ones():
    line = format_log_line(GRPO_LOG, ["reward", "advantages/std", "zero_contrast/frac_rows_with_gradient",
                                      "in_context_reward/num_shots|completions/mean_length", "heldout/accuracy"],
                           step=120, max_steps=1200, epoch=0.5, elapsed=83.4)
    assert line == "step 120/1200 ep 0.50 | reward 1.62 | adv std 0.912 | completion len 2.5 | 0:01:23"
    # the first present key of an alternative wins; the lead's zero-contrast keys appear once logged
    logs = dict(GRPO_LOG, **{"in_context_reward/num_shots": 1.5, "zero_contrast/frac_rows_with_gradient": 0.8,
                             "zero_contrast/groups_dropped": 3})
    line = format_log_line(logs, ["zero_contrast/frac_rows_with_gradient", "zero_contrast/groups_dropped",
                                  "in_context_reward/num_shots|completions/mean_length"], step=5)
    assert line == "step 5 | rows w/ gradient 0.8 | groups dropped 3 | shots 1.5"
    # None / NaN / non-numeric values are treated as missing; unknown keys are labelled by their last part
    assert format_log_line({"reward": None, "a/b": float("nan"), "c/d": "x", "e/f": 2e-5}, ["reward", "a/b", "c/d",
                           "e/f"], step=1) == "step 1 | f 2.0e-05"


def test_a_log_without_any_field_shows_its_summary():
    summary = {"train_runtime": 75.2, "train_samples_per_second": 1000.0, "train_steps_per_second": 16.0,
               "train_loss": 1e-8, "epoch": 8.0}
    assert format_log_line(summary, ["reward"], step=1200, max_steps=1200, epoch=8.0) == (
        "step 1200/1200 ep 8.00 | train_runtime 75.2 | train_loss 1.0e-08 | train_steps_per_second 16")


def _state(step=0):
    state = TrainerState()
    state.global_step, state.epoch, state.max_steps = step, step / 10, 100
    return state


def test_metrics_file_holds_every_log_and_resumes(tmp_path):
    path = tmp_path / "out" / "metrics.jsonl"
    callback = MetricsFileCallback(path)
    callback.on_train_begin(None, _state(0), None)
    for step in (10, 20, 30):
        callback.on_log(None, _state(step), None, logs=dict(GRPO_LOG, reward=step / 10, kl=math.inf))
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30] and rows[1]["reward"] == 2.0 and rows[0]["kl"] is None
    assert set(GRPO_LOG) <= set(rows[0]) and rows[0]["elapsed_s"] >= 0
    # resumed from step 20: the step-30 line (from after the checkpoint) goes, the earlier ones stay
    MetricsFileCallback(path).on_train_begin(None, _state(20), None)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [10, 20]
    # a fresh run starts the file anew
    MetricsFileCallback(path).on_train_begin(None, _state(0), None)
    assert path.read_text() == ""


class _Quadratic(PreTrainedModel):
    config_class = PretrainedConfig

    def __init__(self):
        super().__init__(PretrainedConfig())
        self.w = torch.nn.Parameter(torch.ones(2))

    def forward(self, x):
        return {"loss": ((self.w * x) ** 2).sum()}


def _trainer(tmp_path, **args):
    data = [{"x": torch.tensor([1.0, 2.0])} for _ in range(64)]
    config = TrainingArguments(output_dir=str(tmp_path), report_to="none", per_device_train_batch_size=4,
                               max_steps=6, logging_steps=2, save_strategy="no", use_cpu=True, **args)
    return Trainer(model=_Quadratic(), args=config, train_dataset=data)


@pytest.mark.parametrize("disable_tqdm", [False, True])
def test_install_console_replaces_the_dict_printer(tmp_path, disable_tqdm, capsys):
    trainer = _trainer(tmp_path, disable_tqdm=disable_tqdm)
    path = install_console(trainer, ConsoleArguments(console_fields=["loss"]))
    types = [type(cb) for cb in trainer.callback_handler.callbacks]
    assert ProgressCallback not in types and PrinterCallback not in types
    assert CompactProgressCallback in types and MetricsFileCallback in types
    trainer.train()
    out = capsys.readouterr()
    printed = out.err + out.out
    assert "step 2/6 ep " in printed and "| loss " in printed and "{'loss'" not in printed
    assert "train_runtime" in printed  # the end-of-run summary line
    assert [json.loads(line)["step"] for line in open(path)] == [2, 4, 6, 6]
    assert install_console(_trainer(tmp_path), ConsoleArguments(compact_console=False, metrics_file=None)) is None


def test_heldout_callback_logs_without_disturbing_the_training_log(tmp_path):
    trainer = _trainer(tmp_path, disable_tqdm=True)
    seen_modes = []

    def evaluate(model):
        seen_modes.append(model.training)
        return {"heldout/accuracy": float(len(seen_modes))}

    trainer.add_callback(HeldoutEvalCallback(trainer, evaluate, eval_steps=4))
    trainer.train()
    history = trainer.state.log_history
    heldout = [(e["step"], e["heldout/accuracy"]) for e in history if "heldout/accuracy" in e]
    assert heldout == [(0, 1.0), (4, 2.0), (6, 3.0)]  # start, every 4 steps, end (step 6 once)
    # the step's own training log still happened (logging resets control flags; the callback keeps them)
    assert [e["step"] for e in history if "loss" in e] == [2, 4, 6]
    assert seen_modes == [False] * 3 and trainer.model.training


def test_a_failing_heldout_evaluation_is_counted_and_training_goes_on(tmp_path, caplog):
    trainer = _trainer(tmp_path, disable_tqdm=True)

    def evaluate(model):
        raise RuntimeError("backend down")

    callback = HeldoutEvalCallback(trainer, evaluate, eval_steps=2)
    trainer.add_callback(callback)
    trainer.train()
    assert trainer.state.global_step == 6 and callback.failures == 4  # steps 0, 2, 4, 6
    assert "held-out evaluation at step 2 failed" in caplog.text
    assert not any("heldout/accuracy" in e for e in trainer.state.log_history)


def test_output_listing_names_what_exists_in_order(tmp_path, capsys):
    for name in ("config.json", "metrics.jsonl", "run_summary.json", "eval_table.md", "training_curves.png"):
        (tmp_path / name).write_text("x")
    (tmp_path / "start_policy").mkdir()
    (tmp_path / "checkpoint-10").mkdir()
    found = print_output_listing(tmp_path)
    assert list(found) == ["trained selector", "start policy (KL reference)", "run summary", "metrics of every log",
                           "evaluation", "plots", "checkpoints"]
    text = capsys.readouterr().out
    assert f"trained selector             {tmp_path}/\n" in text and f"{tmp_path}/checkpoint-10/" in text
    assert output_listing(tmp_path / "nothing") == {}
