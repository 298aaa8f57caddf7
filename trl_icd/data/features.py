"""Per-item feature vectors: an image half and a text half, one row per corpus item in corpus order.

The table feeds two consumers: the similarity samplers (`image_sim`, `text_sim`) and the selector, whose frozen item
table is `FeatureTable.combined()`. Two featurisers produce it:

- `compute_clip_features`: CLIP image embeddings of the item's image and CLIP text embeddings of its question.
- `fallback_features`: no weights at all (tests, the demo world, machines without a CLIP checkpoint): a colour /
  layout / edge-orientation descriptor of the image and signed hashed word + bigram counts of the question.

A table is written once (`save`) as a directory of two `.npy` arrays plus a small JSON file of ids, metadata and a
content hash, and memory-mapped read-only on `load`, so a 658k-item VQAv2 table (train + val, 1,536 dims: 4 GB) costs
no RAM until rows are touched and every process on a machine shares one copy in the page cache.

The selector reads rows through an `ItemTable` (a table's combined rows, or a plain matrix): it is never a module
buffer or parameter (DDP would broadcast it every step, ZeRO-3 does not shard buffers, checkpoints would store it).
A selector records the table's `FeaturizerSpec` and content hash; a selector loaded in a process that has mapped a
table with that hash finds it there (`find_item_table`), which is how TRL's reference model gets its rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import weakref
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .corpus import Corpus, CorpusItem, ImageLoadError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
# How a table's rows become the selector's item vectors (recorded by selectors, so a change is caught on load).
COMBINED_NORMALIZATION = "concat(l2(image), l2(text)) / sqrt(2)"
_COMBINED_SCALE = np.float32(1.0 / np.sqrt(2.0))
_HASH_CHUNK_BYTES = 64 << 20
_IMAGE_FILE = "image.npy"
_TEXT_FILE = "text.npy"
_META_FILE = "features.json"
_FILES = (_IMAGE_FILE, _TEXT_FILE, _META_FILE)


def l2_normalize(matrix: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit L2 norm (computed in float64, returned as float32); all-zero rows stay zero."""
    matrix = np.asarray(matrix, dtype=np.float64)
    norms = np.linalg.norm(matrix, axis=-1, keepdims=True)
    return (matrix / np.maximum(norms, eps)).astype(np.float32)


@dataclass(frozen=True)
class FeaturizerSpec:
    """What produced a table's vectors, as a selector records it. Vectors of two tables with the same spec are
    comparable (a selector trained on one reads the other: new queries, new pools); with different specs they are
    not. `name` None means "not recorded" (a plain matrix, a checkpoint from before specs were recorded): then only
    the width is compared."""

    name: str | None
    dim: int
    image_dim: int | None = None
    text_dim: int | None = None
    normalization: str | None = None

    def describe(self) -> str:
        parts = f"image {self.image_dim} + text {self.text_dim}" if self.image_dim is not None else f"{self.dim} dims"
        norm = f", {self.normalization}" if self.normalization else ""
        return f"{self.name or 'unrecorded featuriser'} ({parts}{norm})"

    def to_dict(self) -> dict:
        return {"name": self.name, "dim": self.dim, "image_dim": self.image_dim, "text_dim": self.text_dim,
                "normalization": self.normalization}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeaturizerSpec:
        return cls(data.get("name"), int(data["dim"]), data.get("image_dim"), data.get("text_dim"),
                   data.get("normalization"))

    def mismatch(self, other: FeaturizerSpec) -> str | None:
        """Why vectors of `other` cannot stand in for this spec's, or None when they can."""
        if self.dim != other.dim:
            return f"{self.dim}-dim vectors vs {other.dim}-dim"
        if self.name is None or other.name is None:
            return None
        for key in ("name", "image_dim", "text_dim", "normalization"):
            if getattr(self, key) != getattr(other, key):
                return f"{key} {getattr(self, key)!r} vs {getattr(other, key)!r}"
        return None


def _hash_id(item_id: Any) -> int | str:
    if isinstance(item_id, (int, np.integer)) and not isinstance(item_id, (bool, np.bool_)):
        return int(item_id)
    return item_id if isinstance(item_id, str) else repr(item_id)


