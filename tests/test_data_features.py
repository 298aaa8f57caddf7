"""Feature tables: the weight-free fallback featuriser, CLIP features with a tiny random CLIP, save/load (mmap),
and the export script."""

import hashlib
import importlib.util
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from trl_icd.data import Corpus, FeatureTable, ImageLoadError, compute_clip_features, fallback_features, load_okvqa
from trl_icd.data.features import NATURAL_IMAGE_DIM, hashed_text_vector, question_tokens
from trl_icd.testing.okvqa import write_okvqa_fixture

ROOT = Path(__file__).resolve().parents[1]


def shape_image(shape, colour, corner, size=22, canvas=80):
    image = Image.new("RGB", (canvas, canvas), (235, 235, 235))
    draw = ImageDraw.Draw(image)
    x, y = corner
    box = [x, y, x + size, y + size]
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(x, y + size), (x + size, y + size), (x + size // 2, y)], fill=colour)
    return image


COLOURS = {"red": (210, 30, 30), "blue": (30, 40, 210)}


@pytest.fixture(scope="module")
def shapes_corpus():
    records = []
    for shape in ("circle", "square", "triangle"):
        for colour in COLOURS:
            for corner in ((8, 8), (48, 44)):
                n = len(records)
                records.append(
                    {
                        "id": n,
                        "image": shape_image(shape, COLOURS[colour], corner),
                        "image_id": n,
                        "question": f"What is the code word of the {colour} {shape}?",
                        "answers": ["x"] * 10,
                        "shape": shape,
                        "colour": colour,
                        "corner": corner,
                    }
                )
    return Corpus.from_records(records)


def test_fallback_shapes_rows_and_normalisation(shapes_corpus):
    table = fallback_features(shapes_corpus, show_progress=False)
    assert table.ids == shapes_corpus.ids
    assert table.image.shape == (12, NATURAL_IMAGE_DIM) and table.text.shape == (12, 256)
    assert table.image.dtype == table.text.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(table.image, axis=1), 1, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(table.text, axis=1), 1, atol=1e-6)
    combined = table.combined()
    assert combined.dtype == np.float32 and combined.shape == (12, NATURAL_IMAGE_DIM + 256)
    np.testing.assert_allclose(combined, np.concatenate([table.image, table.text], 1) / np.sqrt(2), atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(combined, axis=1), 1, atol=1e-6)
    projected = fallback_features(shapes_corpus, image_dim=32, text_dim=16, show_progress=False)
    assert projected.image.shape == (12, 32) and projected.text.shape == (12, 16)
    np.testing.assert_allclose(np.linalg.norm(projected.image, axis=1), 1, atol=1e-6)


def test_fallback_is_deterministic(shapes_corpus):
    a = fallback_features(shapes_corpus, image_dim=40, show_progress=False)
    b = fallback_features(shapes_corpus, image_dim=40, show_progress=False)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.text, b.text)


def test_fallback_image_features_see_colour_and_shape(shapes_corpus):
    """Same shape and colour elsewhere in the frame is nearer than a different colour or a different shape."""
    table = fallback_features(shapes_corpus, show_progress=False)
    similarity = table.image @ table.image.T
    items = list(shapes_corpus)
    for a in items:
        concept = (a.meta["shape"], a.meta["colour"])
        same = [b for b in items if b.id != a.id and (b.meta["shape"], b.meta["colour"]) == concept]
        other_colour = [b for b in items if b.meta["shape"] == a.meta["shape"] and b.meta["colour"] != a.meta["colour"]]
        other_shape = [b for b in items if b.meta["shape"] != a.meta["shape"] and b.meta["colour"] == a.meta["colour"]]
        best_same = max(similarity[a.id, b.id] for b in same)
        assert best_same > max(similarity[a.id, b.id] for b in other_colour)
        assert best_same > max(similarity[a.id, b.id] for b in other_shape)


