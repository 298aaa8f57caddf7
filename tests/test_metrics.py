"""VQA accuracy under its three protocols: each normalisation step, each rule difference between the protocols
(hand-computed), the 10-choose-9 averaging, other answer counts, the registry, the evaluate module, and a seeded
differential test against independent re-statements of the three reference scorers."""

import random

import pytest

from trl_icd.metrics import (
    CONTRACTIONS,
    VQA_PROTOCOLS,
    evalai_normalize,
    get_vqa_protocol,
    official_normalize,
    normalize_answer,
    process_punctuation,
    register_vqa_protocol,
    vqa_accuracy,
    vqa_accuracy_batch,
)

PROTOCOLS = ("vqa", "vqa2016", "lmms_eval")


# --- normalisation steps -------------------------------------------------------------------------------------------


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
        ("1,000 (approx)", "1000 approx"),
        ("3.5", "3.5"),  # a period followed by a digit stays
        ("5.", "5"),  # other periods go
        ("e.g", "eg"),
        ("A man's hat.", "man's hat"),  # apostrophes are not punctuation
        ("\tNew\nYork  ", "new york"),  # tabs/newlines to spaces, strip, collapse
        ("(left)", "left"),
        ("50/50", "50 50"),
        ("what?", "what"),
        ("a:b", "a:b"),  # colons are not punctuation either
    ],
)
def test_official_normalisation_steps(raw, normalized):
    assert normalize_answer(raw) == normalized
    assert normalize_answer(raw, "vqa2016") == normalized  # both official versions normalise alike


def test_period_strip_removes_at_most_32_periods():
    # The official call passes re.UNICODE (= 32) where `count` goes.
    assert process_punctuation("." * 40) == "." * 8


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("Two", "2"),
        ("1,000", "1000"),  # commas deleted before the punctuation step...
        ("red,white", "redwhite"),  # ...so a comma never becomes a space (official: "red white")
        ("red, white", "red white"),
        ("what?", "what"),
        ("why?not", "whynot"),  # official: "why not"
        ("dog's", "dog 's"),  # 's split off its word (official: "dog's")
        ("The Dog'S bone", "dog 's bone"),  # after lower-casing
        ("t-shirt", "t shirt"),  # other marks as in the official rules
        ("1,000 (approx)", "1000 approx"),
        ("YES!", "yes"),
        ("5.", "5"),
    ],
)
def test_evalai_normalisation_steps(raw, normalized):
    assert evalai_normalize(raw) == normalized
    assert normalize_answer(raw, "lmms_eval") == normalized


# --- the rule differences between protocols, hand-computed -----------------------------------------------------------

# (prediction, gold answers, {protocol: accuracy}); each line says why.
RULE_CASES = [
    # differing gold answers: official normalises them ("Two" -> "2"), 2016 only strips their punctuation, so the
    # normalised prediction "2" matches 2 of 10 today (0.6) but only the one "2" in 2016 (0.3).
    ("two", ["Two", "2", "x", "y", "z", "w", "v", "u", "t", "s"], {"vqa": 0.6, "vqa2016": 0.3, "lmms_eval": 0.6}),
    # "no!" -> "no" on the gold side today; 2016 turns "no!" into "no " (mark not next to a space -> a space).
    ("no", ["no!"] * 2 + ["yes"] * 8, {"vqa": 0.6, "vqa2016": 0.0, "lmms_eval": 0.6}),
    ("no", ["no!"] * 4 + ["yes"] * 6, {"vqa": 1.0, "vqa2016": 0.0, "lmms_eval": 1.0}),
    # all gold answers identical: today neither side is normalised ("Yes" != "yes"); 2016 normalises the prediction.
    ("Yes", ["yes"] * 10, {"vqa": 0.0, "vqa2016": 1.0, "lmms_eval": 1.0}),
    ("yes.", ["yes"] * 10, {"vqa": 0.0, "vqa2016": 1.0, "lmms_eval": 1.0}),
    ("two", ["2"] * 10, {"vqa": 0.0, "vqa2016": 1.0, "lmms_eval": 1.0}),
    ("yes", ["yes"] * 10, {"vqa": 1.0, "vqa2016": 1.0, "lmms_eval": 1.0}),
    # identical gold answers with a mark: nobody normalises them except lmms-eval.
    ("t-shirt", ["t-shirt"] * 10, {"vqa": 1.0, "vqa2016": 0.0, "lmms_eval": 1.0}),
    ("T-shirt", ["t-shirt"] * 10, {"vqa": 0.0, "vqa2016": 0.0, "lmms_eval": 1.0}),
    # today the gold answers are stripped before the identity check: " yes" and "yes" are identical.
    ("Yes", ["yes "] * 5 + ["yes"] * 5, {"vqa": 0.0, "vqa2016": 1.0, "lmms_eval": 1.0}),
    # capitals on the gold side: only the official-today and lmms-eval lower-case gold answers.
    ("two dogs", ["Two Dogs"] * 3 + ["cats"] * 7, {"vqa": 0.9, "vqa2016": 0.0, "lmms_eval": 0.9}),
    # lmms-eval deletes commas (and ?) outright; the official rules turn an inner comma into a space.
    ("red,white", ["red white"] * 3 + ["blue"] * 7, {"vqa": 0.9, "vqa2016": 0.9, "lmms_eval": 0.0}),
    ("red,white", ["redwhite"] * 3 + ["blue"] * 7, {"vqa": 0.0, "vqa2016": 0.0, "lmms_eval": 0.9}),
    # lmms-eval splits 's off its word on both sides, so possessives still match each other...
    ("man's hat", ["man's hat"] * 3 + ["cap"] * 7, {"vqa": 0.9, "vqa2016": 0.9, "lmms_eval": 0.9}),
    # ...but no longer match the same words written without the apostrophe split.
    ("man 's hat", ["man's hat"] * 3 + ["cap"] * 7, {"vqa": 0.0, "vqa2016": 0.0, "lmms_eval": 0.9}),
    # newlines/tabs are spaces everywhere; a digit-comma-digit deletes every mark (official), a comma (lmms-eval).
    ("1,000\n", ["1000"] * 4 + ["many"] * 6, {"vqa": 1.0, "vqa2016": 1.0, "lmms_eval": 1.0}),
]


