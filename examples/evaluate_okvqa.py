"""Evaluate demonstration-selection methods on the validation split: zero-shot, random, RICES image similarity,
text similarity and any number of trained selectors, at every shot count, on the same queries; VQA accuracy
(`--vqa_protocol`: `vqa` = today's official script, the default; `vqa2016`; `lmms_eval`) through the reward backend
(and its cache). Writes a Markdown table with 95% confidence intervals, a paired comparison of each selector against
the best baseline at each shot count, the per-query results (JSON, with the protocol in `meta`) and a plot.

    python examples/evaluate_okvqa.py --config recipes/okvqa/plan5.yaml \\
        --selectors outputs/okvqa/plan5 outputs/okvqa/plan7 --shots 0 1 2 3 4 --results_dir eval/okvqa

The selectors' candidate pools come from the same `build_pools` as training (the recipe's pool settings): a
per-query pool for every validation question, never one fixed pool for all. All val questions are used unless
`--limit N` (then the first N in question-id order: a quick check, not a result to report).

A selector reads whatever feature table the data options give, as long as it comes from the featuriser it was
trained with (another featuriser is refused, naming both). To evaluate it, unchanged, on another split or corpus,
override the data options; a selector trained on OK-VQA, evaluated on VQAv2 val, for example.

    python examples/evaluate_okvqa.py --config recipes/okvqa/plan5.yaml --selectors outputs/okvqa/plan5 \
        --dataset vqav2 --dataset_path data/vqav2 --features_path data/vqav2/clip_features --results_dir eval/vqav2
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field


from trl_icd.pipeline import (
    BASELINES,
    DataArguments,
    RewardArguments,
    SelectorArguments,
    build_pools,
    build_reward,
    evaluate_methods,
    load_data,
    load_or_build_selector,
    parse_script_arguments,
    score_selections,
    select_with_selector,
)
from trl_icd.sources import check_pretrained_path, exit_on_missing_input

logger = logging.getLogger("evaluate_okvqa")


@dataclass
class EvalArguments:
    """Switches of this script: what to evaluate (selectors, baselines, shot counts) and where the results go."""

    results_dir: str = field(default="eval", metadata={"help": "Where the table, JSON and plot go."})
    selectors: list[str] = field(
        default_factory=list,
        metadata={"help": "Trained selector folders to evaluate (each is one method).", "aliases": ["--selector"]},
    )
    selector_names: list[str] = field(
        default_factory=list, metadata={"help": "Names of the selectors in the table (default: folder names)."}
    )
    shots: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4], metadata={"help": "Shot counts."})
    baselines: list[str] = field(
        default_factory=lambda: list(BASELINES), metadata={"help": "Retrieval baselines: random, image_sim, text_sim."}
    )
    limit: int | None = field(default=None, metadata={"help": "Evaluate only the first N val queries."})
    random_seed: int = field(default=0, metadata={"help": "Seed of the random baseline."})


def main(argv=None) -> dict:
    args, data_args, reward_args, selector_args = parse_script_arguments(
        (EvalArguments, DataArguments, RewardArguments, SelectorArguments), argv, description=__doc__
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    from trl_icd.evaluation import (
        markdown_comparison_table,
        markdown_table,
        mean_ci,
        plot_accuracy_vs_shots,
    )

    for path in args.selectors:  # before any data is read: a typo should not cost a corpus load
        check_pretrained_path(path, "selector checkpoint (--selectors)")
    data = load_data(data_args)
    query_ids = list(data.eval_ids)[: args.limit] if args.limit else list(data.eval_ids)
    if not query_ids:
        raise ValueError(f"no queries in split {data_args.eval_split!r}")
    if args.selector_names and len(args.selector_names) != len(args.selectors):
        raise ValueError("give one --selector_names entry per --selectors entry")
    names = args.selector_names or [os.path.basename(os.path.normpath(p)) for p in args.selectors]
    if len(set(names)) != len(names) or set(names) & {"zero_shot", *args.baselines}:
        raise ValueError(f"selector names must be distinct and differ from the baselines: {names}")
    selectors = {
        name: load_or_build_selector(path, data, data_args, selector_args)
        for name, path in zip(names, args.selectors, strict=True)
    }
    pools = build_pools(data, data_args, query_ids) if selectors else None
    reward = build_reward(data, reward_args)
    logger.info("%d queries x shots %s x methods %s, VQA protocol %r", len(query_ids), args.shots,
                ["zero_shot", *args.baselines, *names], reward.vqa_protocol)

    results = evaluate_methods(data, reward, query_ids, args.shots, pools=pools, selectors=selectors,
                               baselines=args.baselines, seed=args.random_seed)
    # Each selector also choosing its own number of demonstrations (greedy, its learned stop): its headline figure.
    own_choice = {}
    for name, (model, tokenizer) in selectors.items():
        picks = select_with_selector(model, tokenizer, data, pools, query_ids)
        own_choice[name] = (score_selections(reward, query_ids, picks),
                            sum(len(picks[q]) for q in query_ids) / len(query_ids))
    results.meta.update({
        "dataset": data_args.dataset, "split": data_args.eval_split, "limit": args.limit,
        "pool_size": data_args.pool_size, "pool_method": data_args.pool_method, "scorer": reward.scorer_hash,
        "selectors": dict(zip(names, args.selectors, strict=True)),
        "features": {"hash": data.features.content_hash, "rows": len(data.features),
                     "featurizer": data.features.featurizer.describe()},
        "own_choice": {name: {"accuracy": sum(acc) / len(acc), "mean_shots": shots}
                       for name, (acc, shots) in own_choice.items()},
    })
    os.makedirs(args.results_dir, exist_ok=True)
    sections = [markdown_table(results)]
    for name, (accuracies, mean_shots) in own_choice.items():
        interval = mean_ci(accuracies)
        sections.append(f"{name} choosing its own number of demonstrations (greedy): {100 * interval.mean:.1f} "
                        f"± {100 * interval.half_width:.1f} (mean {mean_shots:.2f} shots).")
    if names:
        sections.append(markdown_comparison_table(results, names, ["zero_shot", *args.baselines]))
    table = "\n\n".join(sections)
    with open(os.path.join(args.results_dir, "results.md"), "w") as f:
        f.write(table + "\n")
    results.save_json(os.path.join(args.results_dir, "results.json"))
    plot_accuracy_vs_shots(results, os.path.join(args.results_dir, "accuracy_vs_shots.png"), own_choice=own_choice,
                           labels={name: f"Selector {name}, exactly that many shots" for name in names})
    print(table)
    return {"results_dir": args.results_dir, "summary": results.to_dict(per_query=False)["summary"]}


if __name__ == "__main__":
    with exit_on_missing_input():
        main(sys.argv[1:])
