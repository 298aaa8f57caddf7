"""OK-VQA and VQAv2 corpora, from the official local files or from the Hugging Face Hub.

Local layout (the reference; what the official downloads unpack to):

    root/OpenEnded_mscoco_{split}2014_questions.json     (VQAv2: v2_OpenEnded_mscoco_{split}2014_questions.json)
    root/mscoco_{split}2014_annotations.json             (VQAv2: v2_mscoco_{split}2014_annotations.json)
    image_root/{split}2014/COCO_{split}2014_{image_id:012d}.jpg     (image_root defaults to root)

Every item: id = question_id, question, the 10 answers (the annotations' processed `answer` field), answer = the
most common of them (VQAv2's official `multiple_choice_answer` when the annotations carry it), image_id, split, and
the image, loaded lazily from its path. Items are sorted by question id within a split, splits in the order asked.

Hub: `load_vqa_hub` reads any parquet VQA dataset through `datasets.load_dataset` with a column mapping; `HUB_PRESETS`
names the dataset ids whose columns we know (see docs/data.md).
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .corpus import Corpus, CorpusItem, most_common_answer

logger = logging.getLogger(__name__)

SPLITS = ("train", "val")


@dataclass(frozen=True)
class VQAFileLayout:
    """File names of one VQA release (the `{split}` placeholder is `train` or `val`)."""

    questions: str
    annotations: str
    image_dir: str = "{split}2014"
    image_file: str = "COCO_{split}2014_{image_id:012d}.jpg"


OKVQA_LAYOUT = VQAFileLayout(
    questions="OpenEnded_mscoco_{split}2014_questions.json", annotations="mscoco_{split}2014_annotations.json"
)
VQAV2_LAYOUT = VQAFileLayout(
    questions="v2_OpenEnded_mscoco_{split}2014_questions.json", annotations="v2_mscoco_{split}2014_annotations.json"
)
LAYOUTS = {"okvqa": OKVQA_LAYOUT, "vqav2": VQAV2_LAYOUT}


# ---------------------------------------------------------------------------------------------------------------
# Local files.


def _read_json(path: Path, top_key: str) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"missing VQA file {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from err
    if not isinstance(data, dict) or not isinstance(data.get(top_key), list):
        raise ValueError(f"{path}: expected a JSON object with a list under {top_key!r}")
    return data[top_key]


def _require(record: Any, keys: Sequence[str], where: str) -> None:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object, got {type(record).__name__}")
    missing = [k for k in keys if k not in record]
    if missing:
        raise ValueError(f"{where}: missing {missing} (has {sorted(record)})")


def _annotation_answers(annotation: dict, where: str) -> tuple[str, ...]:
    answers = annotation["answers"]
    if not isinstance(answers, list) or not all(isinstance(a, dict) and "answer" in a for a in answers):
        raise ValueError(f"{where}: `answers` must be a list of objects with an `answer` field")
    return tuple(str(a["answer"]) for a in answers)


def load_vqa_local(
    questions_file: str | os.PathLike,
    annotations_file: str | os.PathLike,
    image_dir: str | os.PathLike,
    split: str,
    image_file: str = "COCO_{split}2014_{image_id:012d}.jpg",
    on_mismatch: str = "raise",
) -> Corpus:
    """A corpus from one split's official question and annotation files and its COCO image folder.

    Questions and annotations are joined on `question_id`. A question without an annotation, an annotation without
    a question, or a pair whose `image_id`s differ is a mismatch: `on_mismatch="raise"` (default) fails listing them,
    `"drop"` drops those items and logs how many. Images are not opened here (the folder must exist)."""
    if on_mismatch not in ("raise", "drop"):
        raise ValueError(f"on_mismatch must be 'raise' or 'drop', got {on_mismatch!r}")
    questions_file, annotations_file, image_dir = Path(questions_file), Path(annotations_file), Path(image_dir)
    questions = _read_json(questions_file, "questions")
    annotations = _read_json(annotations_file, "annotations")
    if not image_dir.is_dir():
        example = image_file.format(split=split, image_id=0)
        raise FileNotFoundError(f"missing image folder {image_dir} (expected {example} etc.)")

    question_by_id: dict[int, dict] = {}
    for n, q in enumerate(questions):
        _require(q, ("question_id", "image_id", "question"), f"{questions_file} question #{n}")
        if q["question_id"] in question_by_id:
            raise ValueError(f"{questions_file}: duplicate question_id {q['question_id']}")
        question_by_id[q["question_id"]] = q
    annotation_by_id: dict[int, dict] = {}
    for n, a in enumerate(annotations):
        _require(a, ("question_id", "image_id", "answers"), f"{annotations_file} annotation #{n}")
        if a["question_id"] in annotation_by_id:
            raise ValueError(f"{annotations_file}: duplicate question_id {a['question_id']}")
        annotation_by_id[a["question_id"]] = a

    no_annotation = sorted(set(question_by_id) - set(annotation_by_id))
    no_question = sorted(set(annotation_by_id) - set(question_by_id))
    image_conflict = sorted(
        qid
        for qid in set(question_by_id) & set(annotation_by_id)
        if question_by_id[qid]["image_id"] != annotation_by_id[qid]["image_id"]
    )
    if no_annotation or no_question or image_conflict:
        report = (
            f"{split}: {len(no_annotation)} questions without annotation (e.g. {no_annotation[:5]}), "
            f"{len(no_question)} annotations without question (e.g. {no_question[:5]}), "
            f"{len(image_conflict)} with different image_id in the two files (e.g. {image_conflict[:5]}) "
            f"[{questions_file.name} vs {annotations_file.name}]"
        )
        if on_mismatch == "raise":
            raise ValueError(f"question/annotation mismatch: {report}")
        logger.warning("dropping mismatched items: %s", report)
    keep = sorted(set(question_by_id) & set(annotation_by_id) - set(image_conflict))

    items = []
    for qid in keep:
        q, a = question_by_id[qid], annotation_by_id[qid]
        answers = _annotation_answers(a, f"{annotations_file} question_id {qid}")
        image_id = int(q["image_id"])
        meta = {k: a[k] for k in ("question_type", "answer_type") if k in a}
        items.append(
            CorpusItem(
                id=qid,
                question=str(q["question"]),
                answers=answers,
                answer=a.get("multiple_choice_answer") or most_common_answer(answers),
                image_id=image_id,
                split=split,
                meta=meta,
                image_source=str(image_dir / image_file.format(split=split, image_id=image_id)),
            )
        )
    _warn_answer_counts(items, split)
    return Corpus(items)


def _warn_answer_counts(items: Sequence[CorpusItem], split: str, expected: int = 10) -> None:
    odd = [item.id for item in items if len(item.answers) != expected]
    if odd:
        logger.warning("%s: %d items do not have %d answers (e.g. ids %s)", split, len(odd), expected, odd[:5])


def _load_local(root, splits, image_root, layout: VQAFileLayout, on_mismatch: str) -> Corpus:
    root = Path(root)
    image_root = Path(image_root) if image_root is not None else root
    corpora = [
        load_vqa_local(
            root / layout.questions.format(split=split),
            root / layout.annotations.format(split=split),
            image_root / layout.image_dir.format(split=split),
            split,
            image_file=layout.image_file,
            on_mismatch=on_mismatch,
        )
        for split in _check_splits(splits)
    ]
    return Corpus.concat(*corpora)


def _check_splits(splits: str | Iterable[str]) -> list[str]:
    splits = [splits] if isinstance(splits, str) else list(splits)
    if not splits:
        raise ValueError("no split requested")
    if len(set(splits)) != len(splits):
        raise ValueError(f"split listed twice: {splits}")
    return splits


def _check_local_files(root: Path, splits: Sequence[str], image_root: Path, layout: VQAFileLayout, name: str) -> None:
    """Every file and image folder the splits need, all missing ones listed at once with how to get them."""
    from .downloads import download_instructions

    needed = []
    for split in splits:
        needed += [root / layout.questions.format(split=split), root / layout.annotations.format(split=split),
                   image_root / layout.image_dir.format(split=split)]
    missing = [p for p in needed if not p.exists()]
    if missing:
        from ..sources import SourceNotFoundError

        raise SourceNotFoundError(
            f"{root}: missing {len(missing)} of the {len(needed)} files/folders of {name} ({', '.join(splits)}): "
            + ", ".join(str(p) for p in missing) + "\n" + download_instructions(name, str(root))
        )


def _load_folder_or_hub(source, splits, image_root, layout, on_mismatch, hub_kwargs, name: str) -> Corpus:
    """The official files in the folder `source` (file names from `layout`), else the Hub dataset `source`; which of
    the two a string means is decided by `trl_icd.sources.resolve_source`."""
    from ..sources import SourceNotFoundError, hub_failure_message, resolve_source
    from .downloads import DISPLAY_NAMES, download_instructions

    what = f"{DISPLAY_NAMES[name]} data folder"
    hint = download_instructions(name, os.fspath(source))
    resolved = resolve_source(source, what, hint=hint, known_hub_ids=HUB_PRESETS)
    if resolved.is_local:
        if hub_kwargs:
            raise TypeError(f"Hub options {sorted(hub_kwargs)} given for the local folder {source}")
        splits = _check_splits(splits)
        root = Path(resolved.value)
        _check_local_files(root, splits, Path(image_root) if image_root is not None else root, layout, name)
        return _load_local(root, splits, image_root, layout, on_mismatch)
    try:
        return load_vqa_hub(resolved.value, splits=splits, **hub_kwargs)
    except OSError as error:  # ConnectionError, DatasetNotFoundError (a FileNotFoundError), HTTP errors
        if not resolved.ambiguous:
            raise
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        raise SourceNotFoundError(hub_failure_message(resolved.value, what, reason, hint=hint)) from error


def load_okvqa(
    source: str | os.PathLike,
    splits: str | Iterable[str] = SPLITS,
    image_root: str | os.PathLike | None = None,
    on_mismatch: str = "raise",
    **hub_kwargs,
) -> Corpus:
    """OK-VQA: `source` is a folder with the official files (see module docstring) or a Hub dataset id
    (`hub_kwargs` go to `load_vqa_hub`; `splits` are then our split names, mapped by the preset or `split_map`)."""
    return _load_folder_or_hub(source, splits, image_root, OKVQA_LAYOUT, on_mismatch, hub_kwargs, "okvqa")


def load_vqav2(
    source: str | os.PathLike,
    splits: str | Iterable[str] = SPLITS,
    image_root: str | os.PathLike | None = None,
    on_mismatch: str = "raise",
    **hub_kwargs,
) -> Corpus:
    """VQAv2, like `load_okvqa` but with the `v2_`-prefixed official file names."""
    return _load_folder_or_hub(source, splits, image_root, VQAV2_LAYOUT, on_mismatch, hub_kwargs, "vqav2")


# ---------------------------------------------------------------------------------------------------------------
# Hub.


@dataclass(frozen=True)
class HubColumns:
    """Which dataset columns hold what. `None` = try the usual names (`CANDIDATE_COLUMNS`); an explicit name must
    exist. `answers` may hold a list of strings or a list of `{"answer": ...}` objects (official style)."""

    question_id: str | None = None
    question: str | None = None
    answers: str | None = None
    image: str | None = None
    image_id: str | None = None
    answer: str | None = None  # the official most common answer (VQAv2 `multiple_choice_answer`), if any


CANDIDATE_COLUMNS = {
    "question_id": ("question_id", "questionId", "qid"),
    "question": ("question",),
    "answers": ("answers",),
    "image": ("image",),
    "image_id": ("image_id", "id_image", "imageId"),
    "answer": ("multiple_choice_answer",),
}
_REQUIRED_COLUMNS = ("question_id", "question", "answers", "image")


@dataclass(frozen=True)
class HubPreset:
    """What we know about a Hub dataset: our split name -> its split name, and its column mapping."""

    split_map: Mapping[str, str]
    columns: HubColumns = HubColumns()
    note: str = ""


HUB_PRESETS: dict[str, HubPreset] = {
    "lmms-lab/OK-VQA": HubPreset(
        {"val": "val2014"},
        note="validation only; question_id is a string (converted to int); no image_id column, so other questions "
        "on the same image are not known (OK-VQA has ~1 question per image)",
    ),
    "ReplugLens/OK-VQA": HubPreset(
        {"train": "train", "val": "test"},
        note="train 9,009 / test (= official val) 5,046 rows; columns found by name (image id as `id_image` or "
        "`image_id`)",
    ),
    "lmms-lab/VQAv2": HubPreset(
        {"val": "validation"},
        note="validation only; answers are official {answer, answer_confidence, answer_id} objects",
    ),
    "ReplugLens/VQAv2": HubPreset(
        {"val": "minival_validation", "testdev": "testdev"},
        note="columns question_id, question, answers (strings), id_image, multiple_choice_answer, image",
    ),
}


def _resolve_columns(available: Sequence[str], columns: HubColumns, source: str) -> dict[str, str | None]:
    resolved: dict[str, str | None] = {}
    for name, candidates in CANDIDATE_COLUMNS.items():
        explicit = getattr(columns, name)
        if explicit is not None:
            if explicit not in available:
                raise KeyError(f"{source}: column {explicit!r} (for {name}) not found; columns are {list(available)}")
            resolved[name] = explicit
        else:
            resolved[name] = next((c for c in candidates if c in available), None)
    missing = [name for name in _REQUIRED_COLUMNS if resolved[name] is None]
    if missing:
        raise KeyError(
            f"{source}: cannot find columns for {missing} among {list(available)}; pass `columns=HubColumns(...)`"
        )
    return resolved


def _as_id(value: Any) -> Any:
    """Question/image ids as ints where they are integral (some Hub copies store them as strings)."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return int(value) if hasattr(value, "__index__") else value


