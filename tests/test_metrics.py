"""The official VQA accuracy: each normalisation rule, the 10-choose-9 averaging, fewer answers, the evaluate module."""

import re

import pytest

from trl_icd.metrics import normalize_answer, process_punctuation, vqa_accuracy, vqa_accuracy_batch


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("Two", "2"),  # number words to digits, lower-case
        ("none", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),  # only zero..ten are mapped
        ("the cat", "cat"),  # articles dropped
        ("A red bus", "red bus"),
        ("an apple", "apple"),
        ("dont", "don't"),  # contractions restored
        ("isnt it", "isn't it"),
        ("Im", "im"),  # the official table's "Im" key can never match after lower-casing
        ("yes!", "yes"),  # a mark not next to a space becomes a space
        ("red,white", "red white"),
        ("t-shirt", "t shirt"),
        ("red, white", "red white"),  # a mark next to a space is deleted
        ("1,000", "1000"),  # digit-comma-digit: every mark is deleted
        ("3.5", "3.5"),  # a period followed by a digit stays
        ("5.", "5"),  # other periods go
        ("e.g", "eg"),
        ("A man's hat.", "man's hat"),  # apostrophes are not punctuation
        ("\tNew\nYork  ", "new york"),  # tabs/newlines to spaces, strip, collapse
        ("(left)", "left"),
        ("50/50", "50 50"),
    ],
)
def test_normalize_answer_rules(raw, normalized):
    assert normalize_answer(raw) == normalized


