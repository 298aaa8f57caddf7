"""VLLMBackend: the OpenAI-compatible client against a local HTTP server that imitates vLLM (prompt log-probs
included), and the offline-engine request building against a fake `vllm` module (vLLM is not installable here)."""

import base64
import io
import json
import math
import sys
import threading
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
from PIL import Image
from reward_fakes import COLOURS, colour_corpus

from trl_icd.data.corpus import ImageLoadError
from trl_icd.rewards.backend import PartialBatchError
from trl_icd.rewards.in_context import InContextReward
from trl_icd.rewards.prompt import InContextPrompt, PromptFormat, stable_hash
from trl_icd.rewards.vllm import VLLMBackend, answer_span_logprob, image_data_url
from trl_icd.testing.tokenizer import tiny_chat_tokenizer

TOKENIZER = tiny_chat_tokenizer()
END_ID = TOKENIZER.convert_tokens_to_ids("<|im_end|>")


# ---------------------------------------------------------------------------------------------- the imitation
def colour_name(image: Image.Image) -> str:
    pixel = image.convert("RGB").getpixel((image.width // 2, image.height // 2))
    return min(COLOURS, key=lambda name: sum((a - b) ** 2 for a, b in zip(COLOURS[name], pixel)))


def image_term(image: Image.Image) -> float:
    return image.convert("RGB").getpixel((0, 0))[0] / 2550


def token_logprob(previous: int, token: int, images: list) -> float:
    """The imitation's log-prob of `token` after `previous`; it depends on the query image."""
    return -(((token * 7 + previous * 3) % 11) + 1) / 10 - image_term(images[-1])


def prompt_logprobs(ids: list[int], images: list, key=str, wrap=lambda v: {"logprob": v, "rank": 2}) -> list:
    """vLLM's layout: None for the first token, then {actual token: lp, a decoy top-1 token: lp}."""
    out = [None]
    for t in range(1, len(ids)):
        decoy = (ids[t] + 1) % len(TOKENIZER)
        out.append({key(ids[t]): wrap(token_logprob(ids[t - 1], ids[t], images)), key(decoy): wrap(-0.01)})
    return out


def reply_text(images: list, payload: dict) -> str:
    text = colour_name(images[-1]) + ", and more Question: x"
    for stop in payload.get("stop") or []:
        text = text.split(stop)[0]
    return text


def expected_logprob(fmt: PromptFormat, prompt: InContextPrompt, answer: str, include_end: bool = False) -> float:
    """Independent of the client: the answer tokens follow the generation prompt; sum the imitation's log-probs."""
    images = fmt.images(prompt)
    prefix = TOKENIZER.apply_chat_template(fmt.messages(prompt), tokenize=False, add_generation_prompt=True)
    previous = TOKENIZER(prefix, add_special_tokens=False)["input_ids"][-1]
    target = TOKENIZER(answer, add_special_tokens=False)["input_ids"] + ([END_ID] if include_end or not answer else [])
    total = 0.0
    for token in target:
        total += token_logprob(previous, token, images)
        previous = token
    return total


class VLLMImitation(BaseHTTPRequestHandler):
    server_version = "vllm-imitation"

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_POST(self):
        state = self.server.state
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with state["lock"]:
            state["payloads"].append((self.path, payload))
        if self.path == "/tokenize":
            ids = TOKENIZER(payload["prompt"], add_special_tokens=payload.get("add_special_tokens", True))["input_ids"]
            return self._send(200, {"tokens": ids, "count": len(ids), "max_model_len": 4096})
        if self.path != "/v1/chat/completions":
            return self._send(404, {"error": "no route"})
        if payload.get("continue_final_message") and payload.get("add_generation_prompt", True):
            return self._send(400, {"error": "continue_final_message and add_generation_prompt are exclusive"})
        images, messages = [], []
        for message in payload["messages"]:
            content = message["content"]
            if isinstance(content, list):
                parts = []
                for part in content:
                    if part["type"] == "image_url":
                        data = part["image_url"]["url"].split(",", 1)[1]
                        images.append(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))
                        parts.append({"type": "image"})
                    else:
                        parts.append(part)
                content = parts
            messages.append({"role": message["role"], "content": content})
        text = TOKENIZER.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=payload.get("add_generation_prompt", True),
            continue_final_message=payload.get("continue_final_message", False),
        )
        if "FAIL_ALWAYS" in text:
            return self._send(400, {"error": "bad request"})
        if "FAIL_ONCE" in text:
            with state["lock"]:
                first = text not in state["failed_once"]
                state["failed_once"].add(text)
            if first:
                return self._send(503, {"error": "overloaded"})
        ids = TOKENIZER(text, add_special_tokens=False)["input_ids"]
        body = {"id": "chatcmpl-1", "object": "chat.completion", "model": payload["model"]}
        if payload.get("use_beam_search"):
            choices = [reply_text(images, {}) for _ in range(payload.get("n", 1))]
        else:
            choices = [reply_text(images, payload)]
        body["choices"] = [{"index": i, "message": {"role": "assistant", "content": c}} for i, c in enumerate(choices)]
        if payload.get("prompt_logprobs") is not None:
            body["prompt_logprobs"] = prompt_logprobs(ids, images)
        if payload.get("return_token_ids") and not state["old_server"]:
            body["prompt_token_ids"] = ids
        return self._send(200, body)

    def _send(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), VLLMImitation)
    httpd.state = {"lock": threading.Lock(), "payloads": [], "failed_once": set(), "old_server": False}
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def state(server):
    server.state.update(payloads=[], failed_once=set(), old_server=False)
    return server.state


