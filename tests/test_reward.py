"""InContextReward with a deterministic fake backend: hand-computed rewards, every shaping mode, batching and
deduplication, cache accounting, metrics, and every bad-input case."""

import json
import math
from collections import defaultdict

import pytest
from reward_fakes import FakeBackend, colour_corpus, colour_image

from trl_icd.data.corpus import Corpus
from trl_icd.rewards.backend import PartialBatchError
from trl_icd.rewards.components import relevance
from trl_icd.rewards.in_context import INVALID_SELECTION_REASONS, SCORING_ERROR_REASONS, InContextReward
from trl_icd.rewards.shaping import REWARD_MODES


def call(reward, completions, query_ids, **columns):
    return reward(prompts=["pick"] * len(completions), completions=completions, query_id=query_ids, **columns)


def red_query_gt_prob(shots):
    """gt_prob of query 0 (answers red×6, redish×3, square×1) under FakeBackend's log-probs."""
    p = {a: math.exp(FakeBackend.logprob(a, shots)) for a in ("red", "redish", "square")}
    return p["red"] + p["redish"] + p["square"] / 3


def test_rewards_and_components_hand_computed():
    backend = FakeBackend()
    reward = InContextReward(colour_corpus(), backend)
    assert reward.__name__ == "in_context_reward"
    rewards = call(reward, ["2, 4", "1", "[6 0]"], [0, 0, 2])
    # row 0: demos blue(colour q), red(colour q) -> answers "red": correct for the red query
    first = reward.last_components[0]
    assert first["answer"] == "red" and first["demo_ids"] == [2, 4] and first["query_id"] == 0
    assert (first["hard"], first["soft"], first["rel"]) == (1.0, 1.0, 1.0)
    assert first["gt_prob"] == pytest.approx(red_query_gt_prob(2))
    # row 1: the only demo asks another question -> "unknown": wrong
    second = reward.last_components[1]
    assert (second["answer"], second["hard"], second["soft"]) == ("unknown", 0.0, 0.0)
    assert second["gt_prob"] == pytest.approx(red_query_gt_prob(1))
    assert second["rel"] == pytest.approx(relevance("unknown", colour_corpus()[0].answers))
    # row 2: blue query, last colour demo is red -> wrong
    assert reward.last_components[2]["answer"] == "red" and reward.last_components[2]["soft"] == 0.0
    assert rewards == [2.0, 0.0, 0.0]  # hard_plus_soft, weights 1/1
    assert reward.last_statuses == ["ok"] * 3


FORMULAS = {  # lever_plus §3, written out independently of trl_icd.rewards.shaping
    "hard_plus_soft": lambda h, s, p, r, wh, ws, wr: wh * h + ws * s,
    "hard_plus_soft_v2": lambda h, s, p, r, wh, ws, wr: ws * s + 2 * wh * h,
    "separated": lambda h, s, p, r, wh, ws, wr: 2 * wh + ws * s if h == 1 else ws * s,
    "hard_only": lambda h, s, p, r, wh, ws, wr: wh * h,
    "soft_only": lambda h, s, p, r, wh, ws, wr: ws * s,
    "hard01_plus_gtprob": lambda h, s, p, r, wh, ws, wr: wh * h + ws * p,
    "hard01_plus_gtprob_separated": lambda h, s, p, r, wh, ws, wr: 2 * wh + ws * p if h == 1 else ws * p,
    "hard_plus_gtprob_plus_rel": lambda h, s, p, r, wh, ws, wr: wh * h + ws * p + wr * (1 - h) * r,
}


def test_every_shaping_mode_end_to_end_without_rescoring():
    assert set(FORMULAS) == set(REWARD_MODES)
    corpus, backend = colour_corpus(), FakeBackend()
    first = InContextReward(corpus, backend)
    call(first, ["2, 4", "1"], [0, 0])
    weights = dict(hard_weight=1.5, soft_weight=0.7, rel_weight=0.3)
    for mode, formula in FORMULAS.items():
        reward = InContextReward(corpus, backend, mode=mode, cache_path=first.cache, **weights)
        rewards = call(reward, ["2, 4", "1"], [0, 0])
        for value, c in zip(rewards, reward.last_components):
            expected = formula(c["hard"], c["soft"], c["gt_prob"], c["rel"], 1.5, 0.7, 0.3)
            assert value == pytest.approx(expected), mode
        assert reward.cache_hits == 2 and reward.cache_misses == 0, mode
    assert backend.pairs_scored == 2  # the components were scored once, shaped 9 ways


