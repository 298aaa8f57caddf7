"""Is a `dataset_path` or checkpoint string a local folder or a Hugging Face Hub id? Decided before anything heavy
runs, so a missing folder fails at once with what to do instead of after the Hub client's retries.

`data/okvqa` is both a relative path and a valid-looking Hub id (`owner/name`). The rules, in order:

1. it exists on disk: local (a folder; a file where a folder is expected is an error);
2. it can only be a path (absolute, `./`, `../`, `~`, a backslash, more than one `/`, a trailing `/`, or no `/` at
   all, which no Hub dataset or model id of the `owner/name` form is): local, so it must exist;
3. it is `owner/name` and `owner` exists as a local folder (e.g. `data/` is there but `data/okvqa` is not): local;
4. otherwise it is read as a Hub id. Unless the caller knows the id (`known_hub_ids`, e.g. the dataset presets),
   that reading is *ambiguous* and is checked at once (`hub_unavailable`: offline, the local Hub cache only;
   online, one metadata request without retries); when the Hub cannot provide it either, the error names both
   readings, with how to get the data.

Writing a local path as `./data/okvqa` in a recipe settles the question (rule 2).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class SourceNotFoundError(FileNotFoundError):
    """A local source that does not exist (or is not what was expected), with what to do about it."""


@dataclass(frozen=True)
class ResolvedSource:
    """Where to load from: `kind` "local" (`value` is the expanded path) or "hub" (`value` is the repo id).
    `ambiguous`: a Hub reading of a string that could also be a missing local folder."""

    kind: str
    value: str
    ambiguous: bool = False

    @property
    def is_local(self) -> bool:
        return self.kind == "local"


def only_a_path(text: str) -> bool:
    """True when `text` cannot be an `owner/name` Hub id, so it must be a path (rule 2)."""
    if os.path.isabs(text) or text.startswith((".", "~")) or "\\" in text or text.endswith(("/", os.sep)):
        return True
    if os.sep != "/" and os.sep in text:
        return True
    return HUB_ID.match(text) is None


def resolve_source(
    value: str | os.PathLike,
    what: str,
    hint: str = "",
    expect: str = "dir",
    known_hub_ids: Collection[str] = (),
    repo_type: str = "dataset",
    probe_hub: bool = True,
) -> ResolvedSource:
    """Apply the module's rules to `value`. A local reading that does not exist raises `SourceNotFoundError` naming
    `what` (e.g. "OK-VQA data folder") and ending with `hint` (how to get it); so does an ambiguous string that the
    Hub cannot provide either (`hub_unavailable`, unless `probe_hub=False`), naming both readings. `expect`: "dir" or
    "file" for an existing local path."""
    if expect not in ("dir", "file"):
        raise ValueError(f"expect must be 'dir' or 'file', got {expect!r}")
    text = os.fspath(value)
    if not text:
        raise ValueError(f"{what}: empty path")
    path = Path(os.path.expanduser(text))
    if path.exists():
        _check_kind(path, text, what, expect)
        return ResolvedSource("local", str(path))
    if text in known_hub_ids:
        return ResolvedSource("hub", text)
    if only_a_path(text):
        raise SourceNotFoundError(missing_message(text, what, hint))
    owner = text.split("/", 1)[0]
    if Path(owner).is_dir():
        raise SourceNotFoundError(
            missing_message(text, what, hint, note=f"{owner}/ exists here, so {text!r} is read as a local path")
        )
    if probe_hub:
        reason = hub_unavailable(text, repo_type)
        if reason is not None:
            raise SourceNotFoundError(hub_failure_message(text, what, reason, hint, repo_type))
    return ResolvedSource("hub", text, ambiguous=True)


def require_local(value: str | os.PathLike, what: str, hint: str = "", expect: str = "dir") -> Path:
    """`value` must be an existing local folder (or file): its path, else `SourceNotFoundError`."""
    text = os.fspath(value)
    path = Path(os.path.expanduser(text))
    if not path.exists():
        raise SourceNotFoundError(missing_message(text, what, hint))
    _check_kind(path, text, what, expect)
    return path


def _check_kind(path: Path, text: str, what: str, expect: str) -> None:
    if expect == "dir" and not path.is_dir():
        raise SourceNotFoundError(f"{what} {text!r} is a file; expected a folder")
    if expect == "file" and not path.is_file():
        raise SourceNotFoundError(f"{what} {text!r} is a folder; expected a file")


def missing_message(text: str, what: str, hint: str = "", note: str = "") -> str:
    where = os.path.abspath(os.path.expanduser(text))
    lines = [f"{what} {text!r} does not exist" + (f" ({where})" if where != text else "")
             + (f"; {note}" if note else "") + "."]
    if hint:
        lines.append(hint)
    return "\n".join(lines)


def hub_failure_message(text: str, what: str, reason: str, hint: str = "", repo_type: str = "dataset") -> str:
    """The message for an ambiguous source that the Hub cannot provide either: both readings."""
    return "\n".join([
        f"{what} {text!r} could not be found under either reading:",
        f"  - as a local folder: {os.path.abspath(text)} does not exist;",
        f"  - as the Hub {repo_type} {text!r}: {reason}.",
        f"Write a local path as ./{text} (or an absolute path) so it is never read as a Hub id.",
        *([hint] if hint else []),
    ])


def hub_unavailable(repo_id: str, repo_type: str = "dataset") -> str | None:
    """Why the Hub cannot provide `repo_id` right now, or None when it can (or a cached copy exists). Offline
    (HF_HUB_OFFLINE=1) only the local cache is consulted; online one metadata request is made (no retries)."""
    if _hub_offline():
        if _cached(repo_id, repo_type):
            return None
        return "the Hub is offline (HF_HUB_OFFLINE=1) and there is no cached copy"
    try:
        from huggingface_hub import HfApi

        exists = HfApi().repo_exists(repo_id, repo_type=repo_type)
    except Exception as error:  # no network, DNS, proxy, ...: the Hub reading cannot work either
        return f"the Hub could not be reached ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
    return None if exists else f"the Hub has no {repo_type} of that name (or it is private: log in first)"


def _cached(repo_id: str, repo_type: str) -> bool:
    if repo_type == "model":
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    try:  # what `datasets.load_dataset` does offline: resolve the dataset from its caches
        from datasets import load_dataset_builder

        load_dataset_builder(repo_id)
    except Exception:
        return False
    return True


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def check_pretrained_path(value: str | os.PathLike, what: str, marker: str = "config.json") -> ResolvedSource:
    """A checkpoint to load with `from_pretrained`: a local folder must exist and hold `marker`; an `owner/name`
    string with no such folder is left to the Hub (ambiguous, see `resolve_source`)."""
    resolved = resolve_source(value, what, repo_type="model")
    if resolved.is_local and not (Path(resolved.value) / marker).is_file():
        raise SourceNotFoundError(
            f"{what} {os.fspath(value)!r} is a folder without {marker}: not a saved checkpoint "
            f"(has: {sorted(p.name for p in Path(resolved.value).iterdir())[:10]})"
        )
    return resolved


@contextmanager
def exit_on_missing_input() -> Iterator[None]:
    """For scripts' `__main__`: a missing input ends the run with its message and exit status 2, not a traceback
    (`main()` called from Python still raises)."""
    try:
        yield
    except SourceNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


__all__ = [
    "HUB_ID",
    "ResolvedSource",
    "SourceNotFoundError",
    "check_pretrained_path",
    "exit_on_missing_input",
    "hub_failure_message",
    "hub_unavailable",
    "missing_message",
    "only_a_path",
    "require_local",
    "resolve_source",
]
