"""OK-VQA / VQAv2 corpora: the official local files (fixture in the official format) and the Hub column mapping."""

import json
from collections import Counter

import datasets
import numpy as np
import pytest
from PIL import Image

from trl_icd.data import ImageLoadError, load_okvqa, load_vqa_hub, load_vqa_local, load_vqav2
from trl_icd.data.okvqa import HubColumns, corpus_from_hub_dataset
from trl_icd.testing.okvqa import write_okvqa_fixture


@pytest.fixture(scope="module")
def okvqa(tmp_path_factory):
    return write_okvqa_fixture(tmp_path_factory.mktemp("okvqa"), n_train=14, n_val=7, seed=3)


def test_local_loader_reads_every_field(okvqa):
    corpus = load_okvqa(okvqa)
    assert len(corpus) == 21
    assert corpus.splits == ["train", "val"]
    for split in ("train", "val"):
        truth = okvqa.records[split]
        assert corpus.ids_in_split(split) == [r["question_id"] for r in truth]  # question-id order
        for record in truth:
            item = corpus[record["question_id"]]
            assert item.question == record["question"]
            assert item.answers == tuple(record["answers"]) and len(item.answers) == 10
            assert item.answer == record["answer"] == Counter(record["answers"]).most_common(1)[0][0]
            assert item.image_id == record["image_id"]
            assert item.split == split
            assert item.image_source.endswith(f"{split}2014/COCO_{split}2014_{record['image_id']:012d}.jpg")
            image = item.image
            assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (64, 64)
    # several questions share an image, and they share its image key
    by_image = Counter(item.image_id for item in corpus)
    shared = [image_id for image_id, n in by_image.items() if n > 1]
    assert shared
    keys = {item.image_key for item in corpus if item.image_id == shared[0]}
    assert len(keys) == 1


def test_local_loader_split_selection_and_image_root(okvqa, tmp_path):
    val = load_okvqa(okvqa, splits="val")
    assert val.splits == ["val"] and len(val) == 7
    # JSON files in one folder, images in another
    for name in ("OpenEnded_mscoco_val2014_questions.json", "mscoco_val2014_annotations.json"):
        (tmp_path / name).write_bytes((okvqa.root / name).read_bytes())
    moved = load_okvqa(tmp_path, splits=["val"], image_root=okvqa.root)
    assert moved.item_at(0).image.size == (64, 64)
    with pytest.raises(FileNotFoundError, match=r"missing 1 of the 3 files/folders .*val2014"):
        load_okvqa(tmp_path, splits=["val"])
    with pytest.raises(ValueError, match="twice"):
        load_okvqa(okvqa, splits=["val", "val"])


def _copy_split(src, dst, split="val"):
    """Copy one split's JSON files to `dst` with an empty image folder; returns the two file paths."""
    names = (f"OpenEnded_mscoco_{split}2014_questions.json", f"mscoco_{split}2014_annotations.json")
    for name in names:
        (dst / name).write_bytes((src / name).read_bytes())
    (dst / f"{split}2014").mkdir(exist_ok=True)
    return dst / names[0], dst / names[1]


