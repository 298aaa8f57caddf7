"""What the scripts build from their arguments: the corpus with its features and splits, per-query candidate
pools (one function for training, RL data and evaluation), the scoring backend and in-context reward, the selector
(fresh or loaded) with its training dataset, and the RCE warm-up."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from .arguments import DataArguments, RCEArguments, RewardArguments, SelectorArguments

logger = logging.getLogger(__name__)

@dataclass
class DataBundle:
    """What every script needs: the corpus (pool items + queries), its features, and the split ids. `world` is the
    demo world (None for real data)."""

    corpus: Any
    features: Any
    train_ids: list
    eval_ids: list
    world: Any = None


def build_demo_world(args: DataArguments):
    """The demo world in the regime `args.demo_preset`, sized and seeded by `args`."""
    from ..data.demo import build_demo_world as build

    kwargs = {"seed": args.demo_seed, "preset": args.demo_preset}
    if args.demo_num_train is not None:
        kwargs["num_train"] = args.demo_num_train
    if args.demo_num_eval is not None:
        kwargs["num_eval"] = args.demo_num_eval
    if args.demo_num_test is not None:
        kwargs["num_test"] = args.demo_num_test
    return build(**kwargs)


def load_corpus(args: DataArguments):
    """(corpus, world): the demo world's corpus or OK-VQA/VQAv2 from local files or the Hub."""
    if args.dataset == "demo":
        world = build_demo_world(args)
        return world.corpus, world
    from ..data.okvqa import load_okvqa, load_vqav2

    loader = load_okvqa if args.dataset == "okvqa" else load_vqav2
    splits = list(dict.fromkeys([args.train_split, args.eval_split]))
    if os.path.isdir(args.dataset_path):
        return loader(args.dataset_path, splits=splits, image_root=args.image_root), None
    return loader(args.dataset_path, splits=splits), None


def load_features(args: DataArguments, corpus):
    """The exported feature table for this corpus (memory-mapped) or the fallback featuriser's.

    A table exported for exactly these items in corpus order is used as it is (read-only memory maps, shared by
    every process). One that holds these items among others, or in another order, is subset to the corpus (an
    in-memory copy of those rows; export for exactly the splits you load to avoid it)."""
    from ..data.features import FeatureTable, fallback_features

    if not args.features_path:
        return fallback_features(corpus, text_dim=args.fallback_text_dim)
    table = FeatureTable.load(args.features_path)
    if list(table.ids) == list(corpus.ids):
        return table
    try:
        aligned = table.aligned_to(corpus)
    except KeyError as err:
        raise ValueError(
            f"{args.features_path} has no features for some of the {len(corpus)} items of {args.dataset} splits "
            f"{corpus.splits} ({err.args[0]}); export features for these splits with examples/export_features.py"
        ) from None
    logger.warning("%s holds %d rows, not exactly this corpus's %d items in order: using an in-memory copy of the "
                   "%d rows needed", args.features_path, len(table), len(corpus), len(corpus))
    return aligned


def check_data_paths(args: DataArguments) -> None:
    """Fail at once on a missing local input, before anything is read: the dataset folder (a string that can only be
    a path, or whose first component is a local folder; see `trl_icd.sources`) and the feature table."""
    from ..sources import require_local, resolve_source

    if args.dataset != "demo":
        from ..data.downloads import DISPLAY_NAMES, download_instructions
        from ..data.okvqa import HUB_PRESETS

        resolve_source(args.dataset_path, f"{DISPLAY_NAMES[args.dataset]} data folder (dataset_path)",
                       hint=download_instructions(args.dataset, args.dataset_path), known_hub_ids=HUB_PRESETS)
    if args.features_path:
        require_local(args.features_path, "feature table (features_path)",
                      hint="Export it once with examples/export_features.py --source <dataset_path> --output_dir "
                           f"{args.features_path} (README: OK-VQA step 2).")