@pytest.mark.parametrize(("prediction", "answers", "expected"), RULE_CASES)
def test_rule_differences_hand_computed(prediction, answers, expected):
    assert set(expected) == set(PROTOCOLS)
    for protocol, value in expected.items():
        assert vqa_accuracy(prediction, answers, protocol) == pytest.approx(value), protocol


def test_default_protocol_is_todays_official_script():
    assert vqa_accuracy("Yes", ["yes"] * 10) == vqa_accuracy("Yes", ["yes"] * 10, "vqa") == 0.0


# --- scoring -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize(("matching", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_ten_choose_nine_averaging(protocol, matching, expected):
    answers = ["dog"] * matching + ["cat", "horse", "cow", "sheep", "goat", "pig", "hen", "fox", "owl", "bee"][
        : 10 - matching
    ]
    assert vqa_accuracy("dog", answers, protocol) == pytest.approx(expected)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_fewer_than_ten_answers(protocol):
    assert vqa_accuracy("dog", ["dog"], protocol) == 1.0  # one answer: exact match
    assert vqa_accuracy("cat", ["dog"], protocol) == 0.0
    # n answers: min(1, matches / ((n - 1) / 3)) averaged over the n leave-one-out subsets
    assert vqa_accuracy("dog", ["dog", "cat"], protocol) == pytest.approx(0.5)  # (0 + 1) / 2
    assert vqa_accuracy("dog", ["dog", "cat", "cow", "pig", "hen"], protocol) == pytest.approx(0.6)  # (0 + 4 * .75) / 5
    assert vqa_accuracy("dog", ["dog", "dog", "cow", "pig", "hen"], protocol) == pytest.approx(0.9)  # (2 * .75 + 3) / 5
    # OK-VQA's 5 answers each given twice -> the 10-answer score of one matching answer given twice
    assert vqa_accuracy("dog", ["dog", "cat", "cow", "pig", "hen"] * 2, protocol) == pytest.approx(0.6)


def test_one_answer_follows_each_protocols_normalisation():
    assert vqa_accuracy("Dog", ["dog"], "vqa") == 0.0  # a single answer is "all identical": no normalisation
    assert vqa_accuracy("Dog", ["dog"], "vqa2016") == 1.0
    assert vqa_accuracy("Dog", ["DOG"], "lmms_eval") == 1.0


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
    with pytest.raises(ValueError, match="vqa2016"):  # the message lists the valid protocols
        vqa_accuracy("dog", ["dog"], protocol="vqa2017")
    with pytest.raises(ValueError, match="Unknown VQA protocol"):
        normalize_answer("dog", protocol="nope")


def test_registry_accepts_new_protocols():
    @register_vqa_protocol("_test_casefold", normalize=str.casefold)
    def casefold(prediction, answers):
        return prediction.casefold(), [a.casefold() for a in answers]

    try:
        assert get_vqa_protocol("_test_casefold").compared is casefold
        assert vqa_accuracy("DOG", ["dog"] * 3 + ["Dog."] * 7, "_test_casefold") == pytest.approx(0.9)
        assert normalize_answer("DOG", "_test_casefold") == "dog"
    finally:
        del VQA_PROTOCOLS["_test_casefold"]
    with pytest.raises(ValueError):
        register_vqa_protocol("", normalize=str)


