"""Throughput of the Qwen2.5-VL in-context reward on a realistic GRPO stream: scored (query, demos) pairs per second.

The stream: each step takes `--queries-per-step` training queries (cycling, so later epochs revisit them) and G =
`--group-size` selector samples per query. A simulated selector draws 1..`--max-shots` demonstrations from the
query's candidate pool (pools of one training set overlap, so demonstration images recur across queries), with
fixed per-query preferences (over candidates and over the number of shots) that sharpen over the steps, as a
learning selector's do; this produces the repeats within a group and across epochs that a real selector produces.

Modes (same model, same stream, the answer plus every distinct gold answer's log-prob for each row):
  (a) one pair at a time, nothing reused: the research code's way (processor + full forward per gold answer,
      `generate` per pair, vision tower on every image every time);
  (b) batched: the same computations, `--batch-size` rows per call, bucketed by image count;
  (c) the full pipeline: `InContextReward(corpus, backend, cache_path=...)` over a `QwenVLBackend` with batching,
      the persistent reward cache, the vision-feature cache and one shared prefill per prompt.
Ablations (add their letters to `--modes`): (v) batched + vision-feature cache, (p) batched + shared prefill,
(n) batched + both, without the reward cache.
Prints pairs/s (wall clock and this process's CPU time), the ratios to (a), and how far each mode's answers and
gt_prob are from (a)'s (the same numbers, up to batch-composition rounding).

CPU (default): an input-sensitive small random Qwen2.5-VL (text 256 x 4 layers, vision 128 x 4 blocks, real patch
settings), 448-px images, fp32, one thread (tiny matrix ops on a busy machine run faster on one thread).
GPU: `--device cuda --size 3b` builds a random-weight model of the real Qwen2.5-VL-3B size in bf16.

    python benchmarks/reward_throughput.py
    python benchmarks/reward_throughput.py --modes abcvpn
    python benchmarks/reward_throughput.py --device cuda --size 3b --queries-per-step 8 --steps 4
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from trl_icd.rewards.components import distinct_gold_answers, gt_probability  # noqa: E402
from trl_icd.rewards.prompt import InContextPrompt  # noqa: E402
from trl_icd.rewards.qwen_vl import QwenVLBackend  # noqa: E402
from trl_icd.testing.qwen_vl import random_qwen2_5_vl, synthetic_vqa_corpus  # noqa: E402

IMAGE_SIZES = {  # (width, height) cycles per size; the 3B run uses COCO-like 448-px images
    "tiny": ((112, 112), (112, 84), (84, 112)),
    "small": ((448, 448), (448, 336), (336, 448)),
    "3b": ((448, 448), (448, 336), (336, 448)),
}


@dataclass
class Stream:
    corpus: object
    steps: list[list[tuple[int, tuple[int, ...]]]]  # per step: (query id, demo ids) per row

    @property
    def rows(self) -> int:
        return sum(len(step) for step in self.steps)


def build_stream(args) -> Stream:
    """A GRPO reward stream: `steps` x (`queries_per_step` x G) rows of (query id, ordered demo ids)."""
    rng = np.random.default_rng(args.seed)
    corpus = synthetic_vqa_corpus(
        args.num_queries + args.train_items, image_sizes=IMAGE_SIZES[args.size], seed=args.seed
    )
    queries = list(range(args.num_queries))
    train = list(range(args.num_queries, args.num_queries + args.train_items))
    pools = {q: rng.choice(train, size=args.pool_size, replace=False).tolist() for q in queries}
    preferences = {q: rng.normal(size=args.pool_size) for q in queries}
    shot_preferences = {q: rng.normal(size=args.max_shots) for q in queries}
    steps = []
    for step in range(args.steps):
        sharpness = args.sharpness * (1 + step / max(args.steps - 1, 1))  # the selector grows more confident
        rows = []
        for j in range(args.queries_per_step):
            query = queries[(step * args.queries_per_step + j) % len(queries)]
            logits = preferences[query] * sharpness
            shot_probs = np.exp(shot_preferences[query] * sharpness)
            for _ in range(args.group_size):
                shots = 1 + int(rng.choice(args.max_shots, p=shot_probs / shot_probs.sum()))
                gumbel = logits - np.log(-np.log(rng.uniform(size=len(logits))))  # Plackett-Luce sampling
                order = np.argsort(-gumbel)[:shots]
                rows.append((query, tuple(pools[query][k] for k in order)))
        steps.append(rows)
    return Stream(corpus=corpus, steps=steps)


def stream_stats(stream: Stream) -> dict:
    pairs = [row for step in stream.steps for row in step]
    slots = sum(1 + len(d) for _, d in pairs)
    images = {i for q, d in pairs for i in (q, *d)}
    return {
        "rows": len(pairs),
        "distinct pairs": len(set(pairs)),
        "image slots": slots,
        "distinct images": len(images),
        "mean shots": float(np.mean([len(d) for _, d in pairs])),
    }


def prompts_of(stream: Stream, step: list) -> list[InContextPrompt]:
    corpus = stream.corpus
    return [InContextPrompt(corpus[q], tuple(corpus[d] for d in demos)) for q, demos in step]


def gold_of(prompts: list[InContextPrompt]) -> list[list[str]]:
    return [distinct_gold_answers(p.query.answers) for p in prompts]


def run_one_by_one(stream: Stream, backend: QwenVLBackend) -> list[tuple]:
    """(a): every row alone, nothing reused. Per row: (answer, gt_prob, gold log-probs)."""
    results = []
    for step in tqdm(stream.steps, desc="(a) one by one", leave=False):
        for prompt in prompts_of(stream, step):
            golds = gold_of([prompt])
            answers, logprobs = backend.answer_and_logprob([prompt], golds)
            gt_prob = gt_probability(prompt.query.answers, dict(zip(golds[0], logprobs[0])))
            results.append((answers[0], gt_prob, logprobs[0]))
    return results


def run_batched(stream: Stream, backend: QwenVLBackend) -> list[tuple]:
    """(b) and the ablations: each step's rows in batched backend calls, no reward cache."""
    results = []
    for step in tqdm(stream.steps, desc="batched", leave=False):
        prompts = prompts_of(stream, step)
        golds = gold_of(prompts)
        answers, logprobs = backend.answer_and_logprob(prompts, golds)
        for prompt, answer, gold, lp in zip(prompts, answers, golds, logprobs):
            results.append((answer, gt_probability(prompt.query.answers, dict(zip(gold, lp))), lp))
    return results


