"""A deterministic stand-in for the VLM on the demo world (`trl_icd.data.demo`): it answers an in-context prompt by
weighing what it sees in the query image against the answers its demonstrations show, so which demonstrations are
chosen (and, in ties, their order) decides the answer, and the best achievable accuracy is known exactly.

The rule (all weights are `SimulatorRule` fields; defaults in brackets)
-----------------------------------------------------------------------
A prompt is a query q and demonstrations d_1..d_n in prompt order (d_n is next to the query). Every item carries its
hidden `concept`, `question_type`, `answer_source` and `zero_shot_answer` in `CorpusItem.meta`.

1. Each demonstration votes for the answer it shows (`d_i.answer`) with a weight set by its relation to q:
   ``match`` (same concept and question type) [6], ``same_concept`` (other type: it *looks* right) [2.5],
   ``same_type`` (other concept: the question looks right) [3], ``unrelated`` [1].
2. The query image votes for q's zero-shot answer (the colour/shape it sees; for a knowledge question, the shape
   it sees — a wrong guess) with ``readable_weight`` [8] or ``knowledge_weight`` [2], diluted by the context:
   multiplied by ``dilution / (dilution + n)`` [dilution 2]. More demonstrations mean less attention on the image.
3. support(a) = the sum of the votes for a (answers compared after VQA normalisation). The answer is the a of
   largest support; a tie goes to the answer shown nearest the query (the largest position i with d_i.answer = a;
   the image's own vote counts as position 0). So order matters, a little: only in ties.
4. p(a) = (support(a) + smoothing) / (Σ_b support(b) + smoothing · vocabulary_size) [smoothing 0.001, vocabulary
   1000]: the gold answer is likely exactly when relevant demonstrations vote for it, so `gt_prob` is informative.

Consequences: a knowledge question (name / origin / use) is answered right only when a matching demonstration is
shown and out-votes the rest; irrelevant demonstrations dilute the image's vote and add votes for wrong answers, so
accuracy falls as random demonstrations are added; two same-type demonstrations sharing a wrong answer beat the image
from two shots on, one from four shots on — more is not always better. A match out-votes any one near miss, so a
selection that covers several question types of the right concept ("hedging") also works, once it has as many slots
as there are knowledge types; keep `max_shots` below that (2 with the default world) to make the type matter.

The oracle
----------
`oracle_accuracy(query, pool, max_shots, min_shots)` is the best accuracy over all ordered sequences of distinct pool
items of every length in [min_shots, max_shots], computed exactly without enumerating sequences: for a target answer
a and length n, (i) an optimal sequence holds the min(n, #pool items showing a) highest-weight items showing a — each
swap of another item for an unused a-item raises support(a), lowers or keeps every other support and never moves a's
last position earlier; (ii) they go last, after the f remaining "filler" items, so a wins every tie; (iii) a is then
reachable iff fillers exist with every other support ≤ support(a) (strictly below when a has no demonstration, since
it then loses ties): per other answer b, taking b's lightest items first, b can absorb k_b fillers, and a is
reachable iff Σ_b k_b ≥ f. The oracle is the largest VQA accuracy of a reachable answer; its sequence is checked by
running the rule on it. Tests compare it to brute-force enumeration.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from statistics import NormalDist
from typing import NamedTuple

import numpy as np

from ..data.corpus import CorpusItem
from .backend import RewardBackend
from .prompt import InContextPrompt

logger = logging.getLogger(__name__)

RELATIONS = ("match", "same_concept", "same_type", "unrelated")
REQUIRED_META = ("concept", "question_type", "answer_source", "zero_shot_answer")
_DIGITS = 9  # supports are compared after rounding, so float summation order never decides a tie


@dataclass(frozen=True)
class SimulatorRule:
    """The weights of the simulated answerer (see the module docstring for the rule)."""

    match_weight: float = field(default=6.0, metadata={"help": "Vote of a demonstration of the same concept and type."})
    same_concept_weight: float = field(
        default=2.5, metadata={"help": "Vote of a demonstration of the same concept but another question type."}
    )
    same_type_weight: float = field(
        default=3.0, metadata={"help": "Vote of a demonstration of the same question type but another concept."}
    )
    unrelated_weight: float = field(default=1.0, metadata={"help": "Vote of an unrelated demonstration."})
    readable_weight: float = field(
        default=8.0, metadata={"help": "Vote of the query image for a readable (colour/shape) answer, 0-shot."}
    )
    knowledge_weight: float = field(
        default=2.0, metadata={"help": "Vote of the query image for its guess at a knowledge answer, 0-shot."}
    )
    dilution: float = field(
        default=2.0, metadata={"help": "The image's vote is scaled by dilution / (dilution + number of demos)."}
    )
    vote_noise: float = field(
        default=0.0,
        metadata={
            "help": "Log-normal sigma of a fixed per-(query, demonstration) factor on each demonstration's vote: a "
            "real model reacts to particular demonstrations idiosyncratically (0: votes depend on the relation only)."
        },
    )
    smoothing: float = field(default=0.001, metadata={"help": "Support every answer gets in the log-probabilities."})
    vocabulary_size: int = field(default=1000, metadata={"help": "Answers sharing the smoothing mass."})

    def __post_init__(self):
        weights = (self.match_weight, self.same_concept_weight, self.same_type_weight, self.unrelated_weight)
        if min(weights) <= 0 or self.readable_weight <= 0 or self.knowledge_weight <= 0 or self.dilution <= 0:
            raise ValueError("all simulator weights and the dilution must be positive")
        if self.vote_noise < 0:
            raise ValueError("vote_noise must be non-negative")
        if self.smoothing <= 0 or self.vocabulary_size < 1:
            raise ValueError("smoothing must be positive and vocabulary_size >= 1")

    def weight(self, relation: str) -> float:
        return getattr(self, f"{relation}_weight")


class OracleResult(NamedTuple):
    """The best accuracy reachable from a pool, the answer that reaches it and one sequence that does."""

    accuracy: float
    demos: tuple[CorpusItem, ...]
    answer: str


def _require_meta(item: CorpusItem) -> Mapping:
    meta = item.meta
    if any(key not in meta for key in REQUIRED_META):
        missing = [key for key in REQUIRED_META if key not in meta]
        raise ValueError(
            f"item {item.id!r} lacks the hidden fields {missing} the simulated answerer needs: SimulatedBackend "
            "only answers demo-world items (trl_icd.data.demo.build_demo_world)"
        )
    return meta


def relation(query: CorpusItem, demo: CorpusItem) -> str:
    """How `demo` relates to `query`: one of `RELATIONS`."""
    q, d = _require_meta(query), _require_meta(demo)
    same_concept = q["concept"] == d["concept"]
    same_type = q["question_type"] == d["question_type"]
    if same_concept and same_type:
        return "match"
    if same_concept:
        return "same_concept"
    if same_type:
        return "same_type"
    return "unrelated"


_STANDARD_NORMAL = NormalDist()


def pair_normal(query_id, demo_id) -> float:
    """A standard normal draw fixed by the (query id, demo id) pair: the same pair always gets the same value, in
    every process and run."""
    digest = hashlib.blake2b(repr((query_id, demo_id)).encode(), digest_size=8).digest()
    return _STANDARD_NORMAL.inv_cdf((int.from_bytes(digest, "big") + 0.5) / 2**64)


def _default_normalize() -> Callable[[str], str]:
    from ..metrics import normalize_answer

    return normalize_answer


class SimulatedBackend(RewardBackend):
    """The demo world's answerer (rule in the module docstring). Stateless apart from a small memo of normalised
    answers; thread-safe for reading."""

    def __init__(self, rule: SimulatorRule | None = None, world_key: str | None = None, **overrides):
        if rule is None:
            rule = SimulatorRule(**overrides)
        elif overrides:
            rule = SimulatorRule(**{**asdict(rule), **overrides})
        self.rule = rule
        self.world_key = world_key
        self._normalize = _default_normalize()
        self._norm_memo: dict[str, str] = {}

    @classmethod
    def for_world(cls, world, **overrides) -> SimulatedBackend:
        """The answerer of a `DemoWorld`: its preset's rule (plus `overrides`), with the world's settings in
        `identity`, so a reward cache never serves one world's answers to another (ids repeat across worlds)."""
        from .prompt import stable_hash

        return cls(SimulatorRule(**{**world.simulator_rule, **overrides}), world_key=stable_hash(asdict(world.config)))

    # -- the rule ------------------------------------------------------------------------------------------------

    @property
    def identity(self) -> dict:
        rule = asdict(self.rule)
        if not rule["vote_noise"]:
            del rule["vote_noise"]  # absent means 0, as before the field existed: old caches stay valid
        identity = {"backend": "simulated", "version": 1, "rule": rule}
        if self.world_key is not None:
            identity["world"] = self.world_key
        return identity

    def _norm(self, answer: str) -> str:
        norm = self._norm_memo.get(answer)
        if norm is None:
            norm = self._norm_memo[answer] = self._normalize(answer)
        return norm

    def image_vote(self, query: CorpusItem, num_shots: int) -> float:
        """The query image's vote for its zero-shot answer, diluted by `num_shots` demonstrations: the readable
        weight when the answerer sees or knows the answer, else the knowledge weight, times the item's
        `confidence` (1 when absent)."""
        meta = _require_meta(query)
        sure = meta["answer_source"] == "image" or meta.get("known", False)
        base = self.rule.readable_weight if sure else self.rule.knowledge_weight
        return base * meta.get("confidence", 1.0) * self.rule.dilution / (self.rule.dilution + num_shots)

    def demo_vote(self, query: CorpusItem, demo: CorpusItem) -> float:
        """The vote of `demo` for the answer it shows, as a demonstration for `query`: its relation's weight, times
        exp(vote_noise · z) with z a standard normal fixed by the (query id, demo id) pair."""
        weight = self.rule.weight(relation(query, demo))
        if self.rule.vote_noise:
            weight *= math.exp(self.rule.vote_noise * pair_normal(query.id, demo.id))
        return weight

    def support(self, prompt: InContextPrompt) -> dict[str, tuple[float, int]]:
        """{normalised answer: (support, last position)} for every answer with a vote (position 0 = the image)."""
        query = prompt.query
        n = len(prompt.demos)
        votes: dict[str, list] = {self._norm(_require_meta(query)["zero_shot_answer"]): [self.image_vote(query, n), 0]}
        for position, demo in enumerate(prompt.demos, start=1):
            entry = votes.setdefault(self._norm(demo.answer), [0.0, 0])
            entry[0] += self.demo_vote(query, demo)
            entry[1] = position
        return {answer: (support, last) for answer, (support, last) in votes.items()}

    @staticmethod
    def _winner(support: Mapping[str, tuple[float, int]]) -> str:
        return max(support, key=lambda a: (round(support[a][0], _DIGITS), support[a][1]))

    def _logprobs(self, support: Mapping[str, tuple[float, int]], answers: Sequence[str]) -> list[float]:
        eps = self.rule.smoothing
        total = sum(s for s, _ in support.values()) + eps * self.rule.vocabulary_size
        return [float(np.log((support.get(self._norm(a), (0.0, 0))[0] + eps) / total)) for a in answers]

    def answer(self, prompts: Sequence[InContextPrompt]) -> list[str]:
        return [self._winner(self.support(p)) for p in prompts]

    def answer_logprob(
        self, prompts: Sequence[InContextPrompt], answers: Sequence[Sequence[str]]
    ) -> list[list[float]]:
        if len(prompts) != len(answers):
            raise ValueError(f"{len(prompts)} prompts but {len(answers)} answer lists")
        return [self._logprobs(self.support(p), a) for p, a in zip(prompts, answers, strict=True)]

    def answer_and_logprob(
        self, prompts: Sequence[InContextPrompt], answers: Sequence[Sequence[str]]
    ) -> tuple[list[str], list[list[float]]]:
        if len(prompts) != len(answers):
            raise ValueError(f"{len(prompts)} prompts but {len(answers)} answer lists")
        supports = [self.support(p) for p in prompts]
        logprobs = [self._logprobs(s, a) for s, a in zip(supports, answers, strict=True)]
        return [self._winner(s) for s in supports], logprobs

    # -- the oracle ----------------------------------------------------------------------------------------------

    def oracle_accuracy(
        self,
        query: CorpusItem,
        pool_items: Sequence[CorpusItem],
        max_shots: int,
        min_shots: int = 1,
        accuracy: Callable[[str, Sequence[str]], float] | None = None,
    ) -> OracleResult:
        """The best VQA accuracy any ordered sequence of `min_shots`..`max_shots` distinct `pool_items` reaches on
        `query`, with its answer and one such sequence (exact; see the module docstring for why).

        `min_shots=1` matches a selector that must pick at least one demonstration; pass `min_shots=max_shots=s` for
        the oracle at exactly s shots. `accuracy(prediction, gold_answers)` defaults to the official VQA accuracy."""
        if accuracy is None:
            from ..metrics import vqa_accuracy as accuracy
        if min_shots < 0 or max_shots < min_shots:
            raise ValueError(f"need 0 <= min_shots <= max_shots, got {min_shots}, {max_shots}")
        unique = list({item.id: item for item in pool_items}.values())
        lengths = range(min_shots, min(max_shots, len(unique)) + 1)
        if not lengths:
            raise ValueError(f"a pool of {len(unique)} distinct items cannot give {min_shots} demonstrations")

        # Pool items by the answer they show, each bucket sorted by weight (heaviest first).
        buckets: dict[str, list[tuple[float, CorpusItem]]] = {}
        for item in unique:
            buckets.setdefault(self._norm(item.answer), []).append((self.demo_vote(query, item), item))
        for bucket in buckets.values():
            bucket.sort(key=lambda pair: -pair[0])
        zero_shot = self._norm(_require_meta(query)["zero_shot_answer"])
        gold = list(query.answers)
        scored = sorted(
            ((float(accuracy(a, gold)), a) for a in {*buckets, zero_shot}), key=lambda pair: (-pair[0], pair[1])
        )
        for acc, target in scored:
            for n in lengths:
                demos = self._sequence_reaching(query, target, n, buckets, zero_shot)
                if demos is not None:
                    predicted = self.answer([InContextPrompt(query, demos)])[0]
                    if predicted != target:  # the derivation above guarantees this; keep the guarantee checked
                        raise RuntimeError(f"oracle sequence answers {predicted!r}, expected {target!r}")
                    return OracleResult(acc, demos, target)
        raise RuntimeError("no reachable answer; unreachable for a non-empty length range")  # pragma: no cover

    def _sequence_reaching(
        self,
        query: CorpusItem,
        target: str,
        n: int,
        buckets: Mapping[str, list[tuple[float, CorpusItem]]],
        zero_shot: str,
    ) -> tuple[CorpusItem, ...] | None:
        """A length-`n` sequence whose answer is `target`, or None if none exists (module docstring, oracle)."""
        image_vote = self.image_vote(query, n)
        own = buckets.get(target, [])[:n]
        support = sum(w for w, _ in own) + (image_vote if target == zero_shot else 0.0)
        if not own and target != zero_shot:
            return None  # no vote at all; with n >= 1 some other answer has one
        threshold = round(support, _DIGITS)
        strict = not own  # a target with no demonstration loses ties

        def fits(load: float) -> bool:
            load = round(load, _DIGITS)
            return load < threshold if strict else load <= threshold

        fillers_needed = n - len(own)
        fillers: list[tuple[float, CorpusItem]] = []
        if zero_shot != target and not fits(image_vote):
            return None  # the image alone out-votes the target
        for answer in sorted(buckets, key=lambda a: (min(w for w, _ in buckets[a]), a)):
            if answer == target or len(fillers) >= fillers_needed:
                continue
            load = image_vote if answer == zero_shot else 0.0
            for weight, item in reversed(buckets[answer]):  # lightest first
                if len(fillers) >= fillers_needed or not fits(load + weight):
                    break
                load += weight
                fillers.append((weight, item))
        if len(fillers) < fillers_needed:
            return None
        fillers.sort(key=lambda pair: pair[0])
        return tuple(item for _, item in fillers) + tuple(item for _, item in reversed(own))


__all__ = ["RELATIONS", "OracleResult", "SimulatedBackend", "SimulatorRule", "relation"]
