"""The silent pitfalls of batching Qwen2.5-VL prompts are guarded (each guard is shown to fire, and the failure it
prevents is shown to be real on an input-sensitive model), plus identity, loading and post-processing."""

import copy

import numpy as np
import pytest
import torch
from transformers import GenerationConfig

from trl_icd.rewards.in_context import InContextReward
from trl_icd.rewards.prompt import InContextPrompt, PromptFormat
from trl_icd.rewards.qwen_vl import (
    AnswerTokenizationError,
    BatchGuardError,
    Qwen2_5_VLImageOnlyProcessor,
    QwenVLBackend,
    VisionFeatureCache,
    check_model_inputs,
    postprocess_answer,
)
from trl_icd.testing.qwen_vl import synthetic_vqa_corpus, tiny_qwen2_5_vl, tiny_qwen2_5_vl_processor


@pytest.fixture(scope="module")
def corpus():
    return synthetic_vqa_corpus(12, image_sizes=((112, 112), (84, 56), (56, 98)), seed=0)


@pytest.fixture(scope="module")
def tiny():
    return tiny_qwen2_5_vl(init_std=0.5, seed=0)


@pytest.fixture(scope="module")
def prompts(corpus):
    # Row 0: one image; row 1: three images of different sizes.
    return [InContextPrompt(corpus[0]), InContextPrompt(corpus[1], (corpus[2], corpus[3]))]


def processor_batch(processor, prompts, images=None, padding_side="left"):
    fmt = PromptFormat()
    texts = [
        processor.apply_chat_template(fmt.messages(p), tokenize=False, add_generation_prompt=True) for p in prompts
    ]
    images = images if images is not None else [im for p in prompts for im in fmt.images(p)]
    return dict(processor(text=texts, images=images, padding=True, padding_side=padding_side, return_tensors="pt"))


