"""The end-to-end scripts' arguments: where the data, features and pools come from, the scoring backend and
reward shaping, a fresh selector's architecture, the RCE warm-up; and the parser that reads them (with `--config`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

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
        from ..metrics import get_vqa_protocol

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






def parse_script_arguments(dataclass_types, argv=None, description: str | None = None) -> list:
    """Parse `argv` (and `--config recipe.yaml`) into `dataclass_types` with `TrlParser` (grouped help:
    `trl_icd.cli.ICDArgumentParser`). A training recipe may be passed as the config of the RL-data or evaluation
    script: its training-only keys are ignored there, while an unknown command-line flag is still an error."""
    from ..cli import ICDArgumentParser

    parser = ICDArgumentParser(tuple(dataclass_types), description=description)
    *parsed, _, unknown_cli = parser.parse_args_and_config(
        argv, return_remaining_strings=True, separate_remaining_strings=True
    )
    if unknown_cli:
        parser.error(f"unrecognized arguments: {unknown_cli}")
    return parsed


