"""Selections by every method (the selector, greedy or at a fixed shot count, and the retrieval baselines), their
scores through the reward backend, the methods × shots evaluation, and the demo run's end-of-run evaluation."""

from __future__ import annotations

import logging
import os

from .arguments import DataArguments, RewardArguments
from .builders import DataBundle, build_pools, build_reward, build_selector_training_dataset

logger = logging.getLogger(__name__)



class fixed_shots:
    """Context manager: the selector picks exactly `num_shots` demonstrations (its masks read the config's shot
    bounds at every forward), e.g. to evaluate it at each shot count."""

    def __init__(self, model, num_shots: int | None):
        self.config = model.config
        self.num_shots = num_shots

    def __enter__(self):
        self.saved = (self.config.min_shots, self.config.max_shots)
        if self.num_shots is not None:
            if self.num_shots > self.saved[1] or self.num_shots < 1:
                raise ValueError(f"the selector was built for 1..{self.saved[1]} shots, not {self.num_shots}")
            self.config.min_shots = self.config.max_shots = self.num_shots
        return self

    def __exit__(self, *exc):
        self.config.min_shots, self.config.max_shots = self.saved


def selector_generate(model, tokenizer, prompts: list[str], batch_size: int = 64, show_progress: bool = True,
                      **generate_kwargs) -> list[list[list[int]]]:
    """Completion token ids per prompt (a list of `num_return_sequences` sequences each), padding removed."""
    import torch
    from tqdm.auto import tqdm

    n_return = generate_kwargs.get("num_return_sequences", 1)
    generate_kwargs.setdefault("max_new_tokens", model.config.max_shots + 1)
    out: list[list[list[int]]] = []
    model.eval()
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(prompts), batch_size), desc="selector", disable=not show_progress):
        batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True)
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.no_grad():
            sequences = model.generate(**batch, pad_token_id=tokenizer.pad_token_id, **generate_kwargs)
        completions = sequences[:, batch["input_ids"].shape[1] :].tolist()
        for j in range(0, len(completions), n_return):
            out.append([[t for t in c if t != tokenizer.pad_token_id] for c in completions[j : j + n_return]])
    return out


def select_with_selector(model, tokenizer, data: DataBundle, pools: dict, query_ids, num_shots: int | None = None,
                         batch_size: int = 64, show_progress: bool = True) -> dict:
    """Greedy selections `{query_id: [demo ids]}` (exactly `num_shots` when given, else the selector's own stop)."""
    from ..selector import parse_selection

    query_ids = list(query_ids)
    dataset = build_selector_training_dataset(data, {q: pools[q] for q in query_ids}, tokenizer)
    with fixed_shots(model, num_shots):
        completions = selector_generate(model, tokenizer, dataset["prompt"], batch_size=batch_size,
                                        show_progress=show_progress, do_sample=False)
    return {
        q: list(parse_selection(c[0], list(cands), tokenizer))
        for q, cands, c in zip(dataset["query_id"], dataset["candidate_ids"], completions, strict=True)
    }


def retrieval_selections(data: DataBundle, query_ids, method: str, num_shots: int, seed: int = 0) -> dict:
    """`num_shots` demonstrations per query from the whole training split by `method` ('random', 'image_sim' =
    RICES, 'text_sim'), most similar nearest the query (last in the prompt), as similarity retrieval is usually run."""
    from ..data.samplers import sample_candidate_pools

    if num_shots == 0:
        return {q: [] for q in query_ids}
    picks = sample_candidate_pools(data.corpus, data.features, list(query_ids), data.train_ids, num_shots,
                                   method=method, seed=seed, show_progress=False)
    return {q: list(reversed(ids)) if method != "random" else list(ids) for q, ids in picks.items()}


def score_selections(reward, query_ids, selections: dict) -> list[float]:
    """VQA accuracy (`soft`) of each query's selection, scored through the reward's backend and cache, in the order
    of `query_ids`. A pair the backend could not score is an error: an evaluation must not silently drop
    queries (that would compare methods on different questions)."""
    pairs = [(q, list(selections[q])) for q in query_ids]
    components = reward.score_pairs(pairs)
    failed = [pairs[i] for i, c in enumerate(components) if c is None]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(pairs)} evaluation prompts could not be scored, e.g. {failed[:3]}")
    return [float(c["soft"]) for c in components]


BASELINES = ("random", "image_sim", "text_sim")


