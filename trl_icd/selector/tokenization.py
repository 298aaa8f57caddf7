"""Selector text: the tokenizer, prompt writing and completion parsing.

A prompt names feature-table rows: the query, then `num_slots` candidate slots (`<empty>` beyond the pool):

    code mode (default, 3 base-256 digits): "<code_0> <code_0> <code_17> <code_0> <code_3> <code_232> ... <empty> ..."
    token mode:                             "<item_17> <item_1000> <item_42> <empty>"

A completion is slot tokens (positions in the candidate list) then `<stop>`: ids `[slot_3, slot_0, stop]`, decoded by
TRL (`skip_special_tokens=True`) as the text "<slot_3> <slot_0>".
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from .vocabulary import (
    PAD_ID,
    PAD_WORD,
    STOP_ID,
    STOP_WORD,
    TOKENIZER_METADATA_KEY,
    UNK_WORD,
    SelectorVocabulary,
    shot_bounds_of,
)


def build_selector_tokenizer(config) -> PreTrainedTokenizerFast:
    """A word-level tokenizer for `config`'s vocabulary (save it next to the model).

    Adds no BOS/EOS (TRL tokenizes prompts with `add_special_tokens=True`), pads on the left (TRL's prompt padding),
    `<stop>` is eos and `<pad>` is pad; the layout and shot bounds are stored in its `init_kwargs` (and so in
    `tokenizer_config.json`) for `selector_prompt` and `parse_selection`.
    """
    vocabulary = SelectorVocabulary.resolve(config)
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(vocabulary.words())}, unk_token=UNK_WORD))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    min_shots, max_shots = shot_bounds_of(config)
    metadata = {**vocabulary.to_dict(), "min_shots": min_shots, "max_shots": max_shots}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_WORD,
        eos_token=STOP_WORD,
        unk_token=UNK_WORD,
        padding_side="left",
        model_max_length=vocabulary.prompt_length + (max_shots if max_shots is not None else vocabulary.num_slots) + 1,
        **{TOKENIZER_METADATA_KEY: metadata},
    )


def _row(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{what} must be an int feature-table row, got {value!r}")
    return int(value)


def selector_prompt(query_row, candidate_rows: Sequence, num_slots: int | None = None, *, vocabulary=None) -> str:
    """The prompt for a query and its candidate pool; items are feature-table rows (`corpus.row_of(id)`).

    `vocabulary`: the selector's config, its tokenizer or a `SelectorVocabulary` (None: the default code vocabulary,
    which any default `ICDSelectorConfig` shares). `num_slots` defaults to the vocabulary's; a pool shorter than it
    leaves `<empty>` slots. Raises ValueError on rows out of range, duplicates, the query among its candidates, or a
    pool larger than `num_slots`.
    """
    if vocabulary is None:
        if num_slots is None:
            raise ValueError("give num_slots or vocabulary=<the selector's config or tokenizer>")
        vocabulary = SelectorVocabulary(num_slots=num_slots)
    else:
        vocabulary = SelectorVocabulary.resolve(vocabulary)
        if num_slots is not None and num_slots != vocabulary.num_slots:
            raise ValueError(f"num_slots={num_slots} but the selector has {vocabulary.num_slots} slots")
    query = _row(query_row, "query_row")
    candidates = [_row(row, "candidate row") for row in candidate_rows]
    if len(candidates) > vocabulary.num_slots:
        raise ValueError(f"{len(candidates)} candidates do not fit in {vocabulary.num_slots} slots")
    for row in [query, *candidates]:
        if not 0 <= row < vocabulary.max_items:
            raise ValueError(f"row {row} is outside the feature table rows this vocabulary can name "
                             f"(0..{vocabulary.max_items - 1})")
    if len(set(candidates)) != len(candidates):
        raise ValueError(f"duplicate candidates in {candidates}")
    if query in candidates:
        raise ValueError(f"the query row {query} is among its own candidates")
    words = vocabulary.item_words(query)
    for row in candidates:
        words += vocabulary.item_words(row)
    words += vocabulary.empty_words() * (vocabulary.num_slots - len(candidates))
    return " ".join(words)


def _completion_slots(completion, vocabulary: SelectorVocabulary, tokenizer) -> list[int]:
    """Slot positions named by a completion (ids or text), in order. Ids must end with `<stop>` (trailing padding
    allowed); text may lack it, since TRL decodes with `skip_special_tokens=True`."""
    if isinstance(completion, str):
        tokens = completion.split()
        pad, stop = PAD_WORD, STOP_WORD
        must_stop = False
    else:
        if isinstance(completion, torch.Tensor):
            completion = completion.tolist()
        tokens = [int(token) for token in completion]
        pad, stop = PAD_ID, STOP_ID
        must_stop = True
    while tokens and tokens[-1] == pad:
        tokens.pop()
    if tokens and tokens[-1] == stop:
        tokens.pop()
    elif must_stop:
        raise ValueError(
            "completion does not end with <stop> (truncated? TRL's max_completion_length must be >= max_shots + 1)"
        )
    slots = []
    for token in tokens:
        word = token if isinstance(token, str) else tokenizer.convert_ids_to_tokens(token)
        slot = vocabulary.slot_of_word(word) if isinstance(word, str) else None
        if slot is None:
            raise ValueError(f"completion token {token!r} is not a slot token of this selector")
        slots.append(slot)
    return slots


def parse_selection(
    completion, candidate_ids: Sequence, tokenizer, *, min_shots: int | None = None, max_shots: int | None = None
) -> list:
    """The chosen entries of `candidate_ids` (corpus ids, in prompt order), in the order the selector chose them.

    `completion`: token ids (list, tensor; ending with `<stop>`) or decoded text. The shot bounds default to those
    stored in the selector tokenizer; a pool smaller than `min_shots` may end early. Raises ValueError on a non-slot
    token, an empty slot (`>= len(candidate_ids)`), a repeat, or a length outside the bounds.
    """
    vocabulary = SelectorVocabulary.from_tokenizer(tokenizer)
    if len(candidate_ids) > vocabulary.num_slots:
        raise ValueError(f"{len(candidate_ids)} candidate ids for a selector with {vocabulary.num_slots} slots")
    stored_min, stored_max = shot_bounds_of(tokenizer)
    min_shots = stored_min if min_shots is None else min_shots
    max_shots = stored_max if max_shots is None else max_shots
    slots = _completion_slots(completion, vocabulary, tokenizer)
    for slot in slots:
        if slot >= len(candidate_ids):
            raise ValueError(f"slot {slot} is empty: the pool has {len(candidate_ids)} candidates")
    if len(set(slots)) != len(slots):
        raise ValueError(f"a candidate is chosen twice: slots {slots}")
    if min_shots is not None and len(slots) < min(min_shots, len(candidate_ids)):
        raise ValueError(f"{len(slots)} demonstrations chosen, fewer than min_shots={min_shots}")
    if max_shots is not None and len(slots) > max_shots:
        raise ValueError(f"{len(slots)} demonstrations chosen, more than max_shots={max_shots}")
    return [candidate_ids[slot] for slot in slots]
