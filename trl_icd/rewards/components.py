"""Reward components of one scored prompt: how right the VLM's answer is (`hard`, `soft`), how likely the gold answers
were (`gt_prob`), and how close a wrong answer came (`rel`).

They are computed once per (query, ordered demonstrations) and cached together, so any shaping mode
(`trl_icd.rewards.shaping`) can be applied later without asking the model again.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from difflib import SequenceMatcher

from ..metrics import DEFAULT_VQA_PROTOCOL, normalize_answer, vqa_accuracy

COMPONENT_KEYS = ("hard", "soft", "gt_prob", "rel")


def distinct_gold_answers(answers: Sequence[str]) -> list[str]:
    """The gold answers worth scoring: distinct, non-blank, in first-seen order.

    A blank answer has no tokens, so its summed log-prob would be 0 (probability 1): it is never scored.
    """
    return list(dict.fromkeys(a for a in answers if a.strip()))


def gt_probability(answers: Sequence[str], answer_logprobs: Mapping[str, float]) -> float:
    """Σ over distinct gold answers a of min(count(a)/3, 1) · p(a), with p(a) = exp(summed answer log-prob).

    This is the model's expected VQA credit from the gold answers alone (the research code's `vqa_gt_prob`, computed
    from answer-token log-probs instead of a mis-aligned mean CE). p(a) is the probability of the answer's tokens,
    not of "answer then stop", so with nested answers ("dog", "dog house") the sum can exceed 1.
    """
    counts = Counter(a for a in answers if a.strip())
    total = 0.0
    for answer, count in counts.items():
        if answer not in answer_logprobs:
            raise ValueError(f"no log-prob for gold answer {answer!r}")
        total += min(count / 3.0, 1.0) * math.exp(answer_logprobs[answer])
    return total


def token_f1(prediction: str, reference: str) -> float:
    """Bag-of-words F1 between two already normalised strings (SQuAD style)."""
    pred, ref = prediction.split(), reference.split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def edit_similarity(prediction: str, reference: str) -> float:
    """`difflib.SequenceMatcher` ratio of two already normalised strings (1 = identical)."""
    return SequenceMatcher(None, prediction, reference).ratio()


def relevance(prediction: str, answers: Sequence[str], protocol: str = DEFAULT_VQA_PROTOCOL) -> float:
    """max over gold answers of max(token-F1, edit similarity), after the VQA `protocol`'s full normalisation of both
    sides.

    Graded credit for a wrong answer that is close ("dogs" vs "dog"); an empty prediction gets 0.
    """
    pred = normalize_answer(prediction, protocol)
    if not pred:
        return 0.0
    best = 0.0
    for gold in {normalize_answer(a, protocol) for a in answers}:
        if gold:
            best = max(best, token_f1(pred, gold), edit_similarity(pred, gold))
    return best


def reward_components(
    prediction: str,
    answers: Sequence[str],
    answer_logprobs: Mapping[str, float],
    hard_threshold: float = 0.0,
    protocol: str = DEFAULT_VQA_PROTOCOL,
) -> dict[str, float]:
    """{hard, soft, gt_prob, rel} of one prediction.

    Args:
        prediction: the VLM's answer to the query.
        answers: the query's gold answers (all annotations, repeats included: they are counts).
        answer_logprobs: summed answer-token log-prob of each distinct non-blank gold answer.
        hard_threshold: `hard` = 1 when `soft` > this (0 = "any annotator agreed").
        protocol: the VQA scoring protocol of `soft` and the normalisation of `rel` (`trl_icd.metrics`).
    """
    soft = float(vqa_accuracy(prediction, list(answers), protocol))
    return {
        "hard": 1.0 if soft > hard_threshold else 0.0,
        "soft": soft,
        "gt_prob": gt_probability(answers, answer_logprobs),
        "rel": relevance(prediction, answers, protocol),
    }