@pytest.mark.parametrize(("matching", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_ten_choose_nine_averaging(matching, expected):
    answers = ["dog"] * matching + ["cat", "horse", "cow", "sheep", "goat", "pig", "hen", "fox", "owl", "bee"][
        : 10 - matching
    ]
    assert vqa_accuracy("dog", answers) == pytest.approx(expected)


def test_prediction_is_normalised_before_matching():
    assert vqa_accuracy("Two.", ["2"] * 10) == 1.0
    assert vqa_accuracy("The Dog!", ["dog"] * 3 + ["cat"] * 7) == pytest.approx(0.9)


def test_references_get_punctuation_processing_only_when_they_differ():
    # differing answers: "t-shirt" -> "t shirt", which the normalised prediction matches (3 annotators)
    assert vqa_accuracy("T-shirt", ["t-shirt"] * 3 + ["shirt"] * 7) == pytest.approx(0.9)
    # identical answers are left untouched (official behaviour): "t-shirt" never equals "t shirt"
    assert vqa_accuracy("T-shirt", ["t-shirt"] * 10) == 0.0
    # references are not lower-cased or digit-mapped (annotation files are pre-normalised)
    assert vqa_accuracy("two dogs", ["Two Dogs"] * 10) == 0.0


def test_normalize_references_option():
    assert vqa_accuracy("two dogs", ["Two Dogs"] * 10, normalize_references=True) == 1.0
    assert vqa_accuracy("T-shirt", ["t-shirt"] * 10, normalize_references=True) == 1.0


def test_fewer_than_ten_answers():
    assert vqa_accuracy("dog", ["Dog"]) == 0.0 and vqa_accuracy("dog", ["dog"]) == 1.0  # one answer: exact match
    # n answers: min(1, matches / ((n - 1) / 3)) averaged over the n leave-one-out subsets
    assert vqa_accuracy("dog", ["dog", "cat"]) == pytest.approx(0.5)  # (0 + 1) / 2
    assert vqa_accuracy("dog", ["dog", "cat", "cow", "pig", "hen"]) == pytest.approx(0.6)  # (0 + 4 * 0.75) / 5
    assert vqa_accuracy("dog", ["dog", "dog", "cow", "pig", "hen"]) == pytest.approx(0.9)  # (2 * 0.75 + 3) / 5
    # OK-VQA's 5 answers each given twice -> the official 10-answer score for one matching answer
    assert vqa_accuracy("dog", ["dog", "cat", "cow", "pig", "hen"] * 2) == pytest.approx(0.6)


def test_more_than_ten_answers_keep_the_one_third_threshold():
    assert vqa_accuracy("dog", ["dog"] * 5 + ["cat"] * 8) == pytest.approx(1.0)  # 13 answers: threshold 4
    assert vqa_accuracy("dog", ["dog"] * 4 + ["cat"] * 9) == pytest.approx((4 * 0.75 + 9 * 1.0) / 13)
    assert vqa_accuracy("dog", ["dog"] * 2 + ["cat"] * 11) == pytest.approx((2 * 0.25 + 11 * 0.5) / 13)


def test_bad_input():
    with pytest.raises(ValueError, match="at least one"):
        vqa_accuracy("dog", [])
    with pytest.raises(TypeError):
        vqa_accuracy("dog", "dog")
    with pytest.raises(TypeError):
        vqa_accuracy(None, ["dog"])
    with pytest.raises(ValueError, match="predictions"):
        vqa_accuracy_batch(["a", "b"], [["a"]])


# --- the official evaluation loop, transcribed from GT-Vision-Lab/VQA vqaEval.py as an independent reference -------

_OFFICIAL_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_OFFICIAL_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_OFFICIAL_COMMA = re.compile(r"(\d)(\,)(\d)")


def _official_process_punctuation(in_text):
    out_text = in_text
    for p in _OFFICIAL_PUNCT:
        if (p + " " in in_text or " " + p in in_text) or (re.search(_OFFICIAL_COMMA, in_text) is not None):
            out_text = out_text.replace(p, "")
        else:
            out_text = out_text.replace(p, " ")
    return _OFFICIAL_PERIOD.sub("", out_text, re.UNICODE)


def _official_accuracy(res_ans, gt_answers):
    """The per-question body of VQAEval.evaluate (answers as dicts with answer_id, as in the annotation files)."""
    from trl_icd.metrics import process_digit_article  # contraction/number tables are data, checked above

    answers = [{"answer": a, "answer_id": i + 1} for i, a in enumerate(gt_answers)]
    res_ans = res_ans.replace("\n", " ").replace("\t", " ").strip()
    res_ans = process_digit_article(_official_process_punctuation(res_ans))
    if len({ans["answer"] for ans in answers}) > 1:
        for ans in answers:
            ans["answer"] = _official_process_punctuation(ans["answer"])
    gt_acc = []
    for gt_datum in answers:
        other = [item for item in answers if item != gt_datum]
        matching = [item for item in other if item["answer"] == res_ans]
        gt_acc.append(min(1, float(len(matching)) / 3))
    return float(sum(gt_acc)) / len(gt_acc)


CASES = [
    ("two", ["2"] * 6 + ["two"] * 4),
    ("Yes.", ["yes"] * 9 + ["no"]),
    ("t-shirt", ["t-shirt", "t shirt", "tshirt", "shirt"] * 2 + ["top", "t-shirt!"]),
    ("1,000 people", ["1000 people"] * 2 + ["1,000 people"] * 3 + ["many"] * 5),
    ("red, white and blue", ["red white and blue"] * 4 + ["red, white, blue"] * 6),
    ("an orange", ["orange"] * 2 + ["oranges"] * 8),
    ("3.5", ["3.5"] * 3 + ["3"] * 7),
    ("dont know", ["don't know"] * 5 + ["dont know"] * 5),
    ("umbrella", ["umbrella"] * 10),
    ("left ", ["(left)", "left", "left side", "left.", "right"] * 2),
]


@pytest.mark.parametrize(("prediction", "answers"), CASES)
def test_matches_the_official_evaluation_loop(prediction, answers):
    assert vqa_accuracy(prediction, answers) == pytest.approx(_official_accuracy(prediction, answers), abs=1e-12)


def test_process_punctuation_matches_official():
    for text in ["a-b c", "x,y", "1,2 a-b", "what?", "hi !", "a.b.c", "(x) [y] {z}", "a_b\\c", "@home `x`"]:
        assert process_punctuation(text) == _official_process_punctuation(text)


# --- the evaluate module -------------------------------------------------------------------------------------------


def test_evaluate_module_loads_offline_from_its_path(tmp_path, monkeypatch):
    import evaluate

    from trl_icd.metrics_module import VQA_ACCURACY_PATH

    metric = evaluate.load(VQA_ACCURACY_PATH, cache_dir=str(tmp_path))
    predictions = [case[0] for case in CASES]
    references = [case[1] for case in CASES]
    result = metric.compute(predictions=predictions, references=references, return_per_question=True)
    expected = vqa_accuracy_batch(predictions, references)
    assert result["per_question"] == pytest.approx(expected)
    assert result["vqa_accuracy"] == pytest.approx(sum(expected) / len(expected))
    assert metric.compute(predictions=["Two Dogs"], references=[["two dogs"] * 10])["vqa_accuracy"] == 0.0
    assert metric.compute(predictions=["x"], references=[["X"] * 10], normalize_references=True)["vqa_accuracy"] == 1.0