def test_soft_follows_the_vqa_protocol_and_protocols_never_share_cached_rows(tmp_path):
    # The backend repeats the demonstration's answer "Yes"; the query's ten annotators all wrote "yes": today's
    # official script compares them unnormalised (0), the 2016 script and lmms-eval normalise the prediction (1).
    records = [{"id": i, "image": colour_image("red"), "image_id": 100 + i, "question": "is it red?",
                "answers": ["yes"] * 10 if i == 0 else ["Yes"] * 10} for i in range(2)]
    corpus = Corpus.from_records(records)
    path = tmp_path / "rewards.sqlite"
    expected = {"vqa": 0.0, "vqa2016": 1.0, "lmms_eval": 1.0}
    backend = FakeBackend()
    for protocol, soft in expected.items():
        reward = InContextReward(corpus, backend, mode="soft_only", cache_path=path, vqa_protocol=protocol)
        assert call(reward, ["1"], [0]) == [soft], protocol
        assert reward.last_components[0]["answer"] == "Yes"
        assert reward.cache_misses == 1 and reward.cache_hits == 0, protocol  # never another protocol's row
    assert backend.pairs_scored == 3
    again = InContextReward(corpus, backend, mode="hard_only", cache_path=path, vqa_protocol="vqa2016")
    assert call(again, ["1"], [0]) == [1.0] and again.cache_hits == 1  # same protocol: a hit, whatever the shaping
    with pytest.raises(ValueError, match="Unknown VQA protocol"):
        InContextReward(corpus, backend, vqa_protocol="official")


def test_unknown_mode_is_an_error():
    with pytest.raises(ValueError, match="unknown reward mode"):
        InContextReward(colour_corpus(), FakeBackend(), mode="hard_plus_everything")


def test_identical_pairs_are_scored_once_in_one_batched_call():
    backend = FakeBackend()
    reward = InContextReward(colour_corpus(), backend)
    completions = ["2, 4"] * 3 + ["4, 2"] * 2 + ["1"] * 3
    rewards = call(reward, completions, [0] * 8)
    assert len(backend.calls) == 1
    assert backend.calls[0] == [(0, (2, 4)), (0, (4, 2)), (0, (1,))]  # ordered demos are different prompts
    assert backend.answer_lists[0] == [["red", "redish", "square"]] * 3  # gold answers deduplicated
    assert rewards[:3] == [rewards[0]] * 3 and rewards[5:] == [rewards[5]] * 3
    assert (reward.cache_hits, reward.cache_misses) == (0, 3)


def test_cache_hits_and_metrics(tmp_path):
    backend = FakeBackend()
    logged = defaultdict(list)
    extra = {}
    reward = InContextReward(colour_corpus(), backend, cache_path=tmp_path / "r.sqlite")
    kwargs = dict(log_metric=lambda k, v: logged[k].append(v), log_extra=lambda k, v: extra.__setitem__(k, v))
    call(reward, ["2, 4", "1", "1, 1", "2"], [0, 0, 0, 0], **kwargs)
    call(reward, ["2, 4", "2, 4", "1", "6"], [0, 0, 0, 0], **kwargs)
    assert (reward.cache_hits, reward.cache_misses) == (2, 4)
    assert logged["in_context_reward/cache_hit_rate"] == [0.0, pytest.approx(2 / 3)]
    assert logged["in_context_reward/invalid_rate"] == [0.25, 0.0]
    assert logged["in_context_reward/backend_pairs"] == [3.0, 1.0]
    first_call = reward.last_components  # second call: rows 0, 1 red-correct, row 2 wrong, row 3 "6" -> blue: wrong
    assert logged["in_context_reward/hard"][1] == pytest.approx(sum(c["hard"] for c in first_call) / 4)
    assert logged["in_context_reward/soft"][1] == pytest.approx(0.5)
    assert logged["in_context_reward/num_shots"][1] == pytest.approx(1.5)
    assert all(t >= 0 for t in logged["in_context_reward/scoring_time"])
    assert {"in_context_reward/gt_prob", "in_context_reward/rel", "in_context_reward/error_rate"} <= set(logged)
    assert extra["in_context_reward/status"] == ["ok"] * 4
    assert extra["in_context_reward/answer"] == ["red", "red", "unknown", "blue"]
    assert all(math.isfinite(v) for values in logged.values() for v in values)


def test_conversational_completions():
    reward = InContextReward(colour_corpus(), FakeBackend())
    completions = [
        [{"role": "assistant", "content": "2, 4"}],
        [{"role": "assistant", "content": [{"type": "text", "text": "2, "}, {"type": "text", "text": "4"}]}],
    ]
    assert call(reward, completions, [0, 0]) == [2.0, 2.0]


