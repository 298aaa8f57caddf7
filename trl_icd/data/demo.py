"""The demo world: a small synthetic VQA corpus whose best demonstrations are known, so in-context demonstration
selection can be learned offline in minutes and judged against an oracle.

Every item shows one coloured shape on a plain background (position, size, rotation, background and the exact shade
vary: nuisance the features see but the answers ignore) and asks one templated question of one of five types:

- ``colour`` and ``shape``: the answer can be read off the image (the colour / shape name);
- ``name``, ``origin`` and ``use``: the answer is an arbitrary word fixed per *concept* (shape x colour) and type,
  like OK-VQA's outside knowledge: nothing in the image reveals it, so the simulated answerer
  (`trl_icd.rewards.SimulatedBackend`) gets it right only by copying it from a demonstration of the same concept
  *and* question type.

Relevance is therefore an AND over the two modalities: the concept is visible only in the image, the question type
only in a few key words of the question. Image-similarity retrieval finds the concept but not the type; text
similarity is drawn to the question's frame and its opening/closing words, which every type shares, more than to
the key words; even the two similarities added together miss often. A selector that learns which features matter
can pick the demonstrations that really match. docs/demo_world.md has the rule and measured baselines.

Hidden ground truth lives in `CorpusItem.meta`: ``concept``, ``shape``, ``colour``, ``question_type``,
``answer_source`` ("image" | "knowledge"), ``zero_shot_answer`` (what the answerer says with no demonstrations),
``template`` (index of the question frame), ``core_question`` (the question without opening/closing words) and
``render`` (the nuisance parameters of the image).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .corpus import Corpus

logger = logging.getLogger(__name__)

# Shade centres sit in the middle of the 4-level-per-channel colour bins the fallback featuriser uses (0-63, 64-127,
# 128-191, 192-255), so the per-image shade jitter (< 32) never moves a colour into another bin.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (224, 32, 32),
    "green": (32, 160, 32),
    "blue": (32, 96, 224),
    "yellow": (224, 224, 32),
    "purple": (160, 32, 224),
    "orange": (224, 160, 32),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
# Backgrounds differ in brightness from every object colour by >= 30 grey levels, so shape edges stay visible.
BACKGROUNDS: tuple[tuple[int, int, int], ...] = ((232, 232, 232), (24, 24, 24), (24, 24, 96), (240, 224, 200))

READABLE_TYPES = ("colour", "shape")
KNOWLEDGE_TYPES = ("name", "origin", "use")
QUESTION_TYPES = READABLE_TYPES + KNOWLEDGE_TYPES

# Per type, three question frames in parallel across the types: a frame names the item's shape or colour (so text
# similarity sees half a concept) or neither, and is shared by every type; only the type's key words ("colour",
# "shape", "called", "come from", "used for") say what is asked.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "colour": ("What colour is this {shape}?", "What colour is this thing?", "What colour is the object here?"),
    "shape": ("What shape is the {colour} object?", "What shape is this thing?", "What shape is the object here?"),
    "name": ("What is this {shape} called?", "What is this thing called?", "What is the {colour} object called?"),
    "origin": (
        "Where does this {shape} come from?",
        "Where does this thing come from?",
        "Where does the {colour} object come from?",
    ),
    "use": ("What is this {shape} used for?", "What is this thing used for?", "What is the {colour} object used for?"),
}

# Wording that says nothing about what is asked, shared by every question type (real questions vary in phrasing the
# same way): text similarity is drawn to a shared opening or closing, a selector can learn to look past it.
QUESTION_OPENINGS: tuple[str, ...] = (
    "",
    "Looking at this image, ",
    "Quick question about the picture: ",
    "Tell me, please, ",
    "Here is something I wonder about: ",
)
QUESTION_CLOSINGS: tuple[str, ...] = (
    "",
    " Answer in one or two words.",
    " I would like a short answer.",
    " Thanks a lot!",
)

# What annotators who do not give the canonical answer say instead (normalised VQA answers: lower case, no articles).
COLOUR_ALTERNATIVES = {
    "red": ("crimson", "pink", "orange"),
    "green": ("lime", "dark green", "teal"),
    "blue": ("navy", "light blue", "purple"),
    "yellow": ("gold", "lemon", "orange"),
    "purple": ("violet", "magenta", "blue"),
    "orange": ("amber", "red", "yellow"),
}
SHAPE_ALTERNATIVES = {
    "circle": ("round", "ball", "disc"),
    "square": ("box", "rectangle", "block"),
    "triangle": ("pyramid", "arrow", "wedge"),
    "diamond": ("rhombus", "kite", "square"),
    "cross": ("plus", "x", "star"),
}
_KNOWLEDGE_UNSURE = ("unknown", "no idea")

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "kr", "tr", "st", "gl", "sn")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "n", "r", "l", "s", "x")


@dataclass
class DemoWorldConfig:
    """Size and difficulty of the demo world. Everything is deterministic under `seed`."""

    num_train: int = field(
        default=1200, metadata={"help": "Items in the 'train' split (training queries and the demonstration pool)."}
    )
    num_eval: int = field(default=200, metadata={"help": "Held-out queries in the 'val' split."})
    num_test: int = field(default=200, metadata={"help": "Held-out queries in the 'test' split."})
    seed: int = field(default=0, metadata={"help": "Seed of everything random in the world."})
    image_size: int = field(default=48, metadata={"help": "Side of the square images in pixels."})
    num_shapes: int = field(default=4, metadata={"help": f"Shapes used, the first N of {SHAPES}."})
    num_colours: int = field(default=5, metadata={"help": f"Colours used, the first N of {tuple(COLOURS)}."})
    knowledge_types: tuple[str, ...] = field(
        default=KNOWLEDGE_TYPES,
        metadata={"help": f"Question types whose answer is a per-concept word, a subset of {KNOWLEDGE_TYPES}."},
    )
    knowledge_fraction: float = field(
        default=0.7, metadata={"help": "Fraction of questions of a knowledge type (the rest ask colour or shape)."}
    )
    varied_wording: bool = field(
        default=True,
        metadata={"help": "Give questions a random opening and closing shared across question types (text nuisance)."},
    )
    answer_noise: float = field(
        default=0.15,
        metadata={"help": "Mean fraction of the 10 annotator answers that differ from the canonical answer."},
    )
    ambiguous_fraction: float = field(
        default=0.1,
        metadata={"help": "Fraction of items on which only 3-5 annotators agree (VQA accuracy 0.9 for 3 of 10)."},
    )
    min_canonical_answers: int = field(
        default=3, metadata={"help": "Fewest annotators (of 10) giving the canonical answer; it always leads."}
    )
    rotation_degrees: float = field(default=5.0, metadata={"help": "Largest random rotation of a shape."})
    radius_range: tuple[float, float] = field(
        default=(0.25, 0.36), metadata={"help": "Range of the shape's radius as a fraction of the image side."}
    )
    shade_jitter: int = field(default=20, metadata={"help": "Largest per-channel shift of the object colour (< 32)."})
    pixel_noise: int = field(default=8, metadata={"help": "Amplitude of per-pixel noise."})
    known_fraction: float = field(
        default=0.0,
        metadata={
            "help": "Fraction of knowledge questions whose answer the answerer knows without demonstrations (its "
            "zero-shot answer is then the right word, held with the readable weight); 0: it never does."
        },
    )
    confidence_median: float = field(
        default=1.0,
        metadata={"help": "Median of the per-item factor on the image's vote (how firmly the answerer holds its "
                          "zero-shot answer)."},
    )
    confidence_spread: float = field(
        default=0.0,
        metadata={"help": "Log-normal sigma of that per-item factor; 0: every item gets `confidence_median`."},
    )
    preset: str = field(
        default="default",
        metadata={"help": "The `DEMO_PRESETS` regime of this world: it names the simulator rule "
                          "(`SimulatedBackend.for_world`). `DemoWorldConfig.from_preset` (and "
                          "`build_demo_world(preset=...)`) also start the other settings from it; setting only this "
                          "field keeps them."},
    )

    def __post_init__(self):
        if min(self.num_train, self.num_eval, self.num_test) < 0 or self.num_train == 0:
            raise ValueError("num_train must be positive and num_eval/num_test non-negative")
        if not 1 <= self.num_shapes <= len(SHAPES) or not 1 <= self.num_colours <= len(COLOURS):
            raise ValueError(f"num_shapes must be in 1..{len(SHAPES)} and num_colours in 1..{len(COLOURS)}")
        if not 0.0 <= self.knowledge_fraction <= 1.0 or not 0.0 <= self.ambiguous_fraction <= 1.0:
            raise ValueError("knowledge_fraction and ambiguous_fraction must be in [0, 1]")
        if not 0.0 <= self.answer_noise < 1.0:
            raise ValueError("answer_noise must be in [0, 1)")
        self.knowledge_types = tuple(self.knowledge_types)
        unknown = set(self.knowledge_types) - set(KNOWLEDGE_TYPES)
        if unknown or len(set(self.knowledge_types)) != len(self.knowledge_types):
            raise ValueError(f"knowledge_types must be distinct names from {KNOWLEDGE_TYPES}: {self.knowledge_types}")
        if not self.knowledge_types and self.knowledge_fraction > 0:
            raise ValueError("knowledge_fraction > 0 needs at least one knowledge type")
        if not 1 <= self.min_canonical_answers <= 10:
            raise ValueError("min_canonical_answers must be in 1..10")
        if not 0 <= self.shade_jitter < 32:
            raise ValueError("shade_jitter must be in [0, 32) so shades stay in their colour bin")
        if not 0.05 <= self.radius_range[0] <= self.radius_range[1] <= 0.4:
            raise ValueError("radius_range must satisfy 0.05 <= low <= high <= 0.4")
        if self.image_size < 16:
            raise ValueError("image_size must be at least 16")
        if not 0.0 <= self.known_fraction <= 1.0:
            raise ValueError("known_fraction must be in [0, 1]")
        if self.confidence_median <= 0 or self.confidence_spread < 0:
            raise ValueError("confidence_median must be positive and confidence_spread non-negative")
        _check_preset(self.preset)

    @classmethod
    def from_preset(cls, preset: str, **overrides) -> DemoWorldConfig:
        """The settings of the `DEMO_PRESETS` regime `preset`, with keyword overrides on top."""
        _check_preset(preset)
        return cls(**{**DEMO_PRESETS[preset].world, "preset": preset, **overrides})


def _check_preset(name: str) -> None:
    if name not in DEMO_PRESETS:
        raise ValueError(f"unknown demo preset {name!r}; known: {sorted(DEMO_PRESETS)}")


@dataclass(frozen=True)
class DemoPreset:
    """A named regime of the demo world: `DemoWorldConfig` overrides and the simulated answerer's `SimulatorRule`
    overrides that go with them."""

    description: str
    world: Mapping[str, Any] = field(default_factory=dict)
    rule: Mapping[str, Any] = field(default_factory=dict)


DEMO_PRESETS: Mapping[str, DemoPreset] = MappingProxyType({
    "default": DemoPreset("Easy by design: relevant demonstrations decide most knowledge questions (docs/demo_world.md)."),
    "okvqa_like": DemoPreset(
        "Calibrated to Qwen2.5-VL-3B on OK-VQA (docs/demo_world.md, 'The OK-VQA-like regime'): accuracy with random "
        "demonstrations falls with the shot count, most queries keep their answer whatever the demonstrations, "
        "relevant ones rescue a minority.",
        world={"num_train": 1500, "num_eval": 300, "num_test": 300, "known_fraction": 0.25,
               "confidence_median": 1.85, "confidence_spread": 0.65},
        rule={"readable_weight": 7.25, "knowledge_weight": 1.25, "dilution": 6.0, "same_type_weight": 2.4,
              "same_concept_weight": 3.0, "vote_noise": 0.8},
    ),
})
"""Named regimes (`build_demo_world(preset=...)`, `--demo_preset`)."""


@dataclass(frozen=True)
class ShapeImage:
    """A picklable, zero-argument image factory: the corpus renders images lazily from these parameters."""

    shape: str
    rgb: tuple[int, int, int]
    background: tuple[int, int, int]
    size: int
    centre: tuple[float, float]
    radius: float
    rotation: float
    noise: int
    noise_seed: int

    def __call__(self) -> Image.Image:
        return render_shape(self)


def _polygon(shape: str, cx: float, cy: float, r: float, degrees: float) -> list[tuple[float, float]]:
    if shape == "square":
        angles, radius = [45, 135, 225, 315], r
    elif shape == "diamond":
        angles, radius = [0, 90, 180, 270], r * 1.15
    elif shape == "triangle":
        angles, radius = [90, 210, 330], r * 1.1
    elif shape == "cross":
        w = 0.38  # half-width of a bar relative to r
        base = [(w, 1), (w, w), (1, w), (1, -w), (w, -w), (w, -1), (-w, -1), (-w, -w), (-1, -w), (-1, w), (-w, w),
                (-w, 1)]
        theta = np.deg2rad(degrees)
        c, s = np.cos(theta), np.sin(theta)
        return [(cx + r * (c * x - s * y), cy - r * (s * x + c * y)) for x, y in base]
    else:
        raise ValueError(f"unknown polygon shape {shape!r}")
    return [
        (cx + radius * np.cos(np.deg2rad(a + degrees)), cy - radius * np.sin(np.deg2rad(a + degrees))) for a in angles
    ]


def render_shape(spec: ShapeImage) -> Image.Image:
    """Draw `spec` (RGB, `spec.size` square). Deterministic: the pixel noise has its own seed."""
    image = Image.new("RGB", (spec.size, spec.size), spec.background)
    draw = ImageDraw.Draw(image)
    cx, cy = spec.centre
    if spec.shape == "circle":
        draw.ellipse([cx - spec.radius, cy - spec.radius, cx + spec.radius, cy + spec.radius], fill=spec.rgb)
    else:
        draw.polygon(_polygon(spec.shape, cx, cy, spec.radius, spec.rotation), fill=spec.rgb)
    if spec.noise:
        rng = np.random.default_rng(spec.noise_seed)
        pixels = np.asarray(image, dtype=np.int16)
        pixels = pixels + rng.integers(-spec.noise, spec.noise + 1, size=pixels.shape, dtype=np.int16)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    return image


def concept_of(shape: str, colour: str) -> str:
    return f"{colour} {shape}"


def _pseudo_words(rng: np.random.Generator, count: int, forbidden: set[str]) -> list[str]:
    """`count` distinct made-up two-syllable words (the per-concept 'outside knowledge' answers)."""
    words: list[str] = []
    seen = set(forbidden)
    while len(words) < count:
        word = "".join(
            rng.choice(_ONSETS) + rng.choice(_VOWELS) + (rng.choice(_CODAS) if k == 1 else "") for k in range(2)
        )
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def annotator_answers(
    canonical: str,
    alternatives: Sequence[str],
    rng: np.random.Generator,
    noise: float,
    min_canonical: int,
    ambiguous: bool = False,
) -> list[str]:
    """10 shuffled answers: the canonical one `n` times and annotator noise drawn uniformly from `alternatives`, each
    fewer than `n` times, so the canonical answer is always the most common one (`CorpusItem.answer`); a noise vote
    with no alternative left under that cap goes to the canonical answer. `n` ~ Binomial(10, 1 - noise), or uniform
    in [min_canonical, 5] for an `ambiguous` item; never below `min_canonical`."""
    if ambiguous:
        n = int(rng.integers(min_canonical, max(min_canonical, 5) + 1))
    else:
        n = int(np.clip(rng.binomial(10, 1.0 - noise), min_canonical, 10))
    counts = dict.fromkeys(alternatives, 0)
    answers = [canonical] * n
    for _ in range(10 - n):
        open_alternatives = [a for a in alternatives if counts[a] < n - 1]
        if not open_alternatives:
            answers.append(canonical)
            continue
        alternative = open_alternatives[int(rng.integers(len(open_alternatives)))]
        counts[alternative] += 1
        answers.append(alternative)
    return [answers[i] for i in rng.permutation(10)]


@dataclass
class DemoWorld:
    """The corpus (splits 'train', 'val', 'test') and the hidden ground truth that generated it."""

    corpus: Corpus
    config: DemoWorldConfig
    shapes: tuple[str, ...]
    colours: tuple[str, ...]
    knowledge: dict[str, dict[str, str]]  # question type -> concept -> answer word

    @property
    def question_types(self) -> tuple[str, ...]:
        return READABLE_TYPES + self.config.knowledge_types

    @property
    def concepts(self) -> list[str]:
        return [concept_of(s, c) for s in self.shapes for c in self.colours]

    def ids(self, split: str) -> list:
        return self.corpus.ids_in_split(split)

    def is_match(self, query_id, demo_id) -> bool:
        """Whether `demo_id` really answers `query_id`'s question: same concept and same question type."""
        q, d = self.corpus[query_id].meta, self.corpus[demo_id].meta
        return q["concept"] == d["concept"] and q["question_type"] == d["question_type"]

    @property
    def simulator_rule(self) -> dict:
        """`SimulatorRule` overrides of this world's preset (what `SimulatedBackend.for_world` applies)."""
        return dict(DEMO_PRESETS[self.config.preset].rule)

    def summary(self) -> dict:
        return {
            "config": asdict(self.config),
            "splits": {split: len(self.ids(split)) for split in self.corpus.splits},
            "concepts": len(self.concepts),
            "question_types": list(self.question_types),
        }