def test_hashed_text_matches_an_independent_computation():
    dim = 64
    vector = np.zeros(dim)
    for token in ["w:red", "w:ball", "b:red ball"]:
        h = int.from_bytes(hashlib.blake2b(token.encode(), digest_size=8).digest(), "little")
        vector[h % dim] += 1.0 if h >> 63 else -1.0
    assert question_tokens("Red, ball?") == ["w:red", "w:ball", "b:red ball"]
    np.testing.assert_allclose(hashed_text_vector("Red, ball?", dim), vector / np.linalg.norm(vector))
    assert np.linalg.norm(hashed_text_vector("", dim)) == pytest.approx(1.0)  # empty question: still a unit row
    # shared words make questions closer
    q = hashed_text_vector("what colour is the car", 256)
    assert q @ hashed_text_vector("what colour is the bus", 256) > q @ hashed_text_vector("who made this toy", 256)


def test_unreadable_images_give_counted_zero_rows(caplog):
    good = Image.new("RGB", (10, 10), (0, 200, 0))
    corpus = Corpus.from_records(
        [{"id": i, "image": good if i else "/no/such/image.jpg", "question": "q", "answers": ["a"]} for i in range(4)]
    )
    with pytest.raises(ImageLoadError, match="1/4 images unreadable"):
        fallback_features(corpus, show_progress=False)
    with caplog.at_level(logging.WARNING):
        table = fallback_features(corpus, max_missing_fraction=0.5, show_progress=False)
    assert "1/4 images unreadable" in caplog.text
    assert table.meta["missing_image_ids"] == [0]
    assert not table.image[0].any() and np.linalg.norm(table.image[1]) == pytest.approx(1, abs=1e-6)


def test_save_load_round_trip_is_memory_mapped(shapes_corpus, tmp_path):
    table = fallback_features(shapes_corpus, image_dim=24, text_dim=8, show_progress=False)
    table.meta["note"] = "x"
    table.save(tmp_path / "t")
    assert FeatureTable.is_table_dir(tmp_path / "t")
    loaded = FeatureTable.load(tmp_path / "t")
    assert isinstance(loaded.image, np.memmap) and isinstance(loaded.text, np.memmap)
    assert not loaded.image.flags.writeable
    assert loaded.ids == table.ids and loaded.meta == table.meta
    assert np.array_equal(loaded.image, table.image) and np.array_equal(loaded.text, table.text)
    assert np.array_equal(loaded.combined(), table.combined())
    loaded.check_aligned(shapes_corpus)
    assert loaded.row_of(5) == 5
    in_memory = FeatureTable.load(tmp_path / "t", mmap=False)
    assert not isinstance(in_memory.image, np.memmap)


def test_content_hash_is_stored_checked_and_names_the_content(shapes_corpus, tmp_path):
    import hashlib

    from trl_icd.data.features import find_item_table

    table = fallback_features(shapes_corpus, image_dim=24, text_dim=8, show_progress=False)
    # an independent statement of the hash: blake2b-128 over a canonical header, then the float32 bytes
    digest = hashlib.blake2b(digest_size=16)
    header = {"kind": "feature-table", "ids": list(range(12)), "image_dim": 24, "text_dim": 8}
    digest.update(json.dumps(header, sort_keys=True).encode())
    digest.update(table.image.astype("<f4").tobytes())
    digest.update(table.text.astype("<f4").tobytes())
    assert table.content_hash == digest.hexdigest()
    table.save(tmp_path / "t")
    assert json.loads((tmp_path / "t" / "features.json").read_text())["content_hash"] == table.content_hash
    loaded = FeatureTable.load(tmp_path / "t")
    assert loaded.content_hash == table.content_hash and loaded.source == str(tmp_path / "t")
    assert find_item_table(table.content_hash) is loaded.item_table()  # loading registered it
    loaded.verify()
    moved = FeatureTable(table.ids, table.image[::-1].copy(), table.text, table.meta)  # other values, same ids
    assert moved.content_hash != table.content_hash
    renamed = FeatureTable([i + 100 for i in table.ids], table.image, table.text, table.meta)  # same values
    assert renamed.content_hash != table.content_hash
    # an array edited on disk after saving is caught by `verify`
    image = np.load(tmp_path / "t" / "image.npy", mmap_mode="r+")
    image[0, 0] += 1.0
    image.flush()
    with pytest.raises(ValueError, match="content hash"):
        FeatureTable.load(tmp_path / "t").verify()


