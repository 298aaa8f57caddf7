"""The simulated answerer: its rule on hand-built cases, its log-probs, and its oracle against brute force."""

import itertools
import json
import math

import numpy as np
import pytest

from trl_icd.data import Corpus
from trl_icd.data.demo import build_demo_world
from trl_icd.metrics import vqa_accuracy
from trl_icd.rewards.backend import RewardBackend
from trl_icd.rewards.prompt import InContextPrompt
from trl_icd.rewards.simulated import SimulatedBackend, SimulatorRule, relation


def _item(item_id, shape, colour, qtype, answer, answers=None):
    source = "image" if qtype in ("colour", "shape") else "knowledge"
    return {
        "id": item_id,
        "question": f"{qtype}?",
        "answers": answers or [answer] * 10,
        "concept": f"{colour} {shape}",
        "shape": shape,
        "colour": colour,
        "question_type": qtype,
        "answer_source": source,
        "zero_shot_answer": answer if source == "image" else shape,
    }


@pytest.fixture(scope="module")
def hand():
    """Query 0: the code name of a red circle ("zorb"); query 1: the colour of a red circle."""
    records = [
        _item(0, "circle", "red", "name", "zorb", ["zorb"] * 8 + ["circle"] * 2),
        _item(1, "circle", "red", "colour", "red"),
        _item(10, "circle", "red", "name", "zorb"),  # match for 0
        _item(11, "square", "red", "name", "kelp"),  # same type as 0, other concept
        _item(12, "circle", "red", "shape", "circle"),  # same concept as 0, other type
        _item(13, "square", "blue", "colour", "blue"),  # same type as 1, other concept
        _item(14, "triangle", "blue", "colour", "blue"),
        _item(15, "square", "green", "origin", "tarn"),  # unrelated to both
        _item(16, "diamond", "green", "origin", "vosk"),
        _item(17, "circle", "red", "colour", "red"),  # match for 1
    ]
    return Corpus.from_records(records)


@pytest.fixture(scope="module")
def backend():
    return SimulatedBackend()


def answer(backend, corpus, query, demos):
    return backend.answer([InContextPrompt(corpus[query], tuple(corpus[d] for d in demos))])[0]


def test_relations(hand):
    q = hand[0]
    assert [relation(q, hand[i]) for i in (10, 11, 12, 15)] == ["match", "same_type", "same_concept", "unrelated"]


def test_zero_shot(hand, backend):
    assert answer(backend, hand, 1, []) == "red"  # readable off the image
    assert answer(backend, hand, 0, []) == "circle"  # a knowledge question: names the shape it sees


def test_matching_demo_gives_the_code_word(hand, backend):
    assert answer(backend, hand, 0, [10]) == "zorb"
    assert answer(backend, hand, 0, [15, 11, 10]) == "zorb"  # out-votes the others
    assert answer(backend, hand, 0, [11]) == "kelp"  # copies a same-type demonstration of another concept
    assert answer(backend, hand, 0, [15]) == "circle"  # an unrelated one does not beat the image's guess


def test_irrelevant_demos_distract_and_more_is_not_better(hand, backend):
    # the image's vote for "red" (8) is diluted to 8·2/(2+n); same-type votes for "blue" are 3 each
    assert answer(backend, hand, 1, [13]) == "red"
    assert answer(backend, hand, 1, [13, 14]) == "blue"  # 6 > 4
    assert answer(backend, hand, 1, [15, 16, 13, 17]) == "red"  # a match (6) keeps it right
    assert answer(backend, hand, 1, [15, 16, 13]) == "red"  # image 3.2 > 3
    assert answer(backend, hand, 1, [15, 16, 10, 13]) == "blue"  # image 2.67 < 3: one more demo flips it


