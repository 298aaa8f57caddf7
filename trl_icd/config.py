"""Training configurations: TRL's config dataclasses extended with the fields this package adds. Every field has help
text, so `TrlParser`, `HfArgumentParser` and YAML recipes see it."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from trl import GRPOConfig

from .advantages import ADVANTAGE_MODES
from .zero_contrast import ZERO_CONTRAST_MODES

logger = logging.getLogger(__name__)

__all__ = ["ICDGRPOConfig"]


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class ICDGRPOConfig(GRPOConfig):
    """`GRPOConfig` plus the group-advantage settings and the adaptive KL coefficient of `ICDGRPOTrainer`.

    The advantage fields replace TRL's `scale_rewards` normalisation (`advantage_mode="mean"` is TRL's
    `scale_rewards="none"`, `"batch"` its `"batch"`); reward weights and `multi_objective_aggregation` still apply.
    """

    advantage_mode: str = field(
        default="zscore",
        metadata={
            "help": "How rewards become advantages within each group of `num_generations` completions: 'zscore' "
            "((r - mean) / max(std, advantage_min_std)), 'rank' (tie-aware within-group rank mapped to [-1, 1]), "
            "'mean' (r - mean, Dr. GRPO), 'batch' (group mean, batch std), 'rloo' (leave-one-out mean), or any mode "
            "registered with `trl_icd.register_advantage`."
        },
    )
    advantage_min_std: float = field(
        default=0.1,
        metadata={
            "help": "Floor of the std the 'zscore' and 'batch' modes divide by, so a group whose rewards differ by "
            "almost nothing does not get unit-size advantages. 0 disables the floor."
        },
    )
    advantage_clip: float | None = field(
        default=5.0,
        metadata={"help": "Advantages are clipped to [-advantage_clip, advantage_clip]; null/None disables clipping."},
    )
    adaptive_kl: bool = field(
        default=False,
        metadata={
            "help": "Adapt the KL coefficient `beta` after every optimiser step: multiply it by `adaptive_kl_factor` "
            "when the measured KL exceeds `adaptive_kl_upper`, divide it when the KL is below `adaptive_kl_lower`, "
            "then clamp it to [adaptive_kl_beta_min, adaptive_kl_beta_max]. Needs `beta` > 0 (the starting value)."
        },
    )
    adaptive_kl_lower: float = field(
        default=0.01, metadata={"help": "Lower end of the target KL band: below it, beta is divided by the factor."}
    )
    adaptive_kl_upper: float = field(
        default=0.1, metadata={"help": "Upper end of the target KL band: above it, beta is multiplied by the factor."}
    )
    adaptive_kl_factor: float = field(
        default=1.5, metadata={"help": "Multiplicative step of the adaptive KL coefficient (> 1)."}
    )
    adaptive_kl_beta_min: float = field(
        default=0.001, metadata={"help": "Smallest value the adaptive KL coefficient may take (> 0)."}
    )
    adaptive_kl_beta_max: float = field(
        default=10.0, metadata={"help": "Largest value the adaptive KL coefficient may take."}
    )

    zero_contrast_groups: str = field(
        default="keep",
        metadata={
            "help": "What happens to a group whose completions all got the same reward (no contrast: zero advantage "
            "in every mode). 'keep': stock GRPO (the group still feels the KL term and dilutes the loss "
            "normalisation). 'drop': the group is taken out of the loss entirely. 'resample' (dynamic sampling, "
            "DAPO): flat groups are replaced by contrasted groups from extra generation rounds over fresh training "
            "prompts (at most `dynamic_sampling_max_rounds` per generation batch); groups still flat after that are "
            "dropped."
        },
    )
    dynamic_sampling_max_rounds: int = field(
        default=2,
        metadata={
            "help": "zero_contrast_groups='resample': most extra generation rounds (each the size of a generation "
            "batch) per generation batch. When the bound is hit with flat groups left, they are dropped and "
            "`zero_contrast/refill_bound_hits` counts it."
        },
    )
    selective_rollout: bool = field(
        default=False,
        metadata={
            "help": "Skip, before any reward call, the groups of prompts predicted flat from their own history "
            "(GRESO): a prompt whose last k scored groups were all flat is scored with probability "
            "max(selective_rollout_keep_prob ** k, selective_rollout_min_keep_prob); a contrasted group resets k. "
            "Skipped groups get no reward (advantage 0) and count in `zero_contrast/queries_skipped`."
        },
    )
    selective_rollout_keep_prob: float = field(
        default=0.5,
        metadata={"help": "Selective rollout: each further flat outcome multiplies a prompt's scoring probability "
                          "by this (in (0, 1])."},
    )
    selective_rollout_min_keep_prob: float = field(
        default=0.05,
        metadata={"help": "Selective rollout: floor of a prompt's scoring probability, so a skipped prompt is retried "
                          "after about 1/this appearances (in (0, 1])."},
    )

    plateau_stopping_metric: str | None = field(
        default=None,
        metadata={
            "help": "Stop training when this logged training metric (e.g. 'reward') has plateaued: its moving average "
            "over `plateau_stopping_window` logged values has not improved on its best by more than "
            "`plateau_stopping_min_delta` for `plateau_stopping_patience` logged values (one per `logging_steps`). "
            "None: train for the configured steps/epochs."
        },
    )
    plateau_stopping_mode: str = field(
        default="max", metadata={"help": "'max': a higher metric is better (a reward); 'min': lower is better."}
    )
    plateau_stopping_patience: int = field(
        default=10, metadata={"help": "Logged values without improvement before training stops."}
    )
    plateau_stopping_min_delta: float = field(
        default=0.0, metadata={"help": "Smallest change of the moving average that counts as an improvement."}
    )
    plateau_stopping_window: int = field(
        default=5, metadata={"help": "Logged values in the moving average the plateau rule compares."}
    )

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.plateau_stopping_metric, str) and self.plateau_stopping_metric.lower() in ("", "none"):
            self.plateau_stopping_metric = None  # the command line's way of saying "off"
        _require(
            self.plateau_stopping_mode in ("max", "min"),
            f"plateau_stopping_mode must be 'max' or 'min', got {self.plateau_stopping_mode!r}.",
        )
        _require(
            isinstance(self.plateau_stopping_patience, int) and self.plateau_stopping_patience >= 1
            and isinstance(self.plateau_stopping_window, int) and self.plateau_stopping_window >= 1,
            "plateau_stopping_patience and plateau_stopping_window must be integers >= 1.",
        )
        _require(
            _is_number(self.plateau_stopping_min_delta) and self.plateau_stopping_min_delta >= 0,
            f"plateau_stopping_min_delta must be a number >= 0, got {self.plateau_stopping_min_delta!r}.",
        )
        _require(
            self.zero_contrast_groups in ZERO_CONTRAST_MODES,
            f"Unknown zero_contrast_groups {self.zero_contrast_groups!r}; valid: {', '.join(ZERO_CONTRAST_MODES)}.",
        )
        _require(
            isinstance(self.dynamic_sampling_max_rounds, int) and self.dynamic_sampling_max_rounds >= 1,
            f"dynamic_sampling_max_rounds must be an integer >= 1, got {self.dynamic_sampling_max_rounds!r}.",
        )
        if self.zero_contrast_groups == "resample":
            local_rows = self.per_device_train_batch_size * self.steps_per_generation
            _require(
                local_rows % self.num_generations == 0,
                "zero_contrast_groups='resample' replaces whole groups inside each process, so each process must hold "
                f"whole groups: per_device_train_batch_size * steps_per_generation ({local_rows}) must be a multiple "
                f"of num_generations ({self.num_generations}).",
            )
        for name in ("selective_rollout_keep_prob", "selective_rollout_min_keep_prob"):
            value = getattr(self, name)
            _require(_is_number(value) and 0 < value <= 1, f"{name} must lie in (0, 1], got {value!r}.")
        _require(
            self.advantage_mode in ADVANTAGE_MODES,
            f"Unknown advantage_mode {self.advantage_mode!r}. Valid modes: {', '.join(sorted(ADVANTAGE_MODES))} "
            "(register new ones with trl_icd.register_advantage before building the config).",
        )
        _require(
            _is_number(self.advantage_min_std) and self.advantage_min_std >= 0,
            f"advantage_min_std must be a finite number >= 0, got {self.advantage_min_std!r}.",
        )
        _require(
            self.advantage_clip is None or (_is_number(self.advantage_clip) and self.advantage_clip > 0),
            f"advantage_clip must be None (no clipping) or a number > 0, got {self.advantage_clip!r}.",
        )
        _require(
            _is_number(self.adaptive_kl_lower) and _is_number(self.adaptive_kl_upper)
            and 0 <= self.adaptive_kl_lower < self.adaptive_kl_upper,
            "The adaptive KL band needs 0 <= adaptive_kl_lower < adaptive_kl_upper, got "
            f"{self.adaptive_kl_lower!r} and {self.adaptive_kl_upper!r}.",
        )
        _require(
            _is_number(self.adaptive_kl_factor) and self.adaptive_kl_factor > 1,
            f"adaptive_kl_factor must be > 1, got {self.adaptive_kl_factor!r}.",
        )
        _require(
            _is_number(self.adaptive_kl_beta_min) and _is_number(self.adaptive_kl_beta_max)
            and 0 < self.adaptive_kl_beta_min <= self.adaptive_kl_beta_max,
            "The adaptive KL bounds need 0 < adaptive_kl_beta_min <= adaptive_kl_beta_max, got "
            f"{self.adaptive_kl_beta_min!r} and {self.adaptive_kl_beta_max!r}.",
        )
        if self.adaptive_kl:
            _require(
                self.adaptive_kl_beta_min <= self.beta <= self.adaptive_kl_beta_max,
                f"adaptive_kl=True starts from beta={self.beta!r}, which must lie in [adaptive_kl_beta_min, "
                f"adaptive_kl_beta_max] = [{self.adaptive_kl_beta_min}, {self.adaptive_kl_beta_max}] (with beta=0 TRL "
                "loads no reference model and computes no KL).",
            )
        if self.scale_rewards != "group":
            logger.warning(
                "scale_rewards=%r has no effect with ICDGRPOTrainer: advantage_mode=%r decides the normalisation "
                "(use advantage_mode='mean' for scale_rewards='none', 'batch' for 'batch').",
                self.scale_rewards,
                self.advantage_mode,
            )


# The RCE warm-up's arguments are defined next to their trainer (`trl_icd.rce`) and exported with the other configs.
from .rce import RCEConfig  # noqa: E402

__all__.append("RCEConfig")
