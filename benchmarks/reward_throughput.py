"""Throughput of the Qwen2.5-VL in-context reward on a realistic GRPO stream: scored (query, demos) pairs per second.

The stream: each step takes `--queries-per-step` training queries (cycling, so later epochs revisit them) and G =
`--group-size` selector samples per query. A simulated selector draws `--min-shots`..`--max-shots` (default 1..4)
demonstrations from the query's candidate pool (pools of one training set overlap, so demonstration images recur
across queries), with fixed per-query preferences (over candidates and over the number of shots) that sharpen over
the steps, as a learning selector's do; this produces the repeats within a group and across epochs that a real
selector produces.

Modes (same model, same stream, the answer plus every distinct gold answer's log-prob for each row):
  (a) one pair at a time, nothing reused: the research code's way (processor + full forward per gold answer,
      `generate` per pair, vision tower on every image every time);
  (b) batched: the same computations, `--batch-size` rows per call, bucketed by image count;
  (c) the full pipeline: `InContextReward(corpus, backend, cache_path=...)` over a `QwenVLBackend` with batching,
      the persistent reward cache, the vision-feature cache and one shared prefill per prompt, called once per step
      as GRPO calls it with a selector policy (completions name slots of the query's `candidate_ids`).
Ablations (add their letters to `--modes`): (v) batched + vision-feature cache, (p) batched + shared prefill,
(n) batched + both, without the reward cache.
Prints pairs/s (wall clock and this process's CPU time), the ratios to (a), and how far each mode's answers and
gt_prob are from (a)'s (the same numbers, up to batch-composition rounding).

CPU (default): an input-sensitive small random Qwen2.5-VL (text 256 x 4 layers, vision 128 x 4 blocks, real patch
settings), 448-px images, fp32, one thread (tiny matrix ops on a busy machine run faster on one thread).
GPU: `--device cuda --size 3b` builds a random-weight model of the real Qwen2.5-VL-3B size in bf16 (on CUDA the
table adds each mode's peak allocated memory). `benchmarks/gpu_suite.py` runs these modes, time-boxed, in bf16 and
fp32 as part of one prepared GPU command (`ModeRun`, `run_mode`, `warm_up`, `compare` are its building blocks).

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
    pools: dict[int, list[int]]  # query id -> its candidate pool (corpus ids), what a selector chooses from
    steps: list[list[tuple[int, tuple[int, ...]]]]  # per step: (query id, demo ids) per row

    @property
    def rows(self) -> int:
        return sum(len(step) for step in self.steps)


def build_stream(args, image_sizes=None) -> Stream:
    """A GRPO reward stream: `steps` x (`queries_per_step` x G) rows of (query id, ordered demo ids), with
    `min_shots`..`max_shots` demonstrations per row (images: `image_sizes`, default the size's cycle)."""
    rng = np.random.default_rng(args.seed)
    corpus = synthetic_vqa_corpus(
        args.num_queries + args.train_items, image_sizes=image_sizes or IMAGE_SIZES[args.size], seed=args.seed
    )
    queries = list(range(args.num_queries))
    train = list(range(args.num_queries, args.num_queries + args.train_items))
    pools = {q: rng.choice(train, size=args.pool_size, replace=False).tolist() for q in queries}
    preferences = {q: rng.normal(size=args.pool_size) for q in queries}
    shot_counts = list(range(args.min_shots, args.max_shots + 1))
    shot_preferences = {q: rng.normal(size=len(shot_counts)) for q in queries}
    steps = []
    for step in range(args.steps):
        sharpness = args.sharpness * (1 + step / max(args.steps - 1, 1))  # the selector grows more confident
        rows = []
        for j in range(args.queries_per_step):
            query = queries[(step * args.queries_per_step + j) % len(queries)]
            logits = preferences[query] * sharpness
            shot_probs = np.exp(shot_preferences[query] * sharpness)
            for _ in range(args.group_size):
                shots = shot_counts[int(rng.choice(len(shot_counts), p=shot_probs / shot_probs.sum()))]
                gumbel = logits - np.log(-np.log(rng.uniform(size=len(logits))))  # Plackett-Luce sampling
                order = np.argsort(-gumbel)[:shots]
                rows.append((query, tuple(pools[query][k] for k in order)))
        steps.append(rows)
    return Stream(corpus=corpus, pools=pools, steps=steps)


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


def _deadline(time_limit: float | None) -> float:
    return float("inf") if time_limit is None else time.perf_counter() + time_limit


def run_one_by_one(stream: Stream, backend: QwenVLBackend, time_limit: float | None = None) -> list[tuple]:
    """(a): every row alone, nothing reused. Per row: (answer, gt_prob, gold log-probs). With `time_limit`
    (seconds), stops after the row that crosses it: the first rows of the stream, at least one."""
    deadline = _deadline(time_limit)
    results = []
    for step in tqdm(stream.steps, desc="(a) one by one", leave=False):
        for prompt in prompts_of(stream, step):
            golds = gold_of([prompt])
            answers, logprobs = backend.answer_and_logprob([prompt], golds)
            gt_prob = gt_probability(prompt.query.answers, dict(zip(golds[0], logprobs[0])))
            results.append((answers[0], gt_prob, logprobs[0]))
            if time.perf_counter() > deadline:
                return results
    return results


def run_batched(stream: Stream, backend: QwenVLBackend, time_limit: float | None = None) -> list[tuple]:
    """(b) and the ablations: each step's rows in batched backend calls, no reward cache (whole steps; with
    `time_limit`, stops after the step that crosses it)."""
    deadline = _deadline(time_limit)
    results = []
    for step in tqdm(stream.steps, desc="batched", leave=False):
        prompts = prompts_of(stream, step)
        golds = gold_of(prompts)
        answers, logprobs = backend.answer_and_logprob(prompts, golds)
        for prompt, answer, gold, lp in zip(prompts, answers, golds, logprobs):
            results.append((answer, gt_probability(prompt.query.answers, dict(zip(gold, lp))), lp))
        if time.perf_counter() > deadline:
            break
    return results


def run_pipeline(
    stream: Stream, backend: QwenVLBackend, cache_path: str, time_limit: float | None = None
) -> tuple[list[tuple], object]:
    """(c): the reward function a GRPO trainer calls once per step with a selector policy: each completion names
    slots of its query's candidate pool (no slot at all: a 0-shot prompt). Whole steps, as `run_batched`."""
    from trl_icd.rewards import InContextReward
    from trl_icd.selector import SelectorVocabulary, build_selector_tokenizer

    vocabulary = SelectorVocabulary(num_slots=max(len(pool) for pool in stream.pools.values()))
    reward = InContextReward(
        stream.corpus, backend, cache_path=cache_path, tokenizer=build_selector_tokenizer(vocabulary)
    )
    deadline = _deadline(time_limit)
    results = []
    for step in tqdm(stream.steps, desc="(c) pipeline", leave=False):
        pools = [stream.pools[q] for q, _ in step]
        completions = [
            " ".join(vocabulary.slot_word(pool.index(d)) for d in demos) for pool, (_, demos) in zip(pools, step)
        ]
        rewards = reward(
            prompts=[""] * len(step), completions=completions, query_id=[q for q, _ in step], candidate_ids=pools
        )
        if any(r is None for r in rewards):
            raise RuntimeError(f"unscorable rows: {reward.last_statuses}")
        results += [(c["answer"], c["gt_prob"], None) for c in reward.last_components]
        if time.perf_counter() > deadline:
            break
    return results, reward


def timed(fn, *args, **kwargs):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - wall, time.process_time() - cpu


MODE_NAMES = {
    "a": "(a) one pair at a time", "b": "(b) batched", "c": "(c) full pipeline", "v": "(v) batched+vision cache",
    "p": "(p) batched+prefill", "n": "(n) (c) w/o reward cache",
}


@dataclass
class ModeRun:
    """One mode's pass over (a prefix of) the stream."""

    mode: str
    results: list[tuple]  # per row: (answer, gt_prob, gold log-probs or None)
    wall_s: float
    cpu_s: float
    peak_gpu_mb: float | None  # peak allocated CUDA memory during the mode (None on CPU)
    notes: dict  # cache statistics of the pipeline mode

    @property
    def rows(self) -> int:
        return len(self.results)

    @property
    def pairs_per_s(self) -> float:
        return self.rows / self.wall_s


def warm_up(model, processor, stream: Stream, max_new_tokens: int = 5, num_beams: int = 1) -> None:
    """One-time allocations, kernel selection and lazy imports of both scoring paths, outside every timing."""
    prompts = prompts_of(stream, stream.steps[0][:2])
    for fast in (False, True):
        warm = QwenVLBackend(model, processor, batch_size=2, max_new_tokens=max_new_tokens, num_beams=num_beams,
                             vision_cache_size=512 if fast else 0, shared_prefill=fast)
        warm.answer_and_logprob(prompts, gold_of(prompts))


def run_mode(
    mode: str,
    model,
    processor,
    stream: Stream,
    batch_size: int = 16,
    max_new_tokens: int = 5,
    num_beams: int = 1,
    time_limit: float | None = None,
) -> ModeRun:
    """Score the stream in one mode (`MODE_NAMES`), timed; on CUDA also the peak allocated memory."""
    common = dict(max_new_tokens=max_new_tokens, num_beams=num_beams)
    batched = dict(batch_size=batch_size, **common)
    backends = {  # mode -> backend settings for the batched runs
        "b": dict(vision_cache_size=0, shared_prefill=False, **batched),
        "v": dict(shared_prefill=False, **batched),
        "p": dict(vision_cache_size=0, **batched),
        "n": dict(**batched),
    }
    on_cuda = model.device.type == "cuda"
    if on_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    notes = {}
    if mode == "a":
        backend = QwenVLBackend(model, processor, batch_size=1, vision_cache_size=0, shared_prefill=False, **common)
        results, wall, cpu = timed(run_one_by_one, stream, backend, time_limit)
    elif mode in backends:
        backend = QwenVLBackend(model, processor, **backends[mode])
        results, wall, cpu = timed(run_batched, stream, backend, time_limit)
    elif mode == "c":
        backend = QwenVLBackend(model, processor, **batched)
        with tempfile.TemporaryDirectory() as tmp:
            (results, reward), wall, cpu = timed(
                run_pipeline, stream, backend, os.path.join(tmp, "rewards.sqlite"), time_limit
            )
        vc = backend.vision_cache
        notes = {"reward_cache_hits": reward.cache_hits, "reward_cache_misses": reward.cache_misses,
                 "vision_cache_hits": vc.hits, "vision_cache_misses": vc.misses,
                 "prompts_prefilled": backend.stats["prompts_prefilled"]}
    else:
        raise ValueError(f"unknown mode {mode!r}; known: {sorted(MODE_NAMES)}")
    peak = torch.cuda.max_memory_allocated() / 2**20 if on_cuda else None
    return ModeRun(mode=mode, results=results, wall_s=wall, cpu_s=cpu, peak_gpu_mb=peak, notes=notes)


def compare(reference: ModeRun, other: ModeRun) -> dict:
    """How far `other`'s rows are from `reference`'s on the rows both scored (the stream's common prefix)."""
    pairs = list(zip(reference.results, other.results))
    out = {
        "rows": len(pairs),
        "identical_answers": sum(x[0] == y[0] for x, y in pairs),
        "distinct_answers": len({x[0] for x, _ in pairs}),
        "max_abs_d_gt_prob": max((abs(x[1] - y[1]) for x, y in pairs), default=0.0),
        "max_abs_d_logprob": None,
    }
    if pairs and pairs[0][1][2] is not None:
        out["max_abs_d_logprob"] = max(abs(u - v) for x, y in pairs for u, v in zip(x[2], y[2]))
    return out


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
    parser.add_argument("--min-shots", type=int, default=1, help="fewest demonstrations per row (0: some 0-shot rows)")
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

    warm_up(model, processor, stream, args.max_new_tokens, args.num_beams)
    runs = {}
    for mode in args.modes:
        if mode not in MODE_NAMES:
            raise SystemExit(f"unknown mode {mode!r}")
        runs[mode] = run_mode(mode, model, processor, stream, args.batch_size, args.max_new_tokens, args.num_beams)
        if mode == "c":
            n = runs[mode].notes
            print(f"(c) reward cache: {n['reward_cache_hits']} hits / {n['reward_cache_misses']} misses; vision cache: "
                  f"{n['vision_cache_hits']} hits / {n['vision_cache_misses']} misses; prompts prefilled: "
                  f"{n['prompts_prefilled']}")

    print(f"\n{'mode':<28}{'wall s':>9}{'pairs/s':>10}{'cpu s':>9}{'pairs/cpu-s':>13}{'x(a) wall':>11}{'x(a) cpu':>10}"
          + (f"{'peak GPU MB':>13}" if device.type == "cuda" else ""))
    for mode, run in runs.items():
        ratio_wall = runs["a"].wall_s / run.wall_s if "a" in runs else float("nan")
        ratio_cpu = runs["a"].cpu_s / run.cpu_s if "a" in runs else float("nan")
        peak = f"{run.peak_gpu_mb:>13.0f}" if run.peak_gpu_mb is not None else ""
        print(f"{MODE_NAMES[mode]:<28}{run.wall_s:>9.1f}{run.rows / run.wall_s:>10.2f}{run.cpu_s:>9.1f}"
              f"{run.rows / run.cpu_s:>13.2f}{ratio_wall:>11.2f}{ratio_cpu:>10.2f}{peak}")
    for mode, run in runs.items():
        if "a" in runs and mode != "a":
            diff = compare(runs["a"], run)
            line = (f"{MODE_NAMES[mode]} vs (a): {diff['identical_answers']}/{diff['rows']} identical answers, "
                    f"max |d gt_prob| {diff['max_abs_d_gt_prob']:.2e}")
            if diff["max_abs_d_logprob"] is not None:
                line += f", max |d log-prob| {diff['max_abs_d_logprob']:.2e} nats"
            print(line)

if __name__ == "__main__":
    main()
