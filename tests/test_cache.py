"""RewardCache: accounting, persistence across processes, concurrent writers, scorer keys, RL-data warm-up."""

import json
import multiprocessing
import pickle
import sqlite3
import subprocess
import sys
import textwrap

import pytest
from reward_fakes import FakeBackend, colour_corpus

from trl_icd.rewards.cache import CacheKey, RewardCache, rl_record
from trl_icd.rewards.in_context import InContextReward
from trl_icd.rewards.prompt import PromptFormat

COMPONENTS = {"hard": 1.0, "soft": 0.6, "gt_prob": 0.25, "rel": 1.0, "answer": "dog"}


def key(q, demos, content="c0"):
    return CacheKey(q, tuple(demos), content)


def test_lookup_store_and_accounting():
    cache = RewardCache()  # in memory
    assert cache.lookup("s", [key(1, [2, 3])]) == [None]
    cache.store("s", [(key(1, [2, 3]), COMPONENTS)])
    assert cache.lookup("s", [key(1, [2, 3]), key(1, [3, 2]), key(1, [2, 3])]) == [COMPONENTS, None, COMPONENTS]
    assert cache.lookup("other", [key(1, [2, 3])]) == [None]  # another scorer
    assert cache.lookup("s", [key("1", [2, 3])]) == [None]  # id 1 and "1" are different ids
    assert (cache.hits, cache.misses, cache.stale) == (2, 4, 0)
    assert cache.hit_rate == pytest.approx(2 / 6)
    assert len(cache) == 1 and cache.count("s") == 1 and cache.count("other") == 0


def test_stale_content_is_a_miss_and_is_replaced():
    cache = RewardCache()
    cache.store("s", [(key(1, [2], "old"), COMPONENTS)])
    assert cache.lookup("s", [key(1, [2], "new")]) == [None]
    assert cache.stale == 1
    cache.store("s", [(key(1, [2], "new"), COMPONENTS | {"answer": "cat"})])
    assert cache.lookup("s", [key(1, [2], "new")])[0]["answer"] == "cat"


def test_invalid_components_are_rejected():
    cache = RewardCache()
    with pytest.raises(ValueError, match="not finite"):
        cache.store("s", [(key(1, []), COMPONENTS | {"gt_prob": float("nan")})])
    with pytest.raises(KeyError):
        cache.store("s", [(key(1, []), {"hard": 1.0})])
    assert len(cache) == 0


