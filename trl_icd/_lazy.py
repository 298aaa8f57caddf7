"""Lazy attribute loading for package `__init__` files: `import trl_icd` stays fast and pulls in TRL/transformers
only when a name that needs them is first used."""

from __future__ import annotations

import importlib


def lazy_module_getattr(package: str, names: dict[str, str]):
    """A module-level `__getattr__` resolving `names[attr]` (a submodule path relative to `package`)."""

    def __getattr__(attr: str):
        if attr not in names:
            raise AttributeError(f"module {package!r} has no attribute {attr!r}")
        value = getattr(importlib.import_module(names[attr], package), attr)
        return value

    return __getattr__
