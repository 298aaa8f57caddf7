"""A tiny OK-VQA (or VQAv2) release on disk in the official format, with generated images.

Layout and JSON schema follow the official files, so `load_okvqa(root)` / `load_vqav2(root)` read it exactly as
they read the real data. Some images carry several questions (as in VQAv2 and, rarely, OK-VQA), which the samplers'
same-image exclusion must see. Question ids follow the OK-VQA convention `image_id * 10 + k`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..data.okvqa import LAYOUTS

_SHAPES = ("circle", "square", "triangle")
_COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40)}
_QUESTIONS = (
    "What colour is the {shape}?",
    "What shape is shown in the picture?",
    "Which sport uses an object like this {shape}?",
)


@dataclass(frozen=True)
class VQAFixture:
    """Where the fixture lives and what it holds (`records[split]`: dicts with question_id, image_id, question,
    answers, answer, in question-id order). Usable as a path (`os.fspath`)."""

    root: Path
    records: dict

    def __fspath__(self) -> str:
        return os.fspath(self.root)


def _draw(shape: str, colour: tuple[int, int, int], rng: np.random.Generator, size: int = 64) -> Image.Image:
    background = tuple(int(v) for v in rng.integers(200, 256, size=3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    extent = int(rng.integers(size // 3, size // 2))
    x, y = (int(v) for v in rng.integers(2, size - extent - 2, size=2))
    box = [x, y, x + extent, y + extent]
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(x, y + extent), (x + extent, y + extent), (x + extent // 2, y)], fill=colour)
    return image


def _answers(best: str, rng: np.random.Generator) -> list[str]:
    """10 annotator answers: `best` 6 times, then two distractors twice each, shuffled."""
    answers = [best] * 6 + ["unsure"] * 2 + [f"not {best}"] * 2
    return [answers[i] for i in rng.permutation(10)]


def write_okvqa_fixture(
    root: str | os.PathLike,
    n_train: int = 12,
    n_val: int = 6,
    seed: int = 0,
    dataset: str = "okvqa",
    image_format: str = "JPEG",
) -> VQAFixture:
    """Write `n_train` / `n_val` questions (official JSON files + COCO-style image folders) under `root`.

    Images hold one coloured shape; every third image carries a second question (so `n_*` questions use about
    3/4 as many images). `dataset="vqav2"` writes the `v2_` file names and adds `multiple_choice_answer`."""
    if dataset not in LAYOUTS:
        raise ValueError(f"dataset must be one of {sorted(LAYOUTS)}")
    layout = LAYOUTS[dataset]
    root = Path(root)
    rng = np.random.default_rng(seed)
    records: dict[str, list[dict]] = {}
    next_image_id = 1000 + 100 * seed
    for split, count in (("train", n_train), ("val", n_val)):
        image_dir = root / layout.image_dir.format(split=split)
        image_dir.mkdir(parents=True, exist_ok=True)
        questions, annotations, split_records = [], [], []
        image_index = 0
        while len(split_records) < count:
            image_id = next_image_id
            next_image_id += 1
            shape = _SHAPES[int(rng.integers(len(_SHAPES)))]
            colour_name = list(_COLOURS)[int(rng.integers(len(_COLOURS)))]
            _draw(shape, _COLOURS[colour_name], rng).save(
                image_dir / layout.image_file.format(split=split, image_id=image_id), format=image_format
            )
            n_questions = 2 if image_index % 3 == 0 else 1
            image_index += 1
            for k in range(min(n_questions, count - len(split_records))):
                question_id = image_id * 10 + k
                template = _QUESTIONS[(image_index + k) % len(_QUESTIONS)]
                best = colour_name if "colour" in template else shape if "shape is" in template else f"{shape}ball"
                answers = _answers(best, rng)
                question = template.format(shape=shape)
                questions.append({"image_id": image_id, "question": question, "question_id": question_id})
                annotation = {
                    "image_id": image_id,
                    "question_id": question_id,
                    "question_type": "other",
                    "answer_type": "other",
                    "confidence": 3,
                    "answers": [
                        {"answer_id": i + 1, "raw_answer": a, "answer_confidence": "yes", "answer": a}
                        for i, a in enumerate(answers)
                    ],
                }
                if dataset == "vqav2":
                    annotation["multiple_choice_answer"] = best
                annotations.append(annotation)
                split_records.append(
                    {"question_id": question_id, "image_id": image_id, "question": question, "answers": answers,
                     "answer": best}
                )
        subtype = f"{split}2014"
        (root / layout.questions.format(split=split)).write_text(
            json.dumps({"task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": subtype,
                        "questions": questions})
        )
        (root / layout.annotations.format(split=split)).write_text(
            json.dumps({"data_subtype": subtype, "annotations": annotations})
        )
        records[split] = sorted(split_records, key=lambda r: r["question_id"])
    return VQAFixture(root, records)
