"""`ICDGRPOTrainer`: TRL's `GRPOTrainer` with selectable group advantages, advantage diagnostics, an adaptive KL
coefficient, and handling of zero-contrast groups (drop, dynamic sampling, selective rollout; `trl_icd.zero_contrast`).
Everything else (generation, rewards, loss, vLLM, PEFT, DeepSpeed, VLM inputs) is stock TRL: the trainer replaces the
advantages TRL computed after TRL has gathered the rewards of every process, chooses which rows are scored and which
reach the loss, and never looks inside the policy or the reward functions."""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState
from trl import GRPOTrainer
from trl.trainer.utils import split_pixel_values_by_grid, unsplit_pixel_values_by_grid

from .advantages import advantage_stats, aggregate_rewards, compute_group_advantages, group_has_contrast
from .config import ICDGRPOConfig
from .stopping import PlateauStoppingCallback
from .zero_contrast import (
    ROW_INDEX_COLUMN,
    SKIP_COLUMN,
    PromptStream,
    ZeroContrastState,
    concat_rows,
    reward_usage,
    skippable,
    take_rows,
    with_row_index,
)

logger = logging.getLogger(__name__)

__all__ = ["AdaptiveKLCallback", "ICDGRPOTrainer", "adapt_kl_beta"]

# Loss types whose normaliser counts rows (per-sequence means averaged over the micro-batch, or a fixed per-row
# length): dropped rows would dilute them, so the loss is rescaled to the contrasted rows. Token-normalised types
# (`dapo`, `cispo`, `vespo`) get the contrasted token count as `num_items_in_batch` instead; `bnpo` normalises by the
# micro-batch's own masked token count, which already excludes dropped rows.
_ROW_NORMALISED_LOSSES = ("grpo", "sapo", "dr_grpo", "luspo")
# Private entries of a scored batch: rows that reach the loss, and their number in the whole generation batch.
_ACTIVE_ROWS = "__icd_active_rows__"
_NUM_ACTIVE_ROWS = "__icd_num_active_rows__"


def adapt_kl_beta(
    beta: float,
    kl: float,
    lower: float = 0.01,
    upper: float = 0.1,
    factor: float = 1.5,
    beta_min: float = 0.001,
    beta_max: float = 10.0,
) -> float:
    """One adaptive-KL update: `beta * factor` if `kl > upper`, `beta / factor` if `kl < lower`, else `beta`; then
    clamped to `[beta_min, beta_max]`. Keeps the policy's drift from the reference inside a target band."""
    if kl > upper:
        beta = beta * factor
    elif kl < lower:
        beta = beta / factor
    return min(beta_max, max(beta_min, beta))


class AdaptiveKLCallback(TrainerCallback, ExportableState):
    """Owns the adaptive KL coefficient. The trainer reports the KL it measured in each micro-batch (`observe`); after
    every optimiser step the coefficient is updated from the step's mean KL. The value is saved with checkpoints
    (`TrainerState.stateful_callbacks`) and restored when training resumes from one."""

    def __init__(
        self,
        beta: float,
        lower: float = 0.01,
        upper: float = 0.1,
        factor: float = 1.5,
        beta_min: float = 0.001,
        beta_max: float = 10.0,
    ):
        self.beta = float(beta)
        self.lower, self.upper, self.factor = lower, upper, factor
        self.beta_min, self.beta_max = beta_min, beta_max
        self._step_kl: list[float] = []
        self._warned_no_kl = False

    def observe(self, kl: float) -> None:
        if kl is not None and math.isfinite(kl):
            self._step_kl.append(float(kl))

    def on_step_end(self, args, state, control, **kwargs):
        if not self._step_kl:
            if not self._warned_no_kl:
                logger.warning("Adaptive KL: no KL measured in optimiser step %d; beta unchanged.", state.global_step)
                self._warned_no_kl = True
            return
        kl = sum(self._step_kl) / len(self._step_kl)
        self._step_kl.clear()
        self.beta = adapt_kl_beta(
            self.beta, kl, self.lower, self.upper, self.factor, self.beta_min, self.beta_max
        )

    def on_train_begin(self, args, state, control, **kwargs):
        saved = state.stateful_callbacks.get(type(self).__name__)
        if isinstance(saved, dict) and "beta" in saved.get("args", {}):
            self.beta = float(saved["args"]["beta"])
        self._step_kl.clear()

    def state(self) -> dict:
        return {
            "args": {
                "beta": self.beta,
                "lower": self.lower,
                "upper": self.upper,
                "factor": self.factor,
                "beta_min": self.beta_min,
                "beta_max": self.beta_max,
            },
            "attributes": {},
        }


