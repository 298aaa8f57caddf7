"""Small deterministic stand-ins for the reward tests: a corpus of coloured images and a rule-based backend."""

from __future__ import annotations

from PIL import Image

from trl_icd.data.corpus import Corpus
from trl_icd.rewards.backend import RewardBackend

COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "yellow": (230, 230, 20)}


def colour_image(name: str, size: int = 32) -> Image.Image:
    return Image.new("RGB", (size, size), COLOURS[name])


def colour_corpus(n: int = 12, broken: tuple = ()) -> Corpus:
    """Item i: a square of colour i % 4, question "what colour?" (even i) or "what shape?" (odd i); answers
    annotated by 10 people (3 spellings with counts 6/3/1). Items in `broken` have a missing image file."""
    names = list(COLOURS)
    records = []
    for i in range(n):
        colour = names[i % 4]
        records.append(
            {
                "id": i,
                "image": "/nonexistent/image.png" if i in broken else colour_image(colour),
                "image_id": 1000 + i,
                "question": "what colour?" if i % 2 == 0 else "what shape?",
                "answers": [colour] * 6 + [f"{colour}ish"] * 3 + ["square"],
            }
        )
    return Corpus.from_records(records)


class FakeBackend(RewardBackend):
    """Answers with the answer of the last demonstration that asks the query's question ("unknown" if none);
    log p(answer) = -0.1·len(answer) - 0.05·shots. Loads every image (so a broken one raises ImageLoadError), records
    its calls, and fails whole batches that contain a query in `fail_queries`."""

    def __init__(self, setting: int = 0, fail_queries: tuple = ()):
        self.setting = setting
        self.fail_queries = set(fail_queries)
        self.calls: list[list[tuple]] = []
        self.answer_lists: list[list[list[str]]] = []

    @property
    def identity(self) -> dict:
        return {"backend": "fake", "setting": self.setting}

    def answer(self, prompts):
        out = []
        for p in prompts:
            same = [d for d in p.demos if d.question == p.query.question]
            out.append(same[-1].answer if same else "unknown")
        return out

    @staticmethod
    def logprob(answer: str, shots: int) -> float:
        return -0.1 * len(answer) - 0.05 * shots

    def answer_logprob(self, prompts, answers):
        return [[self.logprob(a, p.num_shots) for a in cands] for p, cands in zip(prompts, answers)]

    def answer_and_logprob(self, prompts, answers):
        self.calls.append([p.key for p in prompts])
        self.answer_lists.append([list(a) for a in answers])
        for p in prompts:
            for item in p.items:
                item.image  # noqa: B018  (raises ImageLoadError for a broken item)
            if p.query.id in self.fail_queries:
                raise RuntimeError(f"backend failure on query {p.query.id}")
        return self.answer(prompts), self.answer_logprob(prompts, answers)

    @property
    def pairs_scored(self) -> int:
        return sum(len(c) for c in self.calls)