def _hub_answers(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, list) and all(isinstance(a, str) for a in value):
        return tuple(value)
    if isinstance(value, list) and all(isinstance(a, Mapping) and "answer" in a for a in value):
        return tuple(str(a["answer"]) for a in value)
    raise ValueError(f"{where}: answers must be a list of strings or of {{'answer': ...}} objects, got {value!r:.120}")


def _hub_image(images, row: int):
    """The encoded image of one row, read from the (memory-mapped) Arrow table only when asked for."""
    return images[row]


def corpus_from_hub_dataset(dataset, split: str, columns: HubColumns = HubColumns(), source: str = "dataset") -> Corpus:
    """A corpus from one `datasets.Dataset` split through the column mapping (what `load_vqa_hub` does per split;
    usable directly on an in-memory dataset). Images stay in the dataset and are decoded on access."""
    from datasets import Image as ImageFeature

    resolved = _resolve_columns(dataset.column_names, columns, source)
    image_column = resolved["image"]
    if isinstance(dataset.features.get(image_column), ImageFeature):
        dataset = dataset.cast_column(image_column, ImageFeature(decode=False))
    images = dataset.select_columns([image_column])[image_column]  # a lazy column: nothing decoded or copied yet
    text_columns = [c for k, c in resolved.items() if c is not None and k != "image"]
    table = dataset.select_columns(text_columns).to_dict()
    items = []
    for row in range(len(dataset)):
        where = f"{source}[{split}] row {row}"
        answers = _hub_answers(table[resolved["answers"]][row], where)
        given_answer = table[resolved["answer"]][row] if resolved["answer"] else None
        items.append(
            CorpusItem(
                id=_as_id(table[resolved["question_id"]][row]),
                question=str(table[resolved["question"]][row]),
                answers=answers,
                answer=given_answer or most_common_answer(answers),
                image_id=_as_id(table[resolved["image_id"]][row]) if resolved["image_id"] else None,
                split=split,
                meta={"source": source},
                image_source=functools.partial(_hub_image, images, row),
            )
        )
    if all(isinstance(item.id, int) for item in items):
        items.sort(key=lambda item: item.id)  # the same order as the local loader
    _warn_answer_counts(items, split)
    return Corpus(items)