def base_url(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/v1"


def prompts_of(corpus, pairs):
    return [InContextPrompt(corpus[q], tuple(corpus[d] for d in demos)) for q, demos in pairs]


# ------------------------------------------------------------------------------------------------ pure pieces
def test_answer_span_logprob_locates_and_checks_the_answer():
    ids = [5, 6, 7, 8, 9]
    entries = [None] + [{t: -0.1 * t, t + 100: -0.01} for t in ids[1:]]
    assert answer_span_logprob(ids, entries, [8, 9]) == pytest.approx(-1.7)
    json_entries = [None] + [{str(t): {"logprob": -0.1 * t}} for t in ids[1:]]
    assert answer_span_logprob(ids, json_entries, [8, 9]) == pytest.approx(-1.7)
    objects = [None] + [{t: SimpleNamespace(logprob=-0.1 * t)} for t in ids[1:]]
    assert answer_span_logprob(None, objects, [8, 9]) == pytest.approx(-1.7)
    closed = answer_span_logprob(ids + [1, 2], entries + [{1: -1.0}, {2: -1.0}], [8, 9], open_end=False)
    assert closed == pytest.approx(-1.7)
    with pytest.raises(ValueError, match="not found"):
        answer_span_logprob(ids, entries, [7, 9])
    with pytest.raises(ValueError, match="mis-aligned"):
        answer_span_logprob(None, entries, [7, 9])  # without ids the missing token still gives it away
    with pytest.raises(ValueError, match="no answer tokens"):
        answer_span_logprob(ids, entries, [])
    with pytest.raises(ValueError, match="first token"):
        answer_span_logprob(ids, entries, ids)
    with pytest.raises(ValueError, match="prompt_logprobs"):
        answer_span_logprob(ids, None, [9])
    with pytest.raises(ValueError, match="return_token_ids"):
        answer_span_logprob(None, entries, [9], open_end=False)


def test_image_data_url_is_lossless_png():
    image = Image.new("RGB", (5, 3), (1, 2, 3))
    url = image_data_url(image)
    assert url.startswith("data:image/png;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert list(decoded.getdata()) == list(image.getdata())
    assert image_data_url(image, "jpeg").startswith("data:image/jpeg;base64,")


# ------------------------------------------------------------------------------------------------ server client
def test_server_answers_and_logprobs_match_an_independent_computation(server, state):
    corpus = colour_corpus()
    fmt = PromptFormat()
    backend = VLLMBackend("tiny-vl", base_url(server), max_pixels=112 * 112, retry_backoff=0.01)
    prompts = prompts_of(corpus, [(0, [2, 5]), (1, []), (6, [3, 8, 1, 9])])
    answers = [["red", "redish", "square"], ["green"], ["blue", "", " blue "]]
    replies, scores = backend.answer_and_logprob(prompts, answers)
    assert replies == ["red", "green", "blue"]  # the query image decides; the reply is cut at ", "
    for prompt, cands, got in zip(prompts, answers, scores):
        assert got == pytest.approx([expected_logprob(fmt, prompt, a.strip()) for a in cands], abs=1e-9)
    assert scores[0][0] != pytest.approx(scores[0][1])
    assert backend.answer(prompts) == replies
    assert backend.answer_logprob(prompts, answers) == scores

    chats = [p for path, p in state["payloads"] if path == "/v1/chat/completions"]
    generation = [p for p in chats if "prompt_logprobs" not in p]
    scoring = [p for p in chats if "prompt_logprobs" in p]
    for p in generation:
        assert (p["temperature"], p["repetition_penalty"], p["max_completion_tokens"]) == (0.0, 1.0, 5)
        assert p["stop"] == ["Question", "Answer", "Short", ", "]
        assert p["mm_processor_kwargs"] == {"max_pixels": 112 * 112}
        assert p["model"] == "tiny-vl"
    for p in scoring:
        assert p["prompt_logprobs"] == 1 and p["max_completion_tokens"] == 1 and p["add_generation_prompt"] is False
        assert p["messages"][-1]["role"] == "assistant" and p["return_token_ids"] is True
        assert p["continue_final_message"] is (p["messages"][-1]["content"] != "")
    # images travel as data URLs, demonstrations first, query last, pixel-exact
    first = next(p for p in generation if len(p["messages"][1]["content"]) == 6)
    urls = [part["image_url"]["url"] for part in first["messages"][1]["content"] if part["type"] == "image_url"]
    sent = [Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1]))) for u in urls]
    assert [list(i.getdata()) for i in sent] == [list(corpus[k].image.getdata()) for k in (2, 5, 0)]
    assert first["messages"][0]["content"][0]["text"] == fmt.system_text(2)