@pytest.mark.parametrize(
    "completion, status",
    [
        ([{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f"}}]}], "empty"),  # TRL tools
        ([{"role": "assistant"}], "empty"),  # no content key
        ([{"role": "assistant", "content": []}], "empty"),
        ([{"role": "assistant", "content": [{"type": "image"}, {"type": "text", "text": None}]}], "empty"),
        ([], "empty"),  # no message at all
        ([{"role": "assistant", "content": 7}], "unparseable"),
        (["2, 4"], "unparseable"),  # messages that are not mappings
        (None, "unparseable"),
        (42, "unparseable"),
    ],
)
def test_odd_conversational_completions_are_counted_fallback_rows(completion, status, caplog):
    backend = FakeBackend()
    reward = InContextReward(colour_corpus(), backend, invalid_reward=-0.5)
    mixed_parts = [{"role": "assistant", "content": [{"type": "image"}, {"type": "text", "text": "2, 4"}]}]
    with caplog.at_level("INFO", logger="trl_icd.rewards.in_context"):
        rewards = call(reward, [completion, mixed_parts], [0, 0])
    assert rewards == [-0.5, 2.0]  # the odd row is a fallback; the batch is scored
    assert reward.last_statuses == [status, "ok"]
    assert reward.status_counts[status] == 1 and reward.last_components[0] is None
    assert f"'{status}': 1" in caplog.text  # logged with its count
    assert backend.calls == [[(0, (2, 4))]]


@pytest.mark.parametrize(
    "completion, status, columns, kwargs",
    [
        ("", "empty", {}, {}),
        ("  [ ] ", "empty", {}, {}),
        ("2, four", "unparseable", {}, {}),
        ("2; 4.", "unparseable", {}, {}),
        ("2, 99", "unknown_id", {}, {}),
        ("-3", "unknown_id", {}, {}),
        ("2, 4, 2", "duplicate_id", {}, {}),
        ("4, 0", "query_as_demo", {}, {}),
        ("12", "same_image_as_query", {}, {}),
        ("2, 4, 6", "too_many_shots", {}, {"max_shots": 2}),
        ("2, 8", "not_in_pool", {"candidate_ids": [[2, 4, 6]]}, {}),
    ],
)
def test_invalid_selection_gets_the_fallback_for_its_row_only(completion, status, columns, kwargs):
    corpus = Corpus.concat(colour_corpus(), Corpus.from_records(
        [{"id": 12, "image": colour_image("red"), "image_id": 1000, "question": "q", "answers": ["x"]}]))
    backend = FakeBackend()
    reward = InContextReward(corpus, backend, invalid_reward=-0.5, **kwargs)
    both = {k: v * 2 for k, v in columns.items()}
    rewards = call(reward, [completion, "2, 4"], [0, 0], **both)
    assert status in INVALID_SELECTION_REASONS
    assert reward.last_statuses == [status, "ok"]
    assert rewards == [-0.5, 2.0]
    assert reward.last_components[0] is None
    assert reward.status_counts[status] == 1
    assert backend.calls == [[(0, (2, 4))]]  # the invalid row never reached the backend


def test_invalid_reward_none_and_error_reward_number():
    reward = InContextReward(colour_corpus(broken=(5,)), FakeBackend(), invalid_reward=None, error_reward=-1.0)
    assert call(reward, ["x", "5", "2, 4"], [0, 1, 0]) == [None, -1.0, 2.0]
    assert reward.last_statuses == ["unparseable", "image_error", "ok"]


def test_missing_and_unknown_query_ids():
    reward = InContextReward(colour_corpus(), FakeBackend())
    assert reward(prompts=["p"] * 2, completions=["2", "4"]) == [None, None]
    assert reward.last_statuses == ["missing_query_id"] * 2
    assert call(reward, ["2", "4", "4"], [None, 77, 0]) == [None, None, 2.0]
    assert reward.last_statuses == ["missing_query_id", "unknown_query_id", "ok"]
    assert set(reward.last_statuses) - {"ok"} <= set(SCORING_ERROR_REASONS)


def test_unreadable_image_fails_only_its_row():
    backend = FakeBackend()
    reward = InContextReward(colour_corpus(broken=(5,)), backend)
    rewards = call(reward, ["2, 4", "5", "4", "3"], [0, 1, 0, 5])
    assert rewards == [2.0, None, 2.0, None]
    assert reward.last_statuses == ["ok", "image_error", "ok", "image_error"]
    # the failed batch was split until the two bad rows were alone
    assert backend.calls[0] == [(0, (2, 4)), (1, (5,)), (0, (4,)), (5, (3,))]
    assert [(1, (5,))] in backend.calls and [(5, (3,))] in backend.calls


def test_backend_error_on_one_row_is_isolated():
    backend = FakeBackend(fail_queries=(3,))
    reward = InContextReward(colour_corpus(), backend)
    queries = [0, 1, 2, 3, 4, 5, 6, 7]
    rewards = call(reward, ["8"] * 4 + ["9"] * 4, queries)
    assert reward.last_statuses == ["ok"] * 3 + ["backend_error"] + ["ok"] * 4
    assert rewards[3] is None and all(r is not None for i, r in enumerate(rewards) if i != 3)
    assert [(3, (8,))] in backend.calls
    assert reward.cache.count() == 7  # the failure is not cached: it is retried next time
    call(reward, ["8"], [3])
    assert reward.cache_misses == 9


def test_a_dead_backend_stops_training_after_repeated_total_failures():
    backend = FakeBackend(fail_queries=tuple(range(12)))
    reward = InContextReward(colour_corpus(), backend, max_failed_calls=2)
    assert call(reward, ["2", "4"], [0, 1]) == [None, None]
    with pytest.raises(RuntimeError, match="failed on every pair in 2 consecutive calls"):
        call(reward, ["6"], [0])
    patient = InContextReward(colour_corpus(), backend, max_failed_calls=None)
    for _ in range(4):
        assert call(patient, ["6"], [1]) == [None]


class PartialBackend(FakeBackend):
    """Reports a failure of query 3's row only, with every other row's results (like the vLLM server client)."""

    def answer_and_logprob(self, prompts, answers):
        self.calls.append([p.key for p in prompts])
        preds, lps = self.answer(prompts), self.answer_logprob(prompts, answers)
        errors = {i: RuntimeError("HTTP 400") for i, p in enumerate(prompts) if p.query.id == 3}
        if errors:
            raise PartialBatchError([None if i in errors else a for i, a in enumerate(preds)],
                                    [None if i in errors else v for i, v in enumerate(lps)], errors)
        return preds, lps


def test_partial_batch_errors_keep_the_other_rows_without_rescoring():
    backend = PartialBackend()
    reward = InContextReward(colour_corpus(), backend)
    rewards = call(reward, ["4", "2", "6"], [0, 3, 2])
    assert len(backend.calls) == 1
    assert reward.last_statuses == ["ok", "backend_error", "ok"]
    assert rewards[1] is None and rewards[0] == 2.0


class MalformedBackend(FakeBackend):
    def __init__(self, defect):
        super().__init__()
        self.defect = defect

    def answer_and_logprob(self, prompts, answers):
        preds, lps = super().answer_and_logprob(prompts, answers)
        for i, p in enumerate(prompts):
            if p.query.id == 3:
                if self.defect == "answer":
                    preds[i] = None
                elif self.defect == "count":
                    lps[i] = lps[i][:-1]
                else:
                    lps[i][0] = self.defect
        return preds, lps


@pytest.mark.parametrize("defect", [float("nan"), float("inf"), 0.5, "answer", "count"])
def test_malformed_backend_results_are_errors_not_rewards(defect):
    reward = InContextReward(colour_corpus(), MalformedBackend(defect))
    rewards = call(reward, ["2", "4"], [3, 0])
    assert reward.last_statuses == ["backend_error", "ok"]
    assert rewards == [None, 2.0]


def test_score_pairs_rl_data_and_warm_up(tmp_path):
    corpus = colour_corpus()
    backend = FakeBackend()
    reward = InContextReward(corpus, backend)
    pairs = [(0, [2, 4]), (0, []), (2, [6, 0]), (0, [2, 4])]
    scored = reward.score_pairs(pairs)
    assert [c["answer"] for c in scored] == ["red", "unknown", "red", "red"]
    assert scored[1]["gt_prob"] == pytest.approx(red_query_gt_prob(0))  # the 0-shot prompt
    assert backend.pairs_scored == 3
    path = tmp_path / "rl.jsonl"
    sources = ["beam", "random", "image_sim", "beam"]
    with open(path, "w") as handle:
        for (q, demos), comps, source in zip(pairs, scored, sources):
            handle.write(json.dumps(reward.rl_data_record(q, demos, source, comps)) + "\n")
    record = json.loads(path.read_text().splitlines()[0])
    assert record["scorer"] == reward.scorer_hash and record["source"] == "beam"
    assert record["components"] == {k: scored[0][k] for k in ("hard", "soft", "gt_prob", "rel", "answer")}

    other_backend = FakeBackend()
    fresh = InContextReward(corpus, other_backend)
    assert fresh.warm_cache(path) == {"loaded": 4, "other_scorer": 0, "invalid": 0}
    assert fresh.score_pairs(pairs) == scored
    assert other_backend.calls == [] and fresh.cache_hits == 3
    with pytest.raises(KeyError):
        reward.score_pairs([(0, [99])])
    with pytest.raises(ValueError, match="source"):
        reward.rl_data_record(0, [2], "oracle", scored[0])


def test_score_pairs_reports_unscorable_pairs():
    reward = InContextReward(colour_corpus(broken=(5,)), FakeBackend())
    out = reward.score_pairs([(0, [5]), (0, [2])])
    assert out[0] is None and out[1]["answer"] == "blue"
    assert reward.last_statuses == ["image_error", "ok"]


def test_stale_rows_are_rescored_when_the_corpus_changes(tmp_path):
    path = tmp_path / "r.sqlite"
    first = InContextReward(colour_corpus(), FakeBackend(), cache_path=path)
    call(first, ["2, 4"], [0])
    edited = Corpus.from_records(
        [{"id": i.id, "image": colour_image("red"), "image_id": i.image_id, "question": i.question,
          "answers": ["crimson"] * 10 if i.id == 0 else list(i.answers)} for i in colour_corpus()]
    )
    backend = FakeBackend()
    second = InContextReward(edited, backend, cache_path=path)
    assert call(second, ["2, 4"], [0]) == [0.0]  # "red" is wrong for the re-annotated query
    assert backend.pairs_scored == 1 and second.cache.stale == 1


def test_prompt_format_must_agree_with_the_backend():
    from trl_icd.rewards.prompt import PromptFormat

    backend = FakeBackend()
    backend.prompt_format = PromptFormat()
    InContextReward(colour_corpus(), backend, prompt_format=PromptFormat())
    with pytest.raises(ValueError, match="prompt format"):
        InContextReward(colour_corpus(), backend, prompt_format=PromptFormat(template="Q:{q} A:{a}"))


def test_selector_completions_are_decoded_with_parse_selection():
    from trl_icd.selector import ICDSelectorConfig, build_selector_tokenizer

    tokenizer = build_selector_tokenizer(ICDSelectorConfig(num_items=12, num_slots=4, min_shots=1, max_shots=3))
    slot = {k: tokenizer.convert_tokens_to_ids(f"<slot_{k}>") for k in range(4)}
    stop, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    backend = FakeBackend()
    reward = InContextReward(colour_corpus(), backend, tokenizer=tokenizer)
    pool = [6, 2, 4]  # slot k names pool[k]
    completion_ids = [
        [slot[1], slot[2], stop],  # demos 2, 4 -> "red": correct
        [slot[2], slot[1], stop, pad],  # demos 4, 2 -> "blue": wrong
        [slot[3], stop],  # an empty slot (the pool has 3 candidates)
        [slot[0], slot[0], stop],  # a repeat
        [slot[0], slot[1]],  # no <stop>: truncated
    ]
    rewards = reward(prompts=["p"] * 5, completions=["<text ignored>"] * 5, completion_ids=completion_ids,
                     query_id=[0] * 5, candidate_ids=[pool] * 5)
    assert reward.last_statuses == ["ok", "ok"] + ["invalid_selection"] * 3
    assert rewards == [2.0, 0.0, 0.0, 0.0, 0.0]
    assert [c["demo_ids"] for c in reward.last_components[:2]] == [[2, 4], [4, 2]]
    # without completion_ids the decoded text names the same slots
    assert reward(prompts=["p"], completions=["<slot_1> <slot_2>"], query_id=[0], candidate_ids=[pool]) == [2.0]
    # the pool is checked too: a selector fed a pool holding its own query must not leak the answer
    assert reward(prompts=["p"], completions=["<slot_0>"], query_id=[0], candidate_ids=[[0, 2]]) == [0.0]
    assert reward.last_statuses == ["query_as_demo"]


def test_queries_without_gold_answers_cannot_be_scored():
    corpus = Corpus.concat(colour_corpus(), Corpus.from_records(
        [{"id": 20, "image": colour_image("red"), "question": "q", "answers": []}]))
    reward = InContextReward(corpus, FakeBackend())
    assert call(reward, ["2", "2"], [20, 0]) == [None, 0.0]
    assert reward.last_statuses == ["no_gold_answers", "ok"]
    with pytest.raises(ValueError, match="without gold answers"):
        reward.score_pairs([(20, [2])])
