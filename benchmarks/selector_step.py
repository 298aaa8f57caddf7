"""Cost of one GRPO step of the ICD selector (generation + scoring + loss/backward/optimiser), and the effect of the
item vocabulary.

One step = 8 queries x G=8 completions through `ICDGRPOTrainer` (TRL's generate, reward, fused-head log-probs,
loss, backward, optimiser). For each K in {16, 64, 256} and each vocabulary it reports the median wall-clock and
process-CPU seconds per step (the first `--warmup` steps dropped), the part spent generating and scoring
(`_generate_and_score_completions`), and the peak memory while training (resident memory of the process on CPU,
allocated CUDA memory on GPU) with its increase over the start of training. Each configuration runs in its own
process so peaks do not mix.

The item-vocabulary comparison uses the same pool size for both modes: `token` (one vocabulary entry per item; TRL
scores every position against the whole vocabulary, forward and backward) vs `code` (items written as 3 base-256
digit tokens; the vocabulary does not depend on the pool). The ratio column is token / code. A VQAv2-sized pool
(443,757 items) is run in code mode only: its token vocabulary would need a 443k-row output head.

    python benchmarks/selector_step.py                       # CPU (or the GPU when one is visible)
    python benchmarks/selector_step.py --threads 2 --steps 4 --slots 16 64
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VQAV2_TRAIN_ITEMS = 443_757
QUERIES, GROUP = 8, 8


class PeakRSS:
    """Peak resident memory of this process while the block runs (polls /proc/self/statm every 2 ms), so the cost
    of building the feature table before training does not mask the step's own peak."""

    def __enter__(self):
        self.start_mb = self.peak_mb = self._rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _poll(self):
        while not self._stop.wait(0.002):
            self.peak_mb = max(self.peak_mb, self._rss_mb())

    @staticmethod
    def _rss_mb() -> float:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_one(setting: dict) -> dict:
    """One configuration in this process: build the selector and data, train `warmup + steps` steps, time them."""
    import logging
    import warnings

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.utils import logging as hf_logging

    from trl_icd import ICDGRPOConfig, ICDGRPOTrainer
    from trl_icd.selector import ICDSelectorForCausalLM, build_selector_tokenizer, parse_selection, selector_prompt

    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    logging.getLogger("deepspeed").setLevel(logging.ERROR)
    torch.set_num_threads(setting["threads"])
    torch.manual_seed(0)
    on_gpu = torch.cuda.is_available()

    num_items, num_slots = setting["num_items"], setting["num_slots"]
    features = torch.nn.functional.normalize(torch.randn(num_items, setting["feature_dim"]), dim=-1)
    model = ICDSelectorForCausalLM.from_features(
        features, num_slots=num_slots, min_shots=1, max_shots=4, item_vocab=setting["item_vocab"],
        hidden_size=setting["hidden_size"], num_heads=4, num_layers=2, num_decoder_layers=2,
    )
    del features
    tokenizer = build_selector_tokenizer(model.config)
    generator = torch.Generator().manual_seed(1)
    rows = []
    for query in range(QUERIES):
        candidates = torch.randint(0, num_items, (4 * num_slots,), generator=generator).unique().tolist()
        candidates = [row for row in candidates if row != query][:num_slots]
        rows.append({"prompt": selector_prompt(query, candidates, vocabulary=tokenizer), "candidate_ids": candidates})

    def even_reward(completion_ids, candidate_ids, **kwargs):
        picks = [parse_selection(ids, candidates, tokenizer) for ids, candidates in zip(completion_ids, candidate_ids)]
        return [sum(row % 2 == 0 for row in chosen) / len(chosen) for chosen in picks]

    class TimedTrainer(ICDGRPOTrainer):
        generation_seconds: list[float] = []

        def _generate_and_score_completions(self, inputs):
            start = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            self.generation_seconds.append(time.perf_counter() - start)
            return out

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.wall, self.cpu = [], []

        def on_step_begin(self, args, state, control, **kwargs):
            if on_gpu:
                torch.cuda.synchronize()
            self._wall, self._cpu = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            if on_gpu:
                torch.cuda.synchronize()
            self.wall.append(time.perf_counter() - self._wall)
            self.cpu.append(time.process_time() - self._cpu)

    timer = StepTimer()
    total_steps = setting["warmup"] + setting["steps"]
    with tempfile.TemporaryDirectory() as output_dir:
        args = ICDGRPOConfig(
            output_dir=output_dir, use_cpu=not on_gpu, bf16=False, per_device_train_batch_size=QUERIES * GROUP,
            num_generations=GROUP, max_completion_length=model.config.max_completion_length, max_steps=total_steps,
            learning_rate=1e-3, logging_steps=1000, save_strategy="no", report_to="none", disable_tqdm=True,
        )
        trainer = TimedTrainer(
            model=model, reward_funcs=even_reward, args=args, train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer, callbacks=[timer],
        )
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
            start_mb = torch.cuda.memory_allocated() / 2**20
        with PeakRSS() as rss:
            trainer.train()
    skip = setting["warmup"]
    if on_gpu:
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        start_mb, peak = rss.start_mb, rss.peak_mb
    return {
        **setting,
        "device": torch.cuda.get_device_name() if on_gpu else f"cpu x{setting['threads']} threads",
        "vocab_size": model.config.vocab_size,
        "prompt_tokens": model.vocabulary.prompt_length,
        "step_wall_s": statistics.median(timer.wall[skip:]),
        "step_cpu_s": statistics.median(timer.cpu[skip:]),
        "generate_score_s": statistics.median(TimedTrainer.generation_seconds[skip:]),
        "peak_mb": peak,
        "peak_over_start_mb": peak - start_mb,
    }


