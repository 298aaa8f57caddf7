"""The in-context reward: a TRL reward function that shows a frozen VLM the demonstrations a policy chose and rewards
the policy with how well the VLM then answers the query.

    reward = InContextReward(corpus, backend, mode="hard_plus_soft", cache_path="rewards.sqlite")
    trainer = GRPOTrainer(model=policy, reward_funcs=[reward], train_dataset=dataset, ...)

Demonstrations come either from a selector policy (dataset columns `query_id` + `candidate_ids`, decoded from
`completion_ids` with `trl_icd.selector.parse_selection`) or from corpus ids written in a completion's text
("12, 873"; any other policy). Each distinct (query, ordered demonstrations) pair of a call is looked up in the reward
cache; the misses go to the backend in one batched `answer_and_logprob` call; components are shaped into the reward
with `trl_icd.rewards.shaping.shape_reward`.

Bad input never crashes a batch and never yields a silently wrong reward: a row whose selection is invalid gets
`invalid_reward`; a row that cannot be scored (missing query, unreadable image, a backend error on that row) gets
`error_reward` (None = unscorable: TRL gives it advantage 0); both are counted (`status_counts`) and logged.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence

from tqdm.auto import tqdm

from ..data.corpus import Corpus, CorpusItem, ImageLoadError
from ..metrics import DEFAULT_VQA_PROTOCOL, get_vqa_protocol
from .backend import PartialBatchError, RewardBackend
from .cache import CacheKey, RewardCache, plain_id, rl_record
from .components import COMPONENT_KEYS, distinct_gold_answers, reward_components
from .prompt import InContextPrompt, PromptFormat, stable_hash
from .shaping import REWARD_MODES, shape_reward

logger = logging.getLogger(__name__)

# Bumped whenever `reward_components` changes meaning, so cached rows of the old definition are never read.
COMPONENTS_VERSION = 1

# Row statuses. "ok": scored (or cached). The policy's fault -> `invalid_reward`:
INVALID_SELECTION_REASONS = (
    "empty",  # no id in the completion
    "unparseable",  # a token that is not an id
    "unknown_id",  # an id that is not in the corpus
    "not_in_pool",  # an id outside the row's `candidate_ids`
    "duplicate_id",  # the same demonstration twice
    "query_as_demo",  # the query itself as a demonstration (would leak its answer)
    "same_image_as_query",  # another question on the query's image
    "too_many_shots",  # more than `max_shots` demonstrations
    "invalid_selection",  # `parse_selection` rejected the selector's completion
)
# Not the policy's fault -> `error_reward`:
SCORING_ERROR_REASONS = ("missing_query_id", "unknown_query_id", "no_gold_answers", "image_error", "backend_error")

_SEPARATORS = re.compile(r"[\s,;]+")
_INTEGER = re.compile(r"[+-]?\d+")


class RejectedRow(ValueError):
    """A row that is not sent to the backend; `reason` is one of `INVALID_SELECTION_REASONS` or
    `SCORING_ERROR_REASONS`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def completion_text(completion) -> str:
    """The text of a TRL completion: a string, or conversational messages (the last message's text: a string or
    the text parts of a list of content parts).

    Raises RejectedRow (a counted, logged fallback row, never a crash of the batch): "empty" for no messages or a
    last message without text (`"content": None`, as TRL writes for tool calls; no content; no text part),
    "unparseable" for any other shape."""
    if isinstance(completion, str):
        return completion
    if not isinstance(completion, Sequence):
        raise RejectedRow("unparseable", f"completion of type {type(completion).__name__}")
    if not completion:
        raise RejectedRow("empty", "no messages in the completion")
    message = completion[-1]
    if not isinstance(message, Mapping):
        raise RejectedRow("unparseable", f"last message of type {type(message).__name__}")
    content = message.get("content")
    if content is None:
        raise RejectedRow("empty", "the last message has no text content (e.g. a tool call)")
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        texts = [part.get("text") for part in content if isinstance(part, Mapping)]
        texts = [text for text in texts if isinstance(text, str)]
        if not texts:
            raise RejectedRow("empty", "the last message has no text part")
        return "".join(texts)
    raise RejectedRow("unparseable", f"message content of type {type(content).__name__}")


