"""Zero-contrast groups: the bookkeeping behind `ICDGRPOTrainer`'s three remedies for groups whose completions all get
the same reward (no contrast, so zero advantage in every mode: they teach nothing, yet every one was paid for).

- **drop**: such groups are taken out of the loss (no KL pull, no share of the token/row normalisers).
- **resample** (dynamic sampling, DAPO): after scoring, flat groups are replaced by contrasted groups from extra
  generation rounds over a seeded stream of training prompts, up to a bound per step; what is left flat is dropped.
- **selective rollout** (GRESO): a prompt whose last `k` scored groups were all flat is sent to the reward functions
  with probability `max(keep_prob ** k, min_keep_prob)` only; otherwise its group is skipped before any reward call.

The skip rule, and why. Flatness is sticky: a query the VLM answers the same way whatever the demonstrations (or one
the policy already solves deterministically) stays flat from one epoch to the next, so its reward calls are the ones
to save. Each further flat outcome multiplies the chance of being scored by `keep_prob`, so a query must keep proving
itself flat to be skipped more often, and one contrasted outcome resets it (`k = 0`: always scored). The floor
`min_keep_prob` bounds how long a skipped query waits before it is tried again (on average `1 / min_keep_prob`
appearances), because the policy keeps changing and a flat query can become informative. Skipped groups are never
scored, so they never update the history: their `k` stays until they are scored again. Decisions are drawn from a
generator seeded by `(seed, global step, round)` per *global* group, so every process takes the same decision, even
for a group split across processes, and a resumed run takes the same decisions as an uninterrupted one.

Everything here is independent of the policy and of the reward functions; `ICDGRPOTrainer` wires it in.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

logger = logging.getLogger(__name__)

__all__ = [
    "ROW_INDEX_COLUMN",
    "SKIP_COLUMN",
    "ZERO_CONTRAST_MODES",
    "PromptStream",
    "SkippableRewardFunction",
    "ZeroContrastCounters",
    "ZeroContrastState",
    "concat_rows",
    "keep_probability",
    "reward_usage",
    "take_rows",
    "with_row_index",
]

ZERO_CONTRAST_MODES = ("keep", "drop", "resample")

# Column added to the training dataset so the trainer knows which dataset row (and so which history) a prompt is;
# removed from every row before TRL sees it.
ROW_INDEX_COLUMN = "__icd_row_index__"
# Column the trainer adds to the rows of skipped groups; `SkippableRewardFunction` reads and removes it.
SKIP_COLUMN = "__icd_skip__"


# ---------------------------------------------------------------------------------------------------------------------
# The skip rule and its state
# ---------------------------------------------------------------------------------------------------------------------


def keep_probability(flat_streak: np.ndarray | int, keep_prob: float, min_keep_prob: float) -> np.ndarray:
    """Probability that a query whose last `flat_streak` scored groups were all flat is scored this time:
    `max(keep_prob ** flat_streak, min_keep_prob)`; 1 for a query never seen flat (streak 0)."""
    streak = np.asarray(flat_streak, dtype=np.float64)
    return np.where(streak <= 0, 1.0, np.maximum(keep_prob**streak, min_keep_prob))


@dataclass
class ZeroContrastCounters:
    """Cumulative counts over the whole run (all processes together), saved with checkpoints."""

    groups_generated: int = 0  # groups sampled from the policy (main batches and refill rounds)
    groups_skipped: int = 0  # groups never sent to the reward functions (selective rollout)
    rows_skipped: int = 0  # their rows (completions)
    groups_scored: int = 0  # groups sent to the reward functions
    groups_scored_flat: int = 0  # ... of which had no reward contrast
    groups_dropped: int = 0  # flat groups taken out of the loss ('drop'/'resample')
    groups_replaced: int = 0  # flat groups replaced by contrasted refill groups ('resample')
    refill_rounds: int = 0  # extra generation rounds ('resample')
    refill_bound_hits: int = 0  # generation batches that still had flat groups after `dynamic_sampling_max_rounds`
    rows_in_loss: int = 0  # rows of the final batches that carried a policy gradient (a contrasted group)
    rows_in_batches: int = 0  # rows of the final batches

    def add(self, **increments: int) -> None:
        for name, value in increments.items():
            setattr(self, name, getattr(self, name) + int(value))


class ZeroContrastState(TrainerCallback, ExportableState):
    """Per-dataset-row contrast history, run counters and the refill stream position: everything the zero-contrast
    handling must carry across a checkpoint. Every process holds an identical copy (it is only ever updated from
    gathered data), and the copy is saved in `trainer_state.json` (`stateful_callbacks`) and restored when training
    resumes from a checkpoint.

    `flat_streak[i]`: consecutive flat outcomes of dataset row `i` up to its last scored group;
    `times_scored[i]`: how often row `i` was scored.
    """

    def __init__(self, num_rows: int = 0):
        self.flat_streak = np.zeros(num_rows, dtype=np.int32)
        self.times_scored = np.zeros(num_rows, dtype=np.int32)
        self.counters = ZeroContrastCounters()
        self.stream_position = 0
        # What the reward functions reported (`usage()`) for the training rows, summed over processes.
        self.reward_usage: dict[str, int] = {}

    # --- history -------------------------------------------------------------------------------------------------

    def keep_probabilities(self, rows: Sequence[int], keep_prob: float, min_keep_prob: float) -> np.ndarray:
        return keep_probability(self.flat_streak[np.asarray(rows, dtype=np.int64)], keep_prob, min_keep_prob)

    def add_reward_usage(self, usage: Mapping[str, int]) -> None:
        for key, value in usage.items():
            self.reward_usage[key] = self.reward_usage.get(key, 0) + int(value)

    def record(self, rows: Sequence[int], flat: Sequence[bool]) -> None:
        """Record scored groups (one dataset row and one flat/contrasted outcome each), in order."""
        for row, is_flat in zip(rows, flat, strict=True):
            self.times_scored[row] += 1
            self.flat_streak[row] = self.flat_streak[row] + 1 if is_flat else 0

    # --- checkpoint state --------------------------------------------------------------------------------------------

    def state(self) -> dict:
        return {
            "args": {"num_rows": int(self.flat_streak.size)},
            "attributes": {
                "flat_streak": self.flat_streak.tolist(),
                "times_scored": self.times_scored.tolist(),
                "counters": asdict(self.counters),
                "stream_position": int(self.stream_position),
                "reward_usage": dict(self.reward_usage),
            },
        }

    def restore(self, saved: Mapping) -> None:
        """Load what `state()` wrote; the run resumes with the saved history, counters and stream position."""
        attributes = saved.get("attributes", {})
        num_rows = int(saved.get("args", {}).get("num_rows", self.flat_streak.size))
        if num_rows != self.flat_streak.size:
            raise ValueError(
                f"The checkpoint's zero-contrast history covers {num_rows} training rows, this run's dataset has "
                f"{self.flat_streak.size}: resume with the dataset the run started with."
            )
        self.flat_streak = np.asarray(attributes.get("flat_streak", self.flat_streak), dtype=np.int32)
        self.times_scored = np.asarray(attributes.get("times_scored", self.times_scored), dtype=np.int32)
        known = {f.name for f in fields(ZeroContrastCounters)}
        self.counters = ZeroContrastCounters(**{k: v for k, v in attributes.get("counters", {}).items() if k in known})
        self.stream_position = int(attributes.get("stream_position", 0))
        self.reward_usage = {k: int(v) for k, v in attributes.get("reward_usage", {}).items()}

    def on_train_begin(self, args, state, control, **kwargs):
        saved = state.stateful_callbacks.get(type(self).__name__)
        if isinstance(saved, dict):
            self.restore(saved)


# ---------------------------------------------------------------------------------------------------------------------
# Where refill prompts come from
# ---------------------------------------------------------------------------------------------------------------------


class PromptStream:
    """An endless, seeded sequence of training-row indices for refill rounds: a fresh permutation of the dataset per
    pass. It is a pure function of `(seed, position)`, so every process draws the same rows and a resumed run
    continues where it stopped (only the position is saved)."""

    def __init__(self, num_rows: int, seed: int):
        if num_rows < 1:
            raise ValueError("dynamic sampling needs a non-empty training dataset")
        self.num_rows = num_rows
        self.seed = seed
        self._cached_epoch, self._cached = None, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._cached_epoch != epoch:
            self._cached = np.random.default_rng([self.seed, 0x5EED, epoch]).permutation(self.num_rows)
            self._cached_epoch = epoch
        return self._cached

    def take(self, position: int, count: int) -> list[int]:
        """`count` row indices starting at `position` (the caller advances its position by `count`)."""
        out = []
        while len(out) < count:
            epoch, offset = divmod(position + len(out), self.num_rows)
            permutation = self._permutation(epoch)
            out.extend(permutation[offset : offset + count - len(out)].tolist())
        return out


class _IndexedDataset(torch.utils.data.Dataset):
    """A map-style dataset whose rows also carry their index under `ROW_INDEX_COLUMN`."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        row = self.dataset[index]
        if not isinstance(row, Mapping):
            raise TypeError(f"training rows must be dicts (TRL's format), got {type(row).__name__}")
        return {**row, ROW_INDEX_COLUMN: int(index)}