# --- differential test against independent re-statements of the three reference scorers ---------------------------
# Written from the published behaviour of GT-Vision-Lab/VQA vqaEval.py (2016 version and after the 2021 fix) and of
# lmms-eval's OK-VQA task (EvalAIAnswerProcessor), char by char, sharing nothing with trl_icd.metrics but the
# 120-entry contraction table (data; its entries are the official script's).

_MARKS = set(';/[]"{}()=+\\_-><@`,?!')
_NUMBERS = dict(zip("none zero one two three four five six seven eight nine ten".split(),
                    ["0", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10"]))


def _digit_comma_digit(text, commas="one"):
    """A digit, then one comma (or a run of commas), then a digit, anywhere in `text`."""
    for i, char in enumerate(text):
        if char != "," or i == 0 or not text[i - 1].isdecimal():
            continue
        j = i + 1
        if commas == "run":
            while j < len(text) and text[j] == ",":
                j += 1
        if j < len(text) and text[j].isdecimal():
            return True
    return False


def _ref_punctuation(text, commas="one"):
    wipe = _digit_comma_digit(text, commas)
    kept = []
    for char in text:
        if char in _MARKS:
            if wipe or char + " " in text or " " + char in text:
                continue
            kept.append(" ")
        else:
            kept.append(char)
    marked = "".join(kept)
    out, removed = [], 0
    for i, char in enumerate(marked):  # a period goes unless the next character is a digit (first 32 only)
        next_is_digit = i + 1 < len(marked) and marked[i + 1].isdecimal()
        if char == "." and not next_is_digit and removed < 32:
            removed += 1
            continue
        out.append(char)
    return "".join(out)


def _ref_digits_articles(text):
    words = []
    for word in text.lower().split():
        word = _NUMBERS.get(word, word)
        if word in ("a", "an", "the"):
            continue
        words.append(word)
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def _ref_whitespace(text):
    return text.replace("\n", " ").replace("\t", " ").strip()


def _ref_leave_one_out(entries, prediction, key):
    """Mean over entries of min(1, matches among the *other* entries / 3); entries are told apart by identity."""
    scores = []
    for left_out in entries:
        others = [e for e in entries if e is not left_out]
        scores.append(min(1.0, sum(key(e) == prediction for e in others) / 3))
    return sum(scores) / len(scores)


def reference_official(prediction, gold, fixed):
    """vqaEval.py's per-question body: `fixed` = after the 2021 fix, else the 2016 version."""
    entries = [{"answer": a, "answer_id": k + 1} for k, a in enumerate(gold)]
    if fixed:
        for e in entries:
            e["answer"] = _ref_whitespace(e["answer"])
    res = _ref_whitespace(prediction)
    if not fixed:
        res = _ref_digits_articles(_ref_punctuation(res))
    if len({e["answer"] for e in entries}) > 1:
        for e in entries:
            e["answer"] = _ref_punctuation(e["answer"])
            if fixed:
                e["answer"] = _ref_digits_articles(e["answer"])
        if fixed:
            res = _ref_digits_articles(_ref_punctuation(res))
    return _ref_leave_one_out(entries, res, key=lambda e: e["answer"])


def _ref_evalai(text):
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = _ref_whitespace(text)
    return _ref_digits_articles(_ref_punctuation(text, commas="run"))


def reference_lmms_eval(prediction, gold):
    processed = [[_ref_evalai(a)] for a in gold]  # boxed: told apart by identity, like positions
    return _ref_leave_one_out(processed, _ref_evalai(prediction), key=lambda box: box[0])


REFERENCES = {
    "vqa": lambda p, g: reference_official(p, g, fixed=True),
    "vqa2016": lambda p, g: reference_official(p, g, fixed=False),
    "lmms_eval": reference_lmms_eval,
}

_BASES = ["yes", "no", "two", "2", "10", "ten", "none", "0", "red", "t-shirt", "dog's bed", "dont know", "3.5",
          "1,000", "left side", "the beach", "a cat", "an orange", "new york", "what's that", "isnt", "e.g. tea",
          "red, white", "why?", "no!", "Yes", "Two Dogs", "umbrella", "50/50", "ice cream", "o'clock", "oclock"]


def _variant(rng, text):
    """One surface form of `text`: case, articles, number words/digits, punctuation, contractions, whitespace."""
    edits = rng.sample(range(9), rng.randint(0, 3))
    for edit in edits:
        if edit == 0:
            text = rng.choice([text.upper(), text.capitalize(), text.lower(), text.title()])
        elif edit == 1:
            text = rng.choice(["the ", "a ", "an ", "The "]) + text
        elif edit == 2:
            text = text + rng.choice([".", "!", "?", ",", " .", "..", "...", ". "])
        elif edit == 3:
            text = rng.choice(["(", '"', "[", "-"]) + text + rng.choice([")", '"', "]", "-"])
        elif edit == 4:
            text = text.replace(" ", rng.choice(["-", "/", "_", ", ", ",", "  ", "\t"]), 1)
        elif edit == 5:
            swaps = {"2": "two", "two": "2", "ten": "10", "10": "ten", "0": "none", "dont": "don't", "isnt": "isn't",
                     "'s": "s", "1,000": "1000", "3.5": "3,5", "oclock": "o'clock"}
            for old, new in swaps.items():
                if old in text.lower():
                    text = text.lower().replace(old, new, 1)
                    break
        elif edit == 6:
            text = rng.choice([" ", "\n", "\t", "  "]) + text + rng.choice(["", " ", "\n"])
        elif edit == 7:
            text = text + rng.choice(["'s", "s", ",5", "5", ".5"])
        else:
            text = rng.choice(["?", "!", "@", "`", "=", "+", "<", ">", ";", "{", "}", "\\"]).join(text.split(" ", 1))
    return text


def generated_cases(n, seed=0):
    rng = random.Random(seed)
    cases = []
    for _ in range(n):
        base = rng.choice(_BASES)
        if rng.random() < 0.3:  # all gold answers identical (raw or a variant)
            gold = [rng.choice([base, _variant(rng, base)])] * 10
        else:
            pool = [base] + [_variant(rng, base) for _ in range(rng.randint(1, 4))] + [rng.choice(_BASES)]
            gold = [rng.choice(pool) for _ in range(10)]
        prediction = rng.choice([base, _variant(rng, base), rng.choice(gold), _variant(rng, rng.choice(gold)),
                                 rng.choice(_BASES)])
        cases.append((prediction, gold))
    return cases


CASES = generated_cases(3000)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_matches_an_independent_restatement_of_its_reference(protocol):
    reference = REFERENCES[protocol]
    mismatches = [(p, g) for p, g in CASES if vqa_accuracy(p, g, protocol) != pytest.approx(reference(p, g), abs=1e-12)]
    assert not mismatches, mismatches[:5]


@pytest.mark.parametrize("normalize", [official_normalize, evalai_normalize], ids=["official", "evalai"])
def test_memoised_normalisers_equal_their_unmemoised_selves(normalize):
    texts = sorted({text for prediction, answers in CASES for text in (prediction, *answers)})
    assert [normalize(text) for text in texts] == [normalize.__wrapped__(text) for text in texts]
    hits = normalize.cache_info().hits
    assert [normalize(text) for text in texts[:50]] == [normalize.__wrapped__(text) for text in texts[:50]]
    assert normalize.cache_info().hits >= hits + 50  # the second pass is answered from the cache


def test_generated_cases_exercise_the_rule_differences():
    # Without enough disagreement between the references, the differential test above would prove little.
    scores = {name: [REFERENCES[name](p, g) for p, g in CASES] for name in PROTOCOLS}
    differ = {(a, b): sum(x != y for x, y in zip(scores[a], scores[b])) for a, b in
              [("vqa", "vqa2016"), ("vqa", "lmms_eval"), ("vqa2016", "lmms_eval")]}
    assert all(count > 150 for count in differ.values()), differ
    assert {round(s, 6) for s in scores["vqa"]} == {0.0, 0.3, 0.6, 0.9, 1.0}  # every accuracy level occurs


def test_reference_restatements_agree_with_hand_computed_cases():
    for prediction, answers, expected in RULE_CASES:
        for protocol, value in expected.items():
            assert REFERENCES[protocol](prediction, answers) == pytest.approx(value), (protocol, prediction)


# --- the evaluate module -------------------------------------------------------------------------------------------


def test_evaluate_module_loads_offline_from_its_path(tmp_path):
    import evaluate

    from trl_icd.metrics_module import VQA_ACCURACY_PATH

    metric = evaluate.load(VQA_ACCURACY_PATH, cache_dir=str(tmp_path))
    predictions = [case[0] for case in RULE_CASES]
    references = [case[1] for case in RULE_CASES]
    for protocol in PROTOCOLS:
        result = metric.compute(predictions=predictions, references=references, return_per_question=True,
                                protocol=protocol)
        expected = [case[2][protocol] for case in RULE_CASES]
        assert result["per_question"] == pytest.approx(expected)
        assert result["vqa_accuracy"] == pytest.approx(sum(expected) / len(expected))
    assert metric.compute(predictions=["Yes"], references=[["yes"] * 10])["vqa_accuracy"] == 0.0  # default: "vqa"
    with pytest.raises(ValueError, match="Unknown VQA protocol"):
        metric.compute(predictions=["x"], references=[["x"]], protocol="nope")