def load_vqa_hub(
    dataset_id: str,
    splits: str | Iterable[str] = SPLITS,
    split_map: Mapping[str, str] | None = None,
    columns: HubColumns | None = None,
    revision: str | None = None,
    cache_dir: str | None = None,
    **load_kwargs,
) -> Corpus:
    """A corpus from a Hub dataset via `datasets.load_dataset(dataset_id, split=...)`.

    `splits` are our names (`train`, `val`); `split_map` (default: the `HUB_PRESETS` entry, else identity) names the
    dataset's split for each; `columns` overrides the preset's / guessed column mapping."""
    from datasets import load_dataset

    preset = HUB_PRESETS.get(dataset_id)
    if preset is None:
        logger.info("%s is not a known preset (%s); guessing columns by name", dataset_id, sorted(HUB_PRESETS))
    split_map = dict(split_map if split_map is not None else (preset.split_map if preset else {}))
    if columns is None:
        columns = preset.columns if preset else HubColumns()
    corpora = []
    for split in _check_splits(splits):
        hub_split = split_map.get(split, split if not split_map else None)
        if hub_split is None:
            raise ValueError(f"{dataset_id} has no split for {split!r} (known: {split_map})")
        dataset = load_dataset(dataset_id, split=hub_split, revision=revision, cache_dir=cache_dir, **load_kwargs)
        corpora.append(corpus_from_hub_dataset(dataset, split, columns, source=dataset_id))
    return Corpus.concat(*corpora)


__all__ = [
    "HUB_PRESETS",
    "LAYOUTS",
    "HubColumns",
    "HubPreset",
    "VQAFileLayout",
    "corpus_from_hub_dataset",
    "load_okvqa",
    "load_vqa_hub",
    "load_vqa_local",
    "load_vqav2",
]
