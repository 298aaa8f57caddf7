"""QwenVLBackend on a tiny, input-sensitive random Qwen2.5-VL in fp32: batched == one-by-one, the answer log-prob
against an independent computation, the fast paths against the plain one, 0-shot and 4-shot prompts."""

import numpy as np
import pytest
import torch

from trl_icd.rewards.prompt import InContextPrompt, PromptFormat
from trl_icd.rewards.qwen_vl import QwenVLBackend
from trl_icd.testing.qwen_vl import synthetic_vqa_corpus, tiny_qwen2_5_vl

ATOL = 1e-4  # fp32 batched-vs-single tolerance (measured max 1e-5)

# (query id, number of demonstrations): 0-4 shots mixed, in an order that is not sorted by image count.
LAYOUT = [(0, 4), (1, 0), (2, 2), (3, 1), (4, 3), (5, 0), (6, 4), (7, 2)]


@pytest.fixture(scope="module")
def corpus():
    # Three image sizes -> three different image-token counts in one batch.
    return synthetic_vqa_corpus(24, image_sizes=((112, 112), (84, 56), (56, 98)), seed=0)


@pytest.fixture(scope="module")
def tiny():
    return tiny_qwen2_5_vl(init_std=0.5, seed=0)


@pytest.fixture(scope="module")
def prompts(corpus):
    return [InContextPrompt(corpus[q], tuple(corpus[8 + q + j] for j in range(k))) for q, k in LAYOUT]


@pytest.fixture(scope="module")
def gold(prompts):
    # Distinct gold answers, a duplicate, a multi-token string and the empty answer.
    return [list(dict.fromkeys(p.query.answers)) + [p.query.answer, "a red double-decker bus", ""] for p in prompts]


def flat(nested):
    return np.array([x for row in nested for x in row])


def make_backend(tiny, **kwargs):
    model, processor = tiny
    return QwenVLBackend(model, processor, **kwargs)


