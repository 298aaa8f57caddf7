"""The official VQA accuracy (GT-Vision-Lab/VQA `PythonEvaluationTools/vqaEvaluation/vqaEval.py`), reproduced rule for
rule so that scores are comparable with published VQAv2 / OK-VQA numbers.

- The prediction is normalised: newlines/tabs to spaces, strip, punctuation rules, periods, then lower-case, number
  words to digits, articles dropped, contractions restored (`normalize_answer`).
- The gold answers get only the punctuation rules, and only when they are not all identical; they are not
  lower-cased (the official annotation files are already normalised). `normalize_references=True` applies the full
  prediction normalisation to them instead, for raw answers (e.g. some Hub copies).
- Score: for each gold answer, drop it and count the matches among the others; `min(1, matches / 3)`; the mean over
  the 10 leave-one-out subsets (the average over all 10-choose-9 annotator subsets). So 1, 2, 3, >=4 matching
  annotators give 0.3, 0.6, 0.9, 1.0.

Fewer (or more) than 10 gold answers: the same leave-one-out average, with the consensus threshold scaled to the
number of other annotators, `min(1, matches / ((n - 1) / 3))` ("a third of the others agree"; exactly the official
`matches / 3` for n = 10). A single gold answer is scored by exact match. No answer at all is an error.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["normalize_answer", "process_punctuation", "process_digit_article", "vqa_accuracy", "vqa_accuracy_batch"]

# The tables below are the official script's, verbatim (including entries that can never match after lower-casing,
# such as "Im" and "Ive").
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've",
    "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've",
    "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}  # fmt: skip
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# The official look-behind is mistyped as a look-ahead `(?!<=\d)` (always true), so a period is removed unless a digit
# follows it ("3.5" keeps its period, "5." loses it). Kept as is: scores must match the official script.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# The official call passes `re.UNICODE` (= 32) positionally, i.e. as the maximum number of periods removed.
_PERIOD_STRIP_COUNT = int(re.UNICODE)


def process_punctuation(text: str) -> str:
    """Official `processPunctuation`: a punctuation mark next to a space (or any mark, when the text has a digit,
    comma, digit pattern) is deleted, otherwise it becomes a space; then periods not followed by a digit go."""
    out = text
    delete_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for mark in PUNCTUATION:
        if delete_all or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """Official `processDigitArticle`: lower-case, number words to digits, articles dropped, contractions fixed."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES]
    return " ".join(words)


def normalize_answer(text: str) -> str:
    """The official normalisation of a predicted answer."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def _process_references(answers: Sequence[str], normalize_references: bool) -> list[str]:
    if normalize_references:
        return [normalize_answer(answer) for answer in answers]
    if len(set(answers)) > 1:
        return [process_punctuation(answer) for answer in answers]
    return list(answers)


def vqa_accuracy(prediction: str, answers: Sequence[str], normalize_references: bool = False) -> float:
    """VQA accuracy in [0, 1] of one predicted answer against the human answers of one question (module docstring).

    Raises:
        ValueError: no gold answer.
        TypeError: a non-string prediction or answer.
    """
    if isinstance(answers, str):
        raise TypeError("answers must be a sequence of strings (the annotators' answers), not one string.")
    answers = list(answers)
    if not answers:
        raise ValueError("vqa_accuracy needs at least one gold answer.")
    if not isinstance(prediction, str) or not all(isinstance(answer, str) for answer in answers):
        raise TypeError("The prediction and the gold answers must be strings.")
    predicted = normalize_answer(prediction)
    references = _process_references(answers, normalize_references)
    total_matches = sum(reference == predicted for reference in references)
    if len(references) == 1:
        return float(total_matches)
    threshold = (len(references) - 1) / 3  # 3.0 for the official 10 answers
    scores = [min(1.0, (total_matches - (reference == predicted)) / threshold) for reference in references]
    return sum(scores) / len(scores)


def vqa_accuracy_batch(
    predictions: Sequence[str], references: Sequence[Sequence[str]], normalize_references: bool = False
) -> list[float]:
    """`vqa_accuracy` for each (prediction, answers) pair."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference lists.")
    return [vqa_accuracy(p, a, normalize_references) for p, a in zip(predictions, references, strict=True)]
