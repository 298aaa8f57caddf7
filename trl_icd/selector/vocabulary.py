"""The selector's vocabulary layout: which token id means what.

One object describes it, and the config (sizes, special ids), the model (reading prompts, the 0/1 output head) and
the tokenizer (its words) all derive from it, so they cannot disagree.

Ids, in order:

| ids | words | role |
|---|---|---|
| 0, 1, 2 | `<pad>`, `<stop>`, `<unk>` | specials; `<stop>` is the eos token and the "no more demonstrations" action |
| 3 | `<empty>` | fills the prompt's candidate slots beyond the pool's size |
| 4 .. 4+K-1 | `<slot_0>` .. `<slot_{K-1}>` | completion tokens: "pick the candidate in prompt position k" |
| 4+K .. | item words | name a row of the feature table (prompt tokens only) |

Item words come in two modes (`item_vocab`):

- `"code"` (default): a row is written as `code_length` base-`code_base` digits `<code_d>` (most significant first),
  so the vocabulary has `code_base` item words whatever the pool size (default 256 x 3 digits: up to 16.7M rows).
  TRL's per-step cost grows with the vocabulary size, so this is what makes a 443k-item VQAv2 pool practical.
- `"token"`: one word `<item_r>` per row (the simplest form; the vocabulary grows with the table).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

ITEM_VOCABULARIES = ("code", "token")

PAD_WORD, STOP_WORD, UNK_WORD, EMPTY_WORD = "<pad>", "<stop>", "<unk>", "<empty>"
PAD_ID, STOP_ID, UNK_ID, EMPTY_ID = 0, 1, 2, 3
SLOT_OFFSET = 4

# Key under which a selector tokenizer stores its layout (saved in tokenizer_config.json).
TOKENIZER_METADATA_KEY = "icd_selector"

_SLOT_WORD = re.compile(r"<slot_(\d+)>")


@dataclass(frozen=True)
class SelectorVocabulary:
    """Layout of the selector vocabulary for `num_slots` candidate positions.

    `num_items` bounds the feature-table rows a prompt may name in `"token"` mode (required there: it sizes the
    vocabulary). In `"code"` mode a prompt may name any row the code can write (`code_base ** code_length`), so a
    selector reads tables larger than the one it was created with; `num_items` is then only checked to fit.
    """

    num_slots: int
    item_vocab: str = "code"
    num_items: int | None = None
    code_base: int = 256
    code_length: int = 3

    def __post_init__(self):
        if not isinstance(self.num_slots, int) or self.num_slots < 1:
            raise ValueError(f"num_slots must be a positive int, got {self.num_slots!r}")
        if self.item_vocab not in ITEM_VOCABULARIES:
            raise ValueError(f"item_vocab must be one of {ITEM_VOCABULARIES}, got {self.item_vocab!r}")
        if self.num_items is not None and self.num_items < 1:
            raise ValueError(f"num_items must be positive, got {self.num_items}")
        if self.item_vocab == "token" and self.num_items is None:
            raise ValueError("item_vocab='token' needs num_items (one vocabulary word per feature-table row)")
        if self.code_base < 2 or self.code_length < 1:
            raise ValueError(f"code_base must be >= 2 and code_length >= 1, got {self.code_base}, {self.code_length}")
        if self.item_vocab == "code" and self.num_items is not None and self.num_items > self.code_capacity:
            raise ValueError(
                f"{self.num_items} items do not fit in {self.code_length} base-{self.code_base} digits "
                f"({self.code_capacity} codes): raise item_code_length or item_code_base"
            )

    # ---- sizes and ids -------------------------------------------------------------------------------------------
    @property
    def code_capacity(self) -> int:
        return self.code_base**self.code_length

    @property
    def max_items(self) -> int:
        """Rows a prompt can name (the attached feature table may hold fewer: reading a row beyond it is an error)."""
        if self.item_vocab == "token":
            return self.num_items
        return self.code_capacity

    @property
    def item_offset(self) -> int:
        return SLOT_OFFSET + self.num_slots

    @property
    def num_item_words(self) -> int:
        return self.num_items if self.item_vocab == "token" else self.code_base

    @property
    def vocab_size(self) -> int:
        return self.item_offset + self.num_item_words

    @property
    def words_per_item(self) -> int:
        return 1 if self.item_vocab == "token" else self.code_length

    @property
    def prompt_length(self) -> int:
        """Tokens in every prompt: the query then `num_slots` candidate slots, `words_per_item` each."""
        return (1 + self.num_slots) * self.words_per_item

    # ---- words ---------------------------------------------------------------------------------------------------
    @staticmethod
    def slot_word(slot: int) -> str:
        return f"<slot_{slot}>"

    def item_word(self, index: int) -> str:
        """The `index`-th item word (a row in "token" mode, a digit in "code" mode)."""
        return f"<item_{index}>" if self.item_vocab == "token" else f"<code_{index}>"

    def words(self) -> list[str]:
        """Every word, in id order."""
        specials = [PAD_WORD, STOP_WORD, UNK_WORD, EMPTY_WORD]
        slots = [self.slot_word(k) for k in range(self.num_slots)]
        return specials + slots + [self.item_word(i) for i in range(self.num_item_words)]

    def item_words(self, row: int) -> list[str]:
        """How feature-table row `row` is written in a prompt."""
        if self.item_vocab == "token":
            return [self.item_word(row)]
        digits = []
        for _ in range(self.code_length):
            row, digit = divmod(row, self.code_base)
            digits.append(self.item_word(digit))
        return digits[::-1]

    def empty_words(self) -> list[str]:
        return [EMPTY_WORD] * self.words_per_item

    def slot_of_word(self, word: str) -> int | None:
        """The slot a completion word picks, or None when the word is not a slot word of this vocabulary."""
        match = _SLOT_WORD.fullmatch(word)
        if match is None:
            return None
        slot = int(match.group(1))
        return slot if slot < self.num_slots and word == self.slot_word(slot) else None

    # ---- (de)serialisation ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SelectorVocabulary:
        return cls(**{key: data[key] for key in ("num_slots", "item_vocab", "num_items", "code_base", "code_length")})

    @classmethod
    def from_config(cls, config) -> SelectorVocabulary:
        return cls(
            num_slots=config.num_slots,
            item_vocab=config.item_vocab,
            num_items=config.num_items,
            code_base=config.item_code_base,
            code_length=config.item_code_length,
        )

    @classmethod
    def from_tokenizer(cls, tokenizer) -> SelectorVocabulary:
        metadata = getattr(tokenizer, "init_kwargs", {}).get(TOKENIZER_METADATA_KEY)
        if metadata is None:
            raise ValueError(
                f"{type(tokenizer).__name__} is not a selector tokenizer (no {TOKENIZER_METADATA_KEY!r} entry); "
                "build it with trl_icd.selector.build_selector_tokenizer(config)"
            )
        return cls.from_dict(metadata)

    @classmethod
    def resolve(cls, source) -> SelectorVocabulary:
        """A vocabulary from a `SelectorVocabulary`, an `ICDSelectorConfig` or a selector tokenizer."""
        if isinstance(source, SelectorVocabulary):
            return source
        if hasattr(source, "num_slots") and hasattr(source, "item_vocab"):
            return cls.from_config(source)
        return cls.from_tokenizer(source)


def shot_bounds_of(source) -> tuple[int | None, int | None]:
    """(min_shots, max_shots) recorded in a config or a selector tokenizer, (None, None) when unknown."""
    if hasattr(source, "min_shots") and hasattr(source, "max_shots"):
        return source.min_shots, source.max_shots
    metadata = getattr(source, "init_kwargs", {}).get(TOKENIZER_METADATA_KEY) or {}
    return metadata.get("min_shots"), metadata.get("max_shots")