def with_row_index(dataset):
    """`dataset` with each row's index added as `ROW_INDEX_COLUMN` (a new column for a `datasets.Dataset`, a thin
    wrapper otherwise). Selective rollout and dynamic sampling need it to know which prompt a group is."""
    import datasets

    if isinstance(dataset, datasets.IterableDataset) or not hasattr(dataset, "__len__"):
        raise ValueError(
            "selective_rollout and zero_contrast_groups='resample' need a map-style training dataset (with len() and "
            "indexing), so each prompt's history and the refill stream can address rows; got an iterable dataset."
        )
    if isinstance(dataset, datasets.Dataset):
        if ROW_INDEX_COLUMN in dataset.column_names:
            dataset = dataset.remove_columns(ROW_INDEX_COLUMN)
        return dataset.add_column(ROW_INDEX_COLUMN, list(range(len(dataset))))
    return _IndexedDataset(dataset)


# ---------------------------------------------------------------------------------------------------------------------
# Reward functions that skip rows
# ---------------------------------------------------------------------------------------------------------------------


def _subset_call_arguments(kwargs: dict, keep: list[int], num_rows: int) -> dict:
    """Per-row arguments (lists of `num_rows` values) restricted to the rows in `keep`; `log_extra` is wrapped so
    the values a reward function logs for the kept rows land on those rows of the completions table."""
    out = {}
    for name, value in kwargs.items():
        if name == "log_extra" and callable(value):
            out[name] = _expanding_log_extra(value, keep, num_rows)
        elif isinstance(value, list) and len(value) == num_rows:
            out[name] = [value[i] for i in keep]
        else:
            out[name] = value
    return out


