"""VQA accuracy under named scoring protocols, so scores are comparable with the published numbers each one produced.

Every protocol scores the same way: each gold answer in turn is left out, the others that equal the prediction are
counted, `min(1, matches / 3)`, and the question's accuracy is the mean over the 10 leave-one-out subsets (the average
over all 10-choose-9 annotator subsets; 1, 2, 3, >= 4 matching annotators give 0.3, 0.6, 0.9, 1.0). They differ in
which strings they compare (`VQA_PROTOCOLS`):

- `"vqa"` (default): today's official GT-Vision-Lab/VQA `vqaEval.py` (since its 2021 fix "Fixed processing answers
  bug"). Prediction and gold answers get newlines/tabs turned into spaces and are stripped; then, if the gold answers
  are not all identical, both sides get the full normalisation (`normalize_answer`); if they are all identical,
  neither side is normalised (so "Yes" against ten "yes" scores 0).
- `"vqa2016"`: the script before that fix (LAVIS and others still ship it). The prediction always gets the full
  normalisation; the gold answers get only the punctuation rules, and only when they are not all identical.
- `"lmms_eval"`: lmms-eval's OK-VQA task. Both sides always get its EvalAI answer processor (`evalai_normalize`): the
  official normalisation after lower-casing, deleting every `,` and `?`, and splitting `'s` off its word.

On 10 gold answers each protocol reproduces its reference exactly. Other numbers of gold answers (one rule for every
protocol): the same leave-one-out average with the consensus threshold scaled to the number of other annotators,
`min(1, matches / ((n - 1) / 3))` ("a third of the others agree"; exactly `matches / 3` for n = 10). One gold answer
is scored by exact match (after the protocol's processing); no gold answer is an error. The references keep
`matches / 3` for every n instead (less credit below 10 answers, more above; a single answer always scores 0).
Digits (`\\d` below) are Unicode digits, as in the Python 3 ports of the script; the Python 2 original knows 0-9.

New protocols are a decorated function returning the strings to compare:

```python
from trl_icd.metrics import official_normalize, register_vqa_protocol

@register_vqa_protocol("always_normalised", normalize=official_normalize)
def always_normalised(prediction, answers):
    return official_normalize(prediction), [official_normalize(a) for a in answers]
```
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = [
    "DEFAULT_VQA_PROTOCOL",
    "VQA_PROTOCOLS",
    "VQAProtocol",
    "evalai_normalize",
    "official_normalize",
    "get_vqa_protocol",
    "normalize_answer",
    "process_digit_article",
    "process_punctuation",
    "register_vqa_protocol",
    "vqa_accuracy",
    "vqa_accuracy_batch",
]

DEFAULT_VQA_PROTOCOL = "vqa"

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


def _clean(text: str) -> str:
    """Newlines and tabs to spaces, then strip: what every protocol does to every answer first."""
    return text.replace("\n", " ").replace("\t", " ").strip()


@functools.lru_cache(maxsize=1 << 16)
def official_normalize(text: str) -> str:
    """The official script's full normalisation: clean, punctuation, then digits/articles/contractions.

    Memoised (a pure str -> str function): training scores every new selection for a query against the same gold
    answers, so the same strings come back again and again (benchmarks/answer_scoring.py)."""
    return process_digit_article(process_punctuation(_clean(text)))


@functools.lru_cache(maxsize=1 << 16)
def evalai_normalize(text: str) -> str:
    """lmms-eval's `EvalAIAnswerProcessor`: lower-case, delete every `,` and `?`, split `'s` off its word (`dog's`
    -> `dog 's`), strip, then the official normalisation. With the commas gone, the digit-comma-digit rule of the
    punctuation step can never fire."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return official_normalize(text)


# --------------------------------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class VQAProtocol:
    """A named scoring protocol: `compared(prediction, answers) -> (prediction, answers)` gives the strings the
    leave-one-out count compares; `normalize(text)` is the full normalisation it applies to an answer."""

    name: str
    compared: Callable[[str, Sequence[str]], tuple[str, list[str]]]
    normalize: Callable[[str], str]


VQA_PROTOCOLS: dict[str, VQAProtocol] = {}


