"""How an in-context prompt looks: one user turn of interleaved (image, "Question:… Short answer:…") demonstrations,
then the query without its answer, after a system prompt that names the real number of demonstrations.

Every backend (HF, vLLM, a remote server) renders prompts through `PromptFormat.messages`, so training rewards,
RL-data scores and evaluation accuracies all come from exactly the same text.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from PIL import Image

from ..data.corpus import CorpusItem

# The research post-processing: a reply that runs on into "Question: ..." or lists "a, b" keeps only its first part.
RESEARCH_STOP_STRINGS = ("Question", "Answer", "Short", ", ")

_NUMBER_WORDS = ["no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


@dataclass(frozen=True, eq=False)
class InContextPrompt:
    """A query and its ordered demonstrations (corpus items); what a backend scores."""

    query: CorpusItem
    demos: tuple[CorpusItem, ...] = ()

    @property
    def num_shots(self) -> int:
        return len(self.demos)

    @property
    def items(self) -> tuple[CorpusItem, ...]:
        """Demonstrations then the query: the order of the images in the prompt."""
        return (*self.demos, self.query)

    @property
    def key(self) -> tuple:
        """(query id, ordered demo ids): the reward-cache key part that names the prompt's content."""
        return (self.query.id, tuple(d.id for d in self.demos))


@dataclass(frozen=True)
class PromptFormat:
    """Template and system prompt. `{q}`/`{a}` in `template` are the question and the demonstration's answer.

    `system_prompt_zero_shot` is used with no demonstrations; `system_prompt` otherwise, with `{n}` = the number
    of demonstrations in words and `{s}` = "s" when n > 1 (the research prompt said "four" for any count).
    """

    template: str = "Question:{q} Short answer:{a}"
    demo_separator: str = "\n"
    system_prompt: str = (
        "You will see {n} example{s} of an image with a question and its short answer, then a new image and "
        "question. Answer the new question in the same style: one to three words, no explanation."
    )
    system_prompt_zero_shot: str = (
        "Answer the question about the image with a short answer: one to three words, no explanation."
    )
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if "{q}" not in self.template or not self.template.rstrip().endswith("{a}"):
            raise ValueError("template must contain {q} and end with {a} (the answer is what the model completes)")

    def system_text(self, num_shots: int) -> str:
        if num_shots == 0:
            return self.system_prompt_zero_shot
        n = _NUMBER_WORDS[num_shots] if num_shots < len(_NUMBER_WORDS) else str(num_shots)
        return self.system_prompt.format(n=n, s="s" if num_shots > 1 else "")

    def demo_text(self, item: CorpusItem) -> str:
        return self.template.replace("{q}", item.question).replace("{a}", item.answer) + self.demo_separator

    def query_text(self, item: CorpusItem) -> str:
        """The template up to `{a}`: the model's reply is the answer."""
        return self.template[: self.template.rindex("{a}")].replace("{q}", item.question)

    def messages(self, prompt: InContextPrompt) -> list[dict]:
        """Chat messages with `{"type": "image"}` placeholders, in the order of `prompt.items` (= `images(prompt)`)."""
        content: list[dict] = []
        for demo in prompt.demos:
            content += [{"type": "image"}, {"type": "text", "text": self.demo_text(demo)}]
        content += [{"type": "image"}, {"type": "text", "text": self.query_text(prompt.query)}]
        return [
            {"role": "system", "content": [{"type": "text", "text": self.system_text(prompt.num_shots)}]},
            {"role": "user", "content": content},
        ]

    @staticmethod
    def images(prompt: InContextPrompt) -> list[Image.Image]:
        """The prompt's images in placeholder order (raises `ImageLoadError` for a missing one)."""
        return [item.image for item in prompt.items]

    def identity(self) -> dict:
        return asdict(self)


def stable_hash(obj) -> str:
    """A short hash of a JSON-able object, stable across processes and Python versions (cache keys)."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def prompt_texts(fmt: PromptFormat, prompts: Sequence[InContextPrompt]) -> list[str]:
    """The user-turn text of each prompt with `<image>` marks; for logs and tables, not for models."""
    out = []
    for p in prompts:
        parts = ["<image>" + fmt.demo_text(d) for d in p.demos] + ["<image>" + fmt.query_text(p.query)]
        out.append("".join(parts))
    return out


def postprocess_answer(text: str, stop_strings: Sequence[str] = RESEARCH_STOP_STRINGS) -> str:
    """Cut a generated reply at the first stop string, then strip (every backend answers through this)."""
    if stop_strings:
        text = re.split("|".join(re.escape(s) for s in stop_strings), text, maxsplit=1)[0]
    return text.strip()


def generation_identity(
    max_new_tokens: int, num_beams: int, length_penalty: float, eos: str, stop_strings: Sequence[str]
) -> dict:
    """The generation settings that change an answer, as every backend reports them in its `identity`: decoding is
    always deterministic (no sampling, no repetition penalty, whatever a checkpoint's generation config says)."""
    return {
        "max_new_tokens": max_new_tokens,
        "num_beams": num_beams,
        "length_penalty": length_penalty,
        "do_sample": False,
        "repetition_penalty": 1.0,
        "eos": eos,
        "stop_strings": list(stop_strings),
    }
