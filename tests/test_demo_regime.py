"""The OK-VQA-like regime of the demo world: the default world is untouched, the preset and its simulator rule are
applied together, the new mechanisms (per-item prior, per-pair vote noise) keep the oracle exact, and the measured
calibration figures stay near the published Qwen2.5-VL-3B ones."""

import hashlib
import json

import numpy as np
import pytest
from test_simulated_backend import _accuracy, _brute_force

from trl_icd.data.demo import DEMO_PRESETS, DemoWorldConfig, build_demo_world
from trl_icd.data.demo_calibration import OKVQA_TARGETS, calibration_table, measure_regime
from trl_icd.rewards.prompt import InContextPrompt
from trl_icd.rewards.simulated import SimulatedBackend, SimulatorRule, pair_normal


def _fingerprint(world) -> str:
    digest = hashlib.sha256()
    for i in world.corpus.ids:
        item = world.corpus[i]
        meta = {k: v for k, v in item.meta.items() if k not in ("known", "confidence")}
        digest.update(json.dumps([item.id, item.question, list(item.answers), meta], sort_keys=True,
                                 default=str).encode())
    return digest.hexdigest()[:16]


def test_default_world_and_rule_are_unchanged():
    """The demo recipe's world and answers, byte for byte as before the regime existed (hashes taken then)."""
    world = build_demo_world()
    assert _fingerprint(world) == "ab01634a6e7a913f"
    assert all(world.corpus[i].meta["confidence"] == 1.0 and not world.corpus[i].meta["known"]
               for i in world.corpus.ids)
    backend = SimulatedBackend()
    ids = world.ids("train")
    answers = backend.answer([InContextPrompt(world.corpus[q], tuple(world.corpus[d] for d in ids[q + 1 : q + 4]))
                              for q in ids[:300]])
    assert hashlib.sha256(json.dumps(answers).encode()).hexdigest()[:16] == "476b92e248c6b00f"
    assert "vote_noise" not in backend.identity["rule"]  # old reward caches of the default rule stay valid
    assert build_demo_world(preset="default").corpus.ids == world.corpus.ids
    assert _fingerprint(build_demo_world(preset="default")) == "ab01634a6e7a913f"


def test_preset_sets_world_and_rule():
    world = build_demo_world(preset="okvqa_like", num_train=200, num_eval=50, num_test=0)
    preset = DEMO_PRESETS["okvqa_like"]
    assert world.config.preset == "okvqa_like" and world.config.num_train == 200
    for key, value in preset.world.items():
        if key not in ("num_train", "num_eval", "num_test"):
            assert getattr(world.config, key) == value
    backend = SimulatedBackend.for_world(world)
    for key, value in preset.rule.items():
        assert getattr(backend.rule, key) == value
    assert backend.identity["world"] != SimulatedBackend.for_world(build_demo_world(
        preset="okvqa_like", num_train=200, num_eval=50, num_test=0, seed=1)).identity["world"]
    with pytest.raises(ValueError, match="unknown demo preset"):
        build_demo_world(preset="nope")
    with pytest.raises(ValueError, match="either"):
        build_demo_world(DemoWorldConfig(), preset="okvqa_like")
    with pytest.raises(ValueError, match="unknown demo preset"):
        DemoWorldConfig(preset="nope")
    assert world.config == DemoWorldConfig.from_preset("okvqa_like", num_train=200, num_eval=50, num_test=0)
    with pytest.raises(ValueError, match="unknown demo preset"):
        DemoWorldConfig.from_preset("nope")


