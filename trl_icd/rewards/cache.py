"""A persistent reward cache: one row per (scorer, query id, ordered demonstration ids).

Every GRPO step re-samples demonstration sequences a selector has already tried; a hit here costs no model call.
The store is one SQLite file (standard library) in WAL mode, so several training processes, RL-data generators and
evaluators can read and write it at once. Rows hold all reward components and the model's answer, so changing the
shaping mode or its weights never needs re-scoring.

Key:
    scorer    hash of everything that changes a score (backend identity: model, dtype, generation settings,
              max_pixels, ...; prompt format; component settings) -- see `InContextReward.scorer_identity`
    query_id  JSON of the query's corpus id
    demo_ids  JSON list of the demonstrations' corpus ids, in prompt order
Each row also stores `content`, a hash of the involved items' questions, answers and image keys: a row whose content
no longer matches the corpus (another dataset with the same ids, edited annotations) is stale, and is re-scored
instead of being trusted.

Scored RL-data file (JSON Lines, one scored sequence per line; written by `InContextReward.rl_data_record`):

    {"query_id": 12, "demo_ids": [873, 5], "source": "beam",
     "components": {"hard": 1.0, "soft": 0.6, "gt_prob": 0.21, "rel": 1.0, "answer": "dog"},
     "scorer": "<16 hex: scorer hash>", "content": "<16 hex: content hash>"}

`source` is one of `RL_DATA_SOURCES`; other keys are allowed and ignored by the cache. `warm_from_jsonl` loads such
a file into the cache.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sqlite3
import threading
import time
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

from .components import COMPONENT_KEYS

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
RL_DATA_SOURCES = ("beam", "sample", "image_sim", "text_sim", "random", "selector")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS scorers (scorer TEXT PRIMARY KEY, identity TEXT NOT NULL, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS rewards (
    scorer TEXT NOT NULL,
    query_id TEXT NOT NULL,
    demo_ids TEXT NOT NULL,
    content TEXT NOT NULL,
    hard REAL NOT NULL,
    soft REAL NOT NULL,
    gt_prob REAL NOT NULL,
    rel REAL NOT NULL,
    answer TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (scorer, query_id, demo_ids)
) WITHOUT ROWID;
"""


def plain_id(item_id):
    """A corpus id as a plain Python value (numpy / torch scalars from dataset columns become int / str)."""
    if isinstance(item_id, (str, bytes, int, float)) or item_id is None:
        return item_id
    item = getattr(item_id, "item", None)
    if callable(item):
        try:
            return item()
        except (TypeError, ValueError):
            pass
    return item_id


def encode_id(item_id: Hashable) -> str:
    """The JSON text that names an id in the cache (1 and "1" stay different)."""
    return json.dumps(plain_id(item_id), sort_keys=True, separators=(",", ":"))


