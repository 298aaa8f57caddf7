"""vLLM scoring backend: the same interface as `QwenVLBackend`, on vLLM's offline engine or on an OpenAI-compatible
vLLM server (scoring on other GPUs or machines).

    # on the scoring machine
    vllm serve Qwen/Qwen2.5-VL-3B-Instruct --port 8000 --limit-mm-per-prompt '{"image": 9}' --generation-config vllm
    # in the training process
    backend = VLLMBackend("Qwen/Qwen2.5-VL-3B-Instruct", base_url="http://scorer:8000")

Answers: greedy (temperature 0, repetition_penalty 1.0 whatever the checkpoint's generation_config says), or vLLM
beam search with `num_beams > 1`; the reply is cut at the stop strings and stripped like the HF backend's.

Answer log-probs, from the prompt log-probs of a prompt that ENDS with the answer (no generation is scored):
messages = [system, user(images + text), assistant(answer)] rendered with `continue_final_message=True,
add_generation_prompt=False`, `prompt_logprobs=1`, one completion token. The answer's tokens are the last n prompt
tokens: their ids (from the server's `/tokenize` endpoint or a local tokenizer) are checked against the tail of
`prompt_token_ids`, and the n log-probs are summed. With `include_end` (or for an empty answer) the assistant
message is closed instead and the answer plus `<|im_end|>` is located just before the template's trailing tokens.
Requests with prompt log-probs do not read vLLM's prefix cache, so each one pays a full prefill.

`vllm` itself is imported only when the offline engine is used (an optional extra); the server client needs only
the standard library.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPException

from PIL import Image

from .backend import PartialBatchError, RewardBackend
from .prompt import RESEARCH_STOP_STRINGS, InContextPrompt, PromptFormat, generation_identity, postprocess_answer

logger = logging.getLogger(__name__)

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# Engine arguments that change scores (part of `identity`); the rest (memory, parallelism) do not.
# `mm_processor_kwargs` configures vLLM's own image preprocessing (which image processor, pixel bounds).
_SCORE_ENGINE_KWARGS = ("dtype", "quantization", "tokenizer", "tokenizer_revision", "hf_overrides", "max_model_len",
                        "mm_processor_kwargs")


class VLLMRequestError(RuntimeError):
    """A server request that failed for good (after retries, or with a non-retryable status)."""


def image_data_url(image: Image.Image, image_format: str = "png") -> str:
    """A base64 data URL of `image` (PNG: lossless, the pixels the HF backend sees; JPEG: smaller requests)."""
    fmt = "jpeg" if image_format.lower() in ("jpg", "jpeg") else image_format.lower()
    buffer = io.BytesIO()
    image.save(buffer, format=fmt.upper(), **({"quality": 95} if fmt == "jpeg" else {}))
    return f"data:image/{fmt};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def _entry_logprob(entry, token_id: int) -> float | None:
    """The log-prob of `token_id` in one prompt-log-prob entry: a mapping keyed by int (engine) or str (JSON) ids,
    whose values are floats, {"logprob": x} dicts or `Logprob` objects."""
    if entry is None:
        return None
    value = None
    for key in (token_id, str(token_id)):
        try:
            value = entry[key]
        except (KeyError, IndexError, TypeError):
            continue
        break
    if value is None:
        return None
    if isinstance(value, Mapping):
        value = value.get("logprob")
    elif not isinstance(value, (int, float)):
        value = getattr(value, "logprob", None)
    return None if value is None else float(value)


def answer_span_logprob(
    prompt_token_ids: Sequence[int] | None,
    prompt_logprobs: Sequence | None,
    target_ids: Sequence[int],
    open_end: bool = True,
    max_trailing: int = 4,
) -> float:
    """Sum of the prompt log-probs of `target_ids` (the answer's tokens) inside a scored prompt.

    `open_end`: the prompt ends with the target (an open final message); otherwise the target is the last
    occurrence that ends at most `max_trailing` tokens before the end (a closed message, e.g. answer + <|im_end|>
    followed by the template's newline). Raises ValueError when the target cannot be located or a log-prob is
    missing: a mis-aligned span must never become a score.
    """
    target = list(target_ids)
    n = len(target)
    if n == 0:
        raise ValueError("no answer tokens to score")
    if prompt_logprobs is None:
        raise ValueError("the response has no prompt_logprobs (is this a vLLM server?)")
    total_positions = len(prompt_logprobs)
    if prompt_token_ids is not None:
        ids = list(prompt_token_ids)
        if len(ids) != total_positions:
            raise ValueError(f"{len(ids)} prompt tokens but {total_positions} prompt log-prob entries")
        ends = [len(ids)] if open_end else range(len(ids), max(len(ids) - max_trailing, n) - 1, -1)
        end = next((e for e in ends if ids[e - n : e] == target), None)
        if end is None:
            tail = ids[-n - max_trailing :]
            raise ValueError(f"answer tokens {target} not found at the end of the prompt (tail {tail})")
    elif open_end:
        end = total_positions  # no ids returned: the membership check below still guards the alignment
    else:
        raise ValueError("locating a closed answer needs prompt_token_ids (request them with return_token_ids)")
    if end - n < 1:
        raise ValueError("the answer starts the prompt: its first token has no log-prob")
    total = 0.0
    for offset, token in enumerate(target):
        position = end - n + offset
        value = _entry_logprob(prompt_logprobs[position], token)
        if value is None:
            raise ValueError(f"token {token} has no log-prob at prompt position {position} (mis-aligned answer)")
        total += value
    return total


class VLLMBackend(RewardBackend):
    """A `RewardBackend` on vLLM: an OpenAI-compatible server (`base_url`) or the offline engine (`llm`, or one
    built from `model` and `engine_kwargs` on first use). See the module docstring for how answers are scored.

    Args:
        model: the served model name (server) / the checkpoint (offline engine); part of `identity`.
        base_url: the server, e.g. "http://host:8000" (a trailing "/v1" is accepted). None = offline engine.
        llm: a ready `vllm.LLM` (offline).
        prompt_format, max_new_tokens, num_beams, length_penalty, stop_strings, max_pixels, min_pixels,
            include_end: as in `QwenVLBackend` (same defaults), so both backends score the same prompts.
        image_format: how images travel to the server ("png" = lossless; part of `identity`).
        tokenizer: a local tokenizer for answer token ids (must be the served model's); None = the server's
            `/tokenize` endpoint (results are cached per answer).
        api_key: sent as a bearer token.
        timeout, max_retries, retry_backoff: per-request timeout (s); retries of connection errors and
            408/429/5xx answers with exponential backoff (s).
        max_workers: concurrent requests.
        revision, extra_identity: recorded in `identity` (e.g. {"dtype": "bfloat16"} for what the server runs).
            Images are preprocessed by vLLM, not by this client: record a server's image-processing settings here
            (e.g. {"image_processor_backend": "pil"}) so caches of differently configured servers never
            mix; the offline engine's `engine_kwargs["mm_processor_kwargs"]` is recorded automatically.
        engine_kwargs: `vllm.LLM(**engine_kwargs)` for the offline engine (default image limit: 9 per prompt).
    """

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        *,
        llm=None,
        prompt_format: PromptFormat | None = None,
        max_new_tokens: int = 5,
        num_beams: int = 1,
        length_penalty: float = 1.0,
        stop_strings: Sequence[str] = RESEARCH_STOP_STRINGS,
        max_pixels: int | None = None,
        min_pixels: int | None = None,
        include_end: bool = False,
        image_format: str = "png",
        tokenizer=None,
        end_token: str = "<|im_end|>",
        api_key: str | None = None,
        timeout: float = 300.0,
        max_retries: int = 3,
        retry_backoff: float = 1.0,
        max_workers: int = 16,
        image_cache_size: int = 256,
        revision: str | None = None,
        extra_identity: Mapping | None = None,
        engine_kwargs: Mapping | None = None,
    ):
        if max_new_tokens < 1 or num_beams < 1 or max_workers < 1:
            raise ValueError("max_new_tokens, num_beams and max_workers must be >= 1")
        if base_url is not None and llm is not None:
            raise ValueError("give either base_url (server) or llm (offline engine), not both")
        self.model = model
        self.base_url = None if base_url is None else _server_root(base_url)
        self.prompt_format = prompt_format if prompt_format is not None else PromptFormat()
        self.max_new_tokens = max_new_tokens
        self.num_beams = num_beams
        self.length_penalty = float(length_penalty)
        self.stop_strings = tuple(stop_strings)
        self.max_pixels = max_pixels
        self.min_pixels = min_pixels
        self.include_end = include_end
        self.image_format = image_format
        self.end_token = end_token
        self.api_key = api_key
        self.timeout = timeout
        self.max_retries = max_retries
        self.retry_backoff = retry_backoff
        self.max_workers = max_workers
        self.revision = revision
        self.extra_identity = dict(extra_identity or {})
        self.engine_kwargs = dict(engine_kwargs or {})
        self._llm = llm
        self._tokenizer = tokenizer
        self._token_cache: dict[str, list[int]] = {}
        self._images: OrderedDict[str, str] = OrderedDict()
        self._image_cache_size = image_cache_size
        self._lock = threading.Lock()
        self.stats = {"requests": 0, "retries": 0}

    # ------------------------------------------------------------------------------------------------ identity
    @property
    def identity(self) -> dict:
        engine = {k: str(self.engine_kwargs[k]) for k in _SCORE_ENGINE_KWARGS if k in self.engine_kwargs}
        return {
            "backend": "vllm",
            "model": self.model,
            "revision": self.revision,
            "engine": engine,
            "prompt_format": self.prompt_format.identity(),
            "generation": generation_identity(
                self.max_new_tokens, self.num_beams, self.length_penalty, self.end_token, self.stop_strings
            ),
            "min_pixels": self.min_pixels,
            "max_pixels": self.max_pixels,
            "include_end": self.include_end,
            "image_format": self.image_format,
            **self.extra_identity,
        }

    # ------------------------------------------------------------------------------------------------ public API
    def answer(self, prompts: Sequence[InContextPrompt]) -> list[str]:
        return self._complete(prompts, None)[0]

    def answer_logprob(self, prompts: Sequence[InContextPrompt], answers: Sequence[Sequence[str]]) -> list[list[float]]:
        return self._complete(prompts, answers, want_answers=False)[1]

    def answer_and_logprob(
        self, prompts: Sequence[InContextPrompt], answers: Sequence[Sequence[str]]
    ) -> tuple[list[str], list[list[float]]]:
        return self._complete(prompts, answers)

    def _complete(self, prompts, answers, want_answers: bool = True):
        """Run the answer and/or log-prob requests of `prompts`; rows that failed raise `PartialBatchError` with
        the other rows' results."""
        if answers is not None:
            if len(answers) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {len(answers)} answer lists")
            if any(isinstance(a, str) for a in answers):
                raise TypeError("answers must be one list of candidate strings per prompt")
        run = self._run_server if self.base_url is not None else self._run_engine
        replies, scores, errors = run(prompts, answers, want_answers)
        if errors:
            none = [None] * len(prompts)
            raise PartialBatchError(replies, scores if scores is not None else none, errors)
        return replies, scores

    # ------------------------------------------------------------------------------------------- shared pieces
    @property
    def _mm_processor_kwargs(self) -> dict | None:
        kwargs = {k: v for k, v in (("min_pixels", self.min_pixels), ("max_pixels", self.max_pixels)) if v is not None}
        return kwargs or None

    def _scored_messages(self, messages: list[dict], answer: str) -> tuple[list[dict], bool]:
        """Messages ending with the assistant's answer, and whether the final message stays open. The answer is
        stripped: chat templating strips an open final message, so surrounding spaces could never be scored."""
        answer = answer.strip()
        open_end = answer != "" and not self.include_end
        return messages + [{"role": "assistant", "content": answer}], open_end

    def _target_ids(self, answer: str, open_end: bool) -> list[int]:
        answer = answer.strip()
        ids = self._token_ids(answer) if answer else []
        return ids if open_end else ids + self._token_ids(self.end_token)

    def _token_ids(self, text: str) -> list[int]:
        with self._lock:
            cached = self._token_cache.get(text)
        if cached is not None:
            return cached
        if self._tokenizer is not None:
            ids = list(self._tokenizer(text, add_special_tokens=False)["input_ids"])
        elif self.base_url is not None:
            reply = self._post("/tokenize", {"model": self.model, "prompt": text, "add_special_tokens": False})
            ids = [int(t) for t in reply["tokens"]]
        else:
            ids = list(self._engine_tokenizer()(text, add_special_tokens=False)["input_ids"])
        with self._lock:
            self._token_cache[text] = ids
        return ids

    def _postprocess(self, text: str | None) -> str:
        text = text or ""
        if text.endswith(self.end_token):
            text = text[: -len(self.end_token)]
        return postprocess_answer(text, self.stop_strings)

    # -------------------------------------------------------------------------------------------------- server
    def _run_server(self, prompts, answers, want_answers):
        replies: list[str | None] = [None] * len(prompts)
        scores: list[list[float] | None] = [None] * len(prompts)
        errors: dict[int, BaseException] = {}
        tasks: list[tuple[int, int | None, Callable]] = []  # (row, answer index or None, request)
        for row, prompt in enumerate(prompts):
            try:
                messages = self._server_messages(prompt)
            except Exception as err:  # noqa: BLE001  (an unreadable image fails its row only)
                errors[row] = err
                continue
            if want_answers:
                tasks.append((row, None, lambda m=messages: self._server_answer(m)))
            for k, answer in enumerate(answers[row] if answers is not None else []):
                tasks.append((row, k, lambda m=messages, a=answer: self._server_logprob(m, a)))
            if answers is not None:
                scores[row] = [float("nan")] * len(answers[row])
        with ThreadPoolExecutor(max_workers=self.max_workers) as pool:
            if answers is not None:  # one /tokenize round per distinct string, before the requests that need it
                strings = {a.strip() for row, cands in enumerate(answers) if row not in errors for a in cands}
                strings.discard("")
                if self.include_end or any(not a.strip() for cands in answers for a in cands):
                    strings.add(self.end_token)
                for string, future in [(s, pool.submit(self._token_ids, s)) for s in sorted(strings)]:
                    try:
                        future.result()
                    except Exception:  # noqa: BLE001  (reported by the rows that need it)
                        logger.debug("tokenizing %r failed", string, exc_info=True)
            futures = [(row, k, pool.submit(request)) for row, k, request in tasks]
            for row, k, future in futures:
                try:
                    value = future.result()
                except Exception as err:  # noqa: BLE001
                    errors.setdefault(row, err)
                    continue
                if k is None:
                    replies[row] = value
                else:
                    scores[row][k] = value
        for row in errors:
            replies[row], scores[row] = None, None
        return replies, (scores if answers is not None else None), errors

    def _server_messages(self, prompt: InContextPrompt) -> list[dict]:
        """The prompt's chat messages with each image placeholder replaced by the image as a data URL."""
        urls = iter([self._data_url(item) for item in prompt.items])
        messages = []
        for message in self.prompt_format.messages(prompt):
            content = [
                {"type": "image_url", "image_url": {"url": next(urls)}} if part.get("type") == "image" else part
                for part in message["content"]
            ]
            messages.append({"role": message["role"], "content": content})
        if next(urls, None) is not None:
            raise ValueError(f"prompt {prompt.key}: fewer image placeholders than images")
        return messages

    def _data_url(self, item) -> str:
        key = item.image_key
        with self._lock:
            url = self._images.get(key)
            if url is not None:
                self._images.move_to_end(key)
                return url
        url = image_data_url(item.image, self.image_format)  # ImageLoadError for a missing image
        with self._lock:
            self._images[key] = url
            while len(self._images) > self._image_cache_size:
                self._images.popitem(last=False)
        return url

    def _request_base(self) -> dict:
        payload = {"model": self.model, "temperature": 0.0, "repetition_penalty": 1.0}
        if self._mm_processor_kwargs:
            payload["mm_processor_kwargs"] = self._mm_processor_kwargs
        return payload

    def _server_answer(self, messages: list[dict]) -> str:
        payload = self._request_base() | {"messages": messages, "max_completion_tokens": self.max_new_tokens}
        if self.num_beams > 1:
            payload |= {"use_beam_search": True, "n": self.num_beams, "length_penalty": self.length_penalty}
        else:
            payload |= {"n": 1, "stop": list(self.stop_strings)}
        reply = self._post("/v1/chat/completions", payload)
        return self._postprocess(reply["choices"][0]["message"].get("content"))

    def _server_logprob(self, messages: list[dict], answer: str) -> float:
        scored, open_end = self._scored_messages(messages, answer)
        payload = self._request_base() | {
            "messages": scored,
            "continue_final_message": open_end,
            "add_generation_prompt": False,
            "prompt_logprobs": 1,
            "max_completion_tokens": 1,
            "return_token_ids": True,
        }
        reply = self._post("/v1/chat/completions", payload)
        target = self._target_ids(answer, open_end)
        return answer_span_logprob(reply.get("prompt_token_ids"), reply.get("prompt_logprobs"), target, open_end)

    def _count(self, name: str) -> None:
        with self._lock:
            self.stats[name] += 1

    def _post(self, path: str, payload: dict) -> dict:
        data = json.dumps(payload).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        url = self.base_url + path
        for attempt in range(self.max_retries + 1):
            request = urllib.request.Request(url, data=data, headers=headers, method="POST")
            self._count("requests")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read().decode("utf-8"))
            except urllib.error.HTTPError as err:
                body = err.read().decode("utf-8", "replace")[:500]
                if err.code not in RETRY_STATUS or attempt == self.max_retries:
                    raise VLLMRequestError(f"POST {url}: HTTP {err.code}: {body}") from None
                reason = f"HTTP {err.code}"
            except (urllib.error.URLError, HTTPException, ConnectionError, TimeoutError) as err:
                if attempt == self.max_retries:
                    raise VLLMRequestError(f"POST {url}: {err}") from err
                reason = repr(err)
            self._count("retries")
            delay = self.retry_backoff * 2**attempt
            logger.debug("POST %s failed (%s); retry %d in %.2f s", url, reason, attempt + 1, delay)
            time.sleep(delay)
        raise AssertionError("unreachable")

    # -------------------------------------------------------------------------------------------------- engine
    def _engine(self):
        if self._llm is None:
            from vllm import LLM  # optional dependency, imported only here

            kwargs = {"limit_mm_per_prompt": {"image": 9}} | self.engine_kwargs
            if self.revision is not None:
                kwargs.setdefault("revision", self.revision)
            self._llm = LLM(model=self.model, **kwargs)
        return self._llm

    def _engine_tokenizer(self):
        return self._engine().get_tokenizer()

    def _engine_input(self, messages: list[dict], images: list, add_generation_prompt: bool, open_end: bool) -> dict:
        """A vLLM text prompt with its images: the chat template renders each image part as the model's placeholder
        (Qwen2.5-VL: <|vision_start|><|image_pad|><|vision_end|>), which vLLM expands per image."""
        text = self._engine_tokenizer().apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, continue_final_message=open_end
        )
        request = {"prompt": text, "multi_modal_data": {"image": images}}
        if self._mm_processor_kwargs:
            request["mm_processor_kwargs"] = self._mm_processor_kwargs
        return request

    def _run_engine(self, prompts, answers, want_answers):
        from vllm import SamplingParams  # optional dependency, imported only here

        llm = self._engine()
        errors: dict[int, BaseException] = {}
        rows, messages, images = [], {}, {}
        for row, prompt in enumerate(prompts):
            try:
                images[row] = self.prompt_format.images(prompt)
            except Exception as err:  # noqa: BLE001  (an unreadable image fails its row only)
                errors[row] = err
                continue
            messages[row] = self.prompt_format.messages(prompt)
            rows.append(row)

        replies: list[str | None] = [None] * len(prompts)
        if want_answers and rows:
            inputs = [self._engine_input(messages[r], images[r], True, False) for r in rows]
            if self.num_beams > 1:
                texts = self._engine_beam_search(llm, inputs)
            else:
                params = SamplingParams(
                    n=1, temperature=0.0, repetition_penalty=1.0, max_tokens=self.max_new_tokens,
                    stop=list(self.stop_strings) or None,
                )
                texts = [out.outputs[0].text for out in llm.generate(inputs, params, use_tqdm=False)]
            for row, text in zip(rows, texts):
                replies[row] = self._postprocess(text)

        scores: list[list[float] | None] | None = None
        if answers is not None:
            scores = [None] * len(prompts)
            pairs, inputs = [], []  # (row, answer index, target ids, open_end)
            for row in rows:
                scores[row] = [float("nan")] * len(answers[row])
                for k, answer in enumerate(answers[row]):
                    scored, open_end = self._scored_messages(messages[row], answer)
                    try:
                        target = self._target_ids(answer, open_end)
                    except Exception as err:  # noqa: BLE001
                        errors.setdefault(row, err)
                        continue
                    pairs.append((row, k, target, open_end))
                    inputs.append(self._engine_input(scored, images[row], False, open_end))
            if inputs:
                params = SamplingParams(n=1, temperature=0.0, max_tokens=1, prompt_logprobs=1)
                outputs = llm.generate(inputs, params, use_tqdm=False)
                for (row, k, target, open_end), out in zip(pairs, outputs):
                    try:
                        scores[row][k] = answer_span_logprob(
                            out.prompt_token_ids, out.prompt_logprobs, target, open_end
                        )
                    except ValueError as err:
                        errors.setdefault(row, err)
        for row in errors:
            replies[row] = None
            if scores is not None:
                scores[row] = None
        return replies, scores, errors

    def _engine_beam_search(self, llm, inputs: list[dict]) -> list[str]:
        """Best beam of each prompt; only the generated tokens are decoded (`seq.tokens` also holds the prompt)."""
        from vllm.sampling_params import BeamSearchParams

        params = BeamSearchParams(beam_width=self.num_beams, max_tokens=self.max_new_tokens,
                                  length_penalty=self.length_penalty, temperature=0.0)
        tokenizer = self._engine_tokenizer()
        texts = []
        for output in llm.beam_search(inputs, params):
            best = output.sequences[0]
            generated = best.tokens[len(best.tokens) - len(best.logprobs):] if best.logprobs else []
            texts.append(tokenizer.decode(generated, skip_special_tokens=True))
        return texts


def _server_root(base_url: str) -> str:
    root = base_url.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root
