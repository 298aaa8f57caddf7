"""Reward-weighted cross-entropy (RCE) warm-up on scored groups of sequences.

For every query we hold a *group* of completions that were each scored by the reward (see
`examples/generate_rl_data.py`). RCE fits the policy to the group's good members:

    L = mean over groups of  Σ_i w_i · NLL(completion_i | prompt),   w = softmax(r / τ) within the group,

with τ annealed linearly from `rce_temperature_start` (2.0) to `rce_temperature_end` (0.5) over training, so early
steps imitate the whole group softly and late steps concentrate on its best members. The `top1` weighting puts all
the weight on the best-reward sequence (ties share it equally) — the "regress to the best" variant; unlike the
research code it never means "the first beam".

`RCETrainer` is a plain `transformers.Trainer` and works for any causal LM (the ICD selector or a text LM); the
negative log-likelihood covers the completion tokens only (plus the eos that ends them), exactly the tokens that
GRPO's log-probs cover afterwards.
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

logger = logging.getLogger(__name__)

RCE_WEIGHTINGS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {}


def register_rce_weighting(name: str):
    """Decorator registering `fn(rewards_of_one_group, temperature) -> weights` (NaN rewards get weight 0)."""

    def wrap(fn):
        RCE_WEIGHTINGS[name] = fn
        return fn

    return wrap


@register_rce_weighting("softmax")
def softmax_weights(rewards: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(r / τ) over the scorable members of one group."""
    if temperature <= 0:
        raise ValueError(f"RCE temperature must be > 0, got {temperature}")
    logits = (rewards / temperature).masked_fill(torch.isnan(rewards), float("-inf"))
    if torch.isinf(logits).all():
        return torch.zeros_like(rewards)
    return torch.softmax(logits, dim=0)


@register_rce_weighting("top1")
def top1_weights(rewards: torch.Tensor, temperature: float) -> torch.Tensor:
    """All weight on the best-reward member (ties share it equally); the temperature is ignored."""
    valid = ~torch.isnan(rewards)
    if not valid.any():
        return torch.zeros_like(rewards)
    best = rewards[valid].max()
    is_best = valid & (rewards == best)
    return is_best.to(rewards.dtype) / is_best.sum()


def rce_temperature(step: int, total_steps: int, start: float = 2.0, end: float = 0.5) -> float:
    """τ(step) = start + (end − start) · min(1, step / (T − 1)): `start` at the first step, `end` at the last."""
    if total_steps <= 1:
        return float(start if step <= 0 else end)
    frac = min(1.0, max(0, step) / (total_steps - 1))
    return float(start + (end - start) * frac)


def rce_group_weights(
    rewards: torch.Tensor, group_index: torch.Tensor, temperature: float, weighting: str = "softmax"
) -> torch.Tensor:
    """Per-sequence weights for a flat batch of sequences; `group_index[j]` names the group of sequence j."""
    if weighting not in RCE_WEIGHTINGS:
        raise ValueError(f"unknown RCE weighting {weighting!r}; valid: {sorted(RCE_WEIGHTINGS)}")
    fn = RCE_WEIGHTINGS[weighting]
    weights = torch.zeros_like(rewards)
    for g in torch.unique(group_index):
        members = group_index == g
        weights[members] = fn(rewards[members], temperature)
    return weights


def rce_loss(
    nll: torch.Tensor,
    rewards: torch.Tensor,
    group_index: torch.Tensor,
    temperature: float,
    weighting: str = "softmax",
) -> torch.Tensor:
    """mean over groups of Σ_i w_i · nll_i (weights carry no gradient)."""
    weights = rce_group_weights(rewards.detach().float(), group_index, temperature, weighting).to(nll.dtype)
    num_groups = torch.unique(group_index).numel()
    return (weights * nll).sum() / max(num_groups, 1)