def parse_id_list(text: str, corpus: Corpus) -> list:
    """Corpus ids written in a text completion: separated by commas, semicolons or spaces, optionally inside one
    pair of brackets ("12, 873", "[12 873]"). Integer tokens are read as int ids; other tokens must be ids as written.
    """
    body = text.strip()
    if len(body) >= 2 and (body[0], body[-1]) in {("[", "]"), ("(", ")")}:
        body = body[1:-1]
    tokens = [t for t in _SEPARATORS.split(body) if t]
    if not tokens:
        raise RejectedRow("empty", repr(text[:80]))
    ids = []
    for token in tokens:
        if _INTEGER.fullmatch(token) and int(token) in corpus:
            ids.append(int(token))
        elif token in corpus:
            ids.append(token)
        elif _INTEGER.fullmatch(token):
            raise RejectedRow("unknown_id", token)
        else:
            raise RejectedRow("unparseable", repr(token[:40]))
    return ids


def check_demos(query: CorpusItem, demo_ids: Sequence, corpus: Corpus, pool=None, max_shots: int | None = None):
    """The demonstration items for `demo_ids`; raises RejectedRow for an unknown id, one outside `pool`, a
    duplicate, the query itself or another question on its image, or more than `max_shots` ids."""
    if max_shots is not None and len(demo_ids) > max_shots:
        raise RejectedRow("too_many_shots", f"{len(demo_ids)} > {max_shots}")
    if len(set(demo_ids)) != len(demo_ids):
        raise RejectedRow("duplicate_id", repr(list(demo_ids)))
    demos = []
    for demo_id in demo_ids:
        item = corpus.get(demo_id)
        if item is None:
            raise RejectedRow("unknown_id", repr(demo_id))
        if pool is not None and demo_id not in pool:
            raise RejectedRow("not_in_pool", repr(demo_id))
        if demo_id == query.id:
            raise RejectedRow("query_as_demo", repr(demo_id))
        if query.image_id is not None and item.image_id == query.image_id:
            raise RejectedRow("same_image_as_query", repr(demo_id))
        demos.append(item)
    return tuple(demos)


def content_hash(prompt: InContextPrompt) -> str:
    """Hash of what the scorer sees from the corpus (ids, questions, answers, image keys, in prompt order): a cached
    row whose hash differs is stale."""
    return stable_hash(
        [[plain_id(i.id), i.question, list(i.answers), i.answer, i.image_key] for i in prompt.items]
    )


def _failure_reason(err: BaseException) -> str:
    return "image_error" if isinstance(err, ImageLoadError) else "backend_error"