def _question_type_probabilities(config: DemoWorldConfig) -> dict[str, float]:
    knowledge = config.knowledge_types
    readable = (1.0 - config.knowledge_fraction) / len(READABLE_TYPES)
    return {**dict.fromkeys(READABLE_TYPES, readable),
            **dict.fromkeys(knowledge, config.knowledge_fraction / max(len(knowledge), 1))}


def _make_record(
    item_id: int,
    split: str,
    config: DemoWorldConfig,
    shapes: Sequence[str],
    colours: Sequence[str],
    knowledge: dict[str, dict[str, str]],
    type_probabilities: dict[str, float],
    rng: np.random.Generator,
    prior_rng: np.random.Generator,
) -> dict:
    shape = shapes[int(rng.integers(len(shapes)))]
    colour = colours[int(rng.integers(len(colours)))]
    concept = concept_of(shape, colour)
    types = list(type_probabilities)
    question_type = types[int(rng.choice(len(types), p=list(type_probabilities.values())))]
    template_index = int(rng.integers(len(TEMPLATES[question_type])))
    core = TEMPLATES[question_type][template_index].format(shape=shape, colour=colour)
    opening = QUESTION_OPENINGS[int(rng.integers(len(QUESTION_OPENINGS)))] if config.varied_wording else ""
    closing = QUESTION_CLOSINGS[int(rng.integers(len(QUESTION_CLOSINGS)))] if config.varied_wording else ""
    question = opening + (core[0].lower() + core[1:] if opening else core) + closing

    if question_type == "colour":
        canonical, alternatives = colour, COLOUR_ALTERNATIVES[colour]
    elif question_type == "shape":
        canonical, alternatives = shape, SHAPE_ALTERNATIVES[shape]
    else:
        canonical = knowledge[question_type][concept]
        # Annotators who do not know the word name what they see, or say they do not know.
        alternatives = (shape, colour, *_KNOWLEDGE_UNSURE)
    ambiguous = bool(rng.random() < config.ambiguous_fraction)
    answers = annotator_answers(
        canonical, alternatives, rng, config.answer_noise, config.min_canonical_answers, ambiguous
    )

    size = config.image_size
    radius = float(rng.uniform(*config.radius_range) * size)
    margin = radius * 1.15 + 1
    centre = (float(rng.uniform(margin, size - margin)), float(rng.uniform(margin, size - margin)))
    base = np.array(COLOURS[colour])
    shade = np.clip(base + rng.integers(-config.shade_jitter, config.shade_jitter + 1, size=3), 0, 255)
    spec = ShapeImage(
        shape=shape,
        rgb=tuple(int(v) for v in shade),
        background=BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))],
        size=size,
        centre=centre,
        radius=radius,
        rotation=float(rng.uniform(-config.rotation_degrees, config.rotation_degrees)),
        noise=config.pixel_noise,
        noise_seed=int(rng.integers(2**31)),
    )
    # The answerer's prior on this item, from its own stream so the rest of the world does not depend on it.
    known = question_type in KNOWLEDGE_TYPES and bool(prior_rng.random() < config.known_fraction)
    confidence = config.confidence_median * float(np.exp(config.confidence_spread * prior_rng.standard_normal()))
    if question_type in READABLE_TYPES or known:
        zero_shot_answer = canonical
    else:
        zero_shot_answer = shape
    return {
        "id": item_id,
        "image_id": item_id,
        "image": spec,
        "question": question,
        "answers": answers,
        "split": split,
        "concept": concept,
        "shape": shape,
        "colour": colour,
        "question_type": question_type,
        "answer_source": "image" if question_type in READABLE_TYPES else "knowledge",
        # With no demonstrations the answerer reads what it can: the true colour / shape, and for a knowledge
        # question it does not know, it names the shape it sees (wrong, but credited by the annotators who did the
        # same).
        "zero_shot_answer": zero_shot_answer,
        "known": known,
        "confidence": confidence,
        "template": template_index,
        "core_question": core,
        "render": {k: v for k, v in asdict(spec).items() if k not in ("shape", "size")},
    }