def reference_logprob(model, processor, prompt, answer, include_end=False, fmt=PromptFormat()):
    """Sum of the answer tokens' log-probs from the FULL logits of the single sequence, with the answer located by
    character offsets in the image-expanded text (shares nothing with the backend but the chat template)."""
    text = processor.apply_chat_template(fmt.messages(prompt), tokenize=False, add_generation_prompt=True)
    suffix = answer + ("<|im_end|>" if include_end or answer == "" else "")
    inputs = processor(text=[text + suffix], images=fmt.images(prompt), return_tensors="pt")
    parts = (text + suffix).split("<|image_pad|>")
    counts = (inputs["image_grid_thw"].prod(-1) // 4).tolist()
    expanded = parts[0] + "".join("<|image_pad|>" * n + part for n, part in zip(counts, parts[1:]))
    encoded = processor.tokenizer(expanded, return_offsets_mapping=True)
    assert encoded["input_ids"] == inputs["input_ids"][0].tolist()
    start = len(expanded) - len(suffix)
    positions = [k for k, (s, e) in enumerate(encoded["offset_mapping"]) if s >= start and e > s]
    assert "".join(processor.tokenizer.decode([encoded["input_ids"][k]]) for k in positions) == suffix
    with torch.no_grad():
        logits = model(**inputs).logits[0].double()
    logprobs = logits.log_softmax(-1)
    ids = inputs["input_ids"][0]
    return float(sum(logprobs[k - 1, ids[k]] for k in positions))


@pytest.mark.parametrize(
    "fast, bucketing", [(True, False), (False, False), (True, True)], ids=["cache+prefill", "plain", "bucketed"]
)
def test_batched_equals_one_by_one(tiny, prompts, gold, fast, bucketing):
    """Unbucketed batches mix 0-4 shots and three image sizes in one batch."""
    kwargs = {} if fast else {"vision_cache_size": 0, "shared_prefill": False}
    batched = make_backend(tiny, batch_size=4, bucketing=bucketing, **kwargs)
    batches = list(batched._buckets(prompts))
    assert (max(len({len(prompts[i].items) for i in b}) for b in batches) > 1) == (not bucketing)
    single = make_backend(tiny, batch_size=1, **kwargs)
    answers_b, logprobs_b = batched.answer_and_logprob(prompts, gold)
    assert answers_b == batched.answer(prompts)
    for i, prompt in enumerate(prompts):
        answer_s, logprobs_s = single.answer_and_logprob([prompt], [gold[i]])
        assert answer_s == [answers_b[i]]
        np.testing.assert_allclose(logprobs_s[0], logprobs_b[i], atol=ATOL, rtol=1e-5)
    assert len(set(answers_b)) >= 4  # an input-blind model would answer everything the same way


def test_beam_search_batched_equals_one_by_one(tiny, prompts):
    batched = make_backend(tiny, batch_size=4, num_beams=3)
    plain = make_backend(tiny, batch_size=8, num_beams=3, vision_cache_size=0, bucketing=False)
    answers = batched.answer(prompts)
    assert answers == plain.answer(prompts)
    assert answers == [make_backend(tiny, batch_size=1, num_beams=3).answer([p])[0] for p in prompts]


@pytest.mark.parametrize("include_end", [False, True])
def test_logprob_matches_independent_full_logits_computation(tiny, prompts, gold, include_end):
    model, processor = tiny
    backend = make_backend(tiny, batch_size=8, include_end=include_end)
    scores = backend.answer_logprob(prompts, gold)
    checked = 0
    for i in (0, 1, 3):  # 4-shot, 0-shot, 1-shot
        for answer, score in zip(gold[i], scores[i]):
            expected = reference_logprob(model, processor, prompts[i], answer, include_end=include_end)
            assert score == pytest.approx(expected, abs=ATOL, rel=1e-5), (i, answer)
            checked += 1
    assert checked >= 12


def test_empty_answer_is_the_probability_of_an_empty_reply(tiny, prompts):
    model, processor = tiny
    backend = make_backend(tiny)
    (score,) = backend.answer_logprob(prompts[:1], [[""]])[0]
    assert score < -1e-3  # never the 0.0 (= probability 1) of a zero-token sum
    assert score == pytest.approx(reference_logprob(model, processor, prompts[0], "", include_end=True), abs=ATOL)
    assert backend.stats["empty_answers"] == 1


def test_include_end_adds_the_end_token(tiny, prompts):
    plain = make_backend(tiny).answer_logprob(prompts[:2], [["red", "no"]] * 2)
    with_end = make_backend(tiny, include_end=True).answer_logprob(prompts[:2], [["red", "no"]] * 2)
    assert np.all(np.array(with_end) < np.array(plain))


def test_fast_paths_equal_the_plain_path(tiny, prompts, gold):
    plain = make_backend(tiny, batch_size=8, vision_cache_size=0, shared_prefill=False, bucketing=False)
    expected_answers, expected_scores = plain.answer_and_logprob(prompts, gold)
    for kwargs in ({"vision_cache_size": 0}, {"shared_prefill": False}, {}):
        backend = make_backend(tiny, batch_size=8, **kwargs)
        answers, scores = backend.answer_and_logprob(prompts, gold)
        assert answers == expected_answers, kwargs
        np.testing.assert_allclose(flat(scores), flat(expected_scores), atol=1e-5, rtol=1e-6)


def test_vision_cache_gives_identical_inputs_and_counts_hits(tiny, prompts):
    cached = make_backend(tiny, vision_cache_size=64)
    plain = make_backend(tiny, vision_cache_size=0)
    texts = [cached._render(p) for p in prompts]
    with torch.inference_mode():
        a = cached._encode(texts, prompts)
        b = plain._encode(texts, prompts)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw"):
        assert torch.equal(a[key], b[key]), key
    # The features are exactly what the vision tower gives for the processor's pixels.
    with torch.inference_mode():
        features = tiny[0].model.get_image_features(b["pixel_values"], b["image_grid_thw"]).pooler_output
    for got, want in zip(a["mm_encoder_outputs"]["image"].pooler_output, features):
        assert torch.equal(got, want)
    # An image's features are the same alone as inside a batch of other images (what makes a per-image cache valid).
    first = int(b["image_grid_thw"][0].prod())
    with torch.inference_mode():
        alone = tiny[0].model.get_image_features(b["pixel_values"][:first], b["image_grid_thw"][:1]).pooler_output[0]
    assert torch.equal(alone, features[0])
    distinct_images = len({item.image_key for p in prompts for item in p.items})
    assert cached.vision_cache.misses == distinct_images and len(cached.vision_cache) == distinct_images
    cached.answer(prompts)
    assert cached.vision_cache.misses == distinct_images  # second pass: every image a hit
    assert cached.vision_cache.hits >= distinct_images  # (counted once per distinct image per batch)


def test_zero_and_four_shot_prompts(tiny, corpus, prompts):
    backend = make_backend(tiny)
    zero, four = prompts[1], prompts[0]
    assert (zero.num_shots, four.num_shots) == (0, 4)
    zero_text, four_text = backend._render(zero), backend._render(four)
    assert zero_text.count("<|image_pad|>") == 1 and four_text.count("<|image_pad|>") == 5
    assert "four examples" in four_text and "example" not in zero_text
    assert four_text.count("Short answer:") == 5 and zero_text.rstrip().endswith("assistant")
    answers, scores = backend.answer_and_logprob([zero, four], [["yes"], ["yes"]])
    assert len(answers) == 2 and all(np.isfinite(s[0]) for s in scores)


def test_input_sensitivity(tiny, corpus, prompts, gold):
    """A changed query image (or demonstration image) moves the answer log-prob by far more than the parity
    tolerance: the parity tests above can see image and position bugs."""
    other = synthetic_vqa_corpus(24, image_sizes=((112, 112), (84, 56), (56, 98)), seed=1)
    swapped_query = [InContextPrompt(other[p.query.id], p.demos) for p in prompts]
    swapped_demo = [InContextPrompt(p.query, tuple(other[d.id] for d in p.demos)) for p in prompts]
    answers = [g[:2] + ["a red double-decker bus"] for g in gold]
    base = np.array(make_backend(tiny).answer_logprob(prompts, answers))
    moved_query = np.abs(np.array(make_backend(tiny).answer_logprob(swapped_query, answers)) - base)
    assert moved_query.max() > 1.0 and np.median(moved_query) > 0.05
    moved_demo = np.abs(np.array(make_backend(tiny).answer_logprob(swapped_demo, answers)) - base)
    with_demos = [i for i, p in enumerate(prompts) if p.num_shots > 0]
    assert moved_demo[with_demos].max() > 0.5
    assert np.all(moved_demo[[i for i, p in enumerate(prompts) if p.num_shots == 0]] < ATOL)


def test_drop_in_under_in_context_reward(tiny, corpus, tmp_path):
    """The backend behind `InContextReward`: components come from exactly the backend's answers and log-probs,
    and a repeated pair is a reward-cache hit (no model call)."""
    from trl_icd.rewards import InContextReward
    from trl_icd.rewards.components import distinct_gold_answers, gt_probability

    backend = make_backend(tiny, batch_size=4)
    reward = InContextReward(corpus, backend, cache_path=str(tmp_path / "rewards.sqlite"))
    completions = ["8, 9", "10", "8, 9", "11, 12, 13, 14"]
    query_ids = [0, 1, 0, 2]
    rewards = reward(prompts=[""] * 4, completions=completions, query_id=query_ids)
    assert all(r is not None for r in rewards) and (reward.cache_hits, reward.cache_misses) == (0, 3)
    direct = make_backend(tiny, batch_size=1)
    for completion, query_id, components in zip(completions, query_ids, reward.last_components):
        prompt = InContextPrompt(corpus[query_id], tuple(corpus[int(d)] for d in completion.split(", ")))
        gold = distinct_gold_answers(prompt.query.answers)
        (answer,), (logprobs,) = direct.answer_and_logprob([prompt], [gold])
        assert components["answer"] == answer
        expected = gt_probability(prompt.query.answers, dict(zip(gold, logprobs)))
        assert components["gt_prob"] == pytest.approx(expected, rel=1e-4, abs=1e-9)
    calls = backend.stats["prompts_prefilled"]
    reward(prompts=[""], completions=["10"], query_id=[1])
    assert reward.cache_hits == 1 and backend.stats["prompts_prefilled"] == calls


def test_vocabulary_past_the_tokenizer_is_never_generated(corpus):
    """The real 3B vocabulary over the small offline tokenizer: ids the tokenizer cannot decode get zero output rows
    (logit 0, below the best real token), so greedy answers are text and a parity check on them can fail."""
    from dataclasses import replace

    from trl_icd.testing.qwen_vl import QWEN2_5_VL_SIZES, random_qwen2_5_vl
    from trl_icd.testing.tokenizer import tiny_chat_tokenizer

    known = len(tiny_chat_tokenizer())
    model, processor = random_qwen2_5_vl(replace(QWEN2_5_VL_SIZES["tiny"], vocab_size=known + 2000))
    weight = model.get_output_embeddings().weight
    assert weight.shape[0] == known + 2000 and not weight[known:].any() and weight[:known].abs().min() > 0
    prompts = [InContextPrompt(corpus[q], tuple(corpus[8 + q + j] for j in range(q % 3))) for q in range(6)]
    backend = QwenVLBackend(model, processor, vision_cache_size=0, shared_prefill=False, bucketing=False)
    inputs = backend._encode([backend._render(p) for p in prompts], prompts)
    with torch.no_grad():
        last = model(**inputs).logits[:, -1]
    assert (last.argmax(-1) < known).all()
    assert len(set(backend.answer(prompts))) >= 2