def test_answer_tokens_come_from_the_tokenize_endpoint_once_each(server, state):
    corpus = colour_corpus()
    backend = VLLMBackend("tiny-vl", base_url(server))
    prompts = prompts_of(corpus, [(0, [2]), (4, [6])])
    backend.answer_logprob(prompts, [["red", "square"], ["red"]])
    backend.answer_logprob(prompts, [["red", "square"], ["red"]])
    tokenized = [p["prompt"] for path, p in state["payloads"] if path == "/tokenize"]
    assert sorted(tokenized) == ["red", "square"]
    remote = backend.answer_logprob(prompts, [["red"], ["red"]])
    local = VLLMBackend("tiny-vl", base_url(server), tokenizer=TOKENIZER)
    state["payloads"].clear()
    assert local.answer_logprob(prompts, [["red"], ["red"]]) == remote
    assert all(path != "/tokenize" for path, _ in state["payloads"])


def test_include_end_and_an_old_server_without_token_ids(server, state):
    corpus = colour_corpus()
    prompts = prompts_of(corpus, [(0, [2])])
    with_end = VLLMBackend("tiny-vl", base_url(server), include_end=True)
    scores = with_end.answer_logprob(prompts, [["red"]])
    assert scores[0][0] == pytest.approx(expected_logprob(PromptFormat(), prompts[0], "red", include_end=True))
    state["old_server"] = True
    plain = VLLMBackend("tiny-vl", base_url(server))
    assert plain.answer_logprob(prompts, [["red"]])[0][0] == pytest.approx(
        expected_logprob(PromptFormat(), prompts[0], "red"))
    with pytest.raises(PartialBatchError) as caught:
        with_end.answer_logprob(prompts, [["red"]])
    assert "return_token_ids" in str(caught.value.errors[0])