def run_pipeline(stream: Stream, backend: QwenVLBackend, cache_path: str) -> tuple[list[tuple[str, float]], object]:
    """(c): the reward function a GRPO trainer calls once per step (ids written in a text policy's completions)."""
    from trl_icd.rewards import InContextReward

    reward = InContextReward(stream.corpus, backend, cache_path=cache_path)
    results = []
    for step in tqdm(stream.steps, desc="(c) pipeline", leave=False):
        completions = [", ".join(str(d) for d in demos) for _, demos in step]
        rewards = reward(prompts=[""] * len(step), completions=completions, query_id=[q for q, _ in step])
        if any(r is None for r in rewards):
            raise RuntimeError(f"unscorable rows: {reward.last_statuses}")
        results += [(c["answer"], c["gt_prob"], None) for c in reward.last_components]
    return results, reward


def timed(fn, *args):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(IMAGE_SIZES), default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: fp32 on CPU, bf16 on CUDA)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--queries-per-step", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--num-queries", type=int, default=4, help="training queries (cycled: epochs revisit them)")
    parser.add_argument("--train-items", type=int, default=24, help="demonstration items the pools draw from")
    parser.add_argument("--pool-size", type=int, default=8)
    parser.add_argument("--max-shots", type=int, default=4)
    parser.add_argument("--sharpness", type=float, default=1.0, help="selector preference scale at step 0")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=5)
    parser.add_argument("--modes", default="abc", help="subset of 'abc' to run")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model, processor = random_qwen2_5_vl(args.size, seed=args.seed, dtype=dtype, device=device)
    stream = build_stream(args)
    stats = stream_stats(stream)
    print(f"model: random Qwen2.5-VL '{args.size}' ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M "
          f"params), {dtype}, {device}, threads={torch.get_num_threads()}")
    print("stream: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items()))

    common = dict(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams)
    warm = QwenVLBackend(model, processor, batch_size=2, **common)  # one-time allocations, lazy imports
    warm.answer_and_logprob(prompts_of(stream, stream.steps[0][:2]), gold_of(prompts_of(stream, stream.steps[0][:2])))

    timings, results = {}, {}
    batched = dict(batch_size=args.batch_size, **common)
    backends = {  # mode -> backend settings for the batched runs
        "b": dict(vision_cache_size=0, shared_prefill=False, **batched),
        "v": dict(shared_prefill=False, **batched),
        "p": dict(vision_cache_size=0, **batched),
        "n": dict(**batched),
    }
    for mode in args.modes:
        if mode == "a":
            backend = QwenVLBackend(model, processor, batch_size=1, vision_cache_size=0, shared_prefill=False, **common)
            results["a"], *timings["a"] = timed(run_one_by_one, stream, backend)
        elif mode in backends:
            backend = QwenVLBackend(model, processor, **backends[mode])
            results[mode], *timings[mode] = timed(run_batched, stream, backend)
        elif mode == "c":
            backend = QwenVLBackend(model, processor, **batched)
            with tempfile.TemporaryDirectory() as tmp:
                (results["c"], reward), *timings["c"] = timed(
                    run_pipeline, stream, backend, os.path.join(tmp, "rewards.sqlite")
                )
            vc = backend.vision_cache
            print(f"(c) reward cache: {reward.cache_hits} hits / {reward.cache_misses} misses; vision cache: "
                  f"{vc.hits} hits / {vc.misses} misses; prompts prefilled: {backend.stats['prompts_prefilled']}")
        else:
            raise SystemExit(f"unknown mode {mode!r}")

    names = {
        "a": "(a) one pair at a time", "b": "(b) batched", "c": "(c) full pipeline", "v": "(v) batched+vision cache",
        "p": "(p) batched+prefill", "n": "(n) (c) w/o reward cache",
    }
    print(f"\n{'mode':<28}{'wall s':>9}{'pairs/s':>10}{'cpu s':>9}{'pairs/cpu-s':>13}{'x(a) wall':>11}{'x(a) cpu':>10}")
    for mode, (wall, cpu) in timings.items():
        ratio_wall = timings["a"][0] / wall if "a" in timings else float("nan")
        ratio_cpu = timings["a"][1] / cpu if "a" in timings else float("nan")
        print(f"{names[mode]:<28}{wall:>9.1f}{stream.rows / wall:>10.2f}{cpu:>9.1f}{stream.rows / cpu:>13.2f}"
              f"{ratio_wall:>11.2f}{ratio_cpu:>10.2f}")
    for mode in results:
        if "a" in results and mode != "a":
            same = sum(x[0] == y[0] for x, y in zip(results["a"], results[mode]))
            delta = max(abs(x[1] - y[1]) for x, y in zip(results["a"], results[mode]))
            line = f"{names[mode]} vs (a): {same}/{len(results['a'])} identical answers, max |d gt_prob| {delta:.2e}"
            if results[mode][0][2] is not None:
                nats = max(abs(u - v) for x, y in zip(results["a"], results[mode]) for u, v in zip(x[2], y[2]))
                line += f", max |d log-prob| {nats:.2e} nats"
            print(line)


if __name__ == "__main__":
    main()
