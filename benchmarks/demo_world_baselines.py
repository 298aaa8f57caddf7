"""How much room the demo world leaves a learned selector: accuracy of random, similarity retrieval and the oracle on
held-out demo queries, per shot count, with 95% confidence intervals, plus the cost of the simulated answerer.

    python benchmarks/demo_world_baselines.py                        # K=32 "mix" pools, shots 0-4
    python benchmarks/demo_world_baselines.py --pool_method image_sim --k 16
    python benchmarks/demo_world_baselines.py --probe                # + a supervised match-scorer (learnability)
    python benchmarks/demo_world_baselines.py --preset okvqa_like --calibration --num_eval 1500 --seed 1
                                        # the OK-VQA-like regime: its calibration figures next to the published ones

Methods (s = shots; retrieved demonstrations are placed most-similar-last, next to the query):
- random: s items drawn uniformly from the training split (as the evaluation script does); random (pool): from the
  query's candidate pool;
- image_sim / text_sim: the s training items nearest the query in image / question features over the whole training
  split (RICES-style, as the evaluation script runs them; with "mix" pools of K >= 16 they are inside the pool);
- combined_sim: nearest in the selector's item table (image and question features concatenated): a hand-made
  combination, not one of the standard baselines, reported to show how far a fixed similarity gets;
- oracle: the best ordered selection of exactly s items from the pool (`SimulatedBackend.oracle_accuracy`);
  oracle (1..s): the best with 1 to s items, what a selector with a learned stop can reach;
- match-first: the true matches of the pool first (the world's ground truth), then the most image-similar rest;
- probe (optional): a low-rank bilinear query x candidate scorer trained, with the ground-truth match labels, on the
  training queries' pools; top-s by score. It shows how well the features separate matches from near misses for a
  model that only sees feature vectors (the selector has to find the same thing from rewards alone).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import numpy as np

from trl_icd.data.demo import build_demo_world
from trl_icd.data.demo_calibration import calibration_table, measure_regime
from trl_icd.data.features import fallback_features
from trl_icd.data.samplers import nearest_first, sample_candidate_pools
from trl_icd.evaluation import EvaluationResults, markdown_comparison_table, markdown_table, plot_accuracy_vs_shots
from trl_icd.metrics import vqa_accuracy
from trl_icd.rewards.prompt import InContextPrompt
from trl_icd.rewards.simulated import SimulatedBackend, relation


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="default", help="demo world regime (trl_icd.data.demo.DEMO_PRESETS)")
    parser.add_argument("--calibration", action="store_true",
                        help="also measure the regime's calibration figures (trl_icd.data.demo_calibration)")
    parser.add_argument("--num_train", type=int, default=None, help="training items (default: the preset's)")
    parser.add_argument("--num_eval", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--k", type=int, default=32, help="candidate pool size")
    parser.add_argument("--pool_method", default="mix")
    parser.add_argument("--shots", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--probe", action="store_true", help="also train the supervised match-scorer probe")
    parser.add_argument("--probe_steps", type=int, default=300)
    parser.add_argument("--output_dir", default=None, help="write results.json / results.md / accuracy_vs_shots.png")
    return parser.parse_args(argv)


def train_probe(corpus, features, pools: dict, steps: int, seed: int = 0):
    """A rank-32 bilinear scorer s(q, c) = (q A)·(c B) on the selector's item table, trained listwise (softmax over
    the pool, log of the mass on true matches) on the training queries' pools. Returns score(query_id, ids)."""
    import torch

    torch.manual_seed(seed)
    table = torch.tensor(features.combined())
    queries = [q for q, ids in pools.items() if any(relation(corpus[q], corpus[c]) == "match" for c in ids)]
    q_rows = torch.tensor([corpus.row_of(q) for q in queries])
    c_rows = torch.tensor([[corpus.row_of(c) for c in pools[q]] for q in queries])
    labels = torch.tensor([[relation(corpus[q], corpus[c]) == "match" for c in pools[q]] for q in queries])
    dim, rank = table.shape[1], 32
    left = torch.nn.Parameter(torch.randn(dim, rank) * 0.05)
    right = torch.nn.Parameter(torch.randn(dim, rank) * 0.05)
    optimizer = torch.optim.Adam([left, right], lr=3e-3)
    for _ in range(steps):
        batch = torch.randint(0, len(queries), (256,))
        scores = ((table[q_rows[batch]] @ left).unsqueeze(1) * (table[c_rows[batch]] @ right)).sum(-1)
        log_probs = torch.log_softmax(scores * 5, dim=1)
        loss = -torch.logsumexp(log_probs.masked_fill(~labels[batch], -1e9), dim=1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def score(query_id, ids):
        with torch.no_grad():
            q = table[corpus.row_of(query_id)] @ left
            c = table[[corpus.row_of(i) for i in ids]] @ right
            return (c @ q).numpy()

    return score


def main(argv=None) -> EvaluationResults:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    timings = {}
    start = time.perf_counter()
    sizes = {"num_train": args.num_train} if args.num_train else {}
    world = build_demo_world(preset=args.preset, num_eval=args.num_eval, num_test=0, seed=args.seed, **sizes)
    timings["build world"] = time.perf_counter() - start
    corpus = world.corpus
    start = time.perf_counter()
    features = fallback_features(corpus, show_progress=False)
    timings["fallback features"] = time.perf_counter() - start
    train, queries = world.ids("train"), world.ids("val")
    start = time.perf_counter()
    pools = sample_candidate_pools(corpus, features, queries, train, args.k, method=args.pool_method, seed=args.seed,
                                   show_progress=False)
    timings["pools (eval queries)"] = time.perf_counter() - start
    backend = SimulatedBackend.for_world(world)
    probe = None
    if args.probe:
        start = time.perf_counter()
        train_pools = sample_candidate_pools(corpus, features, train, train, args.k, method=args.pool_method,
                                             seed=args.seed, show_progress=False)
        probe = train_probe(corpus, features, train_pools, args.probe_steps, seed=args.seed)
        timings["probe training"] = time.perf_counter() - start

    def accuracy(query, demos) -> float:
        return vqa_accuracy(backend.answer([InContextPrompt(query, tuple(demos))])[0], list(query.answers))

    rng = np.random.default_rng(args.seed)
    train_items = [corpus[i] for i in train]
    train_rows = [corpus.row_of(i) for i in train]
    tables = {"image_sim": features.image, "text_sim": features.text, "combined_sim": features.combined()}
    cells: dict[tuple[str, int], list[float]] = {}
    matches, oracle_seconds, oracle_calls = [], 0.0, 0
    for q in queries:
        query, pool = corpus[q], [corpus[i] for i in pools[q]]
        row, rows = corpus.row_of(q), [corpus.row_of(i) for i in pools[q]]
        is_match = [relation(query, p) == "match" for p in pool]
        matches.append(sum(is_match))
        by_image = nearest_first(features.image, row, rows)
        rankings = {
            "random (pool)": list(rng.permutation(len(pool))),
            "match-first": sorted(range(len(pool)), key=lambda j: (not is_match[j], by_image.index(j))),
        }
        retrieved = {name: nearest_first(table, row, train_rows)[: max(args.shots)] for name, table in tables.items()}
        if probe is not None:
            rankings["probe"] = list(np.argsort(-probe(q, pools[q]), kind="stable"))
        for s in args.shots:
            if s == 0:
                cells.setdefault(("zero-shot", 0), []).append(accuracy(query, ()))
                continue
            drawn = rng.choice(len(train_items), s, replace=False)
            cells.setdefault(("random", s), []).append(accuracy(query, [train_items[j] for j in drawn]))
            for name, ranking in rankings.items():
                cells.setdefault((name, s), []).append(accuracy(query, [pool[j] for j in reversed(ranking[:s])]))
            for name, ranking in retrieved.items():
                demos = [train_items[j] for j in reversed(ranking[:s])]
                cells.setdefault((name, s), []).append(accuracy(query, demos))
            begin = time.perf_counter()
            cells.setdefault(("oracle", s), []).append(backend.oracle_accuracy(query, pool, s, min_shots=s).accuracy)
            cells.setdefault(("oracle (1..s)", s), []).append(backend.oracle_accuracy(query, pool, s).accuracy)
            oracle_seconds += time.perf_counter() - begin
            oracle_calls += 2

    results = EvaluationResults(query_ids=list(queries), meta={
        "preset": args.preset, "num_train": world.config.num_train, "num_eval": args.num_eval, "seed": args.seed,
        "k": args.k,
        "pool_method": args.pool_method, "rule": backend.identity["rule"],
    })
    order = ["zero-shot", "random", "random (pool)", "text_sim", "image_sim", "combined_sim", "probe", "match-first",
             "oracle", "oracle (1..s)"]
    for name in order:
        for s in args.shots:
            if (name, s) in cells:
                results.add(name, s, cells[(name, s)])

    # Throughput of the answerer on a GRPO-like stream: 4-shot prompts from the pools.
    prompts = [InContextPrompt(corpus[q], tuple(corpus[i] for i in pools[q][:4])) for q in queries] * 5
    gold = [list(p.query.answers) for p in prompts]
    begin = time.perf_counter()
    backend.answer_and_logprob(prompts, gold)
    per_prompt = (time.perf_counter() - begin) / len(prompts)

    print(f"# Demo world baselines ({args.preset}): {len(queries)} held-out queries, pools K={args.k} "
          f"({args.pool_method}), {world.config.num_train} training items, seed {args.seed}\n")
    print(markdown_table(results))
    print()
    print(markdown_comparison_table(results, ["oracle (1..s)"] + (["probe"] if probe else []),
                                    ["random", "text_sim", "image_sim"]))
    best_sim = max(results.mean(m, s) for m in ("image_sim", "text_sim") for s in args.shots if s > 0)
    best_oracle = max(results.mean("oracle (1..s)", s) for s in args.shots if s > 0)
    best_random = max(results.mean("random", s) for s in args.shots if s > 0)
    with_match = np.mean(np.array(matches) > 0)
    print(f"\nmatches per pool: mean {np.mean(matches):.2f}, pools with >= 1 match {with_match:.1%}")
    print(f"best similarity retrieval / oracle (1..max shots) = {best_sim:.3f} / {best_oracle:.3f} = "
          f"{best_sim / best_oracle:.2f}; best random = {best_random:.3f}")
    print("timings: " + ", ".join(f"{k} {v:.2f} s" for k, v in timings.items())
          + f"; simulated answer+log-probs {per_prompt * 1e6:.0f} µs/prompt (4-shot); oracle "
          f"{oracle_seconds / max(oracle_calls, 1) * 1e3:.2f} ms/query")
    if args.calibration:
        begin = time.perf_counter()
        figures = measure_regime(world, backend, seed=args.seed, features=features)
        print(f"\n## Calibration against Qwen2.5-VL-3B on OK-VQA ({figures['meta']['queries']} queries, random pools "
              f"of K={figures['meta']['pool_size']}, {time.perf_counter() - begin:.1f} s)\n")
        print(calibration_table(figures))
        results.meta["calibration"] = figures
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
        results.save_json(os.path.join(args.output_dir, "results.json"))
        with open(os.path.join(args.output_dir, "results.md"), "w") as f:
            f.write(markdown_table(results) + "\n")
        plot_accuracy_vs_shots(results, os.path.join(args.output_dir, "accuracy_vs_shots.png"),
                               methods=[m for m in results.methods if m != "random (pool)"])
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
