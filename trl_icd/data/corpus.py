"""An in-memory, id-addressed collection of VQA items (image, question, 10 answers).

Every part of trl-icd speaks about items by their corpus id: selector datasets carry `query_id`/`candidate_ids`,
the reward looks demonstrations up by id, the feature table has one row per corpus item in corpus order
(`Corpus.row_of(id)`). Images are loaded lazily so a corpus of 450k items costs only its metadata.
"""

from __future__ import annotations

import io
import os
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

ItemId = Hashable


class ImageLoadError(RuntimeError):
    """An item's image is missing or cannot be decoded (callers count this and fall back, never crash a batch)."""


def most_common_answer(answers: Sequence[str]) -> str:
    """The most frequent answer; ties go to the answer seen first (deterministic, unlike `Counter` order games)."""
    if not answers:
        return ""
    counts = Counter(answers)
    best = max(counts.values())
    return next(a for a in answers if counts[a] == best)


def _load_image(source: Any) -> Image.Image:
    """Decode an image given as PIL image, path, raw bytes, a `datasets` image dict, or a zero-arg callable."""
    try:
        if callable(source) and not isinstance(source, Image.Image):
            source = source()
        if isinstance(source, Image.Image):
            image = source
        elif isinstance(source, (str, os.PathLike)):
            with Image.open(source) as opened:
                image = opened.copy()
        elif isinstance(source, (bytes, bytearray)):
            with Image.open(io.BytesIO(source)) as opened:
                image = opened.copy()
        elif isinstance(source, Mapping) and (source.get("bytes") or source.get("path")):
            return _load_image(source.get("bytes") or source["path"])
        else:
            raise ImageLoadError(f"no image (got {type(source).__name__})")
    except ImageLoadError:
        raise
    except Exception as err:  # PIL raises many types; callers need one
        raise ImageLoadError(f"cannot load image from {source!r:.120}: {err}") from err
    return image if image.mode == "RGB" else image.convert("RGB")


@dataclass(frozen=True, eq=False)
class CorpusItem:
    """One VQA item. `answer` is the most common of `answers`; `meta` holds dataset-specific extras."""

    id: ItemId
    question: str
    answers: tuple[str, ...]
    answer: str
    image_id: ItemId | None = None
    split: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)
    image_source: Any = field(default=None, repr=False)

    @property
    def image(self) -> Image.Image:
        """The RGB image, decoded on each access (raises `ImageLoadError`)."""
        return _load_image(self.image_source)

    @property
    def image_key(self) -> str:
        """A key naming this item's image (for per-image caches): the image id, else the source path, else the id."""
        if self.image_id is not None:
            return f"image:{self.image_id}"
        if isinstance(self.image_source, (str, os.PathLike)):
            return f"path:{os.fspath(self.image_source)}"
        return f"item:{self.id}"


_RECORD_KEYS = {"id", "image", "question", "answers", "answer", "image_id", "split"}


class Corpus:
    """Items addressed by id, with a stable row order (the feature-table order)."""

    def __init__(self, items: Iterable[CorpusItem]):
        self._items: list[CorpusItem] = list(items)
        self._rows: dict[ItemId, int] = {}
        for row, item in enumerate(self._items):
            if item.id in self._rows:
                raise ValueError(f"duplicate corpus id {item.id!r}")
            self._rows[item.id] = row

    @classmethod
    def from_records(cls, records: Iterable[Mapping[str, Any]], split: str | None = None) -> Corpus:
        """Build from dicts with `id`, `image` (PIL / path / bytes / callable), `question`, `answers` (list of str)
        and optional `image_id`, `answer`, `split`; any other key goes to `meta`."""
        items = []
        for n, rec in enumerate(records):
            missing = [k for k in ("id", "question", "answers") if k not in rec]
            if missing:
                raise ValueError(f"record {n} lacks {missing}")
            answers = rec["answers"]
            if isinstance(answers, str) or not all(isinstance(a, str) for a in answers):
                raise ValueError(f"record {rec['id']!r}: `answers` must be a list of strings")
            answers = tuple(answers)
            items.append(
                CorpusItem(
                    id=rec["id"],
                    question=str(rec["question"]),
                    answers=answers,
                    answer=rec.get("answer") or most_common_answer(answers),
                    image_id=rec.get("image_id"),
                    split=rec.get("split", split),
                    meta={k: v for k, v in rec.items() if k not in _RECORD_KEYS},
                    image_source=rec.get("image"),
                )
            )
        return cls(items)

    @classmethod
    def concat(cls, *corpora: Corpus) -> Corpus:
        """One corpus holding every item of `corpora` (ids must not collide), e.g. the train pool plus val queries."""
        return cls(item for corpus in corpora for item in corpus)

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[CorpusItem]:
        return iter(self._items)

    def __contains__(self, item_id: object) -> bool:
        try:
            return item_id in self._rows
        except TypeError:  # unhashable
            return False

    def __getitem__(self, item_id: ItemId) -> CorpusItem:
        try:
            return self._items[self._rows[item_id]]
        except (KeyError, TypeError):
            raise KeyError(f"unknown corpus id {item_id!r}") from None

    def get(self, item_id: ItemId) -> CorpusItem | None:
        return self._items[self._rows[item_id]] if item_id in self else None

    def row_of(self, item_id: ItemId) -> int:
        """The feature-table row of `item_id`."""
        try:
            return self._rows[item_id]
        except (KeyError, TypeError):
            raise KeyError(f"unknown corpus id {item_id!r}") from None

    def item_at(self, row: int) -> CorpusItem:
        return self._items[row]

    @property
    def ids(self) -> list[ItemId]:
        return [item.id for item in self._items]

    def ids_in_split(self, split: str) -> list[ItemId]:
        return [item.id for item in self._items if item.split == split]

    @property
    def splits(self) -> list[str]:
        return sorted({item.split for item in self._items if item.split is not None})

    def filter(self, predicate: Callable[[CorpusItem], bool]) -> Corpus:
        return Corpus(item for item in self._items if predicate(item))

    def __repr__(self) -> str:
        return f"Corpus({len(self)} items, splits={self.splits})"