class InContextReward:
    """A TRL reward function scoring demonstration choices with an in-context VLM (see the module docstring).

    Args:
        corpus: the items (queries and demonstrations) addressed by the ids in the data and completions.
        backend: a `RewardBackend` (`QwenVLBackend`, `VLLMBackend`, `SimulatedBackend`, ...).
        mode, hard_weight, soft_weight, rel_weight: shaping (`trl_icd.rewards.shaping.REWARD_MODES`).
        cache_path: SQLite file of the persistent reward cache (shared by processes), a `RewardCache`, or None for an
            in-memory cache private to this process.
        invalid_reward: reward of a row whose selection is invalid (the policy's fault: a number teaches it).
        error_reward: reward of a row that cannot be scored (missing query, unreadable image, backend error);
            None = unscorable, excluded from its group by TRL.
        tokenizer: the selector's tokenizer; with it, rows carrying `candidate_ids` are decoded from
            `completion_ids` by `parse_selection`. Without it, ids are read from the completion text.
        prompt_format: checked against the backend's own format (backends render prompts themselves); for
            backends without one it is only part of the cache key.
        hard_threshold: `hard` = soft > this.
        max_shots: reject selections with more demonstrations (None = no limit).
        batch_size: most pairs per backend call (None = all misses of a call in one); the cache is written after
            each.
        max_failed_calls: raise after this many consecutive calls in which every pair sent to the backend failed
            (a dead server must stop training, not feed it fallback rewards); None = never.
        name: `__name__` (TRL's metric prefix `rewards/<name>/...`) and the prefix of the metrics logged here.
        vqa_protocol: how `soft` (VQA accuracy) is scored: "vqa" (today's official script), "vqa2016" or
            "lmms_eval" (`trl_icd.metrics.VQA_PROTOCOLS`); part of the scorer identity, so cached rows of different
            protocols never mix.

    After each call: `last_components` (per row: hard, soft, gt_prob, rel, answer, query_id, demo_ids; None for a
    row without components), `last_statuses` ("ok" or a reason), `last_metrics`; running totals `status_counts`,
    `cache_hits`, `cache_misses` (distinct pairs found in / missing from the cache), and `usage()` (what the rows
    of the TRL calls cost; `ICDGRPOTrainer` logs it as `reward_calls/*`).
    """

    def __init__(
        self,
        corpus: Corpus,
        backend: RewardBackend,
        mode: str = "hard_plus_soft",
        hard_weight: float = 1.0,
        soft_weight: float = 1.0,
        rel_weight: float = 0.1,
        cache_path: str | os.PathLike | RewardCache | None = None,
        invalid_reward: float | None = 0.0,
        error_reward: float | None = None,
        tokenizer=None,
        prompt_format: PromptFormat | None = None,
        hard_threshold: float = 0.0,
        max_shots: int | None = None,
        batch_size: int | None = None,
        max_failed_calls: int | None = 3,
        name: str = "in_context_reward",
        vqa_protocol: str = DEFAULT_VQA_PROTOCOL,
    ):
        if mode not in REWARD_MODES:
            raise ValueError(f"unknown reward mode {mode!r}; known: {sorted(REWARD_MODES)}")
        if batch_size is not None and batch_size < 1:
            raise ValueError("batch_size must be >= 1 or None")
        backend_format = getattr(backend, "prompt_format", None)
        if prompt_format is not None and backend_format is not None and prompt_format != backend_format:
            raise ValueError("prompt_format differs from the backend's own prompt format; configure the backend")
        get_vqa_protocol(vqa_protocol)  # an unknown name fails here, not on the first scored row
        self.corpus = corpus
        self.backend = backend
        self.mode = mode
        self.hard_weight = hard_weight
        self.soft_weight = soft_weight
        self.rel_weight = rel_weight
        self.cache = cache_path if isinstance(cache_path, RewardCache) else RewardCache(cache_path)
        self.invalid_reward = invalid_reward
        self.error_reward = error_reward
        self.tokenizer = tokenizer
        self.prompt_format = prompt_format or backend_format or PromptFormat()
        self.hard_threshold = hard_threshold
        self.vqa_protocol = vqa_protocol
        self.max_shots = max_shots
        self.batch_size = batch_size
        self.max_failed_calls = max_failed_calls
        self.__name__ = name
        self.cache_hits = 0
        self.cache_misses = 0
        self.status_counts: Counter = Counter()
        self._usage: Counter = Counter()
        self.last_components: list[dict | None] = []
        self.last_statuses: list[str] = []
        self.last_metrics: dict[str, float] = {}
        self._failed_calls = 0

    # ------------------------------------------------------------------------------------------------ identity
    @property
    def scorer_identity(self) -> dict:
        """Everything that changes a cached row: backend identity, prompt format, component definition (with the
        VQA protocol of `soft`). Shaping (mode, weights) is not part of it: the cache stores components."""
        return {
            "backend": self.backend.identity,
            "prompt_format": self.prompt_format.identity(),
            "components": {"version": COMPONENTS_VERSION, "hard_threshold": self.hard_threshold,
                           "vqa_protocol": self.vqa_protocol},
        }

    @property
    def scorer_hash(self) -> str:
        return stable_hash(self.scorer_identity)

    def shape(self, components: Mapping) -> float:
        """The reward of one set of components under this reward's mode and weights."""
        return float(shape_reward(components, mode=self.mode, hard_weight=self.hard_weight,
                                  soft_weight=self.soft_weight, rel_weight=self.rel_weight))

    # ---------------------------------------------------------------------------------------- TRL entry point
    def __call__(self, prompts=None, completions=None, completion_ids=None, **columns) -> list[float | None]:
        log_metric = columns.pop("log_metric", None)
        log_extra = columns.pop("log_extra", None)
        if completions is None and completion_ids is None:
            raise ValueError("InContextReward needs `completions` or `completion_ids`")
        num_rows = len(completions) if completions is not None else len(completion_ids)
        statuses: list[str] = []
        rows: list[InContextPrompt | None] = []
        for index in range(num_rows):
            try:
                rows.append(self._prompt_of_row(index, completions, completion_ids, columns))
                statuses.append("ok")
            except RejectedRow as err:
                rows.append(None)
                statuses.append(err.reason)
        valid = [p for p in rows if p is not None]
        outcomes, stats = self._score(valid)
        outcome_iter = iter(outcomes)
        components: list[dict | None] = []
        rewards: list[float | None] = []
        for index, prompt in enumerate(rows):
            outcome = next(outcome_iter) if prompt is not None else None
            if isinstance(outcome, str):
                statuses[index] = outcome
            if isinstance(outcome, dict):
                components.append(dict(outcome, query_id=prompt.key[0], demo_ids=list(prompt.key[1])))
                rewards.append(self.shape(outcome))
            else:
                components.append(None)
                invalid = statuses[index] in INVALID_SELECTION_REASONS
                rewards.append(self.invalid_reward if invalid else self.error_reward)
        self._finish_call(statuses, components, stats, log_metric, log_extra)
        self._usage.update(
            rows=num_rows,
            backend_calls=stats["misses"],
            cached=len(valid) - stats["misses"],
            rejected=num_rows - len(valid),
        )
        return rewards

    def usage(self) -> dict[str, int]:
        """Cumulative cost of the TRL calls: `rows` received = `backend_calls` (distinct (query, demonstrations)
        pairs sent to the backend) + `cached` (rows answered from the reward cache, or by another row of the same
        call with the same pair) + `rejected` (rows never scored: invalid selection or unusable input)."""
        return {key: int(self._usage[key]) for key in ("rows", "backend_calls", "cached", "rejected")}

    def _prompt_of_row(self, index: int, completions, completion_ids, columns) -> InContextPrompt:
        query_ids = columns.get("query_id")
        query_id = None if query_ids is None else plain_id(query_ids[index])
        if query_id is None:
            raise RejectedRow("missing_query_id")
        query = self.corpus.get(query_id)
        if query is None:
            raise RejectedRow("unknown_query_id", repr(query_id))
        if not query.answers:
            raise RejectedRow("no_gold_answers", repr(query_id))
        pools = columns.get("candidate_ids")
        pool = None if pools is None or pools[index] is None else [plain_id(c) for c in pools[index]]
        if pool is not None and self.tokenizer is not None:
            from ..selector import parse_selection

            if completion_ids is not None:
                completion = completion_ids[index]
            else:  # the decoded text names the same slots
                completion = completion_text(completions[index])
            try:
                demo_ids = parse_selection(completion, pool, self.tokenizer)
            except ValueError as err:
                raise RejectedRow("invalid_selection", str(err)) from None
        else:
            if completions is None:
                raise RejectedRow("unparseable", "no completion text (pass the selector tokenizer?)")
            demo_ids = parse_id_list(completion_text(completions[index]), self.corpus)
        demo_ids = [plain_id(d) for d in demo_ids]
        demos = check_demos(query, demo_ids, self.corpus, None if pool is None else set(pool), self.max_shots)
        return InContextPrompt(query, demos)

    # ------------------------------------------------------------------------------------- evaluation / RL data
    def score_pairs(self, pairs: Sequence[tuple[Hashable, Sequence[Hashable]]], progress: bool = False
                    ) -> list[dict | None]:
        """Components (hard, soft, gt_prob, rel, answer) of explicit (query id, ordered demo ids) pairs, through
        the same cache and backend as training; None for a pair that could not be scored (its reason is in
        `last_statuses`). Unknown ids raise `KeyError` and a query without gold answers `ValueError`: explicit
        pairs come from code, not from a policy."""
        prompts = [
            InContextPrompt(self.corpus[plain_id(q)], tuple(self.corpus[plain_id(d)] for d in demos))
            for q, demos in pairs
        ]
        unanswered = [p.query.id for p in prompts if not p.query.answers]
        if unanswered:
            raise ValueError(f"queries without gold answers cannot be scored: {unanswered[:5]}")
        outcomes, stats = self._score(prompts, progress=progress)
        self.last_statuses = [o if isinstance(o, str) else "ok" for o in outcomes]
        self.last_components = [o if isinstance(o, dict) else None for o in outcomes]
        self.status_counts.update(self.last_statuses)
        failed = Counter(s for s in self.last_statuses if s != "ok")
        if failed:
            logger.warning("score_pairs: %d of %d pairs could not be scored: %s", sum(failed.values()),
                           len(prompts), dict(failed))
        return [dict(c) if c is not None else None for c in self.last_components]

    def rl_data_record(self, query_id, demo_ids, source: str, components: Mapping, **extra) -> dict:
        """One line of the scored RL-data file (`trl_icd.rewards.cache`), stamped with this scorer's hash."""
        prompt = InContextPrompt(self.corpus[plain_id(query_id)], tuple(self.corpus[plain_id(d)] for d in demo_ids))
        return rl_record(query_id, demo_ids, source, components, self.scorer_hash, content_hash(prompt), **extra)

    def warm_cache(self, path: str | os.PathLike) -> dict:
        """Load this scorer's records of a scored RL-data file into the cache (see `RewardCache.warm_from_jsonl`)."""
        self.cache.register_scorer(self.scorer_hash, self.scorer_identity)
        return self.cache.warm_from_jsonl(path, scorer=self.scorer_hash)

    # ------------------------------------------------------------------------------------------------- scoring
    def _score(self, prompts: Sequence[InContextPrompt], progress: bool = False) -> tuple[list, dict]:
        """Components dict or a failure reason per prompt; each distinct pair is looked up / scored once."""
        scorer, identity = self.scorer_hash, self.scorer_identity
        self.cache.register_scorer(scorer, identity)
        unique: dict[tuple, InContextPrompt] = {}
        for prompt in prompts:
            unique.setdefault(prompt.key, prompt)
        keys = {k: CacheKey(k[0], k[1], content_hash(p)) for k, p in unique.items()}
        cached = self.cache.lookup(scorer, list(keys.values())) if keys else []
        outcome: dict[tuple, dict | str] = {k: c for k, c in zip(keys, cached) if c is not None}
        misses = [p for k, p in unique.items() if k not in outcome]
        hits = len(unique) - len(misses)
        self.cache_hits += hits
        self.cache_misses += len(misses)

        started = time.perf_counter()
        chunk = self.batch_size or max(len(misses), 1)
        bar = tqdm(total=len(misses), desc="scoring pairs", unit="pair", disable=not progress or not misses)
        last_error = None
        for start in range(0, len(misses), chunk):
            batch = misses[start : start + chunk]
            results = self._score_batch(batch)
            fresh = []
            for prompt, result in zip(batch, results):
                if isinstance(result, tuple):  # (reason, error)
                    outcome[prompt.key] = result[0]
                    last_error = result[1]
                else:
                    outcome[prompt.key] = result
                    fresh.append((keys[prompt.key], result))
            self.cache.store(scorer, fresh)
            bar.update(len(batch))
        bar.close()
        scoring_time = time.perf_counter() - started
        self._check_backend_alive(misses, outcome, last_error)
        stats = {"unique": len(unique), "hits": hits, "misses": len(misses), "scoring_time": scoring_time}
        return [outcome[p.key] for p in prompts], stats

    def _score_batch(self, prompts: list[InContextPrompt]) -> list:
        """Components per prompt, or (reason, error) for a prompt the backend failed on. A failed batch is split in
        halves until the failing rows are isolated (also what a too-large batch for memory needs)."""
        answers = [distinct_gold_answers(p.query.answers) for p in prompts]
        try:
            predictions, logprobs = self.backend.answer_and_logprob(prompts, answers)
            if len(predictions) != len(prompts) or len(logprobs) != len(prompts):
                raise RuntimeError(f"backend returned {len(predictions)} answers / {len(logprobs)} log-prob lists "
                                   f"for {len(prompts)} prompts")
        except PartialBatchError as err:
            predictions, logprobs, errors = err.answers, err.logprobs, err.errors
        except Exception as err:  # noqa: BLE001  (any backend failure: isolate it, never crash the batch)
            if len(prompts) == 1:
                logger.debug("scoring failed for %r", prompts[0].key, exc_info=True)
                return [(_failure_reason(err), err)]
            half = len(prompts) // 2
            return self._score_batch(prompts[:half]) + self._score_batch(prompts[half:])
        else:
            errors = {}
        results = []
        for row, prompt in enumerate(prompts):
            if row in errors:
                results.append((_failure_reason(errors[row]), errors[row]))
                continue
            try:
                results.append(self._components(prompt, predictions[row], answers[row], logprobs[row]))
            except (ValueError, TypeError) as err:
                results.append(("backend_error", err))
        return results

    def _components(self, prompt: InContextPrompt, prediction, answers: list[str], logprobs) -> dict:
        """Validated components of one backend result (a malformed result is a backend error, never a reward)."""
        if not isinstance(prediction, str):
            raise TypeError(f"backend answer is {type(prediction).__name__}, not str")
        if logprobs is None or len(logprobs) != len(answers):
            raise ValueError(f"backend gave {0 if logprobs is None else len(logprobs)} log-probs for {len(answers)} "
                             "gold answers")
        checked = {}
        for answer, value in zip(answers, logprobs):
            value = float(value)
            if not math.isfinite(value) or value > 1e-3:
                raise ValueError(f"invalid log-prob {value} for answer {answer!r}")
            checked[answer] = min(value, 0.0)
        components = reward_components(prediction, prompt.query.answers, checked, self.hard_threshold,
                                       self.vqa_protocol)
        components["answer"] = prediction
        return components

    def _check_backend_alive(self, misses, outcome, last_error) -> None:
        if not misses:
            return
        if all(outcome[p.key] == "backend_error" for p in misses):
            self._failed_calls += 1
            if self.max_failed_calls is not None and self._failed_calls >= self.max_failed_calls:
                raise RuntimeError(f"the reward backend failed on every pair in {self._failed_calls} consecutive "
                                   f"calls; last error: {last_error!r}") from last_error
        elif any(isinstance(outcome[p.key], dict) for p in misses):
            self._failed_calls = 0

    # ------------------------------------------------------------------------------------------------- logging
    def _finish_call(self, statuses, components, stats, log_metric, log_extra) -> None:
        self.last_statuses = statuses
        self.last_components = components
        self.status_counts.update(statuses)
        num_rows = max(len(statuses), 1)
        scored = [c for c in components if c is not None]
        invalid = sum(s in INVALID_SELECTION_REASONS for s in statuses)
        errors = sum(s in SCORING_ERROR_REASONS for s in statuses)
        metrics = {
            "invalid_rate": invalid / num_rows,
            "error_rate": errors / num_rows,
            "scoring_time": stats["scoring_time"],
            "backend_pairs": float(stats["misses"]),
        }
        if stats["unique"]:
            metrics["cache_hit_rate"] = stats["hits"] / stats["unique"]
        if scored:
            for name in COMPONENT_KEYS:
                metrics[name] = sum(c[name] for c in scored) / len(scored)
            metrics["num_shots"] = sum(len(c["demo_ids"]) for c in scored) / len(scored)
        self.last_metrics = metrics
        if log_metric is not None:
            for name, value in metrics.items():
                log_metric(f"{self.__name__}/{name}", float(value))
        if log_extra is not None:
            log_extra(f"{self.__name__}/answer", [c["answer"] if c else None for c in components])
            log_extra(f"{self.__name__}/status", list(statuses))
        failed = Counter(s for s in statuses if s != "ok")
        if failed:
            by_kind = {k: v for k, v in failed.items() if k in SCORING_ERROR_REASONS}
            if by_kind:
                logger.warning("%d of %d rows could not be scored (reward %r): %s", sum(by_kind.values()),
                               len(statuses), self.error_reward, by_kind)
            bad = {k: v for k, v in failed.items() if k in INVALID_SELECTION_REASONS}
            if bad:
                logger.info("%d of %d rows had invalid selections (reward %r): %s", sum(bad.values()),
                            len(statuses), self.invalid_reward, bad)


class QwenVLInContextReward(InContextReward):
    """`InContextReward` over a `QwenVLBackend` loaded with `QwenVLBackend.from_pretrained(model_name_or_path,
    **backend_kwargs)` (dtype, device, max_new_tokens, num_beams, max_pixels, the backend's batch_size, ...); every
    other keyword goes to `InContextReward` (its `batch_size` is the most pairs per backend call). A given
    `prompt_format` is handed to the backend, which renders the prompts."""

    def __init__(self, model_name_or_path: str | os.PathLike, corpus: Corpus, backend_kwargs: dict | None = None,
                 **kwargs):
        from .qwen_vl import QwenVLBackend

        backend_kwargs = dict(backend_kwargs or {})
        if kwargs.get("prompt_format") is not None:
            backend_kwargs.setdefault("prompt_format", kwargs["prompt_format"])
        backend = QwenVLBackend.from_pretrained(model_name_or_path, **backend_kwargs)
        super().__init__(corpus, backend, **kwargs)
