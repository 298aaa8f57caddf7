"""Qwen2.5-VL (Hugging Face transformers) scoring backend: batched short answers and answer log-probabilities.

What it guarantees, and why (facts measured on transformers 5.24, see docs/qwen_vl_backend.md):
- Batches are LEFT padded (forced, then asserted): every row's answer then sits in its last columns and `generate`
  continues every row from its real last token.
- `mm_token_type_ids` is always present (asserted): without it transformers silently falls back to 1-D positions
  and every score moves by several nats, identically batched and alone, so no parity test could notice.
- Each row's image-token count is checked against the image grids of that row's own images: images are bound to
  placeholders by global order only, so a mis-nested image list would otherwise be accepted.
- The answer log-probability is the SUM over the answer tokens only, located in the real chat-templated,
  image-expanded input (and checked against `tokenizer(answer)`), with `logits_to_keep` so the full-vocabulary
  logits of the prompt are never materialised.
- Nothing is computed twice: a per-image vision-feature cache (key: image key + pixel bounds), and one prefill
  shared by the greedy answer and all distinct candidate answers of a prompt (KV-cache continuation with explicit
  3-D rope positions). Prompts are bucketed by image count (less padding) and results returned in input order.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence

import torch
from tqdm.auto import tqdm
from transformers import (
    DynamicCache,
    GenerationConfig,
    ProcessorMixin,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .backend import RewardBackend
from .prompt import (  # noqa: F401  (RESEARCH_STOP_STRINGS, postprocess_answer: re-exported)
    RESEARCH_STOP_STRINGS,
    InContextPrompt,
    PromptFormat,
    generation_identity,
    postprocess_answer,
    stable_hash,
)

logger = logging.getLogger(__name__)


class Qwen2_5_VLImageOnlyProcessor(Qwen2_5_VLProcessor):
    """`Qwen2_5_VLProcessor` without a video processor, so it can be built where torchvision is missing.

    In transformers 5.24 `ProcessorMixin.__init__` type-checks every `__init__` argument, and the video-processor
    class only exists when torchvision imports; dropping `video_processor` from the signature removes it from the
    processor's attributes. Images and text behave exactly as in the stock processor (same placeholder expansion,
    same `mm_token_type_ids`).
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = getattr(tokenizer, "image_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.image_token
        )
        self.video_token_id = getattr(tokenizer, "video_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.video_token
        )
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)