def test_allocated_table_is_filled_in_place_and_saved_without_copying(tmp_path):
    rng = np.random.default_rng(0)
    image, text = rng.standard_normal((50, 6)).astype(np.float32), rng.standard_normal((50, 4)).astype(np.float32)
    table = FeatureTable.allocate(tmp_path / "t", [f"q{i}" for i in range(50)], 6, 4, {"featurizer": "x"})
    assert not FeatureTable.is_table_dir(tmp_path / "t")  # no header until saved
    for start in range(0, 50, 16):
        table.image[start : start + 16] = image[start : start + 16]
        table.text[start : start + 16] = text[start : start + 16]
    inode = (tmp_path / "t" / "image.npy").stat().st_ino
    table.save(tmp_path / "t")
    assert (tmp_path / "t" / "image.npy").stat().st_ino == inode  # the array file was not rewritten
    loaded = FeatureTable.load(tmp_path / "t")
    assert np.array_equal(loaded.image, image) and np.array_equal(loaded.text, text)
    assert loaded.content_hash == FeatureTable(loaded.ids, image, text).content_hash


def test_combined_rows_and_featuriser_spec(shapes_corpus):
    table = fallback_features(shapes_corpus, image_dim=24, text_dim=8, show_progress=False)
    rows = np.array([[3, 0, 3], [11, 5, 7]])
    assert np.array_equal(table.combined_rows(rows), table.combined()[rows])  # bit for bit
    spec = table.featurizer
    assert (spec.name, spec.dim, spec.image_dim, spec.text_dim) == ("fallback", 32, 24, 8)
    assert "fallback (image 24 + text 8" in spec.describe()
    clip = FeatureTable(table.ids, table.image, table.text, {"featurizer": "clip", "model": "openai/clip-vit-l"})
    local = FeatureTable(table.ids, table.image, table.text, {"featurizer": "clip", "model": "/models/clip-vit-l/"})
    assert clip.featurizer == local.featurizer and clip.featurizer.name == "clip:clip-vit-l"
    assert "name 'fallback' vs 'clip:clip-vit-l'" == spec.mismatch(clip.featurizer)
    assert spec.mismatch(table.featurizer) is None


