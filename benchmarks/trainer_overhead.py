"""Step-time overhead of ICDGRPOTrainer over TRL's stock GRPOTrainer.

Same tiny Qwen2 policy, data, seed and number of steps for every variant; runs are interleaved (stock, zscore, rank,
stock, ...) so machine load drifts hit all variants alike. A step is timed from `on_step_begin` to `on_step_end`
(generation, rewards, advantages, loss, backward and the optimiser step), both in wall-clock time and in this
process's CPU time (less sensitive to other jobs on a shared machine); the first `--warmup` steps of each run are
dropped, and one unrecorded run warms the process up first. Prints the median step time per variant and its ratio
to stock (target <= 1.03), plus a micro-benchmark of the advantage computation alone.

    python benchmarks/trainer_overhead.py --steps 40 --repeats 6
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from trl_icd import ICDGRPOConfig, ICDGRPOTrainer, advantage_stats, compute_group_advantages  # noqa: E402
from trl_icd.advantages import aggregate_rewards  # noqa: E402
from trl_icd.testing.text import tiny_qwen2_lm  # noqa: E402
from trl_icd.testing.tokenizer import tiny_chat_tokenizer  # noqa: E402

VARIANTS = {  # name -> (trainer class, config class, extra config)
    "stock GRPOTrainer": (GRPOTrainer, GRPOConfig, {}),
    "ICDGRPOTrainer zscore": (ICDGRPOTrainer, ICDGRPOConfig, {"advantage_mode": "zscore"}),
    "ICDGRPOTrainer rank": (ICDGRPOTrainer, ICDGRPOConfig, {"advantage_mode": "rank"}),
}


def length_reward(completions, **kwargs):
    return [float(len(c[0]["content"]) % 7) for c in completions]


def letter_reward(completions, **kwargs):
    return [float(c[0]["content"].count("e")) for c in completions]


class StepTimer(TrainerCallback):
    """Wall-clock and process CPU seconds of every optimiser step."""

    def __init__(self):
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = (time.perf_counter(), time.process_time())

    def on_step_end(self, args, state, control, **kwargs):
        self.wall.append(time.perf_counter() - self._start[0])
        self.cpu.append(time.process_time() - self._start[1])


def run_variant(name: str, args: argparse.Namespace, output_dir: str) -> tuple[list[float], list[float]]:
    trainer_cls, config_cls, extra = VARIANTS[name]
    tokenizer = tiny_chat_tokenizer()
    model = tiny_qwen2_lm(tokenizer, hidden_size=args.hidden, num_layers=args.layers, seed=args.seed)
    dataset = Dataset.from_dict(
        {"prompt": [[{"role": "user", "content": f"Question {i}: name a colour."}] for i in range(256)]}
    )
    config = config_cls(
        output_dir=output_dir,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=args.seed,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        num_generations=args.group,
        max_completion_length=args.completion_length,
        reward_weights=[1.0, 0.5],
        **extra,
    )
    trainer = trainer_cls(
        model=model,
        reward_funcs=[length_reward, letter_reward],
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.remove_callback(PrinterCallback)
    timer = StepTimer()
    trainer.add_callback(timer)
    trainer.train()
    return timer.wall[args.warmup :], timer.cpu[args.warmup :]


def advantage_microbenchmark(batch: int, group: int, repeats: int = 2000) -> tuple[float, float]:
    """Seconds per call: TRL's inline group z-score vs trl_icd's aggregation + advantages + diagnostics."""
    from trl.trainer.utils import nanstd

    per_func = torch.randn(batch, 2)
    weights = torch.tensor([1.0, 0.5])

    def stock():
        rewards = (per_func * weights).nansum(dim=1)
        mean = torch.nanmean(rewards.view(-1, group), dim=1).repeat_interleave(group)
        std = nanstd(rewards.view(-1, group), dim=1).repeat_interleave(group)
        return torch.nan_to_num((rewards - mean) / (std + 1e-4), nan=0.0)

    def ours():
        rewards = aggregate_rewards(per_func, weights, group)
        advantages = compute_group_advantages(rewards, group, "rank")
        return advantage_stats(advantages, rewards, group)

    timings = []
    for fn in (stock, ours):
        fn()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        timings.append((time.perf_counter() - start) / repeats)
    return timings[0], timings[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="optimiser steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="steps dropped at the start of each run")
    parser.add_argument("--repeats", type=int, default=6, help="interleaved runs per variant")
    parser.add_argument("--batch", type=int, default=16, help="per-device batch (completions per step)")
    parser.add_argument("--group", type=int, default=8, help="num_generations")
    parser.add_argument("--completion-length", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared machine)")
    args = parser.parse_args()
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")

    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notices from transformers
    logging.getLogger("trl").setLevel(logging.ERROR)

    wall: dict[str, list[float]] = {name: [] for name in VARIANTS}
    cpu: dict[str, list[float]] = {name: [] for name in VARIANTS}
    names = list(VARIANTS)
    # each repeat rotates the order, so no variant always runs first (or right after the warm-up run)
    order = [names[(i + r) % len(names)] for r in range(args.repeats) for i in range(len(names))]
    with tempfile.TemporaryDirectory() as output_dir:
        run_variant(names[0], args, output_dir)  # process warm-up (lazy initialisation, allocator), not recorded
        for name in tqdm(order, desc="runs (variants interleaved)", unit="run"):
            run_wall, run_cpu = run_variant(name, args, output_dir)
            wall[name].extend(run_wall)
            cpu[name].extend(run_cpu)

    stock_wall = statistics.median(wall["stock GRPOTrainer"])
    stock_cpu = statistics.median(cpu["stock GRPOTrainer"])
    print(
        f"\nmedian step time over {args.repeats} x {args.steps - args.warmup} steps per variant (batch {args.batch}, "
        f"group {args.group}, {args.completion_length} completion tokens, {args.threads} threads, "
        f"load average {os.getloadavg()[0]:.1f})"
    )
    print(f"{'variant':<24}{'wall s/step':>13}{'ratio':>8}{'CPU s/step':>13}{'ratio':>8}")
    for name in VARIANTS:
        median_wall, median_cpu = statistics.median(wall[name]), statistics.median(cpu[name])
        print(
            f"{name:<24}{median_wall:>13.4f}{median_wall / stock_wall:>8.3f}"
            f"{median_cpu:>13.4f}{median_cpu / stock_cpu:>8.3f}"
        )
    stock = stock_wall
    stock_adv, ours_adv = advantage_microbenchmark(args.batch, args.group)
    print(
        f"\nadvantage computation alone: stock inline z-score {stock_adv * 1e6:.0f} us, "
        f"trl_icd rank + diagnostics {ours_adv * 1e6:.0f} us per step ({(ours_adv - stock_adv) / stock:.2%} of a step)"
    )


if __name__ == "__main__":
    main()
