"""Building blocks shared by the end-to-end scripts (`examples/train_okvqa.py`, `generate_rl_data.py`,
`evaluate_okvqa.py`): argument dataclasses, and the functions that turn them into a corpus, a feature table, per-query
candidate pools, a selector, a scoring backend and the in-context reward.

Every script builds pools with the same `build_pools` call, so training, RL-data generation and evaluation see the
same per-query candidates (never the first K training rows for every query).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

DATASETS = ("demo", "okvqa", "vqav2")
BACKENDS = ("simulated", "qwen_vl", "vllm")


@dataclass
class DataArguments:
    """Where the items, their features and the per-query candidate pools come from."""

    dataset: str = field(
        default="demo",
        metadata={"help": "Corpus: 'demo' (the bundled synthetic world, offline), 'okvqa' or 'vqav2'."},
    )
    dataset_path: str | None = field(
        default=None,
        metadata={
            "help": "OK-VQA/VQAv2: a folder with the official question/annotation JSON files (and COCO images, see "
            "`image_root`), or a Hub dataset id."
        },
    )
    image_root: str | None = field(
        default=None, metadata={"help": "Folder holding `train2014/` and `val2014/` COCO images (default: dataset_path)."}
    )
    train_split: str = field(default="train", metadata={"help": "Split whose items are queries and demonstrations."})
    eval_split: str = field(default="val", metadata={"help": "Split of the held-out evaluation queries."})
    max_train_queries: int | None = field(
        default=None, metadata={"help": "Use only the first N training queries (None: all)."}
    )
    demo_seed: int = field(default=0, metadata={"help": "Demo world: seed of the generated world."})
    demo_preset: str = field(
        default="default",
        metadata={"help": "Demo world: regime (`trl_icd.data.demo.DEMO_PRESETS`: 'default', 'okvqa_like')."},
    )
    demo_num_train: int | None = field(
        default=None, metadata={"help": "Demo world: number of training items (None: the world's default)."}
    )
    demo_num_eval: int | None = field(
        default=None, metadata={"help": "Demo world: number of held-out queries (None: the world's default)."}
    )
    demo_num_test: int | None = field(
        default=None, metadata={"help": "Demo world: number of 'test' queries (None: the world's default)."}
    )
    features_path: str | None = field(
        default=None,
        metadata={
            "help": "A feature table saved by `examples/export_features.py` (CLIP). None: the weight-free fallback "
            "featuriser (demo world, tests)."
        },
    )
    fallback_text_dim: int = field(default=256, metadata={"help": "Fallback featuriser: text feature size."})
    pool_size: int = field(
        default=16, metadata={"help": "K: candidates per query (the selector's slots); research setting 64."}
    )
    pool_method: str = field(
        default="image_sim",
        metadata={"help": "Candidate sampler: 'random', 'image_sim', 'text_sim' or 'mix' (trl_icd.data.SAMPLERS)."},
    )
    pool_seed: int = field(default=0, metadata={"help": "Seed of the candidate sampler."})
    pool_shuffle: bool = field(
        default=False,
        metadata={
            "help": "Shuffle each pool (seeded per query) so a candidate's slot carries no similarity rank; False "
            "keeps similarity pools ranked best first."
        },
    )

    def __post_init__(self):
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.dataset != "demo" and not self.dataset_path:
            raise ValueError(f"dataset={self.dataset!r} needs `dataset_path` (a local folder or a Hub id)")
        if self.pool_size < 1:
            raise ValueError("pool_size must be >= 1")


@dataclass
class RewardArguments:
    """The scoring backend (which VLM answers the in-context prompts), reward shaping and the reward cache."""

    reward_backend: str = field(
        default="simulated",
        metadata={
            "help": "'simulated' (demo world's answerer, no model), 'qwen_vl' (Qwen2.5-VL in this process, HF "
            "transformers) or 'vllm' (an OpenAI-compatible vLLM server, see `vllm_server_url`)."
        },
    )
    reward_model_name_or_path: str = field(
        default="Qwen/Qwen2.5-VL-3B-Instruct", metadata={"help": "The VLM (Hub id or local folder) for qwen_vl/vllm."}
    )
    reward_dtype: str | None = field(
        default=None, metadata={"help": "qwen_vl: torch dtype of the VLM (None: float32 on CPU, bfloat16 on CUDA)."}
    )
    reward_device: str | None = field(
        default=None, metadata={"help": "qwen_vl: device of the VLM (None: this process's accelerator device)."}
    )
    reward_attn_implementation: str | None = field(
        default=None, metadata={"help": "qwen_vl: attention implementation (e.g. 'sdpa', 'flash_attention_2')."}
    )
    reward_batch_size: int = field(default=16, metadata={"help": "Prompts per VLM batch."})
    reward_max_new_tokens: int = field(default=5, metadata={"help": "Longest generated answer (research: 5)."})
    reward_num_beams: int = field(default=1, metadata={"help": "Beams of the answer generation (research: 3)."})
    reward_length_penalty: float = field(
        default=1.0, metadata={"help": "Length penalty of the beam search (research: 0.0 with 3 beams)."}
    )
    reward_max_pixels: int | None = field(
        default=None, metadata={"help": "Resize images to at most this many pixels (part of the cache key)."}
    )
    vllm_server_url: str | None = field(
        default=None, metadata={"help": "vllm: base URL of the OpenAI-compatible server, e.g. http://host:8000/v1."}
    )
    reward_mode: str = field(
        default="hard_plus_soft",
        metadata={"help": "Reward shaping mode (trl_icd.rewards.REWARD_MODES), e.g. 'hard_plus_gtprob_plus_rel'."},
    )
    hard_weight: float = field(default=1.0, metadata={"help": "Weight of the `hard` (correct) component."})
    soft_weight: float = field(default=1.0, metadata={"help": "Weight of `soft` (VQA accuracy) or `gt_prob`."})
    rel_weight: float = field(default=0.1, metadata={"help": "Weight of the relevance component."})
    reward_cache_path: str | None = field(
        default=None,
        metadata={"help": "SQLite reward cache shared by training, RL-data generation and evaluation (None: memory)."},
    )
    invalid_reward: float | None = field(
        default=0.0, metadata={"help": "Reward of an unscorable selection (None: excluded from its group)."}
    )
    vqa_protocol: str = field(
        default="vqa",
        metadata={
            "help": "How VQA accuracy (the reward's `soft` component and every evaluation accuracy) is scored: 'vqa' "
            "(today's official vqaEval.py: all-identical gold answers -> no normalisation, else both sides "
            "normalised), 'vqa2016' (the script's earlier version) or 'lmms_eval' (lmms-eval's OK-VQA scoring). "
            "Recorded in the reward-cache key and in evaluation results; see docs/metrics.md."
        },
    )

    def __post_init__(self):
        from .metrics import get_vqa_protocol

        get_vqa_protocol(self.vqa_protocol)
        if self.reward_backend not in BACKENDS:
            raise ValueError(f"reward_backend must be one of {BACKENDS}, got {self.reward_backend!r}")
        if self.reward_backend == "vllm" and not self.vllm_server_url:
            raise ValueError("reward_backend='vllm' needs `vllm_server_url`")


@dataclass
class SelectorArguments:
    """Architecture of a fresh selector (ignored when starting from a checkpoint)."""

    selector_min_shots: int = field(default=1, metadata={"help": "Fewest demonstrations the selector may pick."})
    selector_max_shots: int = field(default=4, metadata={"help": "Most demonstrations the selector may pick."})
    selector_overrides: str | None = field(
        default=None,
        metadata={
            "help": "Extra `ICDSelectorConfig` fields for a fresh selector, as JSON, e.g. "
            "'{\"hidden_size\": 64, \"num_layers\": 2}'."
        },
    )


@dataclass
class RCEArguments:
    """The RCE warm-up that runs before GRPO when `rce_data_path` is set (see `trl_icd.rce`)."""

    rce_data_path: str | None = field(
        default=None, metadata={"help": "Scored RL-data JSONL from `examples/generate_rl_data.py` (None: no warm-up)."}
    )
    rce_num_train_epochs: float = field(default=5.0, metadata={"help": "RCE epochs over the scored groups."})
    rce_learning_rate: float = field(default=1e-4, metadata={"help": "RCE AdamW learning rate."})
    rce_per_device_train_batch_size: int = field(default=8, metadata={"help": "Query groups per RCE step."})
    rce_temperature_start: float = field(default=2.0, metadata={"help": "τ of softmax(r/τ) at the first RCE step."})
    rce_temperature_end: float = field(default=0.5, metadata={"help": "τ at the last RCE step (linear schedule)."})
    rce_weighting: str = field(
        default="softmax", metadata={"help": "'softmax' (reward-weighted) or 'top1' (best-reward sequence only)."}
    )
    rce_drop_flat_groups: bool = field(
        default=True, metadata={"help": "Skip groups whose rewards are all equal (no preference to learn)."}
    )


# ----------------------------------------------------------------------------------------------------------------
# Corpus, features, pools
# ----------------------------------------------------------------------------------------------------------------


def parse_script_arguments(dataclass_types, argv=None, description: str | None = None) -> list:
    """Parse `argv` (and `--config recipe.yaml`) into `dataclass_types` with `TrlParser` (grouped help:
    `trl_icd.cli.ICDArgumentParser`). A training recipe may be passed as the config of the RL-data or evaluation
    script: its training-only keys are ignored there, while an unknown command-line flag is still an error."""
    from .cli import ICDArgumentParser

    parser = ICDArgumentParser(tuple(dataclass_types), description=description)
    *parsed, _, unknown_cli = parser.parse_args_and_config(
        argv, return_remaining_strings=True, separate_remaining_strings=True
    )
    if unknown_cli:
        parser.error(f"unrecognized arguments: {unknown_cli}")
    return parsed


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
    from .data.demo import build_demo_world as build

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
    from .data.okvqa import load_okvqa, load_vqav2

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
    from .data.features import FeatureTable, fallback_features

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
    from .sources import require_local, resolve_source

    if args.dataset != "demo":
        from .data.downloads import DISPLAY_NAMES, download_instructions
        from .data.okvqa import HUB_PRESETS

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
    from .data.samplers import sample_candidate_pools

    return sample_candidate_pools(
        data.corpus, data.features, list(query_ids), data.train_ids, args.pool_size, method=args.pool_method,
        seed=args.pool_seed, shuffle=args.pool_shuffle,
    )


# ----------------------------------------------------------------------------------------------------------------
# Reward
# ----------------------------------------------------------------------------------------------------------------


def build_backend(args: RewardArguments, data: DataBundle):
    """The scoring backend named by `args.reward_backend`."""
    if args.reward_backend == "simulated":
        if data.world is None:
            raise ValueError("reward_backend='simulated' answers demo-world queries only (dataset='demo')")
        from .rewards.simulated import SimulatedBackend

        return SimulatedBackend.for_world(data.world)
    # The same generation settings for both model backends, so their scores are comparable.
    generation = {"max_new_tokens": args.reward_max_new_tokens, "num_beams": args.reward_num_beams,
                  "length_penalty": args.reward_length_penalty, "max_pixels": args.reward_max_pixels}
    if args.reward_backend == "qwen_vl":
        from .rewards.qwen_vl import QwenVLBackend

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
    from .rewards.vllm import VLLMBackend

    return VLLMBackend(args.reward_model_name_or_path, base_url=args.vllm_server_url, **generation)


def build_reward(data: DataBundle, args: RewardArguments, tokenizer=None, max_shots: int | None = None, backend=None):
    """The in-context reward over `data.corpus` (selector completions are decoded with `tokenizer`)."""
    from .rewards.in_context import InContextReward

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


# ----------------------------------------------------------------------------------------------------------------
# Selector
# ----------------------------------------------------------------------------------------------------------------


def load_or_build_selector(path: str | None, data: DataBundle, data_args: DataArguments, args: SelectorArguments):
    """(model, tokenizer): loaded (strictly) from `path`, or fresh, reading `data.features` either way.

    A selector reads any table from the featuriser it was trained with (ValueError naming both featurisers
    otherwise), so a trained selector is evaluated on other splits and corpora as they are. The table stays outside
    the model: every process maps the same file, and TRL's reference model (loaded from a path) finds it in the
    process by the hash the saved config records."""
    import json

    from .selector import ICDSelectorForCausalLM, build_selector_tokenizer

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
    from .data.selector_dataset import build_selector_dataset
    from .selector.vocabulary import SelectorVocabulary

    vocabulary = SelectorVocabulary.from_tokenizer(tokenizer)
    return build_selector_dataset(data.corpus, pools, num_slots=vocabulary.num_slots, vocabulary=vocabulary)


def selector_completion(positions) -> str:
    """The selector's completion text for picking the candidates at `positions` (the stop/eos is appended by RCE)."""
    from .selector.vocabulary import SelectorVocabulary

    return " ".join(SelectorVocabulary.slot_word(int(k)) for k in positions)


