"""Selector prompts, the tokenizer TRL uses, and completion parsing (edge cases and bad input)."""

import pytest
import torch

from trl_icd.selector import ICDSelectorConfig, build_selector_tokenizer, parse_selection, selector_prompt
from trl_icd.selector.vocabulary import PAD_ID, SLOT_OFFSET, STOP_ID, SelectorVocabulary


@pytest.fixture(scope="module")
def tokenizer():
    return build_selector_tokenizer(ICDSelectorConfig(num_items=1000, num_slots=4, min_shots=1, max_shots=3))


def test_code_prompt_writes_rows_as_base_256_digits_and_fills_empty_slots(tokenizer):
    words = selector_prompt(258, [0, 513], vocabulary=tokenizer).split()  # 258 = 1*256 + 2, 513 = 2*256 + 1
    assert words[:9] == [f"<code_{d}>" for d in (0, 1, 2, 0, 0, 0, 0, 2, 1)]
    assert words[9:] == ["<empty>"] * 6
    assert len(words) == (1 + 4) * 3


def test_prompt_tokenizes_without_specials_to_a_fixed_length(tokenizer):
    encoded = tokenizer(
        [selector_prompt(5, [1, 2, 3, 4], vocabulary=tokenizer), selector_prompt(7, [], vocabulary=tokenizer)]
    )
    assert [len(ids) for ids in encoded["input_ids"]] == [15, 15]  # no BOS/EOS added (TRL adds special tokens)
    assert tokenizer.unk_token_id not in sum(encoded["input_ids"], [])
    assert tokenizer.padding_side == "left" and tokenizer.bos_token is None
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (PAD_ID, STOP_ID)


def test_token_vocabulary_prompt():
    config = ICDSelectorConfig(num_items=50, num_slots=3, max_shots=2, item_vocab="token")
    tokenizer = build_selector_tokenizer(config)
    assert len(tokenizer) == config.vocab_size == 4 + 3 + 50
    assert selector_prompt(49, [0, 7], vocabulary=config) == "<item_49> <item_0> <item_7> <empty>"
    with pytest.raises(ValueError, match="outside the feature table"):
        selector_prompt(50, [0], vocabulary=config)


def test_default_vocabulary_matches_any_default_config():
    """Without a vocabulary, `selector_prompt` writes the default code: the one every default config uses."""
    config = ICDSelectorConfig(num_items=20, num_slots=2, max_shots=2)
    assert selector_prompt(3, [9], 2) == selector_prompt(3, [9], vocabulary=config)


@pytest.mark.parametrize(
    "query, candidates, match",
    [
        (1, [2, 3, 4, 5, 6], "do not fit"),
        (1, [2, 2], "duplicate"),
        (1, [2, 1], "among its own candidates"),
        (-1, [2], "outside"),
        (1, [256**3], "outside"),  # beyond the code (rows beyond the table it was built with are fine: tables grow)
        (1.0, [2], "int feature-table row"),
        (True, [2], "int feature-table row"),
        (1, ["2"], "int feature-table row"),
    ],
)
def test_selector_prompt_rejects_bad_input(tokenizer, query, candidates, match):
    with pytest.raises(ValueError, match=match):
        selector_prompt(query, candidates, vocabulary=tokenizer)


def test_selector_prompt_num_slots_must_agree(tokenizer):
    assert selector_prompt(1, [2], 4, vocabulary=tokenizer) == selector_prompt(1, [2], vocabulary=tokenizer)
    with pytest.raises(ValueError, match="slots"):
        selector_prompt(1, [2], 5, vocabulary=tokenizer)
    with pytest.raises(ValueError, match="num_slots or vocabulary"):
        selector_prompt(1, [2])


def slots(*picks, stop=True):
    return [SLOT_OFFSET + k for k in picks] + ([STOP_ID] if stop else [])


def test_parse_selection_ids_text_and_tensors(tokenizer):
    candidates = [101, 202, 303]
    assert parse_selection(slots(2, 0), candidates, tokenizer) == [303, 101]
    assert parse_selection(torch.tensor(slots(1) + [PAD_ID, PAD_ID]), candidates, tokenizer) == [202]
    assert parse_selection("<slot_2> <slot_0>", candidates, tokenizer) == [303, 101]  # TRL's decoded text
    assert parse_selection("<slot_1> <stop> <pad>", candidates, tokenizer) == [202]
    decoded = tokenizer.decode(slots(0, 1), skip_special_tokens=True)
    assert parse_selection(decoded, candidates, tokenizer) == [101, 202]


@pytest.mark.parametrize(
    "completion, match",
    [
        (slots(0, 1, stop=False), "does not end with <stop>"),
        (slots(0, 3), "slot 3 is empty"),
        (slots(1, 1), "chosen twice"),
        (slots(), "fewer than min_shots"),
        ("", "fewer than min_shots"),
        (slots(0, 1, 2, 3)[:3] + [SLOT_OFFSET + 2, STOP_ID], "chosen twice"),
        ([STOP_ID, SLOT_OFFSET, STOP_ID], "not a slot token"),  # a stop in the middle
        ([SLOT_OFFSET + 4 + 7, STOP_ID], "not a slot token"),  # an item-code token
        ([2, STOP_ID], "not a slot token"),  # <unk>
        ("<slot_0> hello", "not a slot token"),
        ("<slot_9>", "not a slot token"),  # beyond K
        ("<slot_01>", "not a slot token"),
    ],
)
def test_parse_selection_rejects_invalid_completions(tokenizer, completion, match):
    with pytest.raises(ValueError, match=match):
        parse_selection(completion, [101, 202, 303], tokenizer)


def test_parse_selection_shot_bounds(tokenizer):
    four = [1, 2, 3, 4]
    with pytest.raises(ValueError, match="more than max_shots"):
        parse_selection(slots(0, 1, 2, 3), four, tokenizer)  # the tokenizer records max_shots=3
    assert parse_selection(slots(0, 1, 2, 3), four, tokenizer, max_shots=4) == four
    assert parse_selection(slots(), [], tokenizer) == []  # an empty pool may stop at once
    assert parse_selection(slots(), four, tokenizer, min_shots=0) == []
    with pytest.raises(ValueError, match="candidate ids for a selector with 4 slots"):
        parse_selection(slots(0), [1, 2, 3, 4, 5], tokenizer)


def test_parse_selection_needs_a_selector_tokenizer():
    from trl_icd.testing.tokenizer import tiny_chat_tokenizer

    with pytest.raises(ValueError, match="not a selector tokenizer"):
        parse_selection("<slot_0>", [1], tiny_chat_tokenizer())


def test_vocabulary_layout_and_capacity():
    vocabulary = SelectorVocabulary(num_slots=64)
    assert vocabulary.vocab_size == 4 + 64 + 256 and vocabulary.max_items == 256**3
    assert vocabulary.item_words(443_756) == ["<code_6>", "<code_197>", "<code_108>"]  # 6*65536 + 197*256 + 108
    assert vocabulary.words()[SLOT_OFFSET + 63] == "<slot_63>" and vocabulary.slot_of_word("<slot_64>") is None
    assert SelectorVocabulary.from_dict(vocabulary.to_dict()) == vocabulary
