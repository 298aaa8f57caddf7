"""What a training run prints and where its numbers go.

transformers prints every logged dict in full (a GRPO run of the demo: 120 dicts of ~1,300 characters). Here the
tqdm bar stays, each log becomes one compact line of a few chosen values (`console_fields`; keys a run does not log
are left out), every logged value is appended to a JSON Lines file in `output_dir` (`metrics.jsonl`), and the end of a
run lists every output written (`output_listing`).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from glob import glob

from transformers import PrinterCallback, ProgressCallback, TrainerCallback

DEFAULT_FIELDS = (
    "reward",
    "advantages/std",
    "frac_reward_zero_std",
    "zero_contrast/frac_rows_with_gradient",
    "in_context_reward/num_shots|completions/mean_length",
    "entropy",
    "heldout/accuracy",
)
LABELS = {
    "reward": "reward",
    "advantages/std": "adv std",
    "frac_reward_zero_std": "flat groups",
    "zero_contrast/frac_rows_with_gradient": "rows w/ gradient",
    "zero_contrast/groups_dropped": "groups dropped",
    "zero_contrast/queries_skipped": "queries skipped",
    "reward_calls/sent": "reward calls",
    "in_context_reward/num_shots": "shots",
    "completions/mean_length": "completion len",
    "entropy": "entropy",
    "kl": "kl",
    "loss": "loss",
    "heldout/accuracy": "held-out acc",
    "heldout/mean_shots": "held-out shots",
}
SUMMARY_KEYS = ("train_runtime", "train_loss", "train_steps_per_second")


@dataclass
class ConsoleArguments:
    """What the console shows during training, and the file every logged value goes to."""

    compact_console: bool = field(
        default=True,
        metadata={"help": "One line per logging step with `console_fields` (False: transformers' full dicts)."},
    )
    console_fields: list[str] = field(
        default_factory=lambda: list(DEFAULT_FIELDS),
        metadata={
            "help": "Logged keys shown on the progress line, in order; 'a|b' shows the first of a, b that was "
            "logged; a key not logged at that step is left out."
        },
    )
    metrics_file: str | None = field(
        default="metrics.jsonl",
        metadata={"help": "File in output_dir to which every log (all keys) is appended as one JSON line; "
                  "None/empty: no file."},
    )


def _number(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _format(value: float) -> str:
    return f"{value:.3g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.1e}"


def format_elapsed(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def format_log_line(logs: Mapping, fields: Sequence[str], step: int, max_steps: int | None = None,
                    epoch: float | None = None, elapsed: float | None = None) -> str:
    """`step 120/1200 ep 0.80 | reward 1.62 | adv std 0.91 | ... | 0:01:23`. A field 'a|b' shows the first of its
    keys present with a finite value; absent ones are skipped. A log holding none of the fields (e.g. the end-of-run
    summary) shows its summary keys, or its first few numeric values."""
    parts = [f"step {step}" + (f"/{max_steps}" if max_steps else "") + (f" ep {epoch:.2f}" if epoch is not None else "")]
    shown = []
    for spec in fields:
        for key in spec.split("|"):
            value = _number(logs.get(key))
            if value is not None:
                shown.append(f"{LABELS.get(key, key.rsplit('/', 1)[-1])} {_format(value)}")
                break
    if not shown:
        keys = [k for k in SUMMARY_KEYS if _number(logs.get(k)) is not None] or [
            k for k, v in logs.items() if k != "epoch" and _number(v) is not None][:6]
        shown = [f"{key} {_format(_number(logs[key]))}" for key in keys]
    parts += shown
    if elapsed is not None:
        parts.append(format_elapsed(elapsed))
    return " | ".join(parts)


class CompactProgressCallback(ProgressCallback):
    """transformers' progress bar, with one `format_log_line` line per log written above it instead of the dict
    (printed plainly when the bar is off, `disable_tqdm`)."""

    def __init__(self, fields: Sequence[str] = DEFAULT_FIELDS, show_bar: bool = True):
        super().__init__()
        self.fields = list(fields)
        self.show_bar = show_bar
        self.start = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.monotonic()
        if self.show_bar:
            super().on_train_begin(args, state, control, **kwargs)

    def on_step_end(self, args, state, control, **kwargs):
        if self.show_bar:
            super().on_step_end(args, state, control, **kwargs)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        elapsed = time.monotonic() - self.start if self.start is not None else None
        line = format_log_line(logs, self.fields, state.global_step, state.max_steps or None, state.epoch, elapsed)
        if self.training_bar is not None:
            self.training_bar.write(line)
        else:
            print(line, flush=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self.show_bar and self.training_bar is not None:
            super().on_train_end(args, state, control, **kwargs)


class MetricsFileCallback(TrainerCallback):
    """Appends every log to a JSON Lines file (`step`, `epoch`, `elapsed_s`, then the logged keys; non-finite values
    as null), on the main process. A fresh run starts the file anew; a resumed one keeps the lines up to its step."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.start = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.monotonic()
        if not state.is_world_process_zero:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        kept = []
        if state.global_step > 0 and os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= state.global_step]
        with open(self.path, "w") as f:
            f.writelines(kept)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch,
                  "elapsed_s": round(time.monotonic() - self.start, 3) if self.start is not None else None}
        for key, value in logs.items():
            if isinstance(value, float) and not math.isfinite(value):
                value = None
            record[key] = value if isinstance(value, (int, float, str, bool, type(None))) else str(value)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def install_console(trainer, args: ConsoleArguments) -> str | None:
    """Replace `trainer`'s printing of logs by `CompactProgressCallback` (unless `compact_console` is off) and add
    `MetricsFileCallback`; returns the metrics file's path (None without one). A notebook's progress table is left
    alone."""
    if args.compact_console:
        removed = [cb for cb in trainer.callback_handler.callbacks if type(cb) in (ProgressCallback, PrinterCallback)]
        for callback in removed:
            trainer.remove_callback(callback)
        if removed:
            trainer.add_callback(CompactProgressCallback(args.console_fields, show_bar=not trainer.args.disable_tqdm))
    if not args.metrics_file:
        return None
    path = os.path.join(trainer.args.output_dir, args.metrics_file)
    trainer.add_callback(MetricsFileCallback(path))
    return path