def test_local_loader_errors(okvqa, tmp_path):
    with pytest.raises(FileNotFoundError, match="OpenEnded_mscoco_train2014_questions.json"):
        load_okvqa(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_okvqa(str(tmp_path / "no" / "such" / "dir"))

    questions, annotations = _copy_split(okvqa.root, tmp_path)
    questions.write_text('{"questions": [')
    with pytest.raises(ValueError, match="not valid JSON"):
        load_okvqa(tmp_path, splits="val")
    questions.write_text('{"items": []}')
    with pytest.raises(ValueError, match="list under 'questions'"):
        load_okvqa(tmp_path, splits="val")
    questions.write_text('{"questions": [{"question_id": 1, "question": "q?"}]}')
    with pytest.raises(ValueError, match=r"question #0: missing \['image_id'\]"):
        load_okvqa(tmp_path, splits="val")

    original = json.loads((okvqa.root / "OpenEnded_mscoco_val2014_questions.json").read_text())
    data = json.loads(json.dumps(original))
    data["questions"] = data["questions"][1:]  # one annotation without its question
    questions.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="1 annotations without question"):
        load_okvqa(tmp_path, splits="val")
    assert len(load_okvqa(tmp_path, splits="val", on_mismatch="drop")) == 6

    data = json.loads(json.dumps(original))
    data["questions"][0]["image_id"] += 1  # the two files disagree on the image
    questions.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="1 with different image_id"):
        load_okvqa(tmp_path, splits="val")

    data = json.loads(json.dumps(original))
    data["questions"].append(dict(data["questions"][0]))
    questions.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="duplicate question_id"):
        load_okvqa(tmp_path, splits="val")

    questions.write_text(json.dumps(original))
    ann = json.loads(annotations.read_text())
    ann["annotations"][0]["answers"] = ["plain", "strings"]
    annotations.write_text(json.dumps(ann))
    with pytest.raises(ValueError, match="`answers` must be a list of objects"):
        load_okvqa(tmp_path, splits="val")


def test_missing_image_file_fails_on_access_only(okvqa, tmp_path):
    questions, annotations = _copy_split(okvqa.root, tmp_path)  # image folder exists but is empty
    corpus = load_vqa_local(questions, annotations, tmp_path / "val2014", "val")
    with pytest.raises(ImageLoadError, match="COCO_val2014_"):
        corpus.item_at(0).image


def test_vqav2_file_names_and_official_answer(tmp_path):
    fixture = write_okvqa_fixture(tmp_path, n_train=4, n_val=3, dataset="vqav2")
    assert (tmp_path / "v2_OpenEnded_mscoco_train2014_questions.json").is_file()
    assert (tmp_path / "v2_mscoco_val2014_annotations.json").is_file()
    corpus = load_vqav2(fixture)
    assert len(corpus) == 7
    for record in fixture.records["val"]:
        assert corpus[record["question_id"]].answer == record["answer"]
    with pytest.raises(FileNotFoundError, match="OpenEnded_mscoco_train2014_questions.json"):
        load_okvqa(fixture)  # OK-VQA names are not there


def test_vqav2_uses_multiple_choice_answer_when_present(tmp_path):
    fixture = write_okvqa_fixture(tmp_path, n_train=2, n_val=1, dataset="vqav2")
    path = tmp_path / "v2_mscoco_val2014_annotations.json"
    ann = json.loads(path.read_text())
    ann["annotations"][0]["multiple_choice_answer"] = "official"
    path.write_text(json.dumps(ann))
    assert load_vqav2(fixture, splits="val").item_at(0).answer == "official"


# ---------------------------------------------------------------------------------------------------------------
# Hub column mapping, exercised on in-memory datasets shaped like the supported Hub copies.


def _png(colour):
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), colour).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def _lmms_style():
    """lmms-lab/OK-VQA columns: question_id (string), image, question, answers (strings), question/answer type."""
    features = datasets.Features(
        {
            "question_id": datasets.Value("string"),
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "answers": datasets.Sequence(datasets.Value("string")),
            "question_type": datasets.Value("string"),
            "answer_type": datasets.Value("string"),
        }
    )
    return datasets.Dataset.from_dict(
        {
            "question_id": ["5370935", "2971475"],
            "image": [_png((255, 0, 0)), _png((0, 0, 255))],
            "question": ["What is this?", "Where is it?"],
            "answers": [["cat"] * 6 + ["dog"] * 4, ["home", "park", "park", "home", "park", "park"] + ["x"] * 4],
            "question_type": ["other", "other"],
            "answer_type": ["other", "other"],
        },
        features=features,
    )