def register_vqa_protocol(name: str, normalize: Callable[[str], str]):
    """Decorator adding `fn(prediction, answers) -> (compared prediction, compared answers)` to `VQA_PROTOCOLS`
    under `name`, with `normalize` as its `normalize_answer` (re-registering a name replaces it)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"A VQA protocol name must be a non-empty string, got {name!r}.")

    def decorator(fn):
        VQA_PROTOCOLS[name] = VQAProtocol(name, fn, normalize)
        return fn

    return decorator


def get_vqa_protocol(name: str) -> VQAProtocol:
    """The registered protocol called `name`; a `ValueError` naming the valid protocols otherwise."""
    try:
        return VQA_PROTOCOLS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"Unknown VQA protocol {name!r}. Valid protocols: {', '.join(sorted(VQA_PROTOCOLS))}."
        ) from None


@register_vqa_protocol("vqa", normalize=official_normalize)
def _official(prediction: str, answers: Sequence[str]) -> tuple[str, list[str]]:
    """Today's official script: normalise both sides unless the (cleaned) gold answers are all identical."""
    prediction, answers = _clean(prediction), [_clean(a) for a in answers]
    if len(set(answers)) > 1:
        return official_normalize(prediction), [official_normalize(a) for a in answers]
    return prediction, answers


@register_vqa_protocol("vqa2016", normalize=official_normalize)
def _official_2016(prediction: str, answers: Sequence[str]) -> tuple[str, list[str]]:
    """The 2016 script: the prediction always normalised; differing gold answers get the punctuation rules only."""
    if len(set(answers)) > 1:
        return official_normalize(prediction), [process_punctuation(a) for a in answers]
    return official_normalize(prediction), list(answers)


@register_vqa_protocol("lmms_eval", normalize=evalai_normalize)
def _lmms_eval(prediction: str, answers: Sequence[str]) -> tuple[str, list[str]]:
    """lmms-eval's OK-VQA scoring: the EvalAI answer processor on both sides, always."""
    return evalai_normalize(prediction), [evalai_normalize(a) for a in answers]


# ------------------------------------------------------------------------------------------------------ scoring


def normalize_answer(text: str, protocol: str = DEFAULT_VQA_PROTOCOL) -> str:
    """The full normalisation `protocol` applies to an answer ("vqa" and "vqa2016": the official one; "lmms_eval":
    the EvalAI processor). Under "vqa" it is skipped when the gold answers are all identical (`vqa_accuracy`)."""
    return get_vqa_protocol(protocol).normalize(text)


def vqa_accuracy(prediction: str, answers: Sequence[str], protocol: str = DEFAULT_VQA_PROTOCOL) -> float:
    """VQA accuracy in [0, 1] of one predicted answer against the human answers of one question under `protocol`
    (module docstring).

    Raises:
        ValueError: no gold answer, or an unknown protocol.
        TypeError: a non-string prediction or answer.
    """
    scorer = get_vqa_protocol(protocol)
    if isinstance(answers, str):
        raise TypeError("answers must be a sequence of strings (the annotators' answers), not one string.")
    answers = list(answers)
    if not answers:
        raise ValueError("vqa_accuracy needs at least one gold answer.")
    if not isinstance(prediction, str) or not all(isinstance(answer, str) for answer in answers):
        raise TypeError("The prediction and the gold answers must be strings.")
    predicted, references = scorer.compared(prediction, answers)
    total_matches = sum(reference == predicted for reference in references)
    if len(references) == 1:
        return float(total_matches)
    threshold = (len(references) - 1) / 3  # 3.0 for the official 10 answers
    scores = [min(1.0, (total_matches - (reference == predicted)) / threshold) for reference in references]
    return sum(scores) / len(scores)


def vqa_accuracy_batch(
    predictions: Sequence[str], references: Sequence[Sequence[str]], protocol: str = DEFAULT_VQA_PROTOCOL
) -> list[float]:
    """`vqa_accuracy` for each (prediction, answers) pair."""
    get_vqa_protocol(protocol)
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference lists.")
    return [vqa_accuracy(p, a, protocol) for p, a in zip(predictions, references, strict=True)]