def test_known_items_answer_right_at_zero_shots():
    world = build_demo_world(num_train=2000, num_eval=0, num_test=0, known_fraction=0.4, confidence_spread=0.5)
    items = [world.corpus[i] for i in world.ids("train")]
    knowledge = [it for it in items if it.meta["answer_source"] == "knowledge"]
    known = [it for it in knowledge if it.meta["known"]]
    assert len(known) / len(knowledge) == pytest.approx(0.4, abs=0.04)
    backend = SimulatedBackend()
    for item in known[:50]:
        assert item.meta["zero_shot_answer"] == item.answer
        assert backend.answer([InContextPrompt(item, ())])[0] == item.answer
    confidences = np.array([it.meta["confidence"] for it in items])
    assert np.median(confidences) == pytest.approx(1.0, rel=0.1)
    assert np.std(np.log(confidences)) == pytest.approx(0.5, rel=0.1)
    # The image's vote carries the item's confidence.
    item = known[0]
    assert backend.image_vote(item, 2) == pytest.approx(8.0 * item.meta["confidence"] * 2 / 4)


def test_vote_noise_is_fixed_per_pair():
    assert pair_normal(3, 17) == pair_normal(3, 17) != pair_normal(17, 3)
    draws = np.array([pair_normal(5, i) for i in range(4000)])
    assert abs(draws.mean()) < 0.06 and draws.std() == pytest.approx(1.0, abs=0.05)
    world = build_demo_world(num_train=50, num_eval=5, num_test=0)
    q, d = world.corpus[world.ids("val")[0]], world.corpus[world.ids("train")[0]]
    plain, noisy = SimulatedBackend(), SimulatedBackend(vote_noise=0.8)
    assert noisy.demo_vote(q, d) == pytest.approx(plain.demo_vote(q, d) * np.exp(0.8 * pair_normal(q.id, d.id)))
    with pytest.raises(ValueError):
        SimulatorRule(vote_noise=-1)


def test_oracle_stays_exact_in_the_regime():
    """Per-item confidence and per-pair noise keep per-item weights, so the oracle's shortcut still holds."""
    world = build_demo_world(preset="okvqa_like", num_train=300, num_eval=30, num_test=0, seed=2)
    backend = SimulatedBackend.for_world(world)
    rng = np.random.default_rng(0)
    train = world.ids("train")
    for q in world.ids("val")[:25]:
        query = world.corpus[q]
        same = [i for i in train if world.corpus[i].meta["concept"] == query.meta["concept"]]
        ids = list(rng.choice(same, min(3, len(same)), replace=False)) + list(rng.choice(train, 3, replace=False))
        pool = [world.corpus[i] for i in dict.fromkeys(ids)]
        for min_shots, max_shots in [(1, 3), (2, 2)]:
            result = backend.oracle_accuracy(query, pool, max_shots, min_shots=min_shots)
            assert result.accuracy == pytest.approx(_brute_force(backend, query, pool, max_shots, min_shots))
            assert _accuracy(backend, query, result.demos) == pytest.approx(result.accuracy)


def test_regime_stays_calibrated():
    """A held-out world seed, 400 queries: each published random-demonstration figure within 5 points (the 95%
    interval there is about ±5), accuracy falling from 1 to 4 shots, most random groups flat under hard rewards,
    few under the gold-answer-probability shaping; the default world is far from these figures."""
    figures = measure_regime(build_demo_world(preset="okvqa_like", num_eval=400, num_test=0, seed=3))
    targets = OKVQA_TARGETS["random"]["value"]
    for shots, target in targets.items():
        assert abs(figures["random"][shots]["mean"] - target) < 0.05, (shots, figures["random"][shots])
    assert figures["random"][1]["mean"] > figures["random"][4]["mean"]
    assert abs(figures["rl_data"]["mean_acc"] - OKVQA_TARGETS["rl_data/mean_acc"]["value"]) < 0.05
    assert figures["groups"]["hard_only"]["flat"] > 0.5
    assert figures["groups"]["hard_plus_gtprob_plus_rel"]["flat"] < 0.2
    assert 0 < figures["pool"]["helped_by_best_selection"] < 0.5
    table = calibration_table(figures)
    assert "| random demonstrations, 1-shot | 50.6 |" in table

    default = measure_regime(build_demo_world(num_eval=200, num_test=0, seed=3), num_queries=200)
    assert default["random"][4]["mean"] < 0.35  # the easy default world is not OK-VQA-like