def load_data(args: DataArguments) -> DataBundle:
    check_data_paths(args)
    corpus, world = load_corpus(args)
    features = load_features(args, corpus)
    train_ids = corpus.ids_in_split(args.train_split)
    eval_ids = corpus.ids_in_split(args.eval_split)
    if not train_ids:
        raise ValueError(f"no items in split {args.train_split!r} (splits: {corpus.splits})")
    return DataBundle(corpus, features, train_ids, eval_ids, world)


def training_query_ids(data: DataBundle, args: DataArguments) -> list:
    ids = list(data.train_ids)
    return ids[: args.max_train_queries] if args.max_train_queries else ids


def build_pools(data: DataBundle, args: DataArguments, query_ids) -> dict:
    """Per-query candidate pools from the training split: the one pool function of training, RL data and eval."""
    from ..data.samplers import sample_candidate_pools

    return sample_candidate_pools(
        data.corpus, data.features, list(query_ids), data.train_ids, args.pool_size, method=args.pool_method,
        seed=args.pool_seed, shuffle=args.pool_shuffle,
    )





def build_backend(args: RewardArguments, data: DataBundle):
    """The scoring backend named by `args.reward_backend`."""
    if args.reward_backend == "simulated":
        if data.world is None:
            raise ValueError("reward_backend='simulated' answers demo-world queries only (dataset='demo')")
        from ..rewards.simulated import SimulatedBackend

        return SimulatedBackend.for_world(data.world)
    # The same generation settings for both model backends, so their scores are comparable.
    generation = {"max_new_tokens": args.reward_max_new_tokens, "num_beams": args.reward_num_beams,
                  "length_penalty": args.reward_length_penalty, "max_pixels": args.reward_max_pixels}
    if args.reward_backend == "qwen_vl":
        from ..rewards.qwen_vl import QwenVLBackend

        device = args.reward_device
        if device is None:
            from accelerate import PartialState

            device = PartialState().device
        kwargs = dict(generation, batch_size=args.reward_batch_size)
        if args.reward_attn_implementation is not None:
            kwargs["attn_implementation"] = args.reward_attn_implementation
        return QwenVLBackend.from_pretrained(
            args.reward_model_name_or_path, dtype=args.reward_dtype, device=device, **kwargs
        )
    from ..rewards.vllm import VLLMBackend

    return VLLMBackend(args.reward_model_name_or_path, base_url=args.vllm_server_url, **generation)


def build_reward(data: DataBundle, args: RewardArguments, tokenizer=None, max_shots: int | None = None, backend=None):
    """The in-context reward over `data.corpus` (selector completions are decoded with `tokenizer`)."""
    from ..rewards.in_context import InContextReward

    return InContextReward(
        data.corpus,
        backend if backend is not None else build_backend(args, data),
        mode=args.reward_mode,
        hard_weight=args.hard_weight,
        soft_weight=args.soft_weight,
        rel_weight=args.rel_weight,
        cache_path=args.reward_cache_path,
        invalid_reward=args.invalid_reward,
        vqa_protocol=args.vqa_protocol,
        tokenizer=tokenizer,
        max_shots=max_shots,
        batch_size=args.reward_batch_size * 8,
    )





def load_or_build_selector(path: str | None, data: DataBundle, data_args: DataArguments, args: SelectorArguments):
    """(model, tokenizer): loaded (strictly) from `path`, or fresh, reading `data.features` either way.

    A selector reads any table from the featuriser it was trained with (ValueError naming both featurisers
    otherwise), so a trained selector is evaluated on other splits and corpora as they are. The table stays outside
    the model: every process maps the same file, and TRL's reference model (loaded from a path) finds it in the
    process by the hash the saved config records."""
    import json

    from ..selector import ICDSelectorForCausalLM, build_selector_tokenizer

    if path:
        from transformers import AutoTokenizer

        model = ICDSelectorForCausalLM.from_pretrained(path, features=data.features)
        tokenizer = AutoTokenizer.from_pretrained(path)
        if model.config.num_slots < data_args.pool_size:
            raise ValueError(f"selector {path} has {model.config.num_slots} slots < pool_size={data_args.pool_size}")
        return model, tokenizer
    overrides = json.loads(args.selector_overrides) if args.selector_overrides else {}
    model = ICDSelectorForCausalLM.from_features(
        data.features, num_slots=data_args.pool_size, min_shots=args.selector_min_shots,
        max_shots=args.selector_max_shots, **overrides,
    )
    return model, build_selector_tokenizer(model.config)


