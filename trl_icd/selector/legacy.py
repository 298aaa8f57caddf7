"""Reading the feature table out of a selector checkpoint written when the table was a weight of the model
(`model.items.features`), so such checkpoints still load (`ICDSelectorForCausalLM.from_pretrained` migrates them)."""

from __future__ import annotations

import json
import os

import numpy as np

from .modeling import LEGACY_TABLE_KEY

_WEIGHTS, _INDEX = "model.safetensors", "model.safetensors.index.json"
_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")


def _resolve(path: str | os.PathLike, filename: str, hub_kwargs: dict) -> str | None:
    from transformers.utils import cached_file

    return cached_file(os.fspath(path), filename, _raise_exceptions_for_missing_entries=False, **hub_kwargs)


def read_legacy_table(pretrained_model_name_or_path, **from_pretrained_kwargs) -> np.ndarray:
    """The `[num_items, feature_dim]` float32 table stored under `model.items.features` in a (possibly sharded)
    safetensors checkpoint, local or in the Hub cache."""
    from safetensors import safe_open

    hub_kwargs = {key: from_pretrained_kwargs[key] for key in _HUB_KWARGS if from_pretrained_kwargs.get(key)}
    weights = _resolve(pretrained_model_name_or_path, _WEIGHTS, hub_kwargs)
    if weights is None:
        index = _resolve(pretrained_model_name_or_path, _INDEX, hub_kwargs)
        if index is None:
            raise FileNotFoundError(f"{pretrained_model_name_or_path}: no {_WEIGHTS} or {_INDEX} to read the table from")
        with open(index) as f:
            shard = json.load(f)["weight_map"][LEGACY_TABLE_KEY]
        weights = _resolve(pretrained_model_name_or_path, shard, hub_kwargs)
    with safe_open(weights, framework="np") as f:
        return np.asarray(f.get_tensor(LEGACY_TABLE_KEY), dtype=np.float32)