def run_rce_warmup(model, tokenizer, data: DataBundle, data_args: DataArguments, reward_args: RewardArguments,
                   rce_args: RCEArguments, training_args):
    """RCE on the scored groups of `rce_args.rce_data_path`, rewards shaped as the GRPO reward shapes them; returns
    the warmed-up model. Sequences the selector cannot emit (a demonstration outside the query's pool, built by
    `build_pools` as in training, or a shot count outside its [min_shots, max_shots]) are dropped and counted, and a
    group holds one scorer's sequences only (`trl_icd.rce.group_scored_records`)."""
    from .rce import RCEConfig, RCETrainer, build_rce_dataset, group_scored_records, read_scored_jsonl
    from .rewards.shaping import shape_reward

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


# ----------------------------------------------------------------------------------------------------------------
# Selections: the selector and the retrieval baselines
# ----------------------------------------------------------------------------------------------------------------


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
    from .selector import parse_selection

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
    from .data.samplers import sample_candidate_pools

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
    from .evaluation import EvaluationResults

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


# ----------------------------------------------------------------------------------------------------------------
# End-of-run evaluation (demo world)
# ----------------------------------------------------------------------------------------------------------------


def run_demo_evaluation(model, tokenizer, data: DataBundle, data_args: DataArguments, reward_args: RewardArguments,
                        output_dir: str, log_history: list) -> dict:
    """Evaluate on the held-out queries and write `eval_results.json`, `eval_table.md`, `eval_details.json`,
    `accuracy_vs_shots.png` and `training_curves.png` to `output_dir`.

    `eval_results.json` holds one accuracy per method: `selector` = the trained selector, greedy, stopping where it
    chooses; `random` / `image_sim` / `text_sim` = each baseline at its *best* shot count in 1..max(4, max_shots)
    (a conservative bar for the selector); `oracle` = the best accuracy any selection of min_shots..max_shots items
    from the selector's pool reaches (demo world only: the simulated answerer knows it)."""
    import json
    from functools import partial

    import numpy as np

    from .evaluation import markdown_comparison_table, markdown_table, plot_accuracy_vs_shots, plot_training_curves
    from .metrics import vqa_accuracy

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
    backend = reward.backend
    oracle = [
        backend.oracle_accuracy(data.corpus[q], [data.corpus[c] for c in pools[q]], max_shots=max_shots,
                                min_shots=min_shots, accuracy=partial(vqa_accuracy, protocol=reward.vqa_protocol)
                                ).accuracy
        for q in query_ids
    ]
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
