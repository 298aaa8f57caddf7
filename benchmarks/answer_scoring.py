"""Scoring answers the way training does: every new selection for a query is scored against the same gold answers.

`trl_icd.metrics.official_normalize` and `evalai_normalize` are memoised; this compares them with the same functions
unmemoised (`__wrapped__`), in one run, on a training-like stream: `--queries` demo-world queries, each scored
`--selections` times (the reward components `soft` and `rel` of one prediction: a gold answer or another concept's
answer), for the protocols `vqa` and `lmms_eval`. Prints pairs/s both ways, the ratio, and checks that every
component is identical. The stream is timed `--repeats` times per variant, alternating, and the best time is kept.

    python benchmarks/answer_scoring.py
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import random
import time

from trl_icd import metrics
from trl_icd.data import build_demo_world
from trl_icd.rewards.components import reward_components


@contextlib.contextmanager
def unmemoised():
    """The normalisers without their cache, everywhere `reward_components` reaches them."""
    saved_globals = {name: getattr(metrics, name) for name in ("official_normalize", "evalai_normalize")}
    saved_protocols = dict(metrics.VQA_PROTOCOLS)
    try:
        for name, fn in saved_globals.items():
            setattr(metrics, name, fn.__wrapped__)
        for name, protocol in saved_protocols.items():
            wrapped = getattr(protocol.normalize, "__wrapped__", protocol.normalize)
            metrics.VQA_PROTOCOLS[name] = dataclasses.replace(protocol, normalize=wrapped)
        yield
    finally:
        for name, fn in saved_globals.items():
            setattr(metrics, name, fn)
        metrics.VQA_PROTOCOLS.clear()
        metrics.VQA_PROTOCOLS.update(saved_protocols)


def training_stream(num_queries: int, selections: int, seed: int) -> list[tuple[str, list[str], dict[str, float]]]:
    world = build_demo_world(num_train=num_queries, num_eval=10, num_test=10, seed=seed)
    items = [world.corpus.get(i) for i in world.corpus.ids_in_split("train")]
    rng = random.Random(seed)
    stream = []
    for item in items:
        logprobs = {answer: -1.0 for answer in item.answers if answer.strip()}  # gt_prob needs one per gold answer
        for _ in range(selections):
            other = rng.choice(items)
            stream.append((rng.choice(item.answers if rng.random() < 0.5 else other.answers), list(item.answers),
                           logprobs))
    rng.shuffle(stream)
    return stream


def score(stream, protocol: str) -> list[tuple[float, float]]:
    out = []
    for prediction, answers, logprobs in stream:
        components = reward_components(prediction, answers, logprobs, protocol=protocol)
        out.append((components["soft"], components["rel"]))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=1200)
    parser.add_argument("--selections", type=int, default=16, help="scored selections per query")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    stream = training_stream(args.queries, args.selections, args.seed)
    print(f"{len(stream):,} (prediction, gold answers) pairs: {args.queries} queries x {args.selections} selections")
    for protocol in ("vqa", "lmms_eval"):
        best = {"unmemoised": float("inf"), "memoised": float("inf")}
        results = {}
        for _ in range(args.repeats):
            for variant in ("unmemoised", "memoised"):
                metrics.official_normalize.cache_clear()
                metrics.evalai_normalize.cache_clear()
                with unmemoised() if variant == "unmemoised" else contextlib.nullcontext():
                    started = time.perf_counter()
                    results[variant] = score(stream, protocol)
                    best[variant] = min(best[variant], time.perf_counter() - started)
        same = results["unmemoised"] == results["memoised"]
        rate = {variant: len(stream) / seconds for variant, seconds in best.items()}
        print(f"{protocol:>9}: unmemoised {rate['unmemoised']:,.0f} pairs/s, memoised {rate['memoised']:,.0f} pairs/s "
              f"({rate['memoised'] / rate['unmemoised']:.2f}x); identical components: {same}")
        if not same:
            raise SystemExit("memoised and unmemoised scores differ")


if __name__ == "__main__":
    main()
