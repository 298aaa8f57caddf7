"""`ICDGRPOTrainer`: TRL's `GRPOTrainer` with selectable group advantages, advantage diagnostics and an adaptive KL
coefficient. Everything else (generation, rewards, loss, vLLM, PEFT, DeepSpeed, VLM inputs) is stock TRL: the
trainer only replaces the advantages TRL computed, after TRL has gathered the rewards of every process."""

from __future__ import annotations

import logging
import math

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState
from trl import GRPOTrainer

from .advantages import advantage_stats, aggregate_rewards, compute_group_advantages
from .config import ICDGRPOConfig

logger = logging.getLogger(__name__)

__all__ = ["AdaptiveKLCallback", "ICDGRPOTrainer", "adapt_kl_beta"]


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
    `args.advantage_min_std`, `args.advantage_clip`), with an optional adaptive KL coefficient.

    Takes exactly `GRPOTrainer`'s arguments; `args` must be an `ICDGRPOConfig`. Works with any policy TRL accepts
    (causal LMs, vision-language models, PEFT models), since only the advantage vector is changed.

    Logged (train and `eval_`): `advantages/std`, `advantages/mean`, `advantages/max_abs`,
    `rewards/within_group_std`, `frac_reward_zero_std`, `frac_unscorable`, and `kl_beta` with adaptive KL. The
    per-sample advantages in TRL's completion logs are the ones used in the loss.
    """

    _tag_names = ["trl", "grpo", "trl-icd"]

    def __init__(self, model, reward_funcs=None, args: ICDGRPOConfig | None = None, *trainer_args, **trainer_kwargs):
        if args is None:
            name = model if isinstance(model, str) else (model.config._name_or_path or type(model).__name__)
            args = ICDGRPOConfig(f"{name.split('/')[-1]}-ICDGRPO")
        if not isinstance(args, ICDGRPOConfig):
            raise TypeError(
                f"ICDGRPOTrainer needs an ICDGRPOConfig (GRPOConfig plus the advantage fields), got {type(args).__name__}."
            )
        self._gathered_rewards_per_func: torch.Tensor | None = None
        self._fixed_beta = args.beta
        super().__init__(model, reward_funcs, args, *trainer_args, **trainer_kwargs)
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

    # --- the KL coefficient: TRL reads `self.beta`; with adaptive KL the callback owns the value -----------------

    def _adaptive_kl_callback(self) -> AdaptiveKLCallback | None:
        handler = getattr(self, "callback_handler", None)
        if handler is None:
            return None
        return next((cb for cb in handler.callbacks if isinstance(cb, AdaptiveKLCallback)), None)

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

    # --- advantages ----------------------------------------------------------------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._gathered_rewards_per_func = rewards_per_func  # [global batch, num_funcs], gathered by TRL
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        mode = "train" if self.model.training else "eval"
        trl_zero_std_entries = len(self._metrics[mode]["frac_reward_zero_std"])
        self._gathered_rewards_per_func = None
        output = super()._generate_and_score_completions(inputs)
        rewards_per_func, self._gathered_rewards_per_func = self._gathered_rewards_per_func, None
        if rewards_per_func is None:
            raise RuntimeError("GRPOTrainer scored completions without calling _calculate_rewards.")

        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        rewards = aggregate_rewards(rewards_per_func, self.reward_weights, group_size, self.multi_objective_aggregation)
        advantages = compute_group_advantages(
            rewards,
            group_size,
            mode=self.args.advantage_mode,
            min_std=self.args.advantage_min_std,
            clip=self.args.advantage_clip,
        )
        local_rows = len(inputs)
        if advantages.numel() != local_rows * self.accelerator.num_processes:
            raise RuntimeError(
                f"Gathered {advantages.numel()} rewards for {local_rows} rows on each of "
                f"{self.accelerator.num_processes} processes."
            )
        start = self.accelerator.process_index * local_rows
        output["advantages"] = advantages[start : start + local_rows].to(output["advantages"])
        self._log_advantages(mode, advantages, rewards, group_size, trl_zero_std_entries)
        return output

    def _log_advantages(
        self, mode: str, advantages: torch.Tensor, rewards: torch.Tensor, group_size: int, trl_zero_std_entries: int
    ) -> None:
        """Log this trainer's diagnostics and overwrite what TRL derived from its own advantages."""
        metrics = self._metrics[mode]
        stats = advantage_stats(advantages, rewards, group_size)
        zero_std = metrics["frac_reward_zero_std"]
        del zero_std[trl_zero_std_entries:]  # TRL's value for this batch (from its own normalisation)
        for name, value in stats.items():
            metrics[name].append(value)
        logged = self._logs["advantages"]
        replaced = min(len(logged), advantages.numel())
        for _ in range(replaced):
            logged.pop()
        logged.extend(advantages[advantages.numel() - replaced :].tolist())

    # --- adaptive KL: report the KL TRL measured (already reduced over processes, so beta stays in sync) --------

    def _compute_loss(self, model, inputs):
        callback = self._adaptive_kl_callback()
        if callback is None or not self.model.training:
            return super()._compute_loss(model, inputs)
        kl_log = self._metrics["train"]["kl"]
        seen = len(kl_log)
        beta_used = callback.beta
        loss = super()._compute_loss(model, inputs)
        for kl in kl_log[seen:]:
            callback.observe(kl)
        self._metrics["train"]["kl_beta"].append(beta_used)
        return loss
