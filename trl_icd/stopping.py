"""Stop training when learning has stopped: a plateau of a logged training metric (by default the mean reward).

Every reward call after the plateau is paid for and teaches nothing, so a run should end there rather than at a
step count guessed in advance. The rule, applied at every logging step that carries the metric: smooth it with a
moving average over the last `window` logged values; a value better than the best so far by more than `min_delta`
resets the patience; after `patience` logged values without such an improvement, training stops. The best value and
the patience count are saved with checkpoints, so a resumed run keeps counting.
"""

from __future__ import annotations

import logging
import math
from collections import deque

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

logger = logging.getLogger(__name__)

__all__ = ["PlateauStoppingCallback"]


class PlateauStoppingCallback(TrainerCallback, ExportableState):
    """Sets `control.should_training_stop` when the moving average of `metric` (a key of the training logs) has not
    improved by more than `min_delta` for `patience` logged values. `mode="max"`: higher is better (a reward);
    `"min"`: lower is better."""

    def __init__(self, metric: str = "reward", patience: int = 10, min_delta: float = 0.0, window: int = 5,
                 mode: str = "max"):
        if patience < 1 or window < 1:
            raise ValueError(f"patience and window must be >= 1, got {patience} and {window}")
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        if not (isinstance(min_delta, (int, float)) and min_delta >= 0):
            raise ValueError(f"min_delta must be a number >= 0, got {min_delta!r}")
        self.metric, self.patience, self.min_delta, self.window, self.mode = metric, patience, min_delta, window, mode
        self.recent: deque = deque(maxlen=window)
        self.best = math.nan
        self.waited = 0
        self.stopped_at: int | None = None
        self._warned_missing = False

    def _improved(self, value: float) -> bool:
        if math.isnan(self.best):
            return True
        return value > self.best + self.min_delta if self.mode == "max" else value < self.best - self.min_delta

    def observe(self, value: float) -> bool:
        """Add one logged value; True when training should stop."""
        self.recent.append(float(value))
        if len(self.recent) < self.window:
            return False
        smoothed = sum(self.recent) / len(self.recent)
        if self._improved(smoothed):
            self.best, self.waited = smoothed, 0
            return False
        self.waited += 1
        return self.waited >= self.patience

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or any(key.startswith("eval_") for key in logs) or "train_runtime" in logs:
            return
        value = logs.get(self.metric)
        if value is None:
            if not self._warned_missing:
                logger.warning("Plateau stopping: the training logs carry no %r; the run will not stop early.",
                               self.metric)
                self._warned_missing = True
            return
        value = float(value)
        if math.isfinite(value) and self.observe(value):
            self.stopped_at = state.global_step
            control.should_training_stop = True
            logger.info(
                "Stopping at step %d: the %d-value moving average of %r has not improved on %.4f by more than %g "
                "for %d logged values.", state.global_step, self.window, self.metric, self.best, self.min_delta,
                self.patience,
            )

    def on_train_begin(self, args, state, control, **kwargs):
        saved = state.stateful_callbacks.get(type(self).__name__)
        if isinstance(saved, dict):
            attributes = saved.get("attributes", {})
            self.recent = deque(attributes.get("recent", []), maxlen=self.window)
            self.best = float(attributes.get("best", math.nan))
            self.waited = int(attributes.get("waited", 0))

    def state(self) -> dict:
        return {
            "args": {"metric": self.metric, "patience": self.patience, "min_delta": self.min_delta,
                     "window": self.window, "mode": self.mode},
            "attributes": {"recent": list(self.recent), "best": self.best, "waited": self.waited},
        }