def test_ties_go_to_the_demo_nearest_the_query(hand):
    backend = SimulatedBackend(same_type_weight=3.0, same_concept_weight=3.0)
    # "kelp" (same type, 3) vs "circle" (same concept, 3 + image guess 2·2/4 = 1): circle leads
    assert answer(backend, hand, 0, [11, 12]) == "circle"
    tie = SimulatedBackend(same_type_weight=3.0, same_concept_weight=3.0, knowledge_weight=1e-12)
    assert answer(tie, hand, 0, [11, 12]) == "circle"  # exact tie 3 vs 3: the later demo wins
    assert answer(tie, hand, 0, [12, 11]) == "kelp"  # order matters, a little


def test_logprobs_follow_the_rule(hand, backend):
    gold = ["zorb", "circle", "never said"]
    relevant, irrelevant = InContextPrompt(hand[0], (hand[10],)), InContextPrompt(hand[0], (hand[15],))
    (lp_rel, lp_irr) = backend.answer_logprob([relevant, irrelevant], [gold, gold])
    assert lp_rel[0] > lp_irr[0] and lp_rel[0] > math.log(0.5)
    assert lp_irr[1] > lp_irr[0]  # without the match the image's guess is likelier
    assert lp_rel[2] < min(lp_rel[:2]) and lp_irr[2] == lp_irr[0]  # unsupported answers get only the smoothing
    # the answer is the most probable supported answer; probabilities stay a distribution
    for prompt in (relevant, irrelevant, InContextPrompt(hand[1], (hand[13], hand[14]))):
        support = backend.support(prompt)
        answers = list(support)
        lps = backend.answer_logprob([prompt], [answers])[0]
        assert answers[int(np.argmax(lps))] == backend.answer([prompt])[0]
        assert sum(math.exp(lp) for lp in lps) < 1.0
    # exact value for the relevant prompt: supports zorb 6, circle 2·2/3, smoothing 0.001, vocabulary 1000
    expected = math.log((6 + 0.001) / (6 + 4 / 3 + 0.001 * 1000))
    assert lp_rel[0] == pytest.approx(expected, rel=1e-12)


def test_answer_and_logprob_and_identity(hand, backend):
    assert isinstance(backend, RewardBackend)
    cases = [(0, [10]), (1, [13, 14]), (0, [])]
    prompts = [InContextPrompt(hand[q], tuple(hand[d] for d in demos)) for q, demos in cases]
    gold = [list(p.query.answers) for p in prompts]
    assert backend.answer_and_logprob(prompts, gold) == (backend.answer(prompts), backend.answer_logprob(prompts, gold))
    json.dumps(backend.identity)
    assert backend.identity != SimulatedBackend(match_weight=7.0).identity
    assert SimulatedBackend(SimulatorRule(), match_weight=7.0).rule.match_weight == 7.0
    with pytest.raises(ValueError):
        backend.answer_logprob(prompts, gold[:1])
    with pytest.raises(ValueError):
        SimulatorRule(unrelated_weight=0.0)


def test_items_without_hidden_fields_are_rejected(backend):
    plain = Corpus.from_records([{"id": 1, "question": "q?", "answers": ["a"] * 10}])
    with pytest.raises(ValueError, match="demo-world items"):
        backend.answer([InContextPrompt(plain[1], ())])


# ------------------------------------------------------------------------------------------------------------------
# On the generated world


@pytest.fixture(scope="module")
def world():
    return build_demo_world(num_train=400, num_eval=200, num_test=0, seed=1)


def _accuracy(backend, query, demos):
    return vqa_accuracy(backend.answer([InContextPrompt(query, tuple(demos))])[0], list(query.answers))


def test_random_demonstrations_hurt_with_more_shots(world, backend):
    rng = np.random.default_rng(0)
    train = [world.corpus[i] for i in world.ids("train")]
    queries = [world.corpus[i] for i in world.ids("val")]
    accuracy = {}
    for shots in (0, 1, 2, 4):
        accuracy[shots] = np.array(
            [_accuracy(backend, q, [train[j] for j in rng.choice(len(train), shots, replace=False)]) for q in queries]
        )
    readable = np.array([q.meta["answer_source"] == "image" for q in queries])
    assert accuracy[0][readable].mean() == 1.0 and accuracy[4][readable].mean() < 0.85
    assert accuracy[1].mean() > accuracy[2].mean() > accuracy[4].mean()