def completion_nll(logits: torch.Tensor, completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Summed negative log-likelihood of each row's completion tokens.

    `logits` are the model's logits for the completion positions, aligned so that `logits[:, t]` predicts
    `completion_ids[:, t]` (i.e. taken one position earlier in the full sequence)."""
    logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    return -(logps * completion_mask).sum(dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# Data: one row = one query's scored group
# ----------------------------------------------------------------------------------------------------------------


def read_scored_jsonl(path: str) -> list[dict]:
    """Read a scored RL-data file (JSON Lines, one scored sequence per line); a malformed line is an error."""
    records = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not JSON ({err})") from err
            for key in ("query_id", "demo_ids", "components"):
                if key not in rec:
                    raise ValueError(f"{path}:{n}: missing {key!r}")
            records.append(rec)
    return records


def group_scored_records(
    records: Iterable[Mapping[str, Any]],
    reward_fn: Callable[[Mapping[str, float]], float],
    drop_flat_groups: bool = True,
    min_shots: int | None = None,
    max_shots: int | None = None,
    scorer: str | None = None,
) -> tuple[dict[Any, list[tuple[tuple, float]]], dict[str, int]]:
    """Group scored sequences by query, de-duplicating identical ordered selections (first score kept).

    Only comparable sequences share a group: rewards of different scorers (`"scorer"` field: model, prompt, VQA
    protocol, ...) are not. With `scorer`, records of any other scorer are dropped; without it, a query whose records
    come from several scorers keeps those of the scorer with the most distinct sequences (ties: the first seen).
    Sequences the policy can never emit — fewer than `min_shots` or more than `max_shots` demonstrations — are
    dropped: under the selector's masks their NLL is ~1e4 and would swamp the loss. Every drop is counted and logged;
    when no sequence is left at all, a `ValueError` says why.

    Returns `{query_id: [(demo_ids, reward), ...]}` and counts (`queries`, `sequences`, `duplicates`,
    `outside_shot_range`, `other_scorer`, `mixed_scorer_queries`, `mixed_scorer_sequences`, `flat_groups`,
    `dropped_flat_groups`). A flat group (every reward equal) carries no preference; by default it is dropped and
    counted rather than imitated uniformly."""
    groups: dict[Any, dict[Any, dict[tuple, float]]] = defaultdict(lambda: defaultdict(dict))
    counts = defaultdict(int)
    total = 0
    for rec in records:
        total += 1
        demos = tuple(rec["demo_ids"])
        if (min_shots is not None and len(demos) < min_shots) or (max_shots is not None and len(demos) > max_shots):
            counts["outside_shot_range"] += 1
            continue
        record_scorer = rec.get("scorer")
        if scorer is not None and record_scorer != scorer:
            counts["other_scorer"] += 1
            continue
        group = groups[rec["query_id"]][record_scorer]
        if demos in group:
            counts["duplicates"] += 1
            continue
        group[demos] = float(reward_fn(rec["components"]))
    _log_dropped_records(counts, total, min_shots, max_shots, scorer)
    out = {}
    for qid, by_scorer in groups.items():
        kept = max(by_scorer, key=lambda name: len(by_scorer[name]))
        if len(by_scorer) > 1:
            counts["mixed_scorer_queries"] += 1
            counts["mixed_scorer_sequences"] += sum(len(g) for name, g in by_scorer.items() if name != kept)
        group = by_scorer[kept]
        values = [r for r in group.values() if not math.isnan(r)]
        if not values:
            continue
        if max(values) == min(values):
            counts["flat_groups"] += 1
            if drop_flat_groups:
                counts["dropped_flat_groups"] += 1
                continue
        out[qid] = list(group.items())
        counts["sequences"] += len(group)
    if counts["mixed_scorer_queries"]:
        logger.warning(
            "RCE data: %d queries hold sequences of several scorers; each keeps one scorer's sequences (%d sequences "
            "of other scorers dropped)", counts["mixed_scorer_queries"], counts["mixed_scorer_sequences"],
        )
    counts["queries"] = len(out)
    return out, dict(counts)


def _log_dropped_records(counts, total: int, min_shots, max_shots, scorer) -> None:
    """Log the records `group_scored_records` dropped before grouping; refuse when none is left."""
    outside, other = counts["outside_shot_range"], counts["other_scorer"]
    if outside:
        logger.warning(
            "RCE data: %d of %d scored sequences have a number of demonstrations outside [%s, %s], which the policy "
            "can never emit; dropped", outside, total, min_shots, max_shots,
        )
    if other:
        logger.warning("RCE data: %d of %d scored sequences come from other scorers than %s; dropped", other, total,
                       scorer)
    if total and outside + other == total:
        raise ValueError(
            f"RCE data: none of the {total} scored sequences is usable ({outside} with a number of demonstrations "
            f"outside [{min_shots}, {max_shots}], {other} from other scorers than {scorer}); generate RL data with "
            "the policy's shot range and scorer"
        )


def build_rce_dataset(
    groups: Mapping[Any, Sequence[tuple[tuple, float]]],
    prompt_fn: Callable[[Any], str],
    completion_fn: Callable[[Any, tuple], str | None],
):
    """A `datasets.Dataset` with one row per query: `query_id`, `prompt` (str), `completions` (list of str),
    `rewards` (list of float).

    `prompt_fn(query_id)` renders the policy's prompt; `completion_fn(query_id, demo_ids)` renders a selection as the
    policy would write it, or returns None when it cannot (e.g. a demonstration outside the query's pool): such
    sequences are dropped, counted and logged, and a query left with fewer than two sequences is dropped."""
    from datasets import Dataset

    rows = {"query_id": [], "prompt": [], "completions": [], "rewards": []}
    unrenderable = 0
    for qid, members in groups.items():
        completions, rewards = [], []
        for demos, reward in members:
            text = completion_fn(qid, demos)
            if text is None:
                unrenderable += 1
                continue
            completions.append(text)
            rewards.append(float(reward))
        if len(completions) < 2:
            continue
        rows["query_id"].append(qid)
        rows["prompt"].append(prompt_fn(qid))
        rows["completions"].append(completions)
        rows["rewards"].append(rewards)
    if unrenderable:
        logger.warning("RCE data: %d scored sequences could not be rendered for the policy and were dropped", unrenderable)
    if not rows["prompt"]:
        raise ValueError("RCE data: no query has two or more usable scored sequences")
    logger.info("RCE data: %d queries, %d sequences", len(rows["prompt"]), sum(map(len, rows["completions"])))
    return Dataset.from_dict(rows)


@dataclass
class RCEConfig(TrainingArguments):
    """Training arguments of the RCE warm-up (`RCETrainer`). Defaults follow the research warm-up: AdamW at 1e-4,
    no schedule, gradient-norm clip 1.0, τ 2.0 → 0.5, 5 epochs."""

    rce_temperature_start: float = field(
        default=2.0, metadata={"help": "Softmax temperature τ of the reward weights at the first step."}
    )
    rce_temperature_end: float = field(
        default=0.5, metadata={"help": "τ at the last step; τ moves linearly from start to end over training."}
    )
    rce_weighting: str = field(
        default="softmax",
        metadata={
            "help": "How rewards become weights within a group: `softmax` (softmax(r/τ)) or `top1` (all weight on "
            "the best-reward sequence, ties shared). Registry: `trl_icd.rce.RCE_WEIGHTINGS`."
        },
    )
    rce_append_eos: bool = field(
        default=True, metadata={"help": "End every completion with the eos token (the policy's stop decision)."}
    )
    max_prompt_length: int | None = field(
        default=None, metadata={"help": "Keep only the last N prompt tokens (None: no truncation)."}
    )
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate (research RCE: 1e-4)."})
    num_train_epochs: float = field(default=5.0, metadata={"help": "Epochs over the scored groups."})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "Learning-rate schedule."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Query groups per device per step."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep the `completions`/`rewards` columns (RCE needs them)."}
    )
    bf16: bool = field(default=False, metadata={"help": "bf16 mixed precision (off: the selector is tiny)."})

    def __post_init__(self):
        super().__post_init__()
        if self.rce_weighting not in RCE_WEIGHTINGS:
            raise ValueError(f"unknown rce_weighting {self.rce_weighting!r}; valid: {sorted(RCE_WEIGHTINGS)}")
        if self.rce_temperature_start <= 0 or self.rce_temperature_end <= 0:
            raise ValueError("RCE temperatures must be > 0")


class RCECollator:
    """Tokenises groups and flattens them into sequences, laid out as GRPO lays them out: prompts left-padded,
    completions (+ eos) right-padded, so the policy sees exactly the inputs GRPO will show it."""

    def __init__(self, tokenizer, append_eos: bool = True, max_prompt_length: int | None = None):
        self.tokenizer = tokenizer
        self.append_eos = append_eos
        self.max_prompt_length = max_prompt_length
        if tokenizer.pad_token_id is None:
            raise ValueError("RCE needs a tokenizer with a pad token")
        if append_eos and tokenizer.eos_token_id is None:
            raise ValueError("append_eos=True needs a tokenizer with an eos token")

    def _encode_completion(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        unk = self.tokenizer.unk_token_id
        if unk is not None and unk in ids:
            raise ValueError(f"completion {text[:80]!r} contains a word the policy's tokenizer does not know")
        if self.append_eos and (not ids or ids[-1] != self.tokenizer.eos_token_id):
            ids = ids + [self.tokenizer.eos_token_id]
        return ids

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        prompts, completions, rewards, groups = [], [], [], []
        for g, row in enumerate(rows):
            prompt_ids = self.tokenizer(row["prompt"])["input_ids"]
            if self.max_prompt_length is not None:
                prompt_ids = prompt_ids[-self.max_prompt_length :]
            for text, reward in zip(row["completions"], row["rewards"], strict=True):
                prompts.append(prompt_ids)
                completions.append(self._encode_completion(text))
                rewards.append(float("nan") if reward is None else float(reward))
                groups.append(g)
        pad = self.tokenizer.pad_token_id
        p_len = max(map(len, prompts))
        c_len = max(map(len, completions))
        n = len(prompts)
        prompt_ids = torch.full((n, p_len), pad, dtype=torch.long)
        prompt_mask = torch.zeros((n, p_len), dtype=torch.long)
        completion_ids = torch.full((n, c_len), pad, dtype=torch.long)
        completion_mask = torch.zeros((n, c_len), dtype=torch.long)
        for j, (p, c) in enumerate(zip(prompts, completions)):
            prompt_ids[j, p_len - len(p) :] = torch.tensor(p)
            prompt_mask[j, p_len - len(p) :] = 1
            completion_ids[j, : len(c)] = torch.tensor(c)
            completion_mask[j, : len(c)] = 1
        return {
            "prompt_ids": prompt_ids,
            "prompt_mask": prompt_mask,
            "completion_ids": completion_ids,
            "completion_mask": completion_mask,
            "rewards": torch.tensor(rewards, dtype=torch.float32),
            "group_index": torch.tensor(groups, dtype=torch.long),
        }


def sequence_nll(model, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """NLL of each sequence's completion under `model` (a causal LM called as GRPO calls it)."""
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    c_len = batch["completion_ids"].size(1)
    logits = logits[:, -c_len - 1 : -1]
    return completion_nll(logits, batch["completion_ids"], batch["completion_mask"].to(logits.dtype))


class RCETrainer(Trainer):
    """`transformers.Trainer` for the RCE warm-up. Train dataset: rows with `prompt`, `completions`, `rewards`
    (`build_rce_dataset`); `args` is an `RCEConfig`. Logs `rce/temperature`, `rce/best_nll` (NLL of each group's
    best sequence) and `rce/weight_entropy`."""

    loss_is_scaled_for_ga = False  # a per-batch mean: Trainer divides by the accumulation steps

    def __init__(self, model, args=None, train_dataset=None, eval_dataset=None, processing_class=None, **kwargs):
        if processing_class is None:
            raise ValueError("RCETrainer needs `processing_class` (the policy's tokenizer)")
        if args is None:
            args = RCEConfig(output_dir="rce_output")
        elif not isinstance(args, RCEConfig):
            raise TypeError(f"RCETrainer needs an RCEConfig, got {type(args).__name__}")
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        data_collator = kwargs.pop("data_collator", None) or RCECollator(
            tokenizer,
            append_eos=getattr(args, "rce_append_eos", True),
            max_prompt_length=getattr(args, "max_prompt_length", None),
        )
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        self._rce_metrics: dict[str, list[float]] = defaultdict(list)

    def _set_signature_columns_if_needed(self):
        self._signature_columns = ["prompt", "completions", "rewards"]

    def current_temperature(self) -> float:
        total = self.state.max_steps if self.state.max_steps and self.state.max_steps > 0 else 1
        return rce_temperature(
            self.state.global_step, total, self.args.rce_temperature_start, self.args.rce_temperature_end
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        nll = sequence_nll(model, inputs)
        rewards, group_index = inputs["rewards"], inputs["group_index"]
        temperature = self.current_temperature()
        loss = rce_loss(nll, rewards, group_index, temperature, self.args.rce_weighting)
        with torch.no_grad():
            weights = rce_group_weights(rewards.float(), group_index, temperature, self.args.rce_weighting)
            entropy = -(weights * torch.log(weights.clamp_min(1e-12))).sum() / torch.unique(group_index).numel()
            best = rce_group_weights(rewards.float(), group_index, 1.0, "top1") > 0
            mode = "train" if model.training else "eval"
            self._rce_metrics[f"{mode}/temperature"].append(temperature)
            self._rce_metrics[f"{mode}/weight_entropy"].append(float(entropy))
            self._rce_metrics[f"{mode}/best_nll"].append(float(nll.detach()[best].mean()))
        return (loss, {"nll": nll}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        for key in list(self._rce_metrics):
            if key.startswith(mode + "/"):
                values = self._rce_metrics.pop(key)
                if values:
                    logs[f"{prefix}rce/{key.split('/', 1)[1]}"] = sum(values) / len(values)
        super().log(logs, start_time)