def run_isolated(setting: dict) -> dict:
    """`run_one` in a fresh interpreter, so the peak RSS is this configuration's alone."""
    out = subprocess.run(
        [sys.executable, __file__, "--one", json.dumps(setting)], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"setting {setting} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slots", type=int, nargs="+", default=[16, 64, 256], help="K values")
    parser.add_argument(
        "--pool-items", type=int, default=20_000, help="feature-table rows for the vocabulary comparison"
    )
    parser.add_argument("--feature-dim", type=int, default=256, help="feature width (CLIP image+text would be 1024)")
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's default)")
    parser.add_argument("--skip-vqav2", action="store_true", help="skip the 443,757-item code-vocabulary runs")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return

    import torch

    threads = args.threads or torch.get_num_threads()
    base = {"feature_dim": args.feature_dim, "hidden_size": args.hidden_size, "steps": args.steps,
            "warmup": args.warmup, "threads": threads}
    results = []
    for num_slots in args.slots:
        runs = [("code", args.pool_items), ("token", args.pool_items)]
        if not args.skip_vqav2:
            runs.append(("code", VQAV2_TRAIN_ITEMS))
        for item_vocab, num_items in runs:
            setting = {**base, "num_slots": num_slots, "item_vocab": item_vocab, "num_items": num_items}
            results.append(run_isolated(setting))
            r = results[-1]
            print(f"done K={num_slots:<4} {item_vocab:<5} N={num_items:<7} step {r['step_wall_s']:.3f}s", flush=True)

    print(f"\nOne GRPO step: {QUERIES} queries x G={GROUP}, max 4 shots, hidden {args.hidden_size}, "
          f"features {args.feature_dim}-d, device {results[0]['device']}; medians of {args.steps} steps")
    header = (f"{'K':>4} {'vocab':>6} {'items':>8} {'V':>7} {'prompt':>6} {'step s':>8} {'cpu s':>8} "
              f"{'gen+score s':>11} {'peak MB':>8} {'+MB':>7} {'token/code wall / cpu':>22}")
    print(header)
    print("-" * len(header))
    by_key = {(r["num_slots"], r["item_vocab"], r["num_items"]): r for r in results}
    for r in results:
        ratio = ""
        if r["item_vocab"] == "token" and (r["num_slots"], "code", r["num_items"]) in by_key:
            code = by_key[(r["num_slots"], "code", r["num_items"])]
            ratio = f"{r['step_wall_s'] / code['step_wall_s']:.1f}x / {r['step_cpu_s'] / code['step_cpu_s']:.1f}x"
        print(f"{r['num_slots']:>4} {r['item_vocab']:>6} {r['num_items']:>8} {r['vocab_size']:>7} "
              f"{r['prompt_tokens']:>6} {r['step_wall_s']:>8.3f} {r['step_cpu_s']:>8.3f} "
              f"{r['generate_score_s']:>11.3f} "
              f"{r['peak_mb']:>8.0f} {r['peak_over_start_mb']:>7.0f} {ratio:>22}")


if __name__ == "__main__":
    main()