def save_policy(model, tokenizer, path: str) -> None:
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def build_selector_training_dataset(data: DataBundle, pools: dict, tokenizer):
    """`prompt` / `query_id` / `candidate_ids` rows for the selector whose tokenizer is `tokenizer`."""
    from ..data.selector_dataset import build_selector_dataset
    from ..selector.vocabulary import SelectorVocabulary

    vocabulary = SelectorVocabulary.from_tokenizer(tokenizer)
    return build_selector_dataset(data.corpus, pools, num_slots=vocabulary.num_slots, vocabulary=vocabulary)


def selector_completion(positions) -> str:
    """The selector's completion text for picking the candidates at `positions` (the stop/eos is appended by RCE)."""
    from ..selector.vocabulary import SelectorVocabulary

    return " ".join(SelectorVocabulary.slot_word(int(k)) for k in positions)


def run_rce_warmup(model, tokenizer, data: DataBundle, data_args: DataArguments, reward_args: RewardArguments,
                   rce_args: RCEArguments, training_args):
    """RCE on the scored groups of `rce_args.rce_data_path`, rewards shaped as the GRPO reward shapes them; returns
    the warmed-up model. Sequences the selector cannot emit (a demonstration outside the query's pool, built by
    `build_pools` as in training, or a shot count outside its [min_shots, max_shots]) are dropped and counted, and a
    group holds one scorer's sequences only (`trl_icd.rce.group_scored_records`)."""
    from ..rce import RCEConfig, RCETrainer, build_rce_dataset, group_scored_records, read_scored_jsonl
    from ..rewards.shaping import shape_reward

    records = read_scored_jsonl(rce_args.rce_data_path)
    scorers = sorted({str(r.get("scorer")) for r in records})
    logger.info("RCE data: %d scored sequences from %s (scorers %s)", len(records), rce_args.rce_data_path, scorers)

    def reward_of(components):
        return shape_reward(components, mode=reward_args.reward_mode, hard_weight=reward_args.hard_weight,
                            soft_weight=reward_args.soft_weight, rel_weight=reward_args.rel_weight)

    groups, counts = group_scored_records(records, reward_of, drop_flat_groups=rce_args.rce_drop_flat_groups,
                                          min_shots=model.config.min_shots, max_shots=model.config.max_shots)
    logger.info("RCE groups: %s", counts)
    groups = {q: g for q, g in groups.items() if q in data.corpus}
    pools = build_pools(data, data_args, list(groups))
    dataset = build_selector_training_dataset(data, pools, tokenizer)
    prompts = dict(zip(dataset["query_id"], dataset["prompt"], strict=True))

    def completion(query_id, demo_ids):
        position = {c: k for k, c in enumerate(pools[query_id])}
        if any(d not in position for d in demo_ids):
            return None
        return selector_completion(position[d] for d in demo_ids)

    dataset = build_rce_dataset(groups, prompts.__getitem__, completion)
    config = RCEConfig(
        output_dir=os.path.join(training_args.output_dir, "rce"),
        use_cpu=training_args.use_cpu,
        seed=training_args.seed,
        num_train_epochs=rce_args.rce_num_train_epochs,
        learning_rate=rce_args.rce_learning_rate,
        per_device_train_batch_size=rce_args.rce_per_device_train_batch_size,
        rce_temperature_start=rce_args.rce_temperature_start,
        rce_temperature_end=rce_args.rce_temperature_end,
        rce_weighting=rce_args.rce_weighting,
        logging_steps=training_args.logging_steps,
        report_to=training_args.report_to,
        disable_tqdm=training_args.disable_tqdm,
        save_strategy="no",
    )
    trainer = RCETrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    return trainer.model


