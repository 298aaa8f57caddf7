"""The demo world: deterministic, well-formed, and built so that relevance needs both the image and the question."""

from collections import Counter

import numpy as np
import pytest

from trl_icd.data.demo import (
    COLOURS,
    KNOWLEDGE_TYPES,
    QUESTION_TYPES,
    READABLE_TYPES,
    DemoWorldConfig,
    annotator_answers,
    build_demo_world,
)
from trl_icd.metrics import normalize_answer, vqa_accuracy


@pytest.fixture(scope="module")
def world():
    return build_demo_world(num_train=300, num_eval=60, num_test=40, seed=3)


def test_splits_ids_and_sizes(world):
    corpus = world.corpus
    assert len(world.ids("train")) == 300 and len(world.ids("val")) == 60 and len(world.ids("test")) == 40
    assert corpus.ids == list(range(400))  # train first, then val, then test
    assert [corpus[i].split for i in (0, 299, 300, 359, 360, 399)] == ["train"] * 2 + ["val"] * 2 + ["test"] * 2
    assert len({item.image_id for item in corpus}) == len(corpus)


def test_deterministic_under_seed():
    a = build_demo_world(num_train=40, num_eval=5, num_test=5, seed=7)
    b = build_demo_world(num_train=40, num_eval=5, num_test=5, seed=7)
    c = build_demo_world(num_train=40, num_eval=5, num_test=5, seed=8)
    for x, y in zip(a.corpus, b.corpus, strict=True):
        assert (x.question, x.answers, dict(x.meta)) == (y.question, y.answers, dict(y.meta))
    for i in (0, 17, 49):
        assert np.array_equal(np.asarray(a.corpus[i].image), np.asarray(b.corpus[i].image))
    assert a.knowledge == b.knowledge
    assert [x.answers for x in a.corpus] != [x.answers for x in c.corpus]
    assert a.knowledge != c.knowledge


def test_hidden_fields_and_answers(world):
    for item in world.corpus:
        meta = item.meta
        qtype, shape, colour = meta["question_type"], meta["shape"], meta["colour"]
        assert meta["concept"] == f"{colour} {shape}" and shape in world.shapes and colour in world.colours
        assert qtype in QUESTION_TYPES
        expected = {"colour": colour, "shape": shape}.get(qtype) or world.knowledge[qtype][meta["concept"]]
        assert item.answer == expected  # the canonical answer is the most common one
        assert len(item.answers) == 10
        counts = Counter(item.answers)
        assert all(counts[a] < counts[item.answer] for a in counts if a != item.answer)
        assert all(normalize_answer(a) == a for a in item.answers)  # already in normalised VQA form
        if qtype in READABLE_TYPES:
            assert meta["answer_source"] == "image" and meta["zero_shot_answer"] == item.answer
        else:
            assert meta["answer_source"] == "knowledge" and meta["zero_shot_answer"] == shape
        # the question names at most the item's own attributes, never another shape or colour
        named = {w.strip("?") for w in item.question.lower().split()} & (set(world.shapes) | set(world.colours))
        assert named <= {shape, colour}


def test_knowledge_words_are_distinct_and_not_readable(world):
    for qtype in KNOWLEDGE_TYPES:
        words = list(world.knowledge[qtype].values())
        assert len(set(words)) == len(words) == len(world.concepts)
    all_words = [w for qtype in KNOWLEDGE_TYPES for w in world.knowledge[qtype].values()]
    assert len(set(all_words)) == len(all_words)
    assert not set(all_words) & (set(world.shapes) | set(COLOURS))