def build_demo_world(config: DemoWorldConfig | None = None, preset: str | None = None, **overrides) -> DemoWorld:
    """Generate the demo world (`DemoWorldConfig` fields as keyword overrides, e.g. `num_train=600, seed=1`).

    `preset` (a `DEMO_PRESETS` name, e.g. "okvqa_like") starts from that regime's settings instead of the defaults;
    keyword overrides still apply on top. Item ids are ints: train items first, then val, then test. Each item has its
    own image (`image_id` = id).
    """
    if preset is not None:
        if config is not None:
            raise ValueError("pass either a DemoWorldConfig or a preset name, not both")
        config = DemoWorldConfig.from_preset(preset, **overrides)
    elif config is None:
        config = DemoWorldConfig(**overrides)
    elif overrides:
        config = DemoWorldConfig(**{**asdict(config), **overrides})
    rng = np.random.default_rng([config.seed, 0xDE70])
    prior_rng = np.random.default_rng([config.seed, 0xC0F1])
    shapes = SHAPES[: config.num_shapes]
    colours = tuple(COLOURS)[: config.num_colours]
    concepts = [concept_of(s, c) for s in shapes for c in colours]
    reserved = set(SHAPES) | set(COLOURS) | {a for alts in (*COLOUR_ALTERNATIVES.values(),
                                                           *SHAPE_ALTERNATIVES.values()) for a in alts}
    knowledge_types = config.knowledge_types
    words = _pseudo_words(rng, len(concepts) * len(knowledge_types), reserved | set(_KNOWLEDGE_UNSURE))
    knowledge = {
        qtype: dict(zip(concepts, words[k * len(concepts) : (k + 1) * len(concepts)], strict=True))
        for k, qtype in enumerate(knowledge_types)
    }
    type_probabilities = _question_type_probabilities(config)
    records = []
    splits = (("train", config.num_train), ("val", config.num_eval), ("test", config.num_test))
    for split, count in splits:
        for _ in range(count):
            records.append(
                _make_record(len(records), split, config, shapes, colours, knowledge, type_probabilities, rng,
                             prior_rng)
            )
    corpus = Corpus.from_records(records)
    logger.info("demo world: %s", {split: count for split, count in splits})
    return DemoWorld(corpus=corpus, config=config, shapes=shapes, colours=colours, knowledge=knowledge)


__all__ = [
    "COLOURS",
    "DEMO_PRESETS",
    "QUESTION_TYPES",
    "SHAPES",
    "DemoPreset",
    "DemoWorld",
    "DemoWorldConfig",
    "ShapeImage",
    "annotator_answers",
    "build_demo_world",
    "render_shape",
]