def evaluate_methods(data: DataBundle, reward, query_ids, shots, pools: dict | None = None,
                     selectors: dict | None = None, baselines=BASELINES, seed: int = 0):
    """Per-query accuracies of every method at every shot count on the same queries -> `EvaluationResults`.

    zero-shot at 0 shots; each baseline (`retrieval_selections`, from the whole training split) and each selector
    (`{name: (model, tokenizer)}`, greedy, exactly s demonstrations from the query's pool in `pools`) at every s >= 1
    (a selector only up to its `max_shots`)."""
    from ..evaluation import EvaluationResults

    query_ids = list(query_ids)
    results = EvaluationResults(query_ids=query_ids, meta={"num_queries": len(query_ids),
                                                           "vqa_protocol": getattr(reward, "vqa_protocol", None)})
    for s in sorted(set(shots)):
        if s == 0:
            results.add("zero_shot", 0, score_selections(reward, query_ids, {q: [] for q in query_ids}))
            continue
        for method in baselines:
            picks = retrieval_selections(data, query_ids, method, s, seed=seed)
            results.add(method, s, score_selections(reward, query_ids, picks))
        for name, (model, tokenizer) in (selectors or {}).items():
            if s > model.config.max_shots:
                logger.info("%s picks at most %d demonstrations; no %d-shot result", name, model.config.max_shots, s)
                continue
            picks = select_with_selector(model, tokenizer, data, pools, query_ids, num_shots=s)
            results.add(name, s, score_selections(reward, query_ids, picks))
    return results





def pool_oracle(data: DataBundle, reward, pools, query_ids, max_shots: int, min_shots: int = 1) -> list[float]:
    """Per query, the best accuracy any selection of min_shots..max_shots items from its pool reaches, scored under
    the reward's VQA protocol (demo world only: the simulated answerer knows it)."""
    from functools import partial

    from ..metrics import vqa_accuracy

    accuracy = partial(vqa_accuracy, protocol=reward.vqa_protocol)
    return [
        reward.backend.oracle_accuracy(data.corpus[q], [data.corpus[c] for c in pools[q]], max_shots=max_shots,
                                       min_shots=min_shots, accuracy=accuracy).accuracy
        for q in query_ids
    ]


def run_demo_evaluation(model, tokenizer, data: DataBundle, data_args: DataArguments, reward_args: RewardArguments,
                        output_dir: str, log_history: list) -> dict:
    """Evaluate on the held-out queries and write `eval_results.json`, `eval_table.md`, `eval_details.json`,
    `accuracy_vs_shots.png` and `training_curves.png` to `output_dir`.

    `eval_results.json` holds one accuracy per method: `selector` = the trained selector, greedy, stopping where it
    chooses; `random` / `image_sim` / `text_sim` = each baseline at its *best* shot count in 1..max(4, max_shots)
    (a conservative bar for the selector); `oracle` = the best accuracy any selection of min_shots..max_shots items
    from the selector's pool reaches (demo world only: the simulated answerer knows it)."""
    import json

    import numpy as np

    from ..evaluation import markdown_comparison_table, markdown_table, plot_accuracy_vs_shots, plot_training_curves

    if data.world is None:
        raise ValueError("the end-of-run evaluation with an oracle needs the demo world; use evaluate_okvqa.py")
    query_ids = list(data.eval_ids)
    pools = build_pools(data, data_args, query_ids)
    reward = build_reward(data, reward_args)
    max_shots, min_shots = model.config.max_shots, model.config.min_shots
    baseline_max_shots = max(4, max_shots)
    results = evaluate_methods(data, reward, query_ids, range(0, baseline_max_shots + 1), pools=pools,
                               selectors={"selector": (model, tokenizer)}, seed=data_args.pool_seed)
    own = select_with_selector(model, tokenizer, data, pools, query_ids)
    own_accuracy = score_selections(reward, query_ids, own)
    oracle = pool_oracle(data, reward, pools, query_ids, max_shots=max_shots, min_shots=min_shots)
    results.add("oracle (pool)", max_shots, oracle)
    summary = {"selector": float(np.mean(own_accuracy)), "oracle": float(np.mean(oracle))}
    for method in BASELINES:
        summary[method] = max(results.mean(method, s) for s in range(1, baseline_max_shots + 1))
    summary = {key: summary[key] for key in ("random", "image_sim", "text_sim", "selector", "oracle")}

    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "eval_results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    results.meta.update({"selector_own_stop": summary["selector"],
                         "selector_mean_shots": float(np.mean([len(v) for v in own.values()]))})
    results.save_json(os.path.join(output_dir, "eval_details.json"))
    table = "\n\n".join([
        markdown_table(results),
        f"Trained selector choosing its own number of demonstrations (greedy): {100 * summary['selector']:.1f} "
        f"(mean {results.meta['selector_mean_shots']:.2f} shots); oracle over {min_shots}..{max_shots} shots from "
        f"the same pools: {100 * summary['oracle']:.1f}; selector / oracle = "
        f"{summary['selector'] / max(summary['oracle'], 1e-12):.3f}.",
        markdown_comparison_table(results, ["selector"], ["zero_shot", *BASELINES]),
    ])
    with open(os.path.join(output_dir, "eval_table.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    plot_accuracy_vs_shots(
        results, os.path.join(output_dir, "accuracy_vs_shots.png"), reference=["oracle (pool)"],
        own_choice={"selector": (own_accuracy, results.meta["selector_mean_shots"])},
        labels={"oracle (pool)": f"Oracle: best {min_shots}-{max_shots} demonstrations from the selector's pool"},
        dataset="Demo world, held-out queries",
    )
    if log_history:
        plot_training_curves(log_history, os.path.join(output_dir, "training_curves.png"),
                             title="Demo world: GRPO training of the selector")
    return summary