def test_question_mix_and_vqa_values(world):
    types = Counter(item.meta["question_type"] for item in world.corpus)
    knowledge = sum(types[t] for t in KNOWLEDGE_TYPES) / len(world.corpus)
    assert abs(knowledge - DemoWorldConfig().knowledge_fraction) < 0.1
    canonical_scores = {round(vqa_accuracy(item.answer, item.answers), 2) for item in world.corpus}
    assert {0.9, 1.0} <= canonical_scores  # ambiguous items: 3 of 10 annotators
    noise_scores = {
        round(vqa_accuracy(item.meta["zero_shot_answer"], item.answers), 2)
        for item in world.corpus
        if item.meta["answer_source"] == "knowledge"
    }
    assert {0.0, 0.3, 0.6} <= noise_scores  # the 10-choose-9 values of 0, 1 and 2 matching annotators


def test_annotator_answers_caps_alternatives():
    rng = np.random.default_rng(0)
    for _ in range(200):
        answers = annotator_answers("red", ("pink", "orange"), rng, noise=0.6, min_canonical=3, ambiguous=True)
        counts = Counter(answers)
        assert len(answers) == 10 and counts["red"] >= 3
        assert all(counts[a] < counts["red"] for a in ("pink", "orange"))


def test_images(world):
    image = world.corpus[0].image
    assert image.mode == "RGB" and image.size == (48, 48)
    pixels = np.asarray(image).reshape(-1, 3).astype(int)
    target = np.array(COLOURS[world.corpus[0].meta["colour"]])
    near = np.abs(pixels - target).max(axis=1) <= 40  # shade jitter + pixel noise
    assert 0.03 < near.mean() < 0.6  # a visible object, smaller than the background


def test_concept_is_visible_and_type_is_readable_in_features(world):
    """The design premise: the image shows the concept (not the question type), a few question words show the type
    (linearly: a nearest-centroid rule reads it), yet plain similarity rarely finds a true match."""
    from trl_icd.data.features import fallback_features

    features = fallback_features(world.corpus, show_progress=False)
    concept = np.array([item.meta["concept"] for item in world.corpus])
    qtype = np.array([item.meta["question_type"] for item in world.corpus])

    def nearest(matrix):
        sims = matrix @ matrix.T
        np.fill_diagonal(sims, -np.inf)
        return sims.argmax(axis=1)

    by_image, by_text, by_both = nearest(features.image), nearest(features.text), nearest(features.combined())
    assert (concept[by_image] == concept).mean() > 0.85
    assert (qtype[by_image] == qtype).mean() < 0.4  # the image says nothing about the question type
    assert (concept[by_text] == concept).mean() < 0.3  # the question names at most half a concept
    types = sorted(set(qtype))
    centroids = np.stack([features.text[qtype == t].mean(axis=0) for t in types])
    assert (np.array(types)[(features.text @ centroids.T).argmax(axis=1)] == qtype).mean() > 0.97
    match = (concept[by_both] == concept) & (qtype[by_both] == qtype)
    assert match.mean() < 0.5  # the nearest item in the selector's own item table is usually not a match


def test_config_validation():
    with pytest.raises(ValueError):
        DemoWorldConfig(num_train=0)
    with pytest.raises(ValueError):
        DemoWorldConfig(num_shapes=99)
    with pytest.raises(ValueError):
        DemoWorldConfig(shade_jitter=40)
    with pytest.raises(TypeError):
        build_demo_world(not_a_field=1)
    world = build_demo_world(DemoWorldConfig(num_train=10, num_eval=0, num_test=0), seed=5)
    assert world.config.seed == 5 and len(world.corpus) == 10


def test_every_vqa_protocol_scores_the_demo_world_alike(world):
    """Demo answers are already in normalised form, so the protocols' rule differences never apply: every answer the
    simulated answerer can give (a normalised item or zero-shot answer) scores the same under each protocol."""
    space = {normalize_answer(i.answer) for i in world.corpus}
    space |= {normalize_answer(i.meta["zero_shot_answer"]) for i in world.corpus}
    for query in world.corpus:
        for answer in space:
            today = vqa_accuracy(answer, query.answers, "vqa")
            assert today == vqa_accuracy(answer, query.answers, "vqa2016") == vqa_accuracy(
                answer, query.answers, "lmms_eval"), (answer, query.answers)