def load_qwen2_5_vl_processor(name_or_path: str, **kwargs) -> ProcessorMixin:
    """The stock processor when it can be built, else the image-only one (no torchvision), with a log line.

    `AutoProcessor` may also "succeed" with a bare tokenizer when it cannot build the processor class; that counts
    as unavailable too."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(name_or_path, **kwargs)
        if isinstance(processor, ProcessorMixin) and hasattr(processor, "image_processor"):
            return processor
        reason = f"AutoProcessor gave a {type(processor).__name__}"
    except Exception as err:  # torchvision missing shows up as AttributeError/ImportError/ValueError by version
        reason = repr(err)
    logger.warning("stock processor for %s unavailable (%s); using the image-only processor", name_or_path, reason)
    return Qwen2_5_VLImageOnlyProcessor.from_pretrained(name_or_path, **kwargs)


def image_processing_identity(image_processor) -> dict:
    """Which image-processing path turns images into pixel values, for the scorer identity: the PIL/NumPy processor
    and the torchvision-backed one resize and normalise differently (up to 0.34 in normalised pixel units on noisy
    images), and which one loads depends on whether torchvision is installed. Records the class, its backend and a
    hash of its settings (the size bounds are recorded as min/max pixels)."""
    settings = {k: v for k, v in image_processor.to_dict().items() if k not in ("size", "image_processor_type")}
    return {
        "class": type(image_processor).__name__,
        "backend": getattr(image_processor, "backend", None),
        "settings": stable_hash(settings),
    }


class VisionFeatureCache:
    """Bounded LRU of vision-tower outputs per image: key -> (grid_thw [1, 3], merged features [n_tokens, hidden]).

    Demonstration images recur across prompts and steps; with a hit the image is neither decoded, resized nor
    encoded again. The key must name everything that changes the features (image key + pixel bounds)."""

    def __init__(self, max_images: int):
        if max_images < 1:
            raise ValueError("max_images must be >= 1")
        self.max_images = max_images
        self._store: OrderedDict = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key):
        value = self._store.get(key)
        if value is None:
            self.misses += 1
            return None
        self.hits += 1
        self._store.move_to_end(key)
        return value

    def put(self, key, value) -> None:
        self._store[key] = value
        self._store.move_to_end(key)
        while len(self._store) > self.max_images:
            self._store.popitem(last=False)

    def clear(self) -> None:
        self._store.clear()

    def __len__(self) -> int:
        return len(self._store)


class BatchGuardError(ValueError):
    """A model input batch that would silently give wrong scores (missing mm_token_type_ids, right padding, images
    not matching their placeholders)."""


class AnswerTokenizationError(ValueError):
    """An answer whose tokens cannot be located in the prompt + answer tokenisation (a merge across the boundary)."""


def image_token_runs(is_image: torch.Tensor) -> list[int]:
    """Lengths of the consecutive runs of image tokens in one row (one run per image, in order)."""
    edges = torch.diff(torch.nn.functional.pad(is_image.int(), (1, 1)))
    return ((edges == -1).nonzero().flatten() - (edges == 1).nonzero().flatten()).tolist()


def check_model_inputs(
    inputs: dict, image_tokens: Sequence[Sequence[int]], image_token_id: int, merge_size: int
) -> None:
    """Raise `BatchGuardError` unless the batch is left padded, carries `mm_token_type_ids` that agree with the
    image tokens, and row i holds, image by image, exactly `image_tokens[i]` image tokens with grids to match.

    `image_tokens` must come from the intended images themselves (their sizes or their cached grids), not from the
    processor's output: the processor binds images to placeholders by global order and re-derives every count from
    that order, so a swapped or mis-nested image list is self-consistent in its output."""
    input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    if inputs.get("mm_token_type_ids") is None:
        raise BatchGuardError(
            "mm_token_type_ids is missing: transformers would fall back to 1-D rope positions and silently "
            "change every score"
        )
    if not bool(attention_mask[:, -1].all()):
        raise BatchGuardError("batch is not left padded: answers would not sit in the last columns")
    is_image = input_ids == image_token_id
    if not torch.equal(inputs["mm_token_type_ids"] == 1, is_image):
        raise BatchGuardError("mm_token_type_ids disagree with the image tokens of input_ids")
    expected = [int(n) for row in image_tokens for n in row]
    grids = inputs.get("image_grid_thw")
    from_grids = [] if grids is None else (grids.prod(-1) // merge_size**2).tolist()
    if from_grids != expected:
        raise BatchGuardError(
            f"image grids give {from_grids} tokens per image, the prompts' images {expected}: images are not in "
            "the order of their placeholders"
        )
    found = [image_token_runs(row) for row in is_image]
    if found != [list(map(int, row)) for row in image_tokens]:
        raise BatchGuardError(
            f"image tokens per row and image {found} != {[list(r) for r in image_tokens]}: images are not in the "
            "order of their placeholders"
        )


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class QwenVLBackend(RewardBackend):
    """`Qwen2_5_VLForConditionalGeneration` + processor as a reward backend.

    Args:
        model, processor: a Qwen2.5-VL model and its processor (stock or `Qwen2_5_VLImageOnlyProcessor`).
        max_new_tokens, num_beams, length_penalty: generation of the short answer (greedy by default; the research
            setting is 5 tokens, 3 beams, length_penalty 0). Sampling is never used and repetition_penalty is 1.0,
            whatever the checkpoint's generation_config says.
        stop_strings: the reply is cut at the first of these, then stripped (`postprocess_answer`).
        batch_size: prompts per model call; `candidate_batch_size`: (prompt, answer) continuations per call.
        max_pixels, min_pixels: image pixel bounds (None: the processor's own); they change token counts and hence
            scores, so they are in `identity`.
        include_end: add `<|im_end|>` to each scored answer (P(the reply is exactly this answer) instead of
            P(the reply starts with it)). An empty answer is always scored as log p(<|im_end|>), never as 0.
        vision_cache_size: images kept in the vision-feature cache (0: run the vision tower on every call, through
            the plain processor path).
        shared_prefill: score all candidates of a prompt (and the greedy answer) from one prefill; False scores
            each (prompt, answer) as one full sequence.
        bucketing: batch only prompts with the same number of images (False: batches in input order, mixed).
        model_name, revision: recorded in `identity` (default: the model's `name_or_path`).
    """

    def __init__(
        self,
        model: Qwen2_5_VLForConditionalGeneration,
        processor: ProcessorMixin,
        max_new_tokens: int = 5,
        num_beams: int = 1,
        batch_size: int = 16,
        max_pixels: int | None = None,
        min_pixels: int | None = None,
        include_end: bool = False,
        prompt_format: PromptFormat | None = None,
        stop_strings: Sequence[str] = RESEARCH_STOP_STRINGS,
        length_penalty: float = 1.0,
        vision_cache_size: int = 512,
        shared_prefill: bool = True,
        candidate_batch_size: int = 64,
        bucketing: bool = True,
        model_name: str | None = None,
        revision: str | None = None,
        progress: bool = False,
    ):
        if max_new_tokens < 1 or num_beams < 1 or batch_size < 1 or candidate_batch_size < 1:
            raise ValueError("max_new_tokens, num_beams, batch_size and candidate_batch_size must be >= 1")
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.prompt_format = prompt_format if prompt_format is not None else PromptFormat()
        self.max_new_tokens = max_new_tokens
        self.num_beams = num_beams
        self.length_penalty = float(length_penalty)
        self.batch_size = batch_size
        self.candidate_batch_size = candidate_batch_size
        self.include_end = include_end
        self.stop_strings = tuple(stop_strings)
        self.shared_prefill = shared_prefill
        self.bucketing = bucketing
        self.progress = progress
        self.model_name = model_name or getattr(model, "name_or_path", "") or ""
        self.revision = revision if revision is not None else getattr(model.config, "_commit_hash", None)

        size = dict(processor.image_processor.size)
        self.min_pixels = int(min_pixels if min_pixels is not None else size["shortest_edge"])
        self.max_pixels = int(max_pixels if max_pixels is not None else size["longest_edge"])
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got {self.min_pixels}, {self.max_pixels}")
        self._size = {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}
        self.merge_size = int(processor.image_processor.merge_size)

        self.image_token = processor.image_token
        self.image_token_id = int(processor.image_token_id)
        self.eos_token_id = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        if self.eos_token_id is None or self.eos_token_id == self.tokenizer.unk_token_id:
            raise ValueError("the tokenizer has no <|im_end|> token")
        self.pad_token_id = self.tokenizer.pad_token_id
        if self.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token")

        self.vision_cache = VisionFeatureCache(vision_cache_size) if vision_cache_size > 0 else None
        self._generation_config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            min_new_tokens=0,
            num_beams=num_beams,
            num_return_sequences=1,
            do_sample=False,
            repetition_penalty=1.0,
            length_penalty=self.length_penalty,
            early_stopping=False,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            use_cache=True,
        )
        self._lock = threading.RLock()  # the model keeps rope_deltas as module state: one call at a time
        self._identity = self._build_identity()
        self.stats = {"empty_answers": 0, "model_calls": 0, "prompts_prefilled": 0}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        dtype: torch.dtype | str | None = None,
        attn_implementation: str = "sdpa",
        device: str | torch.device | None = None,
        revision: str | None = None,
        processor: ProcessorMixin | None = None,
        model_kwargs: dict | None = None,
        **backend_kwargs,
    ) -> QwenVLBackend:
        """Load a checkpoint (Hub id or local path). `dtype` None: float32 on CPU (exact batched == single
        parity), bfloat16 on CUDA (about 0.2 nats of batch-composition noise; pass float32 for exact scores)."""
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        elif isinstance(dtype, str) and dtype != "auto":
            dtype = getattr(torch, dtype)
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            name_or_path,
            dtype=dtype,
            attn_implementation=attn_implementation,
            revision=revision,
            device_map=str(device),
            **(model_kwargs or {}),
        ).eval()
        if processor is None:
            processor = load_qwen2_5_vl_processor(name_or_path, **({"revision": revision} if revision else {}))
        return cls(model, processor, model_name=str(name_or_path), revision=revision, **backend_kwargs)

    # ------------------------------------------------------------------ identity
    def _build_identity(self) -> dict:
        # A weight fingerprint tells unnamed (random, fine-tuned in place) models apart; exact values only (no sums),
        # so the same checkpoint in the same dtype gets the same identity on every device and process.
        fingerprint = stable_hash(
            [
                (name, list(p.shape), p.detach().flatten()[:16].float().cpu().tolist())
                for name, p in sorted(self.model.named_parameters())
            ]
        )
        return {
            "backend": "qwen2_5_vl_hf",
            "model": self.model_name,
            "revision": self.revision,
            "weights": fingerprint,
            "dtype": str(self.model.dtype).replace("torch.", ""),
            "attn_implementation": self.model.config._attn_implementation,
            "chat_template": stable_hash(self.processor.chat_template or self.tokenizer.chat_template or ""),
            "tokenizer": [type(self.tokenizer).__name__, len(self.tokenizer)],
            "prompt_format": self.prompt_format.identity(),
            "generation": generation_identity(
                self.max_new_tokens, self.num_beams, self.length_penalty, "<|im_end|>", self.stop_strings
            ),
            "min_pixels": self.min_pixels,
            "max_pixels": self.max_pixels,
            "image_processor": image_processing_identity(self.processor.image_processor),
            "include_end": self.include_end,
        }

    @property
    def identity(self) -> dict:
        return dict(self._identity)

    # ------------------------------------------------------------------ public API
    @torch.inference_mode()
    def answer(self, prompts: Sequence[InContextPrompt]) -> list[str]:
        with self._lock:
            answers: list[str | None] = [None] * len(prompts)
            for rows in self._buckets(prompts):
                inputs = self._encode([self._render(prompts[i]) for i in rows], [prompts[i] for i in rows])
                for row, text in zip(rows, self._generate(inputs)):
                    answers[row] = text
            return answers

    @torch.inference_mode()
    def answer_logprob(
        self, prompts: Sequence[InContextPrompt], answers: Sequence[Sequence[str]]
    ) -> list[list[float]]:
        self._check_lengths(prompts, answers)
        with self._lock:
            if self.shared_prefill:
                return self._prefill_path(prompts, answers, with_greedy=False)[1]
            return self._full_sequence_path(prompts, answers)

    @torch.inference_mode()
    def answer_and_logprob(
        self, prompts: Sequence[InContextPrompt], answers: Sequence[Sequence[str]]
    ) -> tuple[list[str], list[list[float]]]:
        """One prefill per prompt gives the greedy answer and every candidate's log-prob (greedy decoding only;
        with beams the answer comes from `generate`, the log-probs still from one shared prefill)."""
        self._check_lengths(prompts, answers)
        with self._lock:
            if self.shared_prefill and self.num_beams == 1:
                greedy, scores = self._prefill_path(prompts, answers, with_greedy=True)
                return greedy, scores
            generated = self.answer(prompts)
            return generated, self.answer_logprob(prompts, answers)

    # ------------------------------------------------------------------ prompt rendering and encoding
    def _render(self, prompt: InContextPrompt) -> str:
        """The chat-templated prompt text (one placeholder per image, not yet expanded)."""
        text = self.processor.apply_chat_template(
            self.prompt_format.messages(prompt), tokenize=False, add_generation_prompt=True
        )
        if text.count(self.image_token) != len(prompt.items):
            raise BatchGuardError(
                f"prompt {prompt.key} renders {text.count(self.image_token)} image placeholders for "
                f"{len(prompt.items)} images"
            )
        return text

    def _buckets(self, prompts: Sequence[InContextPrompt]) -> Iterator[list[int]]:
        """Batches of prompt positions. With `bucketing`, one image count per batch: a 0-shot row next to a 4-shot
        row is mostly padding, and padded attention is the costliest part of a batch (2x on CPU here)."""
        if self.bucketing:
            by_count: dict[int, list[int]] = {}
            for i, prompt in enumerate(prompts):
                by_count.setdefault(len(prompt.items), []).append(i)
            groups = [rows for _, rows in sorted(by_count.items())]
        else:
            groups = [list(range(len(prompts)))]
        chunks = [list(chunk) for rows in groups for chunk in _chunks(rows, self.batch_size)]
        yield from tqdm(chunks, desc="scoring", disable=not self.progress or len(chunks) < 2)

    def _encode(self, texts: list[str], prompts: Sequence[InContextPrompt]) -> dict:
        """Model inputs for `texts` (prompt i's text, possibly followed by an answer) with prompt i's images, left
        padded and checked by `check_model_inputs`."""
        if self.vision_cache is None:
            images = [self.prompt_format.images(p) for p in prompts]
            image_tokens = [[self._image_tokens(image) for image in row] for row in images]
            inputs = dict(
                self.processor(
                    text=texts, images=[image for row in images for image in row], padding=True,
                    padding_side="left", size=self._size, return_tensors="pt",
                )
            )
        else:
            grids, features = self._image_features(prompts)
            flat_tokens = [int(g.prod() // self.merge_size**2) for g in grids]
            replacements = [self.image_token * n for n in flat_tokens]
            expanded, _ = self.processor.get_text_with_replacements(list(texts), images_replacements=replacements)
            inputs = dict(self.tokenizer(expanded, padding=True, padding_side="left", return_tensors="pt"))
            inputs["mm_token_type_ids"] = torch.tensor(
                self.processor.create_mm_token_type_ids(inputs["input_ids"]), dtype=inputs["input_ids"].dtype
            )
            inputs["image_grid_thw"] = torch.cat(grids)
            inputs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=tuple(features))}
            counts = [len(p.items) for p in prompts]
            starts = [sum(counts[:i]) for i in range(len(counts))]
            image_tokens = [flat_tokens[s : s + c] for s, c in zip(starts, counts)]
        inputs.pop("token_type_ids", None)
        check_model_inputs(inputs, image_tokens, self.image_token_id, self.merge_size)
        device = self.model.device
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}

    def _image_tokens(self, image) -> int:
        """Image tokens of one image at this backend's pixel bounds, from its size alone."""
        width, height = image.size
        bounds = {"min_pixels": self.min_pixels, "max_pixels": self.max_pixels}
        patches = self.processor.image_processor.get_number_of_image_patches(height, width, bounds)
        return patches // self.merge_size**2

    def _image_features(self, prompts: Sequence[InContextPrompt]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Grids and vision features of every image of `prompts`, in placeholder order; the vision tower runs once
        per image not yet cached (all misses of the batch in one call)."""
        keys = [(item.image_key, self.min_pixels, self.max_pixels) for p in prompts for item in p.items]
        found = {}
        missing: dict = {}  # key -> (prompt index, image position)
        for i, p in enumerate(prompts):
            for j, item in enumerate(p.items):
                key = (item.image_key, self.min_pixels, self.max_pixels)
                if key in found or key in missing:
                    continue
                value = self.vision_cache.get(key)
                if value is None:
                    missing[key] = (i, j)
                else:
                    found[key] = value
        if missing:
            loaded: dict[int, list] = {}
            images = []
            for i, j in missing.values():
                if i not in loaded:
                    loaded[i] = self.prompt_format.images(prompts[i])
                images.append(loaded[i][j])
            pixels = self.processor.image_processor(images=images, size=self._size, return_tensors="pt")
            grid = pixels["image_grid_thw"]
            feats = self.model.model.get_image_features(
                pixels["pixel_values"].to(self.model.device), grid.to(self.model.device)
            ).pooler_output
            for n, key in enumerate(missing):
                value = (grid[n : n + 1].clone(), feats[n])
                self.vision_cache.put(key, value)
                found[key] = value
        grids = [found[k][0] for k in keys]
        features = [found[k][1] for k in keys]
        return grids, features

    # ------------------------------------------------------------------ answer tokens
    def _answer_ids(self, prompt_text: str, prompt_ids: list[int], answer: str) -> list[int]:
        """Token ids of `answer` as they appear after the prompt (+ `<|im_end|>` with include_end or for an empty
        answer). Raises `AnswerTokenizationError` when prompt + answer does not tokenise as prompt, then answer."""
        if answer == "":
            self.stats["empty_answers"] += 1
            if self.stats["empty_answers"] == 1:
                logger.warning("empty answer scored as log p(<|im_end|>) (the reply being empty), not as 0")
            return [self.eos_token_id]
        ids = self.tokenizer(prompt_text + answer, add_special_tokens=False)["input_ids"]
        tail = ids[len(prompt_ids) :]
        alone = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
        if ids[: len(prompt_ids)] != prompt_ids or tail != alone:
            raise AnswerTokenizationError(f"answer {answer!r} merges with the end of the prompt when tokenised")
        return tail + [self.eos_token_id] if self.include_end else tail

    def _end_text(self, answer: str) -> str:
        """What follows the answer in a scored full sequence (must agree with `_answer_ids`)."""
        return "<|im_end|>" if self.include_end or answer == "" else ""

    @staticmethod
    def _check_lengths(prompts, answers) -> None:
        if len(prompts) != len(answers):
            raise ValueError(f"{len(prompts)} prompts but {len(answers)} answer lists")
        if any(isinstance(a, str) for a in answers):
            raise TypeError("answers must be one list of candidate strings per prompt")

    # ------------------------------------------------------------------ scoring paths
    def _full_sequence_path(
        self, prompts: Sequence[InContextPrompt], answers: Sequence[Sequence[str]]
    ) -> list[list[float]]:
        """One forward of prompt + answer per distinct (prompt, answer); the answer is the last n columns."""
        texts = [self._render(p) for p in prompts]
        pairs = []  # (prompt index, answer, answer ids)
        for i, (text, cands) in enumerate(zip(texts, answers)):
            prompt_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            for answer in dict.fromkeys(cands):
                pairs.append((i, answer, self._answer_ids(text, prompt_ids, answer)))
        scores: dict[tuple[int, str], float] = {}
        for chunk in self._buckets([prompts[i] for i, _, _ in pairs]):
            chunk_pairs = [pairs[k] for k in chunk]
            full_texts = [texts[i] + answer + self._end_text(answer) for i, answer, _ in chunk_pairs]
            inputs = self._encode(full_texts, [prompts[i] for i, _, _ in chunk_pairs])
            n_max = max(len(ids) for _, _, ids in chunk_pairs)
            logits = self._forward(inputs, use_cache=False, logits_to_keep=n_max + 1).logits
            logprobs = logits.float().log_softmax(-1)
            kept = logprobs.shape[1]
            for row, (i, answer, ids) in enumerate(chunk_pairs):
                n = len(ids)
                target = inputs["input_ids"][row, -n:]
                if target.tolist() != ids:
                    raise AnswerTokenizationError(f"the last {n} tokens of row {row} are not the answer {answer!r}")
                picked = logprobs[row, kept - n - 1 : kept - 1].gather(-1, target[:, None])
                scores[(i, answer)] = float(picked.sum())
        return [[scores[(i, a)] for a in cands] for i, cands in enumerate(answers)]

    def _prefill_path(
        self, prompts: Sequence[InContextPrompt], answers: Sequence[Sequence[str]], with_greedy: bool
    ) -> tuple[list[str] | None, list[list[float]]]:
        """Per batch: one prefill of the prompts, then every distinct candidate continued from the KV cache, then
        (optionally) greedy decoding on the same cache."""
        greedy: list[str | None] = [None] * len(prompts)
        scores: list[list[float] | None] = [None] * len(prompts)
        for rows in self._buckets(prompts):
            texts = [self._render(prompts[i]) for i in rows]
            inputs = self._encode(texts, [prompts[i] for i in rows])
            positions, _ = self.model.model.get_rope_index(
                inputs["input_ids"], inputs["mm_token_type_ids"], inputs.get("image_grid_thw"),
                attention_mask=inputs["attention_mask"],
            )
            next_position = positions.amax(dim=(0, 2)) + 1  # [B]: the first answer token's rope position
            cache = DynamicCache(config=self.model.config)
            out = self._forward(inputs, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1)
            first_logits = out.logits[:, -1].float()
            self.stats["prompts_prefilled"] += len(rows)

            pairs = []  # (batch row, ids)
            slots = []  # per row: list of pair index per candidate
            for b, (i, text) in enumerate(zip(rows, texts)):
                prompt_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                distinct = {}
                for answer in answers[i]:
                    if answer not in distinct:
                        distinct[answer] = len(pairs)
                        pairs.append((b, self._answer_ids(text, prompt_ids, answer)))
                slots.append([distinct[a] for a in answers[i]])
            mask = inputs["attention_mask"]
            pair_scores = self._score_continuations(cache, first_logits, mask, next_position, pairs)
            for b, i in enumerate(rows):
                scores[i] = [pair_scores[k] for k in slots[b]]
            if with_greedy:
                decoded = self._greedy_decode(cache, first_logits, mask, next_position)
                for b, text in enumerate(decoded):
                    greedy[rows[b]] = text
        return (greedy if with_greedy else None), scores

    def _score_continuations(
        self,
        cache: DynamicCache,
        first_logits: torch.Tensor,
        prompt_mask: torch.Tensor,
        next_position: torch.Tensor,
        pairs: list[tuple[int, list[int]]],
    ) -> list[float]:
        """Summed log-prob of each (row, token ids): the first token from the prefill's last logits, the rest from
        one forward of the (right-padded) continuations on a per-pair copy of the row's KV cache."""
        first_logprobs = first_logits.log_softmax(-1)
        scores = [float(first_logprobs[b, ids[0]]) for b, ids in pairs]
        longer = [k for k, (_, ids) in enumerate(pairs) if len(ids) > 1]
        for chunk in _chunks(longer, self.candidate_batch_size):
            rows = torch.tensor([pairs[k][0] for k in chunk], device=prompt_mask.device)
            width = max(len(pairs[k][1]) - 1 for k in chunk)
            tokens = torch.full((len(chunk), width), self.pad_token_id, dtype=torch.long, device=prompt_mask.device)
            mask = torch.zeros((len(chunk), width), dtype=prompt_mask.dtype, device=prompt_mask.device)
            for j, k in enumerate(chunk):
                ids = pairs[k][1]
                tokens[j, : len(ids) - 1] = torch.tensor(ids[:-1])
                mask[j, : len(ids) - 1] = 1
            sub_cache = DynamicCache(
                ddp_cache_data=[(layer.keys[rows], layer.values[rows]) for layer in cache.layers],
                config=self.model.config,
            )
            positions = next_position[rows, None] + torch.arange(width, device=rows.device)
            logits = self.model(
                input_ids=tokens,
                attention_mask=torch.cat([prompt_mask[rows], mask], dim=1),
                position_ids=positions[None].expand(3, -1, -1),
                cache=sub_cache,
                use_cache=True,
            ).logits
            self.stats["model_calls"] += 1
            logprobs = logits.float().log_softmax(-1)
            for j, k in enumerate(chunk):
                ids = pairs[k][1]
                target = torch.tensor(ids[1:], device=logprobs.device)
                scores[k] += float(logprobs[j, : len(ids) - 1].gather(-1, target[:, None]).sum())
        return scores

    def _greedy_decode(
        self, cache: DynamicCache, first_logits: torch.Tensor, prompt_mask: torch.Tensor, next_position: torch.Tensor
    ) -> list[str]:
        """Greedy decoding continued from the prefill (identical to `generate` with num_beams=1)."""
        token = first_logits.argmax(-1)
        finished = token == self.eos_token_id
        generated = [token]
        mask = prompt_mask
        for step in range(1, self.max_new_tokens):
            if bool(finished.all()):
                break
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
            positions = (next_position + step - 1)[None, :, None].expand(3, -1, 1)
            logits = self.model(
                input_ids=token[:, None], attention_mask=mask, position_ids=positions, cache=cache,
                use_cache=True, logits_to_keep=1,
            ).logits[:, -1]
            self.stats["model_calls"] += 1
            token = torch.where(finished, torch.full_like(token, self.pad_token_id), logits.argmax(-1))
            generated.append(token)
            finished |= token == self.eos_token_id
        return self._decode(torch.stack(generated, dim=1))

    def _generate(self, inputs: dict) -> list[str]:
        with self._clean_generation_config():
            out = self.model.generate(**inputs, generation_config=self._generation_config)
        self.stats["model_calls"] += 1
        return self._decode(out[:, inputs["input_ids"].shape[1] :])

    def _decode(self, new_tokens: torch.Tensor) -> list[str]:
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [postprocess_answer(t, self.stop_strings) for t in texts]

    def _forward(self, inputs: dict, **kwargs):
        if inputs.get("mm_token_type_ids") is None:  # re-checked here: nothing reaches the model without it
            raise BatchGuardError("mm_token_type_ids is missing")
        self.stats["model_calls"] += 1
        return self.model(**inputs, **kwargs)

    @contextlib.contextmanager
    def _clean_generation_config(self):
        """`generate` fills every unset option from the model's generation_config (Qwen checkpoints ship
        sampling settings and repetition_penalty 1.05); swap in a blank one for the call."""
        saved = self.model.generation_config
        self.model.generation_config = GenerationConfig(eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id)
        try:
            yield
        finally:
            self.model.generation_config = saved