def test_hub_mapping_string_answers_and_string_ids():
    corpus = corpus_from_hub_dataset(_lmms_style(), "val", source="lmms-lab/OK-VQA")
    assert corpus.ids == [2971475, 5370935]  # ints, sorted like the local loader
    item = corpus[5370935]
    assert item.question == "What is this?" and item.answer == "cat" and len(item.answers) == 10
    assert item.image_id is None and item.split == "val"
    assert corpus[2971475].answer == "park"  # tied with "x" (4 each): the answer seen first wins
    assert item.image.getpixel((0, 0)) == (255, 0, 0)  # decoded lazily from the dataset
    assert corpus[2971475].image.getpixel((0, 0)) == (0, 0, 255)


def test_hub_mapping_official_answer_objects_and_image_id_alias():
    answers = [[{"answer": "red", "answer_confidence": "yes", "answer_id": i} for i in range(10)]]
    dataset = datasets.Dataset.from_dict(
        {
            "question_id": [11],
            "id_image": [1],
            "question": ["Colour?"],
            "answers": answers,
            "multiple_choice_answer": ["red"],
            "image": [_png((1, 2, 3))],
        },
        features=datasets.Features(
            {
                "question_id": datasets.Value("int64"),
                "id_image": datasets.Value("int64"),
                "question": datasets.Value("string"),
                "answers": [{"answer": datasets.Value("string"), "answer_confidence": datasets.Value("string"),
                             "answer_id": datasets.Value("int64")}],
                "multiple_choice_answer": datasets.Value("string"),
                "image": datasets.Image(),
            }
        ),
    )
    item = corpus_from_hub_dataset(dataset, "train").item_at(0)
    assert item.answers == ("red",) * 10 and item.answer == "red" and item.image_id == 1
    assert item.image_key == "image:1"


def test_hub_mapping_explicit_columns_and_errors():
    dataset = _lmms_style().rename_columns({"question": "text", "answers": "labels"})
    with pytest.raises(KeyError, match=r"cannot find columns for \['question', 'answers'\]"):
        corpus_from_hub_dataset(dataset, "val")
    corpus = corpus_from_hub_dataset(dataset, "val", HubColumns(question="text", answers="labels"))
    assert corpus[5370935].answer == "cat"
    with pytest.raises(KeyError, match="column 'nope'"):
        corpus_from_hub_dataset(dataset, "val", HubColumns(question="nope", answers="labels"))
    bad = datasets.Dataset.from_dict(
        {"question_id": [1], "question": ["q"], "answers": [[1, 2]], "image": ["/no/such.jpg"]}
    )
    with pytest.raises(ValueError, match="answers must be a list of strings"):
        corpus_from_hub_dataset(bad, "val")


def test_load_vqa_hub_uses_preset_split_map(monkeypatch):
    calls = []

    def fake_load_dataset(dataset_id, split, **kwargs):
        calls.append((dataset_id, split))
        return _lmms_style()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    corpus = load_okvqa("lmms-lab/OK-VQA", splits="val")  # not a folder: goes to the Hub loader
    assert calls == [("lmms-lab/OK-VQA", "val2014")]
    assert len(corpus) == 2 and corpus.splits == ["val"]
    with pytest.raises(ValueError, match="no split for 'train'"):
        load_vqa_hub("lmms-lab/OK-VQA", splits=["train"])
    calls.clear()
    load_vqa_hub("someone/vqa-copy", splits=["val"], split_map={"val": "validation"})
    assert calls == [("someone/vqa-copy", "validation")]
    with pytest.raises(TypeError, match="Hub options"):
        load_okvqa(".", split_map={"val": "x"})


def test_fixture_is_deterministic(tmp_path):
    a = write_okvqa_fixture(tmp_path / "a", n_train=5, n_val=2, seed=7)
    b = write_okvqa_fixture(tmp_path / "b", n_train=5, n_val=2, seed=7)
    assert a.records == b.records
    first = load_okvqa(a).item_at(0)
    assert np.array_equal(np.asarray(first.image), np.asarray(load_okvqa(b).item_at(0).image))