def test_retries_then_per_row_errors(server, state):
    records = [{"id": i, "image": Image.new("RGB", (32, 32), COLOURS["red"]), "image_id": i, "question": q,
                "answers": ["red"] * 10} for i, q in enumerate(["FAIL_ONCE?", "FAIL_ALWAYS?", "fine?", "also fine?"])]
    records.append({"id": 9, "image": "/missing.png", "question": "x", "answers": ["x"]})
    from trl_icd.data.corpus import Corpus

    corpus = Corpus.from_records(records)
    backend = VLLMBackend("tiny-vl", base_url(server), retry_backoff=0.01, max_retries=2)
    prompts = prompts_of(corpus, [(0, []), (1, []), (2, [3]), (3, [9])])
    with pytest.raises(PartialBatchError) as caught:
        backend.answer_and_logprob(prompts, [["red"]] * 4)
    err = caught.value
    assert sorted(err.errors) == [1, 3]
    assert "HTTP 400" in str(err.errors[1]) and isinstance(err.errors[3], ImageLoadError)
    assert err.answers[0] == "red" and err.answers[2] == "red" and err.answers[1] is None
    assert err.logprobs[0] == [pytest.approx(expected_logprob(PromptFormat(), prompts[0], "red"))]
    assert backend.stats["retries"] >= 2  # the 503s were retried

    reward = InContextReward(corpus, VLLMBackend("tiny-vl", base_url(server), retry_backoff=0.01))
    state["payloads"].clear()
    rewards = reward(prompts=["p"] * 3, completions=["", "3", "3"], query_id=[1, 1, 2])
    assert reward.last_statuses == ["empty", "backend_error", "ok"]  # row 2 scored in the same round trip
    assert rewards == [0.0, None, 2.0]
    assert sum(path == "/v1/chat/completions" for path, _ in state["payloads"]) == 4  # no re-scoring
    bad = VLLMBackend("tiny-vl", "http://127.0.0.1:9", max_retries=1, retry_backoff=0.01, timeout=2)
    with pytest.raises(PartialBatchError) as refused:
        bad.answer(prompts[:1])
    assert "POST http://127.0.0.1:9" in str(refused.value.errors[0])


def test_beam_search_request(server, state):
    backend = VLLMBackend("tiny-vl", base_url(server), num_beams=3, length_penalty=0.0)
    assert backend.answer(prompts_of(colour_corpus(), [(2, [0])])) == ["blue"]
    (payload,) = [p for path, p in state["payloads"] if path == "/v1/chat/completions"]
    assert (payload["use_beam_search"], payload["n"], payload["length_penalty"]) == (True, 3, 0.0)
    assert "stop" not in payload  # beam search has no stop strings: the reply is cut locally


def test_vllm_identity_tracks_every_score_setting():
    base = VLLMBackend("m", "http://h:1")
    variants = [
        VLLMBackend("m2", "http://h:1"),
        VLLMBackend("m", "http://h:1", max_new_tokens=3),
        VLLMBackend("m", "http://h:1", num_beams=3),
        VLLMBackend("m", "http://h:1", stop_strings=()),
        VLLMBackend("m", "http://h:1", max_pixels=448 * 448),
        VLLMBackend("m", "http://h:1", include_end=True),
        VLLMBackend("m", "http://h:1", image_format="jpeg"),
        VLLMBackend("m", "http://h:1", revision="abc"),
        VLLMBackend("m", "http://h:1", prompt_format=PromptFormat(template="Q:{q} A:{a}")),
        VLLMBackend("m", "http://h:1", extra_identity={"dtype": "bfloat16"}),
        VLLMBackend("m", engine_kwargs={"dtype": "float32"}),
        VLLMBackend("m", engine_kwargs={"mm_processor_kwargs": {"backend": "pil"}}),  # vLLM's image preprocessing
    ]
    hashes = {stable_hash(v.identity) for v in variants}
    assert len(hashes) == len(variants) and stable_hash(base.identity) not in hashes
    # where the server runs, how many threads ask it, and engine memory settings do not change scores
    same = [
        VLLMBackend("m", "http://other:2/", max_workers=2, timeout=5),
        VLLMBackend("m", engine_kwargs={"gpu_memory_utilization": 0.5}),
    ]
    assert {stable_hash(v.identity) for v in same} == {stable_hash(base.identity)}


# ------------------------------------------------------------------------------------------------ offline engine
class FakeParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