def intended_tokens(processor, prompts):
    """Image tokens per row and image, from each prompt's own images (independent of the processor's output)."""
    patches = processor.image_processor.get_number_of_image_patches
    return [[patches(im.size[1], im.size[0]) // 4 for im in PromptFormat().images(p)] for p in prompts]


def last_logits(model, inputs):
    with torch.no_grad():
        return model(**inputs, logits_to_keep=1).logits[:, -1]


def test_image_only_processor_builds_offline_and_expands_images(tiny, prompts):
    _, processor = tiny
    assert isinstance(processor, Qwen2_5_VLImageOnlyProcessor)
    inputs = processor_batch(processor, prompts)
    assert {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"} <= set(inputs)
    expected = (inputs["image_grid_thw"].prod(-1) // 4).tolist()
    image_tokens = (inputs["input_ids"] == processor.image_token_id).sum(-1).tolist()
    assert image_tokens == [expected[0], sum(expected[1:])]
    assert len(set(expected)) > 1  # mixed sizes really give different token counts


def test_missing_mm_token_type_ids_is_refused(tiny, prompts):
    model, processor = tiny
    inputs = processor_batch(processor, prompts)
    without = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
    # The failure the guard prevents: transformers silently falls back to 1-D positions and the scores move.
    assert (last_logits(model, inputs) - last_logits(model, without)).abs().max() > 1e-2
    with pytest.raises(BatchGuardError, match="mm_token_type_ids"):
        check_model_inputs(without, intended_tokens(processor, prompts), processor.image_token_id, 2)
    stale = dict(inputs, mm_token_type_ids=torch.zeros_like(inputs["mm_token_type_ids"]))
    with pytest.raises(BatchGuardError, match="disagree"):
        check_model_inputs(stale, intended_tokens(processor, prompts), processor.image_token_id, 2)
    # The real batch passes.
    check_model_inputs(inputs, intended_tokens(processor, prompts), processor.image_token_id, 2)


def test_right_padding_is_refused_and_overridden(tiny, prompts, corpus):
    model, processor = tiny
    right = processor_batch(processor, prompts, padding_side="right")
    with pytest.raises(BatchGuardError, match="left padded"):
        check_model_inputs(right, intended_tokens(processor, prompts), processor.image_token_id, 2)
    # A processor configured for right padding still gives left-padded batches (and the same scores).
    right_processor = tiny_qwen2_5_vl_processor()
    right_processor.tokenizer.padding_side = "right"
    answers = [["red", "no"], ["square"]]
    expected = QwenVLBackend(model, processor, batch_size=2).answer_and_logprob(prompts, answers)
    got = QwenVLBackend(model, right_processor, batch_size=2).answer_and_logprob(prompts, answers)
    assert got[0] == expected[0]
    np.testing.assert_allclose(np.concatenate(got[1]), np.concatenate(expected[1]), atol=1e-5)


def test_images_not_matching_their_placeholders_are_refused(tiny, prompts):
    model, processor = tiny
    fmt = PromptFormat()
    images = [im for p in prompts for im in fmt.images(p)]
    # The processor binds images to placeholders by global order only: a swap of two images of different sizes
    # is accepted by it, and only the per-row token check sees it.
    swapped = processor_batch(processor, prompts, images=[images[1], images[0], *images[2:]])
    with pytest.raises(BatchGuardError, match="not in the order"):
        check_model_inputs(swapped, intended_tokens(processor, prompts), processor.image_token_id, 2)
    # The failure it prevents is real: the query of row 0 reads another image.
    good = processor_batch(processor, prompts)
    assert (last_logits(model, good)[0] - last_logits(model, swapped)[0]).abs().max() > 1e-2
    # Within a row too: the row total is unchanged, the per-image runs are not.
    within = processor_batch(processor, prompts, images=[images[0], images[2], images[1], images[3]])
    with pytest.raises(BatchGuardError, match="not in the order"):
        check_model_inputs(within, intended_tokens(processor, prompts), processor.image_token_id, 2)
    # A wrong number of images for the placeholders.
    with pytest.raises(BatchGuardError):
        check_model_inputs(good, [intended_tokens(processor, prompts)[0], []], processor.image_token_id, 2)


def test_prompt_format_with_wrong_placeholder_count_is_refused(tiny, prompts):
    class DropsAnImage(PromptFormat):
        def messages(self, prompt):
            messages = super().messages(prompt)
            messages[1]["content"] = messages[1]["content"][1:]
            return messages

    backend = QwenVLBackend(*tiny, prompt_format=DropsAnImage())
    with pytest.raises(BatchGuardError, match="placeholders"):
        backend.answer(prompts[:1])


def test_answer_merging_with_the_prompt_is_refused(tiny):
    backend = QwenVLBackend(*tiny)
    tok = backend.tokenizer
    text = "Short answ"  # "answ" + "er" tokenise as one token: the answer has no tokens of its own
    assert tok(text + "er")["input_ids"][: len(tok(text)["input_ids"])] != tok(text)["input_ids"]
    with pytest.raises(AnswerTokenizationError):
        backend._answer_ids(text, tok(text)["input_ids"], "er")
    assert backend._answer_ids("assistant\n", tok("assistant\n")["input_ids"], "red") == tok("red")["input_ids"]


def test_checkpoint_generation_config_does_not_leak(tiny, prompts):
    """Qwen checkpoints ship sampling settings and repetition_penalty 1.05; `generate` would pick up every option
    left unset. Explicit settings: the same answers whatever the model's generation_config says."""
    model, processor = tiny
    expected = QwenVLBackend(model, processor, num_beams=2).answer(prompts)
    saved = model.generation_config
    model.generation_config = GenerationConfig(
        do_sample=True, temperature=5.0, top_k=3, repetition_penalty=5.0, no_repeat_ngram_size=1, max_new_tokens=1,
        eos_token_id=saved.eos_token_id, pad_token_id=saved.pad_token_id,
    )
    try:
        leaky = model.generation_config
        for _ in range(2):
            assert QwenVLBackend(model, processor, num_beams=2).answer(prompts) == expected
        assert model.generation_config is leaky  # restored after each call
    finally:
        model.generation_config = saved


def _with_image_processor(processor, backend=None, **settings):
    """A copy of `processor` whose image processor reports another backend (as a torchvision-backed one does, which
    cannot be built here) or carries other settings."""
    image_processor = copy.deepcopy(processor.image_processor)
    for name, value in settings.items():
        setattr(image_processor, name, value)
    if backend is not None:
        other = type("OtherBackend", (type(image_processor),), {"backend": property(lambda self: backend)})
        image_processor.__class__ = other
    changed = copy.copy(processor)
    changed.image_processor = image_processor
    return changed


def test_identity_names_every_setting(tiny):
    model, processor = tiny
    base = QwenVLBackend(model, processor).identity
    assert base == QwenVLBackend(model, processor).identity
    variants = [
        {"max_new_tokens": 3}, {"num_beams": 3}, {"length_penalty": 0.0}, {"max_pixels": 56 * 56 * 2},
        {"min_pixels": 28 * 28}, {"include_end": True}, {"stop_strings": ()}, {"model_name": "other"},
        {"prompt_format": PromptFormat(template="Q:{q} A:{a}")},
    ]
    identities = [QwenVLBackend(model, processor, **kw).identity for kw in variants]
    assert all(i != base for i in identities)
    other_weights, _ = tiny_qwen2_5_vl(seed=1)
    assert QwenVLBackend(other_weights, processor).identity["weights"] != base["weights"]
    # The image-processing path: the PIL processor and a torchvision-backed one give different pixels.
    assert base["image_processor"]["backend"] == "pil"
    for changed in (_with_image_processor(processor, backend="torchvision"),
                    _with_image_processor(processor, image_mean=[0.5, 0.5, 0.5])):
        identity = QwenVLBackend(model, changed).identity
        assert identity["image_processor"] != base["image_processor"]
        assert {k: v for k, v in identity.items() if k != "image_processor"} == {
            k: v for k, v in base.items() if k != "image_processor"}
        corpus = synthetic_vqa_corpus(2, image_sizes=((56, 56),), seed=0)
        assert (InContextReward(corpus, QwenVLBackend(model, changed)).scorer_hash
                != InContextReward(corpus, QwenVLBackend(model, processor)).scorer_hash)
    # Pure speed settings do not change scores, so they are not part of the identity.
    speed_only = dict(batch_size=3, vision_cache_size=0, shared_prefill=False, bucketing=False, candidate_batch_size=2)
    assert QwenVLBackend(model, processor, **speed_only).identity == base


@pytest.mark.parametrize("vision_cache_size", [0, 8], ids=["processor", "vision-cache"])
def test_max_pixels_changes_image_tokens(tiny, prompts, vision_cache_size):
    model, processor = tiny
    lengths = []
    for max_pixels in (56 * 56, 112 * 112):
        backend = QwenVLBackend(model, processor, max_pixels=max_pixels, vision_cache_size=vision_cache_size)
        with torch.inference_mode():
            inputs = backend._encode([backend._render(prompts[1])], prompts[1:])
        lengths.append(int((inputs["input_ids"] == processor.image_token_id).sum()))
        assert (inputs["image_grid_thw"].prod(-1) * 14 * 14 <= max_pixels).all()
    assert lengths[0] < lengths[1]
    with pytest.raises(ValueError):
        QwenVLBackend(model, processor, min_pixels=10_000, max_pixels=5_000)


def test_vision_feature_cache_is_a_bounded_lru():
    cache = VisionFeatureCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "b" is now the least recently used
    cache.put("c", 3)
    assert cache.get("b") is None and cache.get("a") == 1 and cache.get("c") == 3
    assert (len(cache), cache.hits, cache.misses) == (2, 3, 1)
    with pytest.raises(ValueError):
        VisionFeatureCache(0)


def test_bad_arguments(tiny, prompts):
    backend = QwenVLBackend(*tiny)
    with pytest.raises(ValueError):
        backend.answer_logprob(prompts, [["a"]])
    with pytest.raises(TypeError):
        backend.answer_logprob(prompts, ["a", "b"])
    with pytest.raises(ValueError):
        QwenVLBackend(*tiny, max_new_tokens=0)


@pytest.mark.parametrize(
    "text, expected",
    [
        (" red  ", "red"),
        ("red Question: what", "red"),
        ("blue\nShort answer: blue", "blue"),
        ("cat, dog", "cat"),
        ("Answer", ""),
        ("", ""),
    ],
)
def test_postprocess_answer(text, expected):
    assert postprocess_answer(text) == expected


def test_postprocess_answer_without_stop_strings():
    assert postprocess_answer(" cat, dog ", ()) == "cat, dog"


def test_from_pretrained_loads_a_saved_checkpoint(tiny, prompts, tmp_path):
    model, processor = tiny
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = QwenVLBackend.from_pretrained(str(tmp_path), device="cpu", batch_size=2)
    assert loaded.model.dtype == torch.float32  # fp32 by default on CPU
    assert loaded.identity["model"] == str(tmp_path)
    assert loaded.identity["weights"] == QwenVLBackend(model, processor).identity["weights"]
    answers = [["red"], ["square", "yes"]]
    expected = QwenVLBackend(model, processor, batch_size=2).answer_and_logprob(prompts, answers)
    got = loaded.answer_and_logprob(prompts, answers)
    assert got[0] == expected[0]
    np.testing.assert_allclose(np.concatenate(got[1]), np.concatenate(expected[1]), atol=1e-6)