def _content_hash(kind: str, header: Mapping[str, Any], arrays: Sequence[np.ndarray], what: str) -> str:
    """blake2b-128 of a canonical header and the arrays' little-endian float32 bytes, read in chunks (a progress bar
    for tables of more than a few hundred MB)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps({"kind": kind, **header}, sort_keys=True).encode("utf-8"))
    total = sum(int(a.shape[0]) for a in arrays)
    big = sum(a.size for a in arrays) * 4 > 256 << 20
    with tqdm(total=total, desc=f"hashing {what}", unit="rows", disable=not big) as progress:
        for array in arrays:
            step = max(1, _HASH_CHUNK_BYTES // max(1, 4 * int(np.prod(array.shape[1:], dtype=np.int64))))
            for start in range(0, array.shape[0], step):
                digest.update(np.ascontiguousarray(array[start : start + step], dtype="<f4").data)
                progress.update(min(step, array.shape[0] - start))
    return digest.hexdigest()


@dataclass
class FeatureTable:
    """Image and text features of a corpus, one row per item in corpus order (row i = `corpus.item_at(i)`).

    Each row of `image` and `text` has unit L2 norm, except image rows of items whose image could not be read
    (`meta["missing_image_ids"]`), which are zero: they have similarity 0 to everything, so image-similarity
    retrieval neither prefers nor crashes on them. A table is identified by `content_hash` (ids and values) and
    produced by `featurizer` (a `FeaturizerSpec`). Treat the arrays as read-only once the hash has been read.
    """

    ids: list
    image: np.ndarray
    text: np.ndarray
    meta: dict = field(default_factory=dict)
    _content_hash: str | None = field(default=None, init=False, repr=False, compare=False)
    _item_table: ItemTable | None = field(default=None, init=False, repr=False, compare=False)
    _allocated_in: Path | None = field(default=None, init=False, repr=False, compare=False)
    source: str = field(default="in memory", init=False, repr=False, compare=False)

    def __post_init__(self):
        self.ids = list(self.ids)
        if self.image.ndim != 2 or self.text.ndim != 2:
            raise ValueError(f"feature arrays must be 2-D, got image {self.image.shape} and text {self.text.shape}")
        if not (len(self.ids) == self.image.shape[0] == self.text.shape[0]):
            raise ValueError(
                f"{len(self.ids)} ids but {self.image.shape[0]} image rows and {self.text.shape[0]} text rows"
            )
        self._rows = {item_id: row for row, item_id in enumerate(self.ids)}
        if len(self._rows) != len(self.ids):
            raise ValueError("duplicate ids in feature table")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def image_dim(self) -> int:
        return int(self.image.shape[1])

    @property
    def text_dim(self) -> int:
        return int(self.text.shape[1])

    @property
    def combined_dim(self) -> int:
        return self.image_dim + self.text_dim

    def row_of(self, item_id: Hashable) -> int:
        try:
            return self._rows[item_id]
        except (KeyError, TypeError):
            raise KeyError(f"id {item_id!r} is not in the feature table") from None

    def rows_of(self, item_ids: Iterable[Hashable]) -> np.ndarray:
        return np.fromiter((self.row_of(i) for i in item_ids), dtype=np.int64)

    def combined(self) -> np.ndarray:
        """`[N, image_dim + text_dim]` float32: concat(image, text) / sqrt(2), unit norm per row (the selector's
        item vectors). A new array of the whole table each call (4 GB for VQAv2): to read some rows use
        `combined_rows`."""
        out = np.empty((len(self), self.combined_dim), dtype=np.float32)
        np.multiply(self.image, _COMBINED_SCALE, out=out[:, : self.image_dim])
        np.multiply(self.text, _COMBINED_SCALE, out=out[:, self.image_dim :])
        return out

    def combined_rows(self, rows) -> np.ndarray:
        """`combined()[rows]` (any shape of int rows -> that shape + `[combined_dim]`), reading only those rows."""
        rows = np.asarray(rows, dtype=np.int64)
        flat = rows.reshape(-1)
        out = np.empty((flat.size, self.combined_dim), dtype=np.float32)
        out[:, : self.image_dim] = self.image[flat]
        out[:, self.image_dim :] = self.text[flat]
        out *= _COMBINED_SCALE
        return out.reshape(*rows.shape, self.combined_dim)

    @property
    def featurizer(self) -> FeaturizerSpec:
        """The featuriser that produced this table (from `meta`: its name and model, the dims, the combination)."""
        name = self.meta.get("featurizer")
        if name and self.meta.get("model"):  # the model's last path part: a Hub id and a local copy name it alike
            name = f"{name}:{Path(str(self.meta['model']).rstrip('/')).name}"
        return FeaturizerSpec(name or None, self.combined_dim, self.image_dim, self.text_dim, COMBINED_NORMALIZATION)

    @property
    def content_hash(self) -> str:
        """Hash of the ids and values (read from the header of a saved table; computed once otherwise)."""
        if self._content_hash is None:
            self._content_hash = self._compute_hash()
        return self._content_hash

    def _compute_hash(self) -> str:
        header = {"ids": [_hash_id(i) for i in self.ids], "image_dim": self.image_dim, "text_dim": self.text_dim}
        return _content_hash("feature-table", header, (self.image, self.text), f"feature table ({len(self)} rows)")

    def verify(self) -> None:
        """Recompute the content hash and raise if it differs from the recorded one (a table edited on disk)."""
        recorded, actual = self.content_hash, self._compute_hash()
        if recorded != actual:
            raise ValueError(f"feature table at {self.source}: content hash {actual} differs from the recorded "
                             f"{recorded}; the arrays changed after it was saved: re-export it")

    def item_table(self) -> ItemTable:
        """The selector's view of this table (its combined rows), registered so selectors in this process that
        recorded this table's hash find it."""
        if self._item_table is None:
            self._item_table = ItemTable(
                self.combined_rows, len(self), self.combined_dim, self.content_hash, self.featurizer, self.source
            )
        return register_item_table(self._item_table)

    def check_aligned(self, corpus: Corpus) -> None:
        """Raise unless row i of this table is item i of `corpus` (the invariant every consumer relies on)."""
        if len(corpus) != len(self):
            raise ValueError(f"feature table has {len(self)} rows but the corpus has {len(corpus)} items")
        for row, item in enumerate(corpus):
            if self.ids[row] != item.id:
                raise ValueError(
                    f"feature table row {row} is id {self.ids[row]!r} but corpus row {row} is {item.id!r}; "
                    "use `table.aligned_to(corpus)`"
                )

    def aligned_to(self, corpus: Corpus) -> FeatureTable:
        """This table's rows reordered (and subset) to `corpus` order; every corpus id must be present. Returns
        `self` when already aligned, else an in-memory copy of the selected rows."""
        missing = [item.id for item in corpus if item.id not in self._rows]
        if missing:
            raise KeyError(f"{len(missing)} corpus ids have no features, e.g. {missing[:5]}")
        rows = self.rows_of(corpus.ids)
        if len(rows) == len(self) and np.array_equal(rows, np.arange(len(self))):
            return self
        kept = set(corpus.ids)
        meta = dict(self.meta)
        if "missing_image_ids" in meta:
            meta["missing_image_ids"] = [i for i in meta["missing_image_ids"] if i in kept]
        return FeatureTable(corpus.ids, np.asarray(self.image[rows]), np.asarray(self.text[rows]), meta)

    @classmethod
    def allocate(
        cls, path: str | os.PathLike, ids: Sequence, image_dim: int, text_dim: int, meta: Mapping | None = None
    ) -> FeatureTable:
        """A table of zeros whose arrays are writable memory maps in `path/`, for tables larger than memory: fill
        rows in place (`table.image[a:b] = ...`, unit-norm rows), then `table.save(path)` writes the header (ids,
        metadata, content hash) without copying the arrays."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / _META_FILE).unlink(missing_ok=True)
        n = len(ids)
        image = np.lib.format.open_memmap(path / _IMAGE_FILE, mode="w+", dtype=np.float32, shape=(n, image_dim))
        text = np.lib.format.open_memmap(path / _TEXT_FILE, mode="w+", dtype=np.float32, shape=(n, text_dim))
        table = cls(list(ids), image, text, dict(meta or {}))
        table._allocated_in = path.resolve()
        return table

    def save(self, path: str | os.PathLike) -> Path:
        """Write `path/` = image.npy, text.npy (float32) and features.json (ids, dims, metadata, content hash)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        ids = [_json_id(i) for i in self.ids]
        meta = _json_meta(self.meta)
        (path / _META_FILE).unlink(missing_ok=True)  # while arrays are rewritten, the folder is not a valid table
        if self._allocated_in == path.resolve():  # filled in place by `allocate`: the arrays are these files
            self.image.flush()
            self.text.flush()
            self._content_hash = None  # rows were written after allocation
        else:
            np.save(path / _IMAGE_FILE, np.ascontiguousarray(self.image, dtype=np.float32))
            np.save(path / _TEXT_FILE, np.ascontiguousarray(self.text, dtype=np.float32))
        header = {
            "format_version": FORMAT_VERSION,
            "num_items": len(self),
            "image_dim": self.image_dim,
            "text_dim": self.text_dim,
            "content_hash": self.content_hash,
            "meta": meta,
            "ids": ids,
        }
        tmp = path / (_META_FILE + ".tmp")
        tmp.write_text(json.dumps(header))
        os.replace(tmp, path / _META_FILE)  # the header last: a half-written table has no header and fails to load
        return path

    @staticmethod
    def is_table_dir(path: str | os.PathLike) -> bool:
        """Whether `path` is a folder holding a saved table and nothing else (safe to overwrite)."""
        path = Path(path)
        return path.is_dir() and (path / _META_FILE).is_file() and {p.name for p in path.iterdir()} <= set(_FILES)

    @classmethod
    def load(cls, path: str | os.PathLike, mmap: bool = True) -> FeatureTable:
        """Read a table written by `save`; arrays are read-only memory maps unless `mmap=False`. The table is
        registered (by its content hash) for selectors loaded later in this process."""
        path = Path(path)
        header_path = path / _META_FILE
        if not header_path.is_file():
            raise FileNotFoundError(f"no feature table at {path} (missing {_META_FILE})")
        try:
            header = json.loads(header_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{header_path} is not valid JSON: {err}") from err
        if header.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{header_path}: unsupported format_version {header.get('format_version')!r}")
        mode = "r" if mmap else None
        image = np.load(path / _IMAGE_FILE, mmap_mode=mode)
        text = np.load(path / _TEXT_FILE, mmap_mode=mode)
        num_items = header["num_items"]
        expected = {"image": (num_items, header["image_dim"]), "text": (num_items, header["text_dim"])}
        for name, array in (("image", image), ("text", text)):
            if tuple(array.shape) != tuple(expected[name]) or array.dtype != np.float32:
                raise ValueError(f"{path}/{name}.npy: {array.shape} {array.dtype}, expected {expected[name]} float32")
        table = cls(header["ids"], image, text, header.get("meta", {}))
        table.source = str(path)
        table._content_hash = header.get("content_hash")
        if table._content_hash is None:
            logger.info("%s was saved without a content hash; it is computed when a selector needs it (re-save the "
                        "table to store it)", path)
        else:
            table.item_table()  # register: a selector loaded later in this process finds it by its hash
        return table


class ItemTable:
    """What a selector reads: row -> float32 vector, read-only, identified by a content hash.

    Either a `FeatureTable`'s combined rows (`FeatureTable.item_table()`, gathered from the memory maps on demand)
    or a plain `[N, D]` matrix (`ItemTable.from_matrix`). Deep copies share it (a model copy must not duplicate a
    4 GB table). Indexing (`table[rows]`) returns a CPU float32 tensor of those rows.
    """

    def __init__(self, gather, num_rows: int, dim: int, content_hash: str, featurizer: FeaturizerSpec, source: str):
        self._gather = gather
        self.num_rows, self.dim = int(num_rows), int(dim)
        self.content_hash, self.featurizer, self.source = content_hash, featurizer, source

    @classmethod
    def from_matrix(cls, matrix, featurizer: FeaturizerSpec | None = None, source: str = "in memory") -> ItemTable:
        """A table over a plain `[N, D]` matrix (array or tensor; copied into a read-only float32 array unless it
        already is one). `featurizer` records what produced it (default: unrecorded, only the width is checked)."""
        if hasattr(matrix, "detach"):
            matrix = matrix.detach().cpu().float().numpy()
        array = np.asarray(matrix)
        if array.dtype != np.float32 or array.flags.writeable:
            array = np.array(array, dtype=np.float32, copy=True)
            array.setflags(write=False)
        if array.ndim != 2 or array.shape[0] < 1 or array.shape[1] < 1:
            raise ValueError(f"features must be a non-empty [num_items, feature_dim] matrix, got {array.shape}")
        if not np.isfinite(array).all():
            raise ValueError("features contain NaN or inf")
        if featurizer is None:
            featurizer = FeaturizerSpec(None, int(array.shape[1]))
        elif featurizer.dim != array.shape[1]:
            raise ValueError(f"featurizer {featurizer.describe()} does not match {array.shape[1]}-dim rows")
        content_hash = _content_hash("matrix", {"shape": list(array.shape)}, (array,), f"matrix {array.shape}")
        return cls(lambda rows: array[np.asarray(rows, dtype=np.int64)], array.shape[0], array.shape[1],
                   content_hash, featurizer, source)

    def __len__(self) -> int:
        return self.num_rows

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_rows, self.dim)

    def gather(self, rows) -> np.ndarray:
        """float32 vectors of `rows` (int array of any shape); a row outside the table or a non-finite vector
        raises (a silent wrong row would train on another item)."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_rows):
            bad = int(rows[(rows < 0) | (rows >= self.num_rows)].reshape(-1)[0])
            raise ValueError(f"row {bad} is not a feature-table row below {self.num_rows}, the rows of the item "
                             f"table the selector reads ({self.describe()}): the prompts were built for another table")
        vectors = self._gather(rows)
        if not np.isfinite(vectors).all():
            raise ValueError(f"the item table {self.describe()} holds NaN or inf in the rows read")
        return vectors

    def __getitem__(self, index):
        import torch

        if isinstance(index, slice):
            index = np.arange(self.num_rows)[index]
        if hasattr(index, "detach"):
            index = index.detach().cpu().numpy()
        return torch.from_numpy(np.ascontiguousarray(self.gather(index)))

    def describe(self) -> str:
        return (f"table {self.content_hash[:12]} ({self.num_rows:,} rows x {self.dim}, {self.featurizer.describe()}, "
                f"{self.source})")

    def __repr__(self) -> str:
        return f"ItemTable({self.describe()})"

    def __deepcopy__(self, memo) -> ItemTable:
        return self

    def __copy__(self) -> ItemTable:
        return self


# Tables mapped in this process, by content hash (weakly held: a table lives as long as its users).
_REGISTRY: weakref.WeakValueDictionary[str, ItemTable] = weakref.WeakValueDictionary()


def register_item_table(table: ItemTable) -> ItemTable:
    """Make `table` findable by its content hash in this process (what a selector loaded from a path uses)."""
    _REGISTRY[table.content_hash] = table
    return table


def find_item_table(content_hash: str) -> ItemTable | None:
    """The table with this content hash mapped in this process, if any."""
    return _REGISTRY.get(content_hash)


def registered_item_tables() -> list[ItemTable]:
    return list(_REGISTRY.values())


def as_item_table(features) -> ItemTable:
    """An `ItemTable` from a `FeatureTable`, an `ItemTable` or a plain `[N, D]` matrix (registered, so selectors
    loaded later in this process find it by its hash)."""
    if isinstance(features, ItemTable):
        return register_item_table(features)
    if isinstance(features, FeatureTable):
        return features.item_table()
    return register_item_table(ItemTable.from_matrix(features))


def _json_id(item_id: Any) -> int | str:
    if isinstance(item_id, (bool, np.bool_)):
        raise TypeError(f"feature-table ids must be int or str to be saved, got {item_id!r}")
    if isinstance(item_id, (int, np.integer)):
        return int(item_id)
    if isinstance(item_id, str):
        return item_id
    raise TypeError(f"feature-table ids must be int or str to be saved, got {type(item_id).__name__} {item_id!r}")


def _json_meta(meta: Mapping[str, Any]) -> dict:
    out = dict(meta)
    if "missing_image_ids" in out:
        out["missing_image_ids"] = [_json_id(i) for i in out["missing_image_ids"]]
    try:
        json.dumps(out)
    except TypeError as err:
        raise TypeError(f"feature-table metadata must be JSON-serialisable: {err}") from err
    return out


# ---------------------------------------------------------------------------------------------------------------
# Image loading shared by both featurisers: one decode per distinct image, failures counted and logged.


def _unique_images(corpus: Corpus) -> tuple[list[CorpusItem], np.ndarray]:
    """One representative item per distinct image (`image_key`) and, per corpus row, the index of its image.
    VQAv2 has ~5 questions per image, so featurising each image once saves ~80% of the image work."""
    representatives: list[CorpusItem] = []
    index_of_key: dict[str, int] = {}
    image_index = np.empty(len(corpus), dtype=np.int64)
    for row, item in enumerate(corpus):
        key = item.image_key
        if key not in index_of_key:
            index_of_key[key] = len(representatives)
            representatives.append(item)
        image_index[row] = index_of_key[key]
    return representatives, image_index


def _try_load(item: CorpusItem) -> Image.Image | None:
    try:
        return item.image
    except ImageLoadError as err:
        logger.debug("image of item %r unreadable: %s", item.id, err)
        return None


def _finish_missing_images(
    corpus: Corpus, image_index: np.ndarray, failed_images: set[int], max_missing_fraction: float
) -> list:
    """Ids of items whose image failed; raise if more than `max_missing_fraction` of distinct images failed."""
    if not failed_images:
        return []
    missing_ids = [corpus.item_at(row).id for row in np.flatnonzero(np.isin(image_index, list(failed_images)))]
    num_images = int(image_index.max()) + 1
    fraction = len(failed_images) / num_images
    message = (
        f"{len(failed_images)}/{num_images} images unreadable ({len(missing_ids)} items, e.g. ids {missing_ids[:5]})"
    )
    if fraction > max_missing_fraction:
        raise ImageLoadError(f"{message}: more than max_missing_fraction={max_missing_fraction}; check the image root")
    logger.warning("%s; their image features are zero vectors", message)
    return missing_ids


# ---------------------------------------------------------------------------------------------------------------
# Fallback featuriser (no weights).

_COLOUR_BINS = 4  # per channel -> 64-bin joint RGB histogram
_LAYOUT_GRID = 6  # 6x6 RGB thumbnail -> 108 values
_ORIENTATION_BINS = 12  # unsigned gradient orientation, 15 degrees each
# Weights chosen so that, on generated shape images, the same shape and colour elsewhere in the frame is nearer than
# another shape or colour in the same place (tests/test_data_features.py checks this ordering).
_BLOCK_WEIGHTS = {"colour": 0.5, "foreground_colour": 1.0, "layout": 0.4, "edges": 1.3}
NATURAL_IMAGE_DIM = 2 * _COLOUR_BINS**3 + 3 * _LAYOUT_GRID**2 + _ORIENTATION_BINS
_PROJECTION_SEED = 20240611


def _colour_histograms(thumb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Square roots (Hellinger embedding, unit norm) of the joint RGB histogram of the whole image and of its
    non-dominant colours. The second block is what tells a red object from a blue one on the same large uniform
    background, where the whole-image histogram barely moves; it is zero for a single-colour image."""
    quantised = np.minimum((thumb * _COLOUR_BINS).astype(np.int64), _COLOUR_BINS - 1)
    codes = (quantised[..., 0] * _COLOUR_BINS + quantised[..., 1]) * _COLOUR_BINS + quantised[..., 2]
    hist = np.bincount(codes.ravel(), minlength=_COLOUR_BINS**3).astype(np.float64)
    whole = np.sqrt(hist / hist.sum())
    foreground = hist.copy()
    foreground[np.argmax(hist)] = 0.0
    total = foreground.sum()
    return whole, (np.sqrt(foreground / total) if total > 0 else foreground)


