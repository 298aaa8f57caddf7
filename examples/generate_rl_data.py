"""Generate scored RL data: for every training query, candidate demonstration sequences from its pool — the selector's
beam search and temperature samples, image/text-similarity retrieval and random picks — each scored by the in-context
reward (which fills the reward cache training reuses). Output: JSON Lines, one scored sequence per line
(`{"query_id", "demo_ids", "source", "components", "scorer", ...}`), the input of the RCE warm-up.

    python examples/generate_rl_data.py --config recipes/okvqa/plan5.yaml \\
        --selector_path outputs/okvqa/sft --output_file data/okvqa/rl_data.jsonl

The pools come from the same `build_pools` as training, so every sequence is expressible by the selector. Without
`--selector_path` there are no beam/sample sequences (a random selector's beams are noise, not a policy's
proposals; say so explicitly with `--fresh_selector` if that is what you want). Groups whose sequences all got the
same reward carry nothing for RCE or GRPO to learn from; they are counted and reported (`<output>.summary.json`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from trl_icd.rewards.prompt import stable_hash
from trl_icd.pipeline import (
    DataArguments,
    RewardArguments,
    SelectorArguments,
    build_pools,
    build_reward,
    build_selector_training_dataset,
    fixed_shots,
    load_data,
    load_or_build_selector,
    parse_script_arguments,
    selector_generate,
    training_query_ids,
)
from trl_icd.sources import check_pretrained_path, exit_on_missing_input

logger = logging.getLogger("generate_rl_data")

# When two sources propose the same ordered sequence, it is recorded once, under the first of these.
SOURCE_PRIORITY = ("beam", "image_sim", "text_sim", "sample", "random")


@dataclass
class RLDataArguments:
    """Switches of this script: which sequences to propose per query and where the scored JSON Lines go."""

    output_file: str = field(default="rl_data.jsonl", metadata={"help": "Where to write the scored JSON Lines."})
    selector_path: str | None = field(
        default=None, metadata={"help": "A trained selector (beam and sampled sequences); None: retrieval + random."}
    )
    fresh_selector: bool = field(
        default=False,
        metadata={"help": "Without selector_path, propose beams/samples from a freshly initialised selector anyway."},
    )
    num_shots: list[int] = field(
        default_factory=lambda: [2], metadata={"help": "Sequence lengths to generate (research: 2)."}
    )
    num_beams: int = field(default=5, metadata={"help": "Selector beam-search sequences per query."})
    temperatures: list[float] = field(
        default_factory=lambda: [1.0, 1.3], metadata={"help": "Selector sampling temperatures."}
    )
    samples_per_temperature: int = field(default=2, metadata={"help": "Selector samples per temperature."})
    num_retrieval: int = field(
        default=5, metadata={"help": "Similarity sequences per modality (consecutive windows of the pool's ranking)."}
    )
    num_random: int = field(default=1, metadata={"help": "Random sequences per query."})
    random_seed: int = field(default=0, metadata={"help": "Seed of the random sequences."})
    batch_size: int = field(default=256, metadata={"help": "Pairs scored (and written) per chunk."})


def similarity_sequences(data, query_id, pool, modality: str, num_shots: int, count: int) -> list[tuple]:
    """`count` sequences of `num_shots` pool items: consecutive windows of the pool ranked by `modality` similarity
    to the query (window r = ranks r·s .. r·s+s−1), most similar item last (nearest the query)."""
    table = data.features.image if modality == "image" else data.features.text
    rows = np.array([data.corpus.row_of(c) for c in pool])
    sims = np.asarray(table[rows]) @ np.asarray(table[data.corpus.row_of(query_id)])
    ranked = [pool[i] for i in np.argsort(-sims, kind="stable")]
    out = []
    for r in range(count):
        window = ranked[r * num_shots : (r + 1) * num_shots]
        if len(window) < num_shots:
            break
        out.append(tuple(reversed(window)))
    return out


def random_sequences(query_id, pool, num_shots: int, count: int, seed: int) -> list[tuple]:
    rng = np.random.default_rng([seed, int(stable_hash(["rl_data_random", query_id]), 16) % 2**32])
    return [tuple(pool[i] for i in rng.choice(len(pool), size=num_shots, replace=False)) for _ in range(count)
            if len(pool) >= num_shots]


def selector_sequences(model, tokenizer, dataset, num_shots: int, args: RLDataArguments) -> dict:
    """{query_id: [(source, demo_ids, extra)]} from beam search and temperature sampling at exactly `num_shots`."""
    from trl_icd.selector import parse_selection

    proposals: dict = {q: [] for q in dataset["query_id"]}
    runs = [("beam", {"num_beams": args.num_beams, "num_return_sequences": args.num_beams, "do_sample": False}, {})]
    for t in args.temperatures:
        runs.append(("sample", {"do_sample": True, "temperature": t, "top_k": 0, "top_p": 1.0,
                                "num_return_sequences": args.samples_per_temperature}, {"temperature": t}))
    with fixed_shots(model, num_shots):
        for source, kwargs, extra in runs:
            outputs = selector_generate(model, tokenizer, dataset["prompt"], **kwargs)
            for q, pool, seqs in zip(dataset["query_id"], dataset["candidate_ids"], outputs, strict=True):
                for rank, ids in enumerate(seqs):
                    demos = tuple(parse_selection(ids, list(pool), tokenizer))
                    info = dict(extra, beam_rank=rank) if source == "beam" else dict(extra)
                    proposals[q].append((source, demos, info))
    return proposals


def main(argv=None) -> dict:
    args, data_args, reward_args, selector_args = parse_script_arguments(
        (RLDataArguments, DataArguments, RewardArguments, SelectorArguments), argv, description=__doc__
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    if args.selector_path:
        check_pretrained_path(args.selector_path, "selector checkpoint (--selector_path)")
    data = load_data(data_args)
    query_ids = training_query_ids(data, data_args)
    pools = build_pools(data, data_args, query_ids)

    model = tokenizer = None
    if args.selector_path or args.fresh_selector:
        model, tokenizer = load_or_build_selector(args.selector_path, data, data_args, selector_args)
    else:
        logger.warning("no --selector_path: sequences come from similarity retrieval and random picks only")
    reward = build_reward(data, reward_args)

    # Propose, de-duplicate ordered sequences per query (source priority), then score in chunks.
    proposals: dict = {q: {} for q in query_ids}

    def propose(q, source, demos, extra):
        best = proposals[q].get(demos)
        if best is None or SOURCE_PRIORITY.index(source) < SOURCE_PRIORITY.index(best[0]):
            proposals[q][demos] = (source, dict(extra))

    for s in args.num_shots:
        if model is not None:
            dataset = build_selector_training_dataset(data, pools, tokenizer)
            for q, items in selector_sequences(model, tokenizer, dataset, s, args).items():
                for source, demos, extra in items:
                    propose(q, source, demos, dict(extra, num_shots=s))
        for q in tqdm(query_ids, desc=f"retrieval/random ({s} shots)"):
            for modality in ("image", "text"):
                for rank, demos in enumerate(similarity_sequences(data, q, pools[q], modality, s, args.num_retrieval)):
                    propose(q, f"{modality}_sim", demos, {"retrieval_rank": rank, "num_shots": s})
            for demos in random_sequences(q, pools[q], s, args.num_random, args.random_seed):
                propose(q, "random", demos, {"num_shots": s})

    pairs = [(q, demos, source, extra) for q in query_ids for demos, (source, extra) in proposals[q].items()]
    logger.info("%d sequences for %d queries (%.1f per query)", len(pairs), len(query_ids), len(pairs) / max(1, len(query_ids)))
    os.makedirs(os.path.dirname(os.path.abspath(args.output_file)), exist_ok=True)
    rewards_by_query: dict = {q: [] for q in query_ids}
    sources, failed = Counter(), 0
    with open(args.output_file, "w") as out:
        for start in tqdm(range(0, len(pairs), args.batch_size), desc="scoring"):
            chunk = pairs[start : start + args.batch_size]
            components = reward.score_pairs([(q, demos) for q, demos, _, _ in chunk])
            for (q, demos, source, extra), comp in zip(chunk, components, strict=True):
                if comp is None:
                    failed += 1
                    continue
                out.write(json.dumps(reward.rl_data_record(q, list(demos), source, comp, **extra)) + "\n")
                rewards_by_query[q].append(reward.shape(comp))
                sources[source] += 1

    flat = [q for q, r in rewards_by_query.items() if len(r) > 1 and max(r) == min(r)]
    summary = {
        "output_file": args.output_file,
        "queries": len(query_ids),
        "sequences": sum(sources.values()),
        "sequences_per_source": dict(sources),
        "unscorable_sequences": failed,
        "groups_without_contrast": len(flat),
        "fraction_without_contrast": len(flat) / max(1, len(query_ids)),
        "mean_reward": float(np.mean([x for r in rewards_by_query.values() for x in r])) if sources else None,
        "reward_mode": reward.mode,
        "scorer": reward.scorer_hash,
    }
    with open(args.output_file + ".summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    logger.info("%d of %d groups have no reward contrast (every sequence scored the same)", len(flat), len(query_ids))
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    with exit_on_missing_input():
        main(sys.argv[1:])