# What a training run writes, in the order a person looks for it: (label, paths relative to output_dir; globs). A
# `config.json` stands for its folder (what `from_pretrained` loads).
RUN_OUTPUTS = (
    ("trained selector", ("config.json",)),
    ("LoRA adapter", ("adapter",)),
    ("start policy (KL reference)", ("start_policy",)),
    ("run summary", ("run_summary.json",)),
    ("metrics of every log", ("metrics.jsonl",)),
    ("evaluation", ("eval_results.json", "eval_table.md", "eval_details.json")),
    ("plots", ("accuracy_vs_shots.png", "training_curves.png")),
    ("checkpoints", ("checkpoint-*",)),
    ("RCE warm-up", ("rce",)),
)


def output_listing(output_dir: str | os.PathLike, outputs: Sequence[tuple[str, Sequence[str]]] = RUN_OUTPUTS) -> dict:
    """{label: [existing paths]} for the `outputs` found in `output_dir` (labels with nothing written are left out)."""
    found = {}
    for label, patterns in outputs:
        paths = [p for pattern in patterns for p in sorted(glob(os.path.join(os.fspath(output_dir), pattern)))]
        if paths:
            found[label] = paths
    return found


def format_output_listing(output_dir: str | os.PathLike, found: Mapping[str, Sequence[str]]) -> str:
    root = os.fspath(output_dir)
    width = max((len(label) for label in found), default=0)
    lines = [f"Outputs written to {os.path.abspath(root)}:"]
    for label, paths in found.items():
        shown = [os.path.dirname(p) if os.path.basename(p) == "config.json" else p for p in paths]
        lines.append(f"  {label:<{width}}  " + ", ".join(p + ("/" if os.path.isdir(p) else "") for p in shown))
    return "\n".join(lines)


def print_output_listing(output_dir: str | os.PathLike, outputs: Sequence[tuple[str, Sequence[str]]] = RUN_OUTPUTS
                         ) -> dict:
    """Print where every output of the run went; returns the listing."""
    found = output_listing(output_dir, outputs)
    print(format_output_listing(output_dir, found), flush=True)
    return found


__all__ = [
    "CompactProgressCallback",
    "ConsoleArguments",
    "DEFAULT_FIELDS",
    "MetricsFileCallback",
    "RUN_OUTPUTS",
    "format_log_line",
    "format_output_listing",
    "install_console",
    "output_listing",
    "print_output_listing",
]