def test_load_and_save_errors(shapes_corpus, tmp_path):
    with pytest.raises(FileNotFoundError, match="no feature table"):
        FeatureTable.load(tmp_path)
    table = fallback_features(shapes_corpus, image_dim=4, text_dim=4, show_progress=False)
    table.save(tmp_path / "t")
    header = json.loads((tmp_path / "t" / "features.json").read_text())
    header["num_items"] = 11
    (tmp_path / "t" / "features.json").write_text(json.dumps(header))
    with pytest.raises(ValueError, match="expected"):
        FeatureTable.load(tmp_path / "t")
    (tmp_path / "t" / "features.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        FeatureTable.load(tmp_path / "t")
    with pytest.raises(TypeError, match="int or str"):
        FeatureTable([(1, 2)], np.zeros((1, 2), np.float32), np.zeros((1, 2), np.float32)).save(tmp_path / "u")
    with pytest.raises(ValueError, match="duplicate ids"):
        FeatureTable([1, 1], np.zeros((2, 2), np.float32), np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="3 ids but 2 image rows"):
        FeatureTable([1, 2, 3], np.zeros((2, 2), np.float32), np.zeros((3, 2), np.float32))


def test_alignment_to_a_corpus(shapes_corpus):
    table = fallback_features(shapes_corpus, image_dim=4, text_dim=4, show_progress=False)
    subset = shapes_corpus.filter(lambda item: item.id % 2 == 1)
    with pytest.raises(ValueError, match="12 rows but the corpus has 6"):
        table.check_aligned(subset)
    aligned = table.aligned_to(subset)
    aligned.check_aligned(subset)
    assert np.array_equal(aligned.image, table.image[1::2])
    reordered = Corpus(reversed(list(shapes_corpus)))
    with pytest.raises(ValueError, match="row 0 is id 0"):
        table.check_aligned(reordered)
    assert np.array_equal(table.aligned_to(reordered).text, table.text[::-1])


# ---------------------------------------------------------------------------------------------------------------
# CLIP


@pytest.fixture(scope="module")
def clip():
    from trl_icd.testing.clip import tiny_clip

    return tiny_clip()


@pytest.fixture(scope="module")
def fixture_corpus(tmp_path_factory):
    return load_okvqa(write_okvqa_fixture(tmp_path_factory.mktemp("okvqa"), n_train=8, n_val=3))


def test_clip_features_equal_direct_model_calls(clip, fixture_corpus):
    model, processor = clip
    table = compute_clip_features(fixture_corpus, model, processor, batch_size=4, show_progress=False)
    assert table.image.shape == (11, 16) and table.text.shape == (11, 16)
    assert table.meta["featurizer"] == "clip" and table.meta["missing_image_ids"] == []
    assert max(len(processor.tokenizer(item.question).input_ids) for item in fixture_corpus) <= 64
    with torch.no_grad():
        for row in (0, 5, 10):
            item = fixture_corpus.item_at(row)
            pixels = processor(images=[item.image], return_tensors="pt")["pixel_values"]
            image = model.get_image_features(pixel_values=pixels).pooler_output[0].numpy()
            tokens = processor(text=[item.question], truncation=True, return_tensors="pt")
            text = model.get_text_features(**tokens).pooler_output[0].numpy()
            np.testing.assert_allclose(table.image[row], image / np.linalg.norm(image), atol=1e-5)
            np.testing.assert_allclose(table.text[row], text / np.linalg.norm(text), atol=1e-5)
    # questions on one image share its image row; batching (and text padding) does not change the result
    first, second = fixture_corpus.item_at(0), fixture_corpus.item_at(1)
    assert first.image_id == second.image_id and np.array_equal(table.image[0], table.image[1])
    other = compute_clip_features(fixture_corpus, model, processor, batch_size=1, show_progress=False)
    np.testing.assert_allclose(other.image, table.image, atol=1e-5)
    np.testing.assert_allclose(other.text, table.text, atol=1e-5)


def test_clip_features_unreadable_image_policy(clip, fixture_corpus):
    model, processor = clip
    records = [
        {"id": item.id, "image": item.image_source, "image_id": item.image_id, "question": item.question,
         "answers": list(item.answers)}
        for item in fixture_corpus
    ]
    records[3]["image"] = "/no/such/file.jpg"
    records[3]["image_id"] = -1
    broken = Corpus.from_records(records)
    with pytest.raises(ImageLoadError, match="unreadable"):
        compute_clip_features(broken, model, processor, show_progress=False)
    table = compute_clip_features(broken, model, processor, max_missing_fraction=0.2, show_progress=False)
    assert table.meta["missing_image_ids"] == [records[3]["id"]]
    assert not table.image[3].any() and np.linalg.norm(table.text[3]) == pytest.approx(1, abs=1e-5)


def test_export_script_writes_once_and_reloads_mmapped(clip, tmp_path):
    fixture = write_okvqa_fixture(tmp_path / "data", n_train=5, n_val=2)
    model, processor = clip
    model.save_pretrained(tmp_path / "clip")
    processor.save_pretrained(tmp_path / "clip")
    spec = importlib.util.spec_from_file_location("export_features", ROOT / "examples" / "export_features.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["export_features"] = module
    try:
        spec.loader.exec_module(module)
        argv = ["--source", str(fixture.root), "--model_name_or_path", str(tmp_path / "clip"),
                "--output_dir", str(tmp_path / "out"), "--batch_size", "3"]
        table = module.main(argv)
        assert isinstance(table.image, np.memmap) and table.image.shape == (7, 16)
        assert table.meta["splits"] == ["train", "val"] and table.meta["model"] == str(tmp_path / "clip")
        table.check_aligned(load_okvqa(fixture))
        with pytest.raises(FileExistsError, match="--overwrite"):
            module.main(argv)
        fallback = module.main(["--source", str(fixture.root), "--featurizer", "fallback", "--splits", "val",
                                "--output_dir", str(tmp_path / "out"), "--overwrite"])
        assert len(fallback) == 2 and fallback.meta["featurizer"] == "fallback"
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "keep.txt").write_text("x")
        with pytest.raises(FileExistsError, match="other than a feature table"):
            module.main(["--source", str(fixture.root), "--featurizer", "fallback",
                         "--output_dir", str(tmp_path / "other"), "--overwrite"])
    finally:
        sys.modules.pop("export_features", None)