def _brute_force(backend, query, pool, max_shots, min_shots):
    """Independent of the oracle's shortcut: run the rule on every ordered sequence."""
    best = -1.0
    for n in range(min_shots, min(max_shots, len(pool)) + 1):
        for demos in itertools.permutations(pool, n):
            best = max(best, _accuracy(backend, query, demos))
    return best


@pytest.mark.parametrize("rule", [{}, {"same_concept_weight": 3.0, "knowledge_weight": 3.0}, {"dilution": 0.5}])
def test_oracle_equals_brute_force_on_small_pools(world, rule):
    backend = SimulatedBackend(**rule)
    rng = np.random.default_rng(42)
    train = world.ids("train")
    queries = world.ids("val")[:40]
    by_concept = {}
    for i in train:
        by_concept.setdefault(world.corpus[i].meta["concept"], []).append(i)
    for n, q in enumerate(queries):
        query = world.corpus[q]
        # pools rich in near misses: half from the query's concept, half random
        same = by_concept[query.meta["concept"]]
        ids = list(rng.choice(same, min(3, len(same)), replace=False)) + list(rng.choice(train, 3, replace=False))
        pool = [world.corpus[i] for i in dict.fromkeys(ids)]
        for min_shots, max_shots in [(1, 3), (0, 2), (2, 2), (3, 3)]:
            result = backend.oracle_accuracy(query, pool, max_shots, min_shots=min_shots)
            assert result.accuracy == pytest.approx(_brute_force(backend, query, pool, max_shots, min_shots))
            assert min_shots <= len(result.demos) <= max_shots
            assert _accuracy(backend, query, result.demos) == pytest.approx(result.accuracy)


def test_oracle_beats_every_method_on_sampled_pools(world, backend):
    from trl_icd.data.features import fallback_features
    from trl_icd.data.samplers import sample_candidate_pools

    features = fallback_features(world.corpus, show_progress=False)
    train, queries = world.ids("train"), world.ids("val")
    pools = sample_candidate_pools(world.corpus, features, queries, train, 16, method="mix", show_progress=False)
    rng = np.random.default_rng(0)
    gaps = []
    for q in queries:
        query, pool = world.corpus[q], [world.corpus[i] for i in pools[q]]
        rows = [world.corpus.row_of(p.id) for p in pool]
        row = world.corpus.row_of(q)
        rankings = {
            "random": list(rng.permutation(len(pool))),
            "image_sim": list(np.argsort(-(features.image[rows] @ features.image[row]), kind="stable")),
            "text_sim": list(np.argsort(-(features.text[rows] @ features.text[row]), kind="stable")),
        }
        for shots in (1, 2, 4):
            oracle = backend.oracle_accuracy(query, pool, shots, min_shots=shots).accuracy
            for ranking in rankings.values():
                demos = [pool[j] for j in reversed(ranking[:shots])]
                accuracy = _accuracy(backend, query, demos)
                assert oracle >= accuracy - 1e-12
                gaps.append(oracle - accuracy)
    assert np.mean(gaps) > 0.2  # and by a margin: retrieval is not optimal here


def test_oracle_input_checks(hand, backend):
    with pytest.raises(ValueError):
        backend.oracle_accuracy(hand[0], [hand[10]], max_shots=2, min_shots=2)
    with pytest.raises(ValueError):
        backend.oracle_accuracy(hand[0], [hand[10]], max_shots=0, min_shots=1)
    zero = backend.oracle_accuracy(hand[0], [hand[10], hand[10]], max_shots=0, min_shots=0)  # duplicates collapse
    assert zero.demos == () and zero.answer == "circle" and zero.accuracy == pytest.approx(0.6)
