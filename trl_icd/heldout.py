"""Held-out accuracy during training: every N optimiser steps the selector picks demonstrations greedily for a small
fixed set of held-out queries, the reward's backend answers them, and `heldout/accuracy` (official VQA accuracy) and
`heldout/mean_shots` are logged like any training metric (console, `metrics.jsonl`, `report_to`, `log_history`, and
so the training-curves plot).

The training reward's own mean is measured on *sampled* selections of *training* queries; this is what the policy
would do on queries it never trained on, which is what the evaluation at the end measures on all of them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from transformers import Trainer, TrainerCallback

logger = logging.getLogger(__name__)

CONTROL_FLAGS = ("should_log", "should_evaluate", "should_save", "should_training_stop", "should_epoch_stop")


@dataclass
class HeldoutArguments:
    """Held-out accuracy of the selector during training (greedy selections, scored by the reward's backend)."""

    heldout_eval_steps: int = field(
        default=0,
        metadata={
            "help": "Every N optimiser steps (and before the first and after the last), score the selector's greedy "
            "choices on `heldout_eval_queries` queries of the eval split and log `heldout/accuracy` and "
            "`heldout/mean_shots`. 0: off (each evaluation costs that many reward calls, cached)."
        },
    )
    heldout_eval_queries: int = field(
        default=64, metadata={"help": "How many held-out queries (the first ones of the eval split)."}
    )

    def __post_init__(self):
        if self.heldout_eval_steps < 0 or self.heldout_eval_queries < 1:
            raise ValueError("heldout_eval_steps must be >= 0 and heldout_eval_queries >= 1")


class HeldoutEvalCallback(TrainerCallback):
    """Calls `evaluate(model) -> {name: value}` on the training model (in eval mode, unwrapped for generation) at
    step 0, every `eval_steps` steps and at the end, and logs the result through `transformers.Trainer.log`: into
    `log_history` and every callback/reporter, without `GRPOTrainer.log`, which would flush the training metrics
    accumulated since the last log into this entry. Every process runs it (ZeRO-3 generation needs all of them).
    A failing evaluation is logged and counted (`failures`), never stops training."""

    def __init__(self, trainer, evaluate: Callable, eval_steps: int):
        if eval_steps < 1:
            raise ValueError("eval_steps must be >= 1")
        self.trainer = trainer
        self.evaluate = evaluate
        self.eval_steps = eval_steps
        self.failures = 0
        self._last_step = None

    def _run(self, state) -> None:
        if self._last_step == state.global_step:
            return
        self._last_step = state.global_step
        from trl.models.utils import unwrap_model_for_generation

        trainer = self.trainer
        model = trainer.model
        was_training = model.training
        model.eval()
        try:
            with unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator) as unwrapped:
                metrics = self.evaluate(unwrapped)
        except Exception as error:  # a monitoring metric must not end a long run
            self.failures += 1
            logger.warning("held-out evaluation at step %d failed (%d so far): %r", state.global_step, self.failures,
                           error)
            return
        finally:
            model.train(was_training)
        # Logging resets the step's control flags (should_log, ...): keep the decisions already taken for this step.
        control = trainer.control
        flags = {name: getattr(control, name) for name in CONTROL_FLAGS}
        Trainer.log(trainer, dict(metrics))
        for name, value in flags.items():
            setattr(trainer.control, name, value)

    def on_train_begin(self, args, state, control, **kwargs):
        self._run(state)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.eval_steps == 0:
            self._run(state)

    def on_train_end(self, args, state, control, **kwargs):
        self._run(state)


def selector_heldout_evaluator(data, pools: dict, query_ids, tokenizer, reward) -> Callable:
    """`evaluate(model)` for `HeldoutEvalCallback`: the selector's greedy choices (its own number of shots) from each
    query's pool, scored by `reward` (its `soft` component, the official VQA accuracy). Pairs the backend could not
    score are left out and counted (`heldout/unscored`)."""
    from .pipeline import select_with_selector

    query_ids = list(query_ids)

    def evaluate(model) -> dict:
        picks = select_with_selector(model, tokenizer, data, pools, query_ids, show_progress=False)
        components = reward.score_pairs([(q, picks[q]) for q in query_ids])
        scored = [c["soft"] for c in components if c is not None]
        return {
            "heldout/accuracy": sum(scored) / len(scored) if scored else math.nan,
            "heldout/mean_shots": sum(len(picks[q]) for q in query_ids) / len(query_ids),
            "heldout/unscored": len(components) - len(scored),
        }

    return evaluate


def add_heldout_callback(trainer, args: HeldoutArguments, data, data_args, reward_args, tokenizer, backend):
    """Attach a `HeldoutEvalCallback` for the selector to `trainer` when `args.heldout_eval_steps` > 0 (returns it,
    else None). Its reward shares the training reward's `backend` (one model in memory) but keeps its own counters,
    so the training reward's logged statistics stay those of training."""
    if not args.heldout_eval_steps:
        return None
    from .pipeline import build_pools, build_reward

    query_ids = list(data.eval_ids)[: args.heldout_eval_queries]
    if not query_ids:
        raise ValueError(f"heldout_eval_steps is set but the eval split {data_args.eval_split!r} has no queries")
    pools = build_pools(data, data_args, query_ids)
    reward = build_reward(data, reward_args, backend=backend)
    callback = HeldoutEvalCallback(
        trainer, selector_heldout_evaluator(data, pools, query_ids, tokenizer, reward), args.heldout_eval_steps
    )
    trainer.add_callback(callback)
    logger.info("held-out accuracy every %d steps on %d queries", args.heldout_eval_steps, len(query_ids))
    return callback


__all__ = ["HeldoutArguments", "HeldoutEvalCallback", "add_heldout_callback", "selector_heldout_evaluator"]