def _layout(image: Image.Image) -> np.ndarray:
    """A mean-centred coarse RGB thumbnail: where bright/dark and coloured regions lie."""
    grid = np.asarray(image.resize((_LAYOUT_GRID, _LAYOUT_GRID), Image.BOX), dtype=np.float64) / 255.0
    grid = grid - grid.mean(axis=(0, 1), keepdims=True)
    return _unit(grid.ravel())


def _edge_orientations(gray: np.ndarray) -> np.ndarray:
    """Magnitude-weighted histogram of unsigned gradient orientations: position-invariant shape evidence
    (a square peaks at 0/90 degrees, a triangle at 0/60/120, a circle is flat)."""
    gx = gray[1:-1, 2:] - gray[1:-1, :-2]
    gy = gray[2:, 1:-1] - gray[:-2, 1:-1]
    magnitude = np.hypot(gx, gy)
    angle = np.mod(np.arctan2(gy, gx), np.pi)
    bins = np.minimum((angle / np.pi * _ORIENTATION_BINS).astype(np.int64), _ORIENTATION_BINS - 1)
    hist = np.bincount(bins.ravel(), weights=magnitude.ravel(), minlength=_ORIENTATION_BINS)
    return _unit(hist)


def _unit(vector: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(vector)
    return vector / norm if norm > 0 else vector


def image_descriptor(image: Image.Image) -> np.ndarray:
    """The weight-free image descriptor (length `NATURAL_IMAGE_DIM`, unit norm): colour histograms (whole image and
    non-dominant colours), coarse layout and edge orientations, each block unit-normalised then weighted."""
    image = image.convert("RGB")
    thumb = np.asarray(image.resize((32, 32), Image.BOX), dtype=np.float64) / 255.0
    gray = np.asarray(image.convert("L").resize((64, 64), Image.BILINEAR), dtype=np.float64) / 255.0
    whole, foreground = _colour_histograms(thumb)
    blocks = (
        _BLOCK_WEIGHTS["colour"] * whole,
        _BLOCK_WEIGHTS["foreground_colour"] * foreground,
        _BLOCK_WEIGHTS["layout"] * _layout(image),
        _BLOCK_WEIGHTS["edges"] * _edge_orientations(gray),
    )
    return _unit(np.concatenate(blocks))


_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def question_tokens(question: str) -> list[str]:
    """Lower-cased words and adjacent-word bigrams of a question (the hashed text features' vocabulary)."""
    words = _WORD.findall(question.lower())
    if not words:
        return ["<empty>"]
    return [f"w:{w}" for w in words] + [f"b:{a} {b}" for a, b in zip(words, words[1:], strict=False)]


def _stable_hash(token: str) -> int:
    return int.from_bytes(hashlib.blake2b(token.encode("utf-8"), digest_size=8).digest(), "little")


def hashed_text_vector(question: str, dim: int) -> np.ndarray:
    """Signed feature hashing of `question_tokens` into `dim` buckets, unit norm (deterministic across runs and
    machines: blake2b, not Python's salted `hash`)."""
    vector = np.zeros(dim, dtype=np.float64)
    for token in question_tokens(question):
        h = _stable_hash(token)
        vector[h % dim] += 1.0 if (h >> 63) & 1 else -1.0
    norm = np.linalg.norm(vector)
    if norm == 0:  # every token cancelled out in a collision: fall back to the unsigned bucket of the first token
        vector[_stable_hash(question_tokens(question)[0]) % dim] = 1.0
        norm = 1.0
    return vector / norm


def _projection(in_dim: int, out_dim: int) -> np.ndarray:
    """A fixed Gaussian random projection (Johnson-Lindenstrauss: cosines are approximately kept)."""
    rng = np.random.default_rng([_PROJECTION_SEED, in_dim, out_dim])
    return rng.standard_normal((in_dim, out_dim)) / np.sqrt(out_dim)


def fallback_features(
    corpus: Corpus,
    image_dim: int | None = None,
    text_dim: int = 256,
    max_missing_fraction: float = 0.01,
    show_progress: bool = True,
) -> FeatureTable:
    """Weight-free features for every item of `corpus`.

    Image half: `image_descriptor` (colour histogram + coarse layout + edge orientations; `NATURAL_IMAGE_DIM` values),
    randomly projected to `image_dim` when given. Text half: signed hashed word and bigram counts of the question.
    Deterministic. Each distinct image is decoded once; unreadable images get zero rows (counted, logged, listed in
    `meta["missing_image_ids"]`) unless more than `max_missing_fraction` of images fail, which raises.
    """
    if text_dim < 1 or (image_dim is not None and image_dim < 1):
        raise ValueError("image_dim and text_dim must be positive")
    representatives, image_index = _unique_images(corpus)
    descriptors = np.zeros((len(representatives), NATURAL_IMAGE_DIM), dtype=np.float64)
    failed: set[int] = set()
    for n, item in enumerate(tqdm(representatives, desc="fallback image features", disable=not show_progress)):
        image = _try_load(item)
        if image is None:
            failed.add(n)
        else:
            descriptors[n] = image_descriptor(image)
    missing_ids = _finish_missing_images(corpus, image_index, failed, max_missing_fraction)
    if image_dim is not None and image_dim != NATURAL_IMAGE_DIM:
        descriptors = descriptors @ _projection(NATURAL_IMAGE_DIM, image_dim)
    text = np.stack([hashed_text_vector(item.question, text_dim) for item in corpus]) if len(corpus) else None
    if text is None:
        text = np.zeros((0, text_dim))
    meta = {
        "featurizer": "fallback",
        "image_dim": image_dim or NATURAL_IMAGE_DIM,
        "text_dim": text_dim,
        "missing_image_ids": missing_ids,
    }
    return FeatureTable(corpus.ids, l2_normalize(descriptors[image_index]), l2_normalize(text), meta)


# ---------------------------------------------------------------------------------------------------------------
# CLIP featuriser.


def _embedding(output: Any):
    """`get_*_features` returns a tensor in older transformers and an output whose `pooler_output` is the projected
    embedding in transformers 5."""
    return output if hasattr(output, "ndim") else output.pooler_output


def _batches(sequence: Sequence, batch_size: int):
    for start in range(0, len(sequence), batch_size):
        yield sequence[start : start + batch_size]


def compute_clip_features(
    corpus: Corpus,
    model,
    processor,
    batch_size: int = 64,
    device: str | None = None,
    max_missing_fraction: float = 0.01,
    show_progress: bool = True,
) -> FeatureTable:
    """CLIP (`transformers.CLIPModel`) embeddings of every item: image half = the image embedding of its image (each
    distinct image encoded once), text half = the text embedding of its question (truncated to the text model's
    length). Rows L2-normalised. Unreadable images: zero rows, counted, logged and listed in
    `meta["missing_image_ids"]`; more than `max_missing_fraction` of distinct images failing raises."""
    import torch

    if batch_size < 1:
        raise ValueError("batch_size must be positive")
    if device is not None:
        model = model.to(device)
    device = next(model.parameters()).device
    model.eval()
    representatives, image_index = _unique_images(corpus)
    image_dim = model.config.projection_dim
    image_rows = np.zeros((len(representatives), image_dim), dtype=np.float32)
    failed: set[int] = set()
    positions = list(range(len(representatives)))
    progress = tqdm(total=len(representatives) + len(corpus), desc="CLIP features", disable=not show_progress)
    with torch.inference_mode():
        for batch in _batches(positions, batch_size):
            loaded = [(n, _try_load(representatives[n])) for n in batch]
            good = [(n, image) for n, image in loaded if image is not None]
            failed.update(n for n, image in loaded if image is None)
            if good:
                pixels = processor(images=[image for _, image in good], return_tensors="pt")["pixel_values"]
                embedding = _embedding(model.get_image_features(pixel_values=pixels.to(device, model.dtype)))
                image_rows[[n for n, _ in good]] = embedding.float().cpu().numpy()
            progress.update(len(batch))
        missing_ids = _finish_missing_images(corpus, image_index, failed, max_missing_fraction)
        questions = [item.question for item in corpus]
        max_length = model.config.text_config.max_position_embeddings
        text_rows = np.zeros((len(corpus), image_dim), dtype=np.float32)
        for start in range(0, len(questions), batch_size):
            chunk = questions[start : start + batch_size]
            tokens = processor(text=chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            embedding = _embedding(
                model.get_text_features(
                    input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device)
                )
            )
            text_rows[start : start + len(chunk)] = embedding.float().cpu().numpy()
            progress.update(len(chunk))
    progress.close()
    meta = {
        "featurizer": "clip",
        "model": getattr(model.config, "_name_or_path", "") or "",
        "missing_image_ids": missing_ids,
    }
    return FeatureTable(corpus.ids, l2_normalize(image_rows[image_index]), l2_normalize(text_rows), meta)


def featurizer_for(table: FeatureTable, clip_model=None, clip_processor=None, **kwargs):
    """A function `Corpus -> FeatureTable` that featurises new items the way `table` was made (same featuriser and
    dims), e.g. new queries for a selector trained on `table`. The fallback featuriser is rebuilt from the table's
    metadata; a CLIP table needs the CLIP model and processor it was exported with. `kwargs` go to the featuriser."""
    name = table.meta.get("featurizer")
    if name == "fallback":
        image_dim = table.image_dim if table.image_dim != NATURAL_IMAGE_DIM else None
        return lambda corpus: fallback_features(corpus, image_dim=image_dim, text_dim=table.text_dim, **kwargs)
    if name == "clip":
        if clip_model is None or clip_processor is None:
            raise ValueError(f"the table at {table.source} holds CLIP features of {table.meta.get('model')!r}: pass "
                             "that model and its processor (clip_model=, clip_processor=) to featurise new items")
        return lambda corpus: compute_clip_features(corpus, clip_model, clip_processor, **kwargs)
    raise ValueError(f"the table at {table.source} does not record a known featuriser (meta featurizer={name!r}); "
                     "featurise the new items yourself with the function that made it")