class ICDGRPOTrainer(GRPOTrainer):
    """`GRPOTrainer` whose advantages come from `trl_icd.compute_group_advantages` (`args.advantage_mode`,
    `args.advantage_min_std`, `args.advantage_clip`), with an optional adaptive KL coefficient and the zero-contrast
    remedies of `trl_icd.zero_contrast` (`args.zero_contrast_groups`, `args.selective_rollout`).

    Takes exactly `GRPOTrainer`'s arguments; `args` must be an `ICDGRPOConfig`. Works with any policy TRL accepts
    (causal LMs, vision-language models, PEFT models) and any reward functions.

    Logged (train and `eval_`): `advantages/std`, `advantages/mean`, `advantages/max_abs`,
    `rewards/within_group_std`, `frac_reward_zero_std`, `frac_unscorable`, and `kl_beta` with adaptive KL. The
    per-sample advantages in TRL's completion logs are the ones used in the loss. Training also logs
    `zero_contrast/frac_rows_with_gradient` and cumulative counts: `zero_contrast/queries_skipped`,
    `zero_contrast/groups_dropped`, `zero_contrast/refill_rounds`, `zero_contrast/refill_bound_hits`, and, for reward
    functions that report `usage()` (e.g. `InContextReward`), `reward_calls/sent` (calls that reached the scoring
    backend), `reward_calls/cached`, `reward_calls/rejected`; `cost_summary()` returns them all.
    """

    _tag_names = ["trl", "grpo", "trl-icd"]

    def __init__(
        self, model, reward_funcs=None, args: ICDGRPOConfig | None = None, train_dataset=None, *trainer_args,
        **trainer_kwargs,
    ):
        if args is None:
            name = model if isinstance(model, str) else (model.config._name_or_path or type(model).__name__)
            args = ICDGRPOConfig(f"{name.split('/')[-1]}-ICDGRPO")
        if not isinstance(args, ICDGRPOConfig):
            raise TypeError(
                f"ICDGRPOTrainer needs an ICDGRPOConfig (GRPOConfig plus the advantage fields), got {type(args).__name__}."
            )
        self._gathered_rewards_per_func: torch.Tensor | None = None
        self._skip_rows: torch.Tensor | None = None  # global skip mask of the round being scored
        self._fixed_beta = args.beta
        self._rows_known = args.selective_rollout or args.zero_contrast_groups == "resample"
        if self._rows_known and train_dataset is not None:
            train_dataset = with_row_index(train_dataset)
        super().__init__(model, reward_funcs, args, train_dataset, *trainer_args, **trainer_kwargs)
        if args.adaptive_kl:
            self.add_callback(
                AdaptiveKLCallback(
                    beta=args.beta,
                    lower=args.adaptive_kl_lower,
                    upper=args.adaptive_kl_upper,
                    factor=args.adaptive_kl_factor,
                    beta_min=args.adaptive_kl_beta_min,
                    beta_max=args.adaptive_kl_beta_max,
                )
            )
        if args.plateau_stopping_metric:
            self.add_callback(
                PlateauStoppingCallback(
                    metric=args.plateau_stopping_metric,
                    patience=args.plateau_stopping_patience,
                    min_delta=args.plateau_stopping_min_delta,
                    window=args.plateau_stopping_window,
                    mode=args.plateau_stopping_mode,
                )
            )
        num_rows = len(self.train_dataset) if self._rows_known and self.train_dataset is not None else 0
        self.add_callback(ZeroContrastState(num_rows=num_rows))
        self._prompt_stream = (
            PromptStream(num_rows, args.seed) if args.zero_contrast_groups == "resample" and num_rows else None
        )
        if args.selective_rollout:
            self.reward_funcs = [f if isinstance(f, torch.nn.Module) else skippable(f) for f in self.reward_funcs]
        if args.zero_contrast_groups != "keep" and self.loss_type in _ROW_NORMALISED_LOSSES and (
            args.entropy_coef or self.aux_loss_enabled
        ):
            logger.warning(
                "zero_contrast_groups=%r with loss_type=%r rescales the whole loss to the contrasted rows, so the "
                "entropy bonus / auxiliary loss is rescaled with it.", args.zero_contrast_groups, self.loss_type,
            )

    # --- the KL coefficient: TRL reads `self.beta`; with adaptive KL the callback owns the value -----------------

    def _callback(self, kind):
        handler = getattr(self, "callback_handler", None)
        if handler is None:
            return None
        return next((cb for cb in handler.callbacks if isinstance(cb, kind)), None)

    def _adaptive_kl_callback(self) -> AdaptiveKLCallback | None:
        return self._callback(AdaptiveKLCallback)

    @property
    def zero_contrast_state(self) -> ZeroContrastState:
        """History, counters and refill position of the zero-contrast handling (looked up each time: a resume may
        replace the callback instance)."""
        return self._callback(ZeroContrastState)

    @property
    def beta(self) -> float:
        callback = self._adaptive_kl_callback()
        return callback.beta if callback is not None else self._fixed_beta

    @beta.setter
    def beta(self, value: float) -> None:
        callback = self._adaptive_kl_callback()
        if callback is not None:
            callback.beta = float(value)
        else:
            self._fixed_beta = value

    # --- rewards -------------------------------------------------------------------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        if self._skip_rows is not None:  # skipped rows were never scored: unscorable, whatever a model reward said
            rewards_per_func[self._skip_rows.to(rewards_per_func.device)] = float("nan")
        self._gathered_rewards_per_func = rewards_per_func  # [global batch, num_funcs], gathered by TRL
        return rewards_per_func

    def _score_round(self, inputs, mode: str):
        """Stock generation and scoring of `inputs` -> (TRL's output, aggregated global rewards). TRL's own
        zero-std metric for this batch is removed (this trainer logs its own)."""
        zero_std_log = self._metrics[mode]["frac_reward_zero_std"]
        trl_entries = len(zero_std_log)
        self._gathered_rewards_per_func = None
        output = super()._generate_and_score_completions(inputs)
        rewards_per_func, self._gathered_rewards_per_func = self._gathered_rewards_per_func, None
        if rewards_per_func is None:
            raise RuntimeError("GRPOTrainer scored completions without calling _calculate_rewards.")
        del zero_std_log[trl_entries:]
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        rewards = aggregate_rewards(
            rewards_per_func, self.reward_weights, group_size, self.multi_objective_aggregation
        ).cpu()
        if rewards.numel() != len(inputs) * self.accelerator.num_processes:
            raise RuntimeError(
                f"Gathered {rewards.numel()} rewards for {len(inputs)} rows on each of "
                f"{self.accelerator.num_processes} processes."
            )
        return output, rewards

    def _local_slice(self, num_local_rows: int) -> slice:
        start = self.accelerator.process_index * num_local_rows
        return slice(start, start + num_local_rows)

    # --- one generation batch ------------------------------------------------------------------------------------

    def _generate_and_score_completions(self, inputs):
        mode = "train" if self.model.training else "eval"
        if mode == "eval":
            output, rewards = self._score_round(inputs, mode)
            advantages = self._advantages(rewards, self.num_generations_eval)
            output["advantages"] = advantages[self._local_slice(len(inputs))].to(output["advantages"])
            self._log_batch(mode, advantages, rewards, self.num_generations_eval, [advantages])
            return output
        return self._training_batch(inputs)

    def _advantages(self, rewards: torch.Tensor, group_size: int) -> torch.Tensor:
        return compute_group_advantages(
            rewards,
            group_size,
            mode=self.args.advantage_mode,
            min_std=self.args.advantage_min_std,
            clip=self.args.advantage_clip,
        )

    def _training_batch(self, inputs):
        """Generate and score a training batch, with the zero-contrast handling the config asks for: skip predicted
        flat groups (selective rollout), replace flat groups with contrasted ones (resample), take the remaining flat
        groups out of the loss (drop/resample)."""
        args, group_size = self.args, self.num_generations
        state = self.zero_contrast_state
        rows = None
        if self._rows_known:
            inputs = [dict(x) for x in inputs]
            rows = [int(x.pop(ROW_INDEX_COLUMN)) for x in inputs]
        local_rows = len(inputs)
        local = self._local_slice(local_rows)
        rounds = [self._rollout_round(inputs, rows, 0)]  # (output, global rewards, skip mask)
        # Final batch, as (round, local row) per row; groups stay contiguous.
        origin = [(0, i) for i in range(local_rows)]

        if args.zero_contrast_groups == "resample":
            origin = self._resample(rounds, origin, local_rows)

        merged = concat_rows([r[0] for r in rounds], self._tokenizer.pad_token_id) if len(rounds) > 1 else rounds[0][0]
        offsets = [0]
        for output, _, _ in rounds[:-1]:
            offsets.append(offsets[-1] + local_rows)
        final_index = [offsets[r] + i for r, i in origin]
        output = take_rows(merged, final_index) if len(rounds) > 1 else merged
        local_rewards = torch.cat([r[1][local] for r in rounds])[torch.tensor(final_index)]
        rewards = self.accelerator.gather(local_rewards.to(self.accelerator.device)).cpu()

        advantages = self._advantages(rewards, group_size)
        contrasted = group_has_contrast(rewards, group_size).repeat_interleave(group_size) & ~torch.isnan(rewards)
        output["advantages"] = advantages[local].to(output["completion_mask"].device)
        masking = args.zero_contrast_groups != "keep"
        if masking:
            output = self._mask_flat_rows(output, contrasted[local], int(contrasted.sum()))
        elif len(rounds) > 1:
            raise AssertionError("rows were merged without masking")  # resample always masks

        # Counters and logs (identical on every process: everything below comes from gathered data).
        num_groups = rewards.numel() // group_size
        flat_groups = num_groups - int(group_has_contrast(rewards, group_size).sum())
        state.counters.add(
            groups_dropped=flat_groups if masking else 0,
            rows_in_loss=int(contrasted.sum()),
            rows_in_batches=rewards.numel(),
        )
        self._metrics["train"]["zero_contrast/frac_rows_with_gradient"].append(float(contrasted.double().mean()))
        used = self._used_advantages_per_round(rounds, origin, output["advantages"], contrasted[local] if masking else None)
        self._log_batch("train", advantages, rewards, group_size, used)
        return unsplit_pixel_values_by_grid(output)

    def _rollout_round(self, inputs, rows, round_index: int):
        """Score one batch of rows (skipping predicted-flat groups when selective rollout is on), update the history
        and counters; returns (output with per-row pixel values, global rewards, global skip mask or None)."""
        args, group_size = self.args, self.num_generations
        state = self.zero_contrast_state
        device = self.accelerator.device
        global_rows = None
        if rows is not None:
            global_rows = self.accelerator.gather(torch.tensor(rows, device=device, dtype=torch.long)).cpu()
            grouped = global_rows.view(-1, group_size)
            if not bool((grouped == grouped[:, :1]).all()):
                raise RuntimeError("a group of num_generations consecutive rows mixes prompts (not TRL's sampler?)")
        skip = None
        if args.selective_rollout:
            skip = self._skip_decisions(global_rows[::group_size], round_index).repeat_interleave(group_size)
            local_skip = skip[self._local_slice(len(inputs))]
            if local_skip.any():
                inputs = [dict(x, **{SKIP_COLUMN: bool(s)}) for x, s in zip(inputs, local_skip.tolist(), strict=True)]
        usage_before = reward_usage(self.reward_funcs)
        self._skip_rows = skip
        try:
            output, rewards = self._score_round(inputs, "train")
        finally:
            self._skip_rows = None
        usage_after = reward_usage(self.reward_funcs)
        self._add_reward_usage({k: usage_after[k] - usage_before.get(k, 0) for k in usage_after})

        num_groups = rewards.numel() // group_size
        skipped_groups = skip[::group_size] if skip is not None else torch.zeros(num_groups, dtype=torch.bool)
        grouped_rewards = rewards.view(num_groups, group_size)
        scored_known = ~skipped_groups & ~torch.isnan(grouped_rewards).all(dim=1)
        flat = ~group_has_contrast(rewards, group_size)
        if global_rows is not None:
            group_rows = global_rows[::group_size]
            state.record(group_rows[scored_known].tolist(), flat[scored_known].tolist())
        state.counters.add(
            groups_generated=num_groups,
            groups_skipped=int(skipped_groups.sum()),
            rows_skipped=int(skipped_groups.sum()) * group_size,
            groups_scored=int((~skipped_groups).sum()),
            groups_scored_flat=int((flat & ~skipped_groups).sum()),
        )
        return split_pixel_values_by_grid(output), rewards, skip

    def _skip_decisions(self, group_rows: torch.Tensor, round_index: int) -> torch.Tensor:
        """Selective rollout: per global group, True = skip. Drawn from a generator seeded by the run seed, the global
        step and the round, so every process (and a resumed run) draws the same decisions."""
        probabilities = self.zero_contrast_state.keep_probabilities(
            group_rows.tolist(), self.args.selective_rollout_keep_prob, self.args.selective_rollout_min_keep_prob
        )
        draws = np.random.default_rng([self.args.seed, self.state.global_step, round_index]).random(len(probabilities))
        return torch.from_numpy(draws >= probabilities)

    def _resample(self, rounds: list, origin: list, local_rows: int) -> list:
        """Dynamic sampling: replace this process's flat groups by contrasted groups from refill rounds (fresh prompts
        from the seeded stream), until no process has a flat group left or the round bound is hit. Every process runs
        the same number of rounds (the decision uses the gathered count)."""
        args, group_size = self.args, self.num_generations
        state = self.zero_contrast_state
        local = self._local_slice(local_rows)
        groups_per_process = local_rows // group_size
        global_groups = groups_per_process * self.accelerator.num_processes
        _, rewards, _ = rounds[0]
        flat_slots = torch.nonzero(~group_has_contrast(rewards[local], group_size)).flatten().tolist()
        for round_index in range(1, args.dynamic_sampling_max_rounds + 1):
            missing = torch.tensor([len(flat_slots)], device=self.accelerator.device)
            if int(self.accelerator.reduce(missing, reduction="sum")) == 0:
                return origin
            stream_rows = self._prompt_stream.take(state.stream_position, global_groups)
            state.stream_position += global_groups
            mine = stream_rows[self.accelerator.process_index * groups_per_process :][:groups_per_process]
            rows = [r for r in mine for _ in range(group_size)]
            refill = [self._training_row(r) for r in rows]
            rounds.append(self._rollout_round(refill, rows, round_index))
            state.counters.add(refill_rounds=1)
            contrasted = torch.nonzero(group_has_contrast(rounds[-1][1][local], group_size)).flatten().tolist()
            replaced = 0
            for slot, group in zip(list(flat_slots), contrasted):
                origin[slot * group_size : (slot + 1) * group_size] = [
                    (len(rounds) - 1, group * group_size + j) for j in range(group_size)
                ]
                flat_slots.remove(slot)
                replaced += 1
            count = torch.tensor([replaced], device=self.accelerator.device)
            state.counters.add(groups_replaced=int(self.accelerator.reduce(count, reduction="sum")))
        missing = torch.tensor([len(flat_slots)], device=self.accelerator.device)
        left = int(self.accelerator.reduce(missing, reduction="sum"))
        if left:
            state.counters.add(refill_bound_hits=1)
            hits = state.counters.refill_bound_hits
            if hits == 1 or hits % 50 == 0:
                logger.warning(
                    "Dynamic sampling: %d flat group(s) left after %d refill round(s) at step %d (%d time(s) so far); "
                    "they are dropped from the loss. Raise dynamic_sampling_max_rounds, or use denser rewards.",
                    left, args.dynamic_sampling_max_rounds, self.state.global_step, hits,
                )
        return origin

    def _training_row(self, index: int) -> dict:
        row = dict(self.train_dataset[index])
        row.pop(ROW_INDEX_COLUMN, None)
        return row

    def _mask_flat_rows(self, output: dict, active: torch.Tensor, num_active: int) -> dict:
        """Take the rows of flat groups out of the loss: TRL's loss mask (`tool_mask`, multiplied into the completion
        mask by the loss) is zeroed on them, the token count of token-normalised losses is recounted, and the loss is
        rescaled in `_compute_loss` for row-normalised ones."""
        completion_mask = output["completion_mask"]
        active = active.to(completion_mask.device)
        base = output.get("tool_mask")
        base = torch.ones_like(completion_mask) if base is None else base
        output["tool_mask"] = base * active.unsqueeze(1).to(base.dtype)
        tokens = (completion_mask * output["tool_mask"]).sum()
        output["num_items_in_batch"] = self.accelerator.gather(tokens).sum()
        output[_ACTIVE_ROWS] = active.float()
        output[_NUM_ACTIVE_ROWS] = torch.tensor(float(num_active), device=completion_mask.device)
        return output

    def _used_advantages_per_round(self, rounds, origin, local_advantages, local_active) -> list[torch.Tensor]:
        """Per scoring round, the global vector of the advantages each row ended up with in the loss (0 when the row
        was replaced or dropped), for TRL's completion logs."""
        local_rows = len(origin)
        used = [torch.zeros(local_rows) for _ in rounds]
        values = local_advantages.detach().cpu().float()
        if local_active is not None:
            values = values * local_active.cpu().float()
        for position, (round_index, row) in enumerate(origin):
            used[round_index][row] = values[position]
        device = self.accelerator.device
        return [self.accelerator.gather(u.to(device)).cpu() for u in used]

    def _add_reward_usage(self, local_usage: dict) -> None:
        if not local_usage:
            return
        keys = sorted(local_usage)
        values = torch.tensor([float(local_usage[k]) for k in keys], device=self.accelerator.device)
        totals = self.accelerator.reduce(values, reduction="sum").tolist()
        self.zero_contrast_state.add_reward_usage(dict(zip(keys, (int(round(v)) for v in totals), strict=True)))

    # --- logging ---------------------------------------------------------------------------------------------------

    def _log_batch(self, mode: str, advantages, rewards, group_size: int, used_per_round: list) -> None:
        """Log this trainer's diagnostics of the batch the loss sees, and put the advantages each row got into TRL's
        completion logs (which TRL filled from its own normalisation, one block per scoring round)."""
        metrics = self._metrics[mode]
        for name, value in advantage_stats(advantages, rewards, group_size).items():
            metrics[name].append(value)
        logged = self._logs["advantages"]
        values = torch.cat(used_per_round).tolist()
        replaced = min(len(logged), len(values))
        for _ in range(replaced):
            logged.pop()
        logged.extend(values[len(values) - replaced :])

    def cost_summary(self) -> dict:
        """Run totals (all processes): reward calls by outcome, skipped/dropped/replaced groups, refill rounds, rows
        that carried gradient. `reward_calls/*` come from reward functions that report `usage()`."""
        state = self.zero_contrast_state
        counters = state.counters
        usage = state.reward_usage
        summary = {
            "reward_calls/sent": usage.get("backend_calls"),
            "reward_calls/cached": usage.get("cached"),
            "reward_calls/rejected": usage.get("rejected"),
            "reward_calls/rows_scored": usage.get("rows"),
            "reward_calls/rows_skipped": counters.rows_skipped,
            "zero_contrast/queries_skipped": counters.groups_skipped,
            "zero_contrast/groups_generated": counters.groups_generated,
            "zero_contrast/groups_scored": counters.groups_scored,
            "zero_contrast/groups_scored_flat": counters.groups_scored_flat,
            "zero_contrast/groups_dropped": counters.groups_dropped,
            "zero_contrast/groups_replaced": counters.groups_replaced,
            "zero_contrast/refill_rounds": counters.refill_rounds,
            "zero_contrast/refill_bound_hits": counters.refill_bound_hits,
            "zero_contrast/frac_rows_with_gradient": (
                counters.rows_in_loss / counters.rows_in_batches if counters.rows_in_batches else None
            ),
        }
        plateau = self._callback(PlateauStoppingCallback)
        if plateau is not None:
            summary["stopped_on_plateau_at_step"] = plateau.stopped_at
        return {key: value for key, value in summary.items() if value is not None}

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if self.model.training and not any(key.startswith("eval_") for key in logs):
            for key, value in self.cost_summary().items():
                if key.startswith("reward_calls/") or key.startswith("zero_contrast/") and key != (
                    "zero_contrast/frac_rows_with_gradient"  # its per-step value comes from the metrics
                ):
                    logs[key] = value
        super().log(logs, start_time)

    # --- loss: adaptive KL, and rows taken out of the loss ------------------------------------------------------------

    def _compute_loss(self, model, inputs):
        callback = self._adaptive_kl_callback()
        if callback is None or not self.model.training:
            loss = super()._compute_loss(model, inputs)
        else:
            kl_log = self._metrics["train"]["kl"]
            seen = len(kl_log)
            beta_used = callback.beta
            loss = super()._compute_loss(model, inputs)
            for kl in kl_log[seen:]:
                callback.observe(kl)
            self._metrics["train"]["kl_beta"].append(beta_used)
        if _ACTIVE_ROWS in inputs and self.model.training and self.loss_type in _ROW_NORMALISED_LOSSES:
            loss = loss * self._row_normaliser_correction(inputs)
        return loss

    def _row_normaliser_correction(self, inputs) -> float:
        """TRL averages a row-normalised loss over the micro-batch's rows, dropped ones included. Multiplying by
        `steps_per_generation * num_processes * rows_in_micro_batch / contrasted_rows_in_generation_batch` turns the
        accumulated gradient into the mean over the contrasted rows alone, however they fell into micro-batches."""
        num_active = float(inputs[_NUM_ACTIVE_ROWS])
        if num_active == 0:
            return 0.0
        rows = inputs[_ACTIVE_ROWS].numel()
        return self.args.steps_per_generation * self.accelerator.num_processes * rows / num_active
