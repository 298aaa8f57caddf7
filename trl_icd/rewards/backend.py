"""The one interface every scoring backend implements (HF Qwen2.5-VL, vLLM, simulated)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from .prompt import InContextPrompt


class RewardBackend(ABC):
    """Answers in-context prompts and scores given answers under them.

    Subclasses implement `answer` and `answer_logprob`; backends that can share one prefill between the greedy
    answer and the gold answers override `answer_and_logprob` (the reward calls that one).
    """

    @property
    @abstractmethod
    def identity(self) -> dict:
        """Everything that changes a score (model id/revision, dtype, prompt format, generation settings,
        max_pixels, ...): part of every reward-cache key, so a changed setting never reads a stale score."""

    @abstractmethod
    def answer(self, prompts: Sequence[InContextPrompt]) -> list[str]:
        """The model's short answer to each prompt (greedy / beam, as configured)."""

    @abstractmethod
    def answer_logprob(
        self, prompts: Sequence[InContextPrompt], answers: Sequence[Sequence[str]]
    ) -> list[list[float]]:
        """For each prompt, the summed log-probability of each of its candidate answers (answer tokens only)."""

    def answer_and_logprob(
        self, prompts: Sequence[InContextPrompt], answers: Sequence[Sequence[str]]
    ) -> tuple[list[str], list[list[float]]]:
        """Both at once; the default makes two calls, fast backends share the prefill."""
        return self.answer(prompts), self.answer_logprob(prompts, answers)


class PartialBatchError(RuntimeError):
    """Raised by a backend whose batch failed on some rows only, carrying the other rows' results, so callers
    keep them instead of re-scoring (remote backends: one failed request must not cost the batch).

    `answers[i]` / `logprobs[i]` are None for the rows in `errors` (row index -> exception), and for every row in
    the list a call does not compute (the log-probs of an `answer` call, the answers of an `answer_logprob` call).
    """

    def __init__(
        self,
        answers: Sequence[str | None],
        logprobs: Sequence[Sequence[float] | None],
        errors: dict[int, BaseException],
    ):
        first = next(iter(errors.items()), (None, None))
        super().__init__(f"{len(errors)} of {len(answers)} rows failed; first: row {first[0]}: {first[1]!r}")
        self.answers = list(answers)
        self.logprobs = list(logprobs)
        self.errors = dict(errors)