def test_persistence_across_processes(tmp_path):
    path = tmp_path / "sub" / "cache.sqlite"
    script = textwrap.dedent(
        f"""
        from trl_icd.rewards.cache import CacheKey, RewardCache
        cache = RewardCache({str(path)!r})
        cache.store("s", [(CacheKey(7, (1, 2), "c"), {COMPONENTS!r})])
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    reopened = RewardCache(path)
    assert reopened.lookup("s", [key(7, [1, 2], "c")]) == [COMPONENTS]
    assert reopened.hits == 1


def _writer(path, worker, rows, barrier):
    cache = RewardCache(path, timeout=0.05)  # short lock timeout: exercise the retry path too
    barrier.wait()
    for start in range(0, rows, 10):
        entries = [(key(q, [worker, 99], "c"), COMPONENTS | {"soft": q / rows}) for q in range(start, start + 10)]
        entries.append((key("shared", [start], "c"), COMPONENTS))  # both workers write these rows
        cache.store("s", entries)


def test_two_concurrent_writer_processes(tmp_path):
    path = tmp_path / "cache.sqlite"
    RewardCache(path).close()
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(2)
    workers = [context.Process(target=_writer, args=(str(path), w, 200, barrier)) for w in (0, 1)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(timeout=120)
    assert [p.exitcode for p in workers] == [0, 0]
    cache = RewardCache(path)
    assert len(cache) == 2 * 200 + 20
    found = cache.lookup("s", [key(q, [w, 99], "c") for w in (0, 1) for q in range(200)])
    assert [f["soft"] for f in found] == [q / 200 for _ in (0, 1) for q in range(200)]
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_forked_child_opens_its_own_connection(tmp_path):
    cache = RewardCache(tmp_path / "c.sqlite")
    cache.store("s", [(key(1, []), COMPONENTS)])
    context = multiprocessing.get_context("fork")
    child = context.Process(target=cache.store, args=("s", [(key(2, []), COMPONENTS)]))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0
    assert cache.lookup("s", [key(2, [])]) == [COMPONENTS]
    clone = pickle.loads(pickle.dumps(cache))
    assert clone.lookup("s", [key(1, [])]) == [COMPONENTS]


class SettingsBackend(FakeBackend):
    def __init__(self, **settings):
        super().__init__()
        self.settings = {"model": "m", "revision": "r1", "max_new_tokens": 5, "num_beams": 1, "max_pixels": 1003520,
                         "dtype": "float32"} | settings

    @property
    def identity(self):
        return dict(self.settings)


def test_the_key_changes_with_every_scorer_setting():
    corpus = colour_corpus()
    base = InContextReward(corpus, SettingsBackend()).scorer_hash
    changed = [
        InContextReward(corpus, SettingsBackend(model="m2")),
        InContextReward(corpus, SettingsBackend(revision="r2")),
        InContextReward(corpus, SettingsBackend(max_new_tokens=10)),
        InContextReward(corpus, SettingsBackend(num_beams=3)),
        InContextReward(corpus, SettingsBackend(max_pixels=448 * 448)),
        InContextReward(corpus, SettingsBackend(dtype="bfloat16")),
        InContextReward(corpus, SettingsBackend(), prompt_format=PromptFormat(template="Q:{q} A:{a}")),
        InContextReward(corpus, SettingsBackend(), prompt_format=PromptFormat(system_prompt="Look at {n} example{s}.")),
        InContextReward(corpus, SettingsBackend(), hard_threshold=0.5),
        InContextReward(corpus, SettingsBackend(), vqa_protocol="vqa2016"),
        InContextReward(corpus, SettingsBackend(), vqa_protocol="lmms_eval"),
    ]
    hashes = [r.scorer_hash for r in changed]
    assert base not in hashes and len(set(hashes)) == len(hashes)
    # shaping is applied after the cache: it must not split it
    same = [
        InContextReward(corpus, SettingsBackend(), mode="soft_only"),
        InContextReward(corpus, SettingsBackend(), hard_weight=3.0, soft_weight=0.1, rel_weight=0.5),
        InContextReward(corpus, SettingsBackend(), invalid_reward=-1.0, batch_size=2),
        InContextReward(corpus, SettingsBackend(), vqa_protocol="vqa"),  # the default, named
    ]
    assert {r.scorer_hash for r in same} == {base}
    assert InContextReward(corpus, SettingsBackend()).scorer_identity["components"]["vqa_protocol"] == "vqa"


def test_a_changed_setting_never_reads_the_old_rows(tmp_path):
    path = tmp_path / "c.sqlite"
    backend = SettingsBackend()
    reward = InContextReward(colour_corpus(), backend, cache_path=path)
    reward.score_pairs([(0, [2, 4])])
    backend.settings["max_new_tokens"] = 3  # the identity is read on every call
    reward.score_pairs([(0, [2, 4])])
    assert backend.pairs_scored == 2 and reward.cache_hits == 0
    assert len(RewardCache(path).scorers()) == 2


def test_warm_from_jsonl_counts_and_filters(tmp_path):
    path = tmp_path / "rl.jsonl"
    lines = [
        json.dumps(rl_record(1, [2, 3], "beam", COMPONENTS, "s", "c")),
        json.dumps(rl_record(1, [3], "random", COMPONENTS | {"answer": "cat"}, "s", "c", rank=2)),
        json.dumps(rl_record(4, [5], "sample", COMPONENTS, "other", "c")),
        "",
        json.dumps({"query_id": 1, "demo_ids": [9], "components": COMPONENTS, "scorer": "s"}),  # no content
        '{"query_id": 1, "demo_ids": [8], "comp',  # a truncated last line
    ]
    path.write_text("\n".join(lines) + "\n")
    cache = RewardCache()
    cache.store("s", [(key(1, [3], "c"), COMPONENTS | {"answer": "kept"})])
    assert cache.warm_from_jsonl(path, scorer="s") == {"loaded": 2, "other_scorer": 1, "invalid": 2}
    assert cache.lookup("s", [key(1, [2, 3], "c"), key(1, [3], "c")])[1]["answer"] == "kept"
    cache.warm_from_jsonl(path, scorer="s", overwrite=True)
    assert cache.lookup("s", [key(1, [3], "c")])[0]["answer"] == "cat"
    everything = RewardCache()
    assert everything.warm_from_jsonl(path)["loaded"] == 3


def test_schema_version_mismatch_is_a_clear_error(tmp_path):
    path = tmp_path / "c.sqlite"
    RewardCache(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(RuntimeError, match="schema 99"):
        RewardCache(path)
