"""The selector model: every sample is a valid selection, forbidden tokens have probability exactly 0 (checked against
an independent statement of the rules), padding/cache/causality behave, bad input fails loudly, save/load is exact."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_icd.selector import ICDSelectorConfig, ICDSelectorForCausalLM, parse_selection, selector_prompt
from trl_icd.selector.vocabulary import PAD_ID, SLOT_OFFSET, STOP_ID
from trl_icd.testing.selector import random_pools, selector_prompts, tiny_selector



SHOT_BOUNDS = [(0, 1), (1, 3), (2, 4), (3, 3)]
SAMPLING = [
    {"temperature": 1.0},
    {"temperature": 0.3},
    {"temperature": 3.0},
    {"top_k": 2},
    {"top_p": 0.5},
    {"temperature": 1.5, "top_k": 3, "top_p": 0.9},
    {"repetition_penalty": 1.5},
    {"min_p": 0.2},
]
RETURN_SEQUENCES = 8


def allowed_tokens(pool_size: int, picks: list[int], min_shots: int, max_shots: int) -> set[int]:
    """The rules, stated independently of the model: an unchosen non-empty slot while fewer than max_shots are
    chosen; stop from min_shots on, or when no slot is left."""
    slots = {SLOT_OFFSET + k for k in range(pool_size) if k not in picks} if len(picks) < max_shots else set()
    return slots | ({STOP_ID} if len(picks) >= min_shots or not slots else set())


def completion_masks(completions: torch.Tensor) -> torch.Tensor:
    """1 up to and including the first stop, as TRL builds it."""
    is_stop = completions == STOP_ID
    first = torch.where(is_stop.any(1), is_stop.int().argmax(1), completions.shape[1])
    return (torch.arange(completions.shape[1])[None] <= first[:, None]).long()


def sample(model, tokenizer, pools, **generation_kwargs):
    """(prompt_ids, prompt_mask, completions [rows, new tokens]) for `RETURN_SEQUENCES` samples per pool."""
    encoded = tokenizer(selector_prompts(pools, tokenizer), return_tensors="pt", padding=True)
    generation_kwargs.setdefault("do_sample", True)
    with torch.no_grad():
        out = model.generate(
            **encoded,
            max_new_tokens=model.config.max_completion_length,
            num_return_sequences=RETURN_SEQUENCES,
            **generation_kwargs,
        )
    prompt_ids = encoded["input_ids"].repeat_interleave(RETURN_SEQUENCES, 0)
    prompt_mask = encoded["attention_mask"].repeat_interleave(RETURN_SEQUENCES, 0)
    return prompt_ids, prompt_mask, out[:, prompt_ids.shape[1] :]


def check_valid(completion: list[int], pool: list[int], min_shots: int, max_shots: int) -> list[int]:
    assert STOP_ID in completion, f"no stop in {completion}"
    picks = [token - SLOT_OFFSET for token in completion[: completion.index(STOP_ID)]]
    assert all(0 <= k < len(pool) for k in picks), f"empty or non-slot pick in {completion} (pool {len(pool)})"
    assert len(set(picks)) == len(picks), f"repeat in {completion}"
    assert min(min_shots, len(pool)) <= len(picks) <= max_shots, f"{len(picks)} picks outside bounds: {completion}"
    assert all(token == PAD_ID for token in completion[completion.index(STOP_ID) + 1 :])
    return picks


@pytest.mark.parametrize(
    "item_vocab,min_shots,max_shots", [("code", *bounds) for bounds in SHOT_BOUNDS] + [("token", 1, 3)]
)
def test_thousands_of_samples_are_valid_and_parse(item_vocab, min_shots, max_shots):
    model, tokenizer = tiny_selector(
        num_slots=6, min_shots=min_shots, max_shots=max_shots, peaked=True, item_vocab=item_vocab, seed=min_shots
    )
    pools = random_pools(21, 40, 6, seed=max_shots)
    counted = 0
    for settings in SAMPLING:
        _, _, completions = sample(model, tokenizer, pools, **settings)
        for row, completion in enumerate(completions.tolist()):
            query, pool = pools[row // RETURN_SEQUENCES]
            picks = check_valid(completion, pool, min_shots, max_shots)
            candidate_ids = [f"id{r}" for r in pool]
            assert parse_selection(completion, candidate_ids, tokenizer) == [candidate_ids[k] for k in picks]
            text = tokenizer.decode(completion, skip_special_tokens=True)  # what TRL's reward functions see
            assert parse_selection(text, candidate_ids, tokenizer) == [candidate_ids[k] for k in picks]
            counted += 1
    assert counted == len(SAMPLING) * len(pools) * RETURN_SEQUENCES  # 1344 per bound setting


@pytest.mark.parametrize("min_shots,max_shots", SHOT_BOUNDS)
def test_support_of_every_step_is_exactly_the_allowed_set(min_shots, max_shots):
    """Probabilities at every completion step: > 0 exactly on the allowed tokens, exactly 0 elsewhere (items,
    specials, empty/chosen slots, early stop, late picks)."""
    model, tokenizer = tiny_selector(num_slots=6, min_shots=min_shots, max_shots=max_shots, peaked=True)
    pools = random_pools(14, 40, 6, seed=7)
    prompt_ids, prompt_mask, completions = sample(model, tokenizer, pools, temperature=2.0)
    mask = completion_masks(completions)
    with torch.no_grad():
        logits = model(
            input_ids=torch.cat([prompt_ids, completions], 1), attention_mask=torch.cat([prompt_mask, mask], 1)
        ).logits
    probs = logits[:, prompt_ids.shape[1] - 1 : -1].softmax(-1)
    for row, completion in enumerate(completions.tolist()):
        pool = pools[row // RETURN_SEQUENCES][1]
        for step, token in enumerate(completion[: completion.index(STOP_ID) + 1]):
            picks = [t - SLOT_OFFSET for t in completion[:step]]
            allowed = allowed_tokens(len(pool), picks, min_shots, max_shots)
            support = set((probs[row, step] > 0).nonzero().flatten().tolist())
            assert support == allowed, (row, step, completion)
            assert token in allowed
            invalid = torch.ones(model.config.vocab_size, dtype=torch.bool)
            invalid[sorted(allowed)] = False
            assert torch.all(logits[row, prompt_ids.shape[1] - 1 + step][invalid] == model.config.mask_value)


def test_forced_steps_have_log_prob_zero_and_last_choice_is_forced():
    model, tokenizer = tiny_selector(num_slots=4, min_shots=2, max_shots=2, peaked=True)
    prompt = selector_prompt(5, [7, 9], vocabulary=tokenizer)
    ids = torch.tensor([tokenizer(prompt)["input_ids"] + [SLOT_OFFSET + 1, SLOT_OFFSET + 0, STOP_ID]])
    log_probs = model(input_ids=ids).logits[0, -4:-1].log_softmax(-1)
    # step 1 (one slot left, min_shots=2 forbids stop) and step 2 (max_shots reached) are forced
    assert log_probs[1, SLOT_OFFSET + 0].item() == 0.0
    assert log_probs[2, STOP_ID].item() == 0.0


def test_fresh_selector_is_uniform_over_slots_and_stop_is_a_fair_coin():
    model, tokenizer = tiny_selector(num_slots=6, min_shots=1, max_shots=4)
    ids = tokenizer([selector_prompt(0, [1, 2, 3, 4, 5], vocabulary=tokenizer)], return_tensors="pt")["input_ids"]
    first = model(input_ids=ids).logits[0, -1].softmax(-1)
    torch.testing.assert_close(first[SLOT_OFFSET : SLOT_OFFSET + 5], torch.full((5,), 0.2))
    after_one = model(input_ids=torch.cat([ids, torch.tensor([[SLOT_OFFSET + 2]])], 1)).logits[0, -1].softmax(-1)
    torch.testing.assert_close(after_one[STOP_ID], torch.tensor(0.5))  # stop vs. continue, whatever K is


def test_left_padding_missing_mask_and_causality():
    model, tokenizer = tiny_selector(num_slots=5, max_shots=3, peaked=True)
    prompt = tokenizer(selector_prompt(3, [4, 8, 15], vocabulary=tokenizer))["input_ids"]
    ids = torch.tensor([prompt + [SLOT_OFFSET + 2, SLOT_OFFSET + 0, STOP_ID]])
    reference = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert torch.equal(model(input_ids=ids).logits, reference)  # attention_mask=None (transformers 5 generate)
    padded = torch.cat([torch.full((1, 3), PAD_ID), ids], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], 1)
    torch.testing.assert_close(model(input_ids=padded, attention_mask=mask).logits[:, 3:], reference, rtol=0, atol=1e-6)
    changed = ids.clone()
    changed[0, -2] = SLOT_OFFSET + 1  # a later token must not change earlier positions
    torch.testing.assert_close(model(input_ids=changed).logits[:, :-2], reference[:, :-2], rtol=0, atol=0)
    assert torch.isfinite(reference).all()


def test_generate_feeds_the_whole_sequence_even_with_use_cache():
    """Greedy `generate` (with `use_cache=True`, as TRL may ask) equals a hand-written full-sequence argmax loop."""
    model, tokenizer = tiny_selector(num_slots=6, min_shots=2, max_shots=4, peaked=True)
    pools = random_pools(6, 40, 6, seed=3, sizes=[2, 4, 6])
    encoded = tokenizer(selector_prompts(pools, tokenizer), return_tensors="pt", padding=True)
    out = model.generate(**encoded, do_sample=False, use_cache=True, max_new_tokens=5)
    ids = encoded["input_ids"]
    for _ in range(5):
        next_token = model(input_ids=ids).logits[:, -1].argmax(-1)
        finished = (ids[:, encoded["input_ids"].shape[1] :] == STOP_ID).any(1)
        ids = torch.cat([ids, torch.where(finished, PAD_ID, next_token)[:, None]], 1)
    assert torch.equal(out, ids[:, : out.shape[1]])
    completions = out[:, encoded["input_ids"].shape[1] :].tolist()
    assert all(len(check_valid(row, pool, 2, 4)) >= 2 for row, (_, pool) in zip(completions, pools))


def test_shot_bounds_can_be_narrowed_after_creation():
    """The masks read the config's bounds at every forward: evaluating at a fixed shot count needs no new model."""
    model, tokenizer = tiny_selector(num_slots=6, min_shots=1, max_shots=4, peaked=True)
    model.config.min_shots = model.config.max_shots = 2
    pools = random_pools(7, 40, 6, seed=4, sizes=[3, 6])
    _, _, completions = sample(model, tokenizer, pools, temperature=1.5)
    for row, completion in enumerate(completions.tolist()):
        assert len(check_valid(completion, pools[row // RETURN_SEQUENCES][1], 2, 2)) == 2


def test_bad_sequences_raise():
    model, tokenizer = tiny_selector(num_items=40, num_slots=4)
    prompt = tokenizer(selector_prompt(3, [4, 5], vocabulary=tokenizer))["input_ids"]
    with pytest.raises(ValueError, match="exactly"):
        model(input_ids=torch.tensor([prompt[:-1]]))
    with pytest.raises(ValueError, match="candidate slot 1"):
        model(input_ids=torch.tensor([prompt[:6] + [2, 2, 2] + prompt[9:]]))  # <unk> where an item goes
    beyond = tokenizer(selector_prompt(3, [45], num_slots=4))["input_ids"]  # row 45 of a 40-row table
    with pytest.raises(ValueError, match="feature-table row below 40"):
        model(input_ids=torch.tensor([beyond]))
    with pytest.raises(ValueError, match="the query"):
        model(input_ids=torch.tensor([[3, 3, 3] + prompt[3:]]))  # an empty query
    with pytest.raises(ValueError, match="left-padded"):
        model(input_ids=torch.tensor([prompt + [0]]), attention_mask=torch.tensor([[1] * 5 + [0] + [1] * 10]))
    with pytest.raises(ValueError, match="temperature"):
        model.generate(input_ids=torch.tensor([prompt]), do_sample=True, temperature=500.0, max_new_tokens=2)
    with pytest.raises(ValueError, match="inputs_embeds"):
        model(inputs_embeds=torch.zeros(1, 15, 32))


def test_config_and_features_validation():
    with pytest.raises(ValueError, match="exceeds num_slots"):
        ICDSelectorConfig(num_slots=3, max_shots=4)
    with pytest.raises(ValueError, match="min_shots"):
        ICDSelectorConfig(min_shots=3, max_shots=2)
    with pytest.raises(ValueError, match="mask_value"):
        ICDSelectorConfig(mask_value=float("-inf"))
    with pytest.raises(ValueError, match="mask_value"):
        ICDSelectorConfig(mask_value=-5.0)
    with pytest.raises(ValueError, match="do not fit"):
        ICDSelectorConfig(num_items=70_000, item_code_base=16, item_code_length=4)
    with pytest.raises(ValueError, match="contradicts"):
        ICDSelectorConfig(vocab_size=7)
    with pytest.raises(ValueError, match="NaN"):
        ICDSelectorForCausalLM.from_features(torch.tensor([[float("nan"), 1.0]]), num_slots=2)
    with pytest.raises(ValueError, match="shape"):
        ICDSelectorForCausalLM.from_features(torch.zeros(4, 3), num_slots=2, num_items=9)
    # the vocabulary of the code mode does not grow with the pool; the token mode's does
    assert ICDSelectorConfig(num_items=443_757, num_slots=64).vocab_size == 4 + 64 + 256
    assert ICDSelectorConfig(num_items=443_757, num_slots=64, item_vocab="token").vocab_size == 4 + 64 + 443_757


def test_labels_loss_is_the_completion_cross_entropy():
    model, tokenizer = tiny_selector(num_slots=5, max_shots=3, peaked=True)
    prompt = tokenizer(selector_prompt(3, [4, 8, 15], vocabulary=tokenizer))["input_ids"]
    ids = torch.tensor([prompt + [SLOT_OFFSET + 2, SLOT_OFFSET + 0, STOP_ID]])
    labels = ids.clone()
    labels[:, : len(prompt)] = -100
    out = model(input_ids=ids, labels=labels)
    log_probs = out.logits[0, len(prompt) - 1 : -1].log_softmax(-1).gather(-1, ids[0, len(prompt) :, None])
    torch.testing.assert_close(out.loss, -log_probs.mean())


def test_gradient_checkpointing_gives_the_same_gradients():
    model, tokenizer = tiny_selector(num_slots=5, max_shots=3, peaked=True, num_layers=2, num_decoder_layers=2)
    prompt = tokenizer(selector_prompt(3, [4, 8, 15], vocabulary=tokenizer))["input_ids"]
    ids = torch.tensor([prompt + [SLOT_OFFSET + 2, SLOT_OFFSET + 0, STOP_ID]])
    labels = ids.masked_fill(torch.arange(ids.shape[1]) < len(prompt), -100)
    model.train()
    model(input_ids=ids, labels=labels).loss.backward()
    plain = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.is_gradient_checkpointing
    model(input_ids=ids, labels=labels).loss.backward()
    assert plain.keys() == {name for name, p in model.named_parameters() if p.grad is not None}
    assert "model.encoder.1.attn.q_proj.weight" in plain  # gradients reach the item encoder
    for name, p in model.named_parameters():
        if name in plain:
            torch.testing.assert_close(p.grad, plain[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("item_vocab", ["code", "token"])
def test_save_load_round_trip_is_exact(tmp_path, item_vocab):
    model, tokenizer = tiny_selector(num_slots=5, peaked=True, item_vocab=item_vocab)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    loaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert type(loaded) is ICDSelectorForCausalLM
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)  # rebuilt, not stored
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    prompt = selector_prompt(3, [4, 8], vocabulary=loaded_tokenizer)
    assert prompt == selector_prompt(3, [4, 8], vocabulary=tokenizer)
    ids = loaded_tokenizer([prompt], return_tensors="pt")["input_ids"]
    assert torch.equal(ids, tokenizer([prompt], return_tensors="pt")["input_ids"])
    completion = torch.tensor([[SLOT_OFFSET + 1, STOP_ID]])
    sequence = torch.cat([ids, completion], 1)
    assert torch.equal(loaded(input_ids=sequence).logits, model(input_ids=sequence).logits)
    assert parse_selection(completion[0], [10, 20], loaded_tokenizer) == [20]
    assert loaded_tokenizer.padding_side == "left" and loaded_tokenizer.bos_token is None
    assert (loaded_tokenizer.pad_token_id, loaded_tokenizer.eos_token_id) == (PAD_ID, STOP_ID)


def test_loading_a_checkpoint_with_a_missing_or_unexpected_weight_fails(tmp_path):
    model, _ = tiny_selector(num_slots=4)
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    for name, broken in [
        ("missing", {k: v for k, v in weights.items() if k != "model.pointer.query.weight"}),
        ("unexpected", {**weights, "model.extra.weight": torch.zeros(2)}),
    ]:
        save_file(broken, tmp_path / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(RuntimeError, match="does not match"):
            ICDSelectorForCausalLM.from_pretrained(tmp_path)
        with pytest.raises(RuntimeError, match="does not match"):
            AutoModelForCausalLM.from_pretrained(tmp_path)