class FakeLLM:
    """Stands in for `vllm.LLM`: checks the request layout and answers like the HTTP imitation."""

    instances = []

    def __init__(self, model=None, **kwargs):
        self.model, self.kwargs = model, kwargs
        self.requests = []
        FakeLLM.instances.append(self)

    def get_tokenizer(self):
        return TOKENIZER

    def _check(self, request):
        images = request["multi_modal_data"]["image"]
        assert request["prompt"].count("<|vision_start|><|image_pad|><|vision_end|>") == len(images)
        return images, TOKENIZER(request["prompt"], add_special_tokens=False)["input_ids"]

    def generate(self, requests, params, use_tqdm=True):
        assert use_tqdm is False
        self.requests.append((list(requests), params))
        outputs = []
        for request in requests:
            images, ids = self._check(request)
            logprobs = None
            if params.kwargs.get("prompt_logprobs") is not None:
                logprobs = prompt_logprobs(ids, images, key=int, wrap=lambda v: SimpleNamespace(logprob=v, rank=2))
            text = reply_text(images, {"stop": params.kwargs.get("stop")})
            outputs.append(SimpleNamespace(prompt_token_ids=ids, prompt_logprobs=logprobs,
                                           outputs=[SimpleNamespace(text=text)]))
        return outputs

    def beam_search(self, requests, params):
        self.requests.append((list(requests), params))
        outputs = []
        for request in requests:
            images, ids = self._check(request)
            generated = TOKENIZER(colour_name(images[-1]) + "<|im_end|>", add_special_tokens=False)["input_ids"]
            best = SimpleNamespace(tokens=ids + generated, logprobs=[{}] * len(generated))
            outputs.append(SimpleNamespace(sequences=[best]))
        return outputs


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = FakeLLM, FakeParams
    sampling = types.ModuleType("vllm.sampling_params")
    sampling.BeamSearchParams, sampling.SamplingParams = FakeParams, FakeParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", sampling)
    FakeLLM.instances.clear()
    return module


def test_offline_engine_requests(fake_vllm):
    corpus = colour_corpus(broken=(7,))
    backend = VLLMBackend("tiny-vl", max_pixels=112 * 112, engine_kwargs={"dtype": "float32"})
    prompts = prompts_of(corpus, [(0, [2, 5]), (1, []), (4, [7])])
    answers = [["red", "square"], [""], ["red"]]
    with pytest.raises(PartialBatchError) as caught:
        backend.answer_and_logprob(prompts, answers)
    err = caught.value
    assert list(err.errors) == [2] and isinstance(err.errors[2], ImageLoadError)
    assert err.answers[:2] == ["red", "green"]
    for i in (0, 1):
        expected = [expected_logprob(PromptFormat(), prompts[i], a) for a in answers[i]]
        assert err.logprobs[i] == pytest.approx(expected, abs=1e-9)

    (llm,) = FakeLLM.instances
    assert llm.model == "tiny-vl" and llm.kwargs == {"limit_mm_per_prompt": {"image": 9}, "dtype": "float32"}
    (gen_requests, gen_params), (lp_requests, lp_params) = llm.requests
    assert gen_params.kwargs == {"n": 1, "temperature": 0.0, "repetition_penalty": 1.0, "max_tokens": 5,
                                 "stop": ["Question", "Answer", "Short", ", "]}
    assert lp_params.kwargs == {"n": 1, "temperature": 0.0, "max_tokens": 1, "prompt_logprobs": 1}
    assert [colour_name(i) for i in gen_requests[0]["multi_modal_data"]["image"]] == ["blue", "green", "red"]
    assert gen_requests[0]["mm_processor_kwargs"] == {"max_pixels": 112 * 112}
    assert gen_requests[0]["prompt"].endswith("<|im_start|>assistant\n")
    assert lp_requests[0]["prompt"].endswith("<|im_start|>assistant\nred")  # an open final message
    assert lp_requests[2]["prompt"].endswith("<|im_end|>\n")  # the empty answer: a closed message


def test_offline_engine_beam_search_decodes_only_new_tokens(fake_vllm):
    llm = FakeLLM()
    backend = VLLMBackend("tiny-vl", llm=llm, num_beams=3, length_penalty=0.0)
    assert backend.answer(prompts_of(colour_corpus(), [(2, [0]), (3, [])])) == ["blue", "yellow"]
    ((_, params),) = llm.requests
    assert params.kwargs == {"beam_width": 3, "max_tokens": 5, "length_penalty": 0.0, "temperature": 0.0}


def test_offline_engine_as_a_reward(fake_vllm):
    reward = InContextReward(colour_corpus(), VLLMBackend("tiny-vl", llm=FakeLLM()), mode="hard01_plus_gtprob")
    rewards = reward(prompts=["p"] * 2, completions=["2, 4", "6"], query_id=[0, 1])
    comps = reward.last_components
    assert [c["answer"] for c in comps] == ["red", "green"]
    assert rewards[0] == pytest.approx(1.0 + comps[0]["gt_prob"])
    assert 0 < comps[0]["gt_prob"] and math.isfinite(comps[1]["gt_prob"])