def encode_demo_ids(demo_ids: Sequence[Hashable]) -> str:
    return json.dumps([plain_id(d) for d in demo_ids], sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class CacheKey:
    """One cached prompt: query id, ordered demo ids, and the content hash of the items involved."""

    query_id: Hashable
    demo_ids: tuple
    content: str

    @property
    def encoded(self) -> tuple[str, str]:
        return encode_id(self.query_id), encode_demo_ids(self.demo_ids)


def _is_busy(err: sqlite3.OperationalError) -> bool:
    text = str(err).lower()
    return "locked" in text or "busy" in text


class RewardCache:
    """SQLite-backed store of reward components (see the module docstring for the key and file formats).

    Args:
        path: database file (created with its folder); None = in-memory, private to this process.
        timeout: seconds SQLite waits for another writer's lock before a retry.
        max_retries: retries (with jittered backoff) of a statement that still finds the database locked.

    Counters `hits`, `misses` and `stale` count lookups since construction (a stale row counts as a miss too).
    The connection is opened lazily per process, so the object may be pickled or inherited by forked workers.
    """

    def __init__(self, path: str | os.PathLike | None = None, timeout: float = 60.0, max_retries: int = 10):
        self.path = None if path is None else os.fspath(path)
        self.timeout = timeout
        self.max_retries = max_retries
        self.hits = 0
        self.misses = 0
        self.stale = 0
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._pid: int | None = None
        self._known_scorers: set[str] = set()
        self._connection()  # fail early on an unusable path or schema

    # ---------------------------------------------------------------------------------------------- connection
    def _connection(self) -> sqlite3.Connection:
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        if self.path is None:
            conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        else:
            folder = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(folder, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            (mode,) = self._retry(lambda: conn.execute("PRAGMA journal_mode = WAL").fetchone())
            if str(mode).lower() != "wal":
                logger.warning("%s: SQLite WAL mode unavailable (journal mode %s); concurrent writers will wait "
                               "for each other", self.path, mode)
            conn.execute("PRAGMA synchronous = NORMAL")
        self._retry(lambda: conn.executescript(_SCHEMA))
        self._retry(lambda: self._check_schema(conn))
        self._conn, self._pid = conn, os.getpid()
        self._known_scorers = set()
        return conn

    @staticmethod
    def _check_schema(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        (found,) = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if int(found) != SCHEMA_VERSION:
            raise RuntimeError(f"reward cache schema {found} is not the supported version {SCHEMA_VERSION}")

    def _retry(self, operation):
        """Run `operation`, retrying while another process holds the write lock past `timeout`."""
        for attempt in range(self.max_retries + 1):
            try:
                return operation()
            except sqlite3.OperationalError as err:
                if not _is_busy(err) or attempt == self.max_retries:
                    raise
                time.sleep(min(2.0, 0.05 * 2**attempt) * (0.5 + random.random()))

    def _write(self, sql: str, rows: Sequence[Sequence]) -> None:
        """Run `sql` for every row in one write transaction (BEGIN IMMEDIATE takes the lock up front; retried
        while another writer holds it)."""

        def transaction():
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(sql, rows)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

        with self._lock:
            self._retry(transaction)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    def __enter__(self) -> RewardCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(_conn=None, _pid=None, _lock=None, _known_scorers=set())
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.RLock()

    # ------------------------------------------------------------------------------------------------ scorers
    def register_scorer(self, scorer: str, identity: Mapping) -> None:
        """Record what a scorer hash stands for (for humans inspecting the file; lookups only use the hash)."""
        if scorer in self._known_scorers:
            return
        text = json.dumps(identity, sort_keys=True, default=str)
        self._write("INSERT OR IGNORE INTO scorers (scorer, identity, created_at) VALUES (?, ?, ?)",
                    [(scorer, text, time.time())])
        self._known_scorers.add(scorer)

    def scorers(self) -> dict[str, dict]:
        with self._lock:
            rows = self._retry(lambda: self._connection().execute("SELECT scorer, identity FROM scorers").fetchall())
        return {scorer: json.loads(identity) for scorer, identity in rows}

    # ---------------------------------------------------------------------------------------- lookup and store
    def lookup(self, scorer: str, keys: Sequence[CacheKey]) -> list[dict | None]:
        """Cached components (hard, soft, gt_prob, rel, answer) for each key, or None (a miss or a stale row)."""
        found: list[dict | None] = []

        def read():
            conn = self._connection()
            out = []
            for key in keys:
                query, demos = key.encoded
                out.append(conn.execute(
                    "SELECT content, hard, soft, gt_prob, rel, answer FROM rewards "
                    "WHERE scorer = ? AND query_id = ? AND demo_ids = ?", (scorer, query, demos)).fetchone())
            return out

        with self._lock:
            rows = self._retry(read)
        stale = []
        for key, row in zip(keys, rows):
            if row is None or row[0] != key.content:
                self.misses += 1
                found.append(None)
                if row is not None:
                    stale.append(key)
            else:
                self.hits += 1
                found.append(dict(zip((*COMPONENT_KEYS, "answer"), row[1:])))
        if stale:
            self.stale += len(stale)
            logger.warning("%d stale reward-cache rows (the corpus content of their items changed), e.g. query %r "
                           "demos %r: re-scoring them", len(stale), stale[0].query_id, stale[0].demo_ids)
        return found

    def store(self, scorer: str, entries: Sequence[tuple[CacheKey, Mapping]], overwrite: bool = True) -> None:
        """Write components for each key (`overwrite=False` keeps rows that already exist)."""
        if not entries:
            return
        verb = "INSERT OR REPLACE" if overwrite else "INSERT OR IGNORE"
        now = time.time()
        rows = [(scorer, *key.encoded, key.content, *_component_values(components), now) for key, components in entries]
        self._write(f"{verb} INTO rewards (scorer, query_id, demo_ids, content, hard, soft, gt_prob, rel, answer, "
                    "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)

    def count(self, scorer: str | None = None) -> int:
        def read():
            conn = self._connection()
            if scorer is None:
                return conn.execute("SELECT COUNT(*) FROM rewards").fetchone()[0]
            return conn.execute("SELECT COUNT(*) FROM rewards WHERE scorer = ?", (scorer,)).fetchone()[0]

        with self._lock:
            return self._retry(read)

    def __len__(self) -> int:
        return self.count()

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    # ------------------------------------------------------------------------------------------------ RL data
    def warm_from_jsonl(self, path: str | os.PathLike, scorer: str | None = None, overwrite: bool = False) -> dict:
        """Load a scored RL-data file (format in the module docstring) into the cache.

        Args:
            scorer: load only records of this scorer hash (others are counted as `other_scorer`); None = all.
            overwrite: replace rows that already exist (default: keep them).

        Returns counts: `loaded`, `other_scorer`, `invalid` (malformed lines, e.g. a truncated last line from a
        crashed writer; each is logged and skipped).
        """
        counts = {"loaded": 0, "other_scorer": 0, "invalid": 0}
        by_scorer: dict[str, list[tuple[CacheKey, Mapping]]] = {}

        def flush():
            for record_scorer, entries in by_scorer.items():
                self.store(record_scorer, entries, overwrite=overwrite)
            by_scorer.clear()

        with open(path, encoding="utf-8") as handle:
            for line_no, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    entry = parse_rl_record(record)
                except (ValueError, TypeError, KeyError) as err:
                    counts["invalid"] += 1
                    logger.warning("%s:%d: skipped RL-data line (%s)", path, line_no, err)
                    continue
                if scorer is not None and record["scorer"] != scorer:
                    counts["other_scorer"] += 1
                    continue
                by_scorer.setdefault(record["scorer"], []).append(entry)
                counts["loaded"] += 1
                if counts["loaded"] % 10_000 == 0:  # bounded memory for large files
                    flush()
        flush()
        if counts["other_scorer"] and not counts["loaded"]:
            logger.warning("%s: no record matches scorer %s (the file was scored with other settings)", path, scorer)
        logger.info("warmed reward cache from %s: %s", path, counts)
        return counts


def _component_values(components: Mapping) -> tuple:
    """(hard, soft, gt_prob, rel, answer), validated: finite numbers and a string answer."""
    values = []
    for name in COMPONENT_KEYS:
        value = float(components[name])
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"component {name} is not finite: {value}")
        values.append(value)
    answer = components["answer"]
    if not isinstance(answer, str):
        raise TypeError(f"answer must be a string, got {type(answer).__name__}")
    return (*values, answer)


def rl_record(query_id, demo_ids, source: str, components: Mapping, scorer: str, content: str, **extra) -> dict:
    """One line of the scored RL-data file (JSON-able dict); `extra` keys (e.g. "logprob", "rank") are kept."""
    if source not in RL_DATA_SOURCES:
        raise ValueError(f"unknown RL-data source {source!r}; expected one of {RL_DATA_SOURCES}")
    values = _component_values(components)
    return {
        "query_id": plain_id(query_id),
        "demo_ids": [plain_id(d) for d in demo_ids],
        "source": source,
        "components": dict(zip((*COMPONENT_KEYS, "answer"), values)),
        "scorer": scorer,
        "content": content,
        **extra,
    }


def parse_rl_record(record: Mapping) -> tuple[CacheKey, dict]:
    """(cache key, components) of one RL-data record; raises ValueError / KeyError / TypeError when malformed."""
    if not isinstance(record, Mapping):
        raise TypeError("record is not a JSON object")
    for name in ("query_id", "demo_ids", "components", "scorer", "content"):
        if name not in record:
            raise KeyError(f"missing field {name!r}")
    if not isinstance(record["demo_ids"], list):
        raise TypeError("demo_ids must be a list")
    components = dict(zip((*COMPONENT_KEYS, "answer"), _component_values(record["components"])))
    return CacheKey(record["query_id"], tuple(record["demo_ids"]), str(record["content"])), components