def _expanding_log_extra(log_extra: Callable, keep: list[int], num_rows: int) -> Callable:
    def expanded(column: str, values: list) -> None:
        full = [None] * num_rows
        for i, value in zip(keep, values, strict=True):
            full[i] = value
        log_extra(column, full)

    return expanded


def _expand_rewards(rewards: Sequence, keep: list[int], num_rows: int, name: str) -> list:
    if len(rewards) != len(keep):
        raise ValueError(f"The reward function {name!r} returned {len(rewards)} rewards for {len(keep)} rows.")
    # Skipped rows get a finite placeholder: the trainer marks them NaN after the gather, so TRL's "all reward
    # functions returned None" warning keeps meaning a real failure.
    full: list = [0.0] * num_rows
    for i, reward in zip(keep, rewards, strict=True):
        full[i] = reward
    return full


class SkippableRewardFunction:
    """Wraps a TRL reward function so rows marked with `SKIP_COLUMN` are never passed to it (the reward call selective
    rollout saves). Everything else is passed through unchanged; attribute access (`__name__`, `usage`, ...) reaches
    the wrapped function."""

    def __init__(self, func: Callable):
        self.func = func
        self.__name__ = getattr(func, "__name__", type(func).__name__)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.func, name)

    def _split(self, prompts, completions, completion_ids, kwargs):
        skip = kwargs.pop(SKIP_COLUMN, None)
        num_rows = len(prompts)
        if skip is None or not any(skip):
            return None, num_rows, dict(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
        keep = [i for i, s in enumerate(skip) if not s]
        arguments = _subset_call_arguments(
            dict(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs), keep, num_rows
        )
        return keep, num_rows, arguments

    def __call__(self, prompts=None, completions=None, completion_ids=None, **kwargs):
        keep, num_rows, arguments = self._split(prompts, completions, completion_ids, kwargs)
        if keep is None:
            return self.func(**arguments)
        rewards = self.func(**arguments) if keep else []
        return _expand_rewards(rewards, keep, num_rows, self.__name__)


class AsyncSkippableRewardFunction(SkippableRewardFunction):
    """`SkippableRewardFunction` for an async reward function (TRL awaits it with the others)."""

    async def __call__(self, prompts=None, completions=None, completion_ids=None, **kwargs):
        keep, num_rows, arguments = self._split(prompts, completions, completion_ids, kwargs)
        if keep is None:
            return await self.func(**arguments)
        rewards = (await self.func(**arguments)) if keep else []
        return _expand_rewards(rewards, keep, num_rows, self.__name__)


def skippable(func: Callable) -> SkippableRewardFunction:
    """The right wrapper for a sync or async reward function."""
    from trl.trainer.utils import is_async_callable

    return AsyncSkippableRewardFunction(func) if is_async_callable(func) else SkippableRewardFunction(func)


def reward_usage(reward_funcs: Sequence) -> dict[str, int]:
    """Summed `usage()` of the reward functions that report one (e.g. `InContextReward`: `rows`, `backend_calls`,
    `cached`, `rejected`); functions without it are not counted."""
    total: dict[str, int] = {}
    for func in reward_funcs:
        usage = getattr(func, "usage", None)
        if callable(usage) and not inspect.isclass(func):
            for key, value in usage().items():
                total[key] = total.get(key, 0) + int(value)
    return total


# ---------------------------------------------------------------------------------------------------------------------
# Rows of a scored batch: select and concatenate (with re-padding)
# ---------------------------------------------------------------------------------------------------------------------

# Entries aligned with the left-padded prompt, with their padding value ("pad" = the tokenizer's pad token id).
_PROMPT_ALIGNED = {"prompt_ids": "pad", "prompt_mask": 0}
# Entries aligned with the right-padded completion.
_COMPLETION_ALIGNED = {
    "completion_ids": "pad",
    "completion_mask": 0,
    "tool_mask": 0,
    "old_per_token_logps": 0.0,
    "ref_per_token_logps": 0.0,
    "sampling_per_token_logps": 0.0,
    "importance_sampling_ratio": 1.0,
    "advantages": 0.0,
}
# Entries over prompt + completion (VLM token types): split at the prompt width, padded on each side.
_SEQUENCE_ALIGNED = ("token_type_ids", "mm_token_type_ids")


def _num_rows(batch: Mapping) -> int:
    return int(batch["prompt_ids"].shape[0])


def take_rows(batch: Mapping, rows: Sequence[int]) -> dict:
    """The rows `rows` (in that order) of a scored batch whose per-row entries are tensors with one row per
    completion or lists of per-row values (pixel values already split per row with TRL's
    `split_pixel_values_by_grid`); 0-d entries are kept as they are."""
    n = _num_rows(batch)
    index = torch.as_tensor(list(rows), dtype=torch.long)
    out = {}
    for key, value in batch.items():
        if value is None or (isinstance(value, torch.Tensor) and value.dim() == 0):
            out[key] = value
        elif isinstance(value, torch.Tensor) and value.shape[0] == n:
            out[key] = value[index.to(value.device)]
        elif isinstance(value, list) and len(value) == n:
            out[key] = [value[i] for i in index.tolist()]
        else:
            raise ValueError(f"cannot select rows of batch entry {key!r} (not one value per row)")
    return out


def _pad_to(tensor: torch.Tensor, width: int, value, left: bool) -> torch.Tensor:
    missing = width - tensor.shape[1]
    if missing <= 0:
        return tensor
    pad = tensor.new_full((tensor.shape[0], missing, *tensor.shape[2:]), value)
    return torch.cat([pad, tensor] if left else [tensor, pad], dim=1)


def concat_rows(batches: Sequence[Mapping], pad_token_id: int) -> dict:
    """Scored batches (same keys, per-row entries as for `take_rows`) stacked row-wise; prompts are re-padded on the
    left, completion-aligned entries on the right, to the widest batch. 0-d entries are taken from the first batch
    (the trainer recomputes the ones it needs). An entry whose layout is unknown is an error, not a guess."""
    if not batches:
        raise ValueError("concat_rows needs at least one batch")
    keys = list(batches[0])
    for batch in batches[1:]:
        if list(batch) != keys:
            raise ValueError(f"cannot concatenate batches with different entries: {keys} vs {list(batch)}")
    prompt_width = max(b["prompt_ids"].shape[1] for b in batches)
    completion_width = max(b["completion_ids"].shape[1] for b in batches)

    def pad_value(spec):
        return pad_token_id if spec == "pad" else spec

    out = {}
    for key in keys:
        values = [b[key] for b in batches]
        first = values[0]
        if first is None:
            out[key] = None
        elif isinstance(first, list):
            out[key] = [item for value in values for item in value]
        elif first.dim() == 0:
            out[key] = first
        elif key in _PROMPT_ALIGNED:
            out[key] = torch.cat([_pad_to(v, prompt_width, pad_value(_PROMPT_ALIGNED[key]), left=True) for v in values])
        elif key in _SEQUENCE_ALIGNED:
            parts = []
            for batch, value in zip(batches, values, strict=True):
                width = batch["prompt_ids"].shape[1]
                prompt_part = _pad_to(value[:, :width], prompt_width, 0, left=True)
                completion_part = _pad_to(value[:, width:], completion_width, 0, left=False)
                parts.append(torch.cat([prompt_part, completion_part], dim=1))
            out[key] = torch.cat(parts)
        elif first.dim() == 1:
            out[key] = torch.cat(values)
        elif key in _COMPLETION_ALIGNED:
            if all(v.shape[1] == 1 for v in values) and key == "importance_sampling_ratio":  # sequence level
                out[key] = torch.cat(values)
            else:
                spec = pad_value(_COMPLETION_ALIGNED[key])
                out[key] = torch.cat([_pad_to(v, completion_width, spec, left=False) for v in values])
        else:
            raise ValueError(
                f"dynamic sampling does not know how to merge the batch entry {key!r} of shape {tuple(first.shape)}; "
                "use zero_contrast_groups='drop' (and selective_rollout) with this policy"
            )
    return out
