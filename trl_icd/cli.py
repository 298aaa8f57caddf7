"""The scripts' argument parser: TRL's `TrlParser` (dataclasses + `--config recipe.yaml`) with a `--help` a person
can read.

`TrlParser` lists every field of every dataclass in one flat list (about 280 for the training script, most of them
TRL's and transformers') and does not list `--config`, which it consumes before parsing. `ICDArgumentParser` builds
the same parser, then regroups the options for help only: `--config` first, then one titled group per project
dataclass in the order given, then TRL's and transformers' options grouped by the class that declares them, shown as
a list of names (`--help_all` shows them in full). Parsing is untouched.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import inspect
import sys
import textwrap
from pathlib import Path

from trl import TrlParser

FOREIGN_PACKAGES = {"trl": "TRL", "transformers": "transformers"}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each help text (as `HfArgumentParser`), descriptions kept as written."""


class _HelpAll(argparse.Action):
    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.collapse_foreign = False
        parser.print_help()
        parser.exit()


def declaring_class(dtype: type, name: str) -> type:
    """The class in `dtype`'s MRO whose own annotations declare the field `name` (the most derived one)."""
    for klass in dtype.__mro__:
        if name in inspect.get_annotations(klass):
            return klass
    return dtype


def _package_of(klass: type) -> str | None:
    return FOREIGN_PACKAGES.get(klass.__module__.split(".")[0])


def _public(dtype: type, klass: type) -> type:
    """`klass`, or, when it is private (`_BaseConfig`), the nearest public subclass of it in `dtype`'s MRO."""
    mro = dtype.__mro__
    for candidate in reversed(mro[: mro.index(klass) + 1]):
        if not candidate.__name__.startswith("_"):
            return candidate
    return klass


def _docstring_summary(klass: type) -> str | None:
    doc = klass.__dict__.get("__doc__")
    if not doc or doc.startswith(f"{klass.__name__}("):  # the signature dataclasses writes when there is none
        return None
    return textwrap.fill(" ".join(inspect.cleandoc(doc).split("\n\n")[0].split()), width=100)


class ICDArgumentParser(TrlParser):
    """`TrlParser` with grouped, ordered help (see the module docstring). `collapse_foreign=False` (or `--help_all`)
    shows TRL's and transformers' options in full."""

    def __init__(self, dataclass_types, collapse_foreign: bool = True, **kwargs):
        kwargs.setdefault("usage", "%(prog)s [--config RECIPE.yaml] [--OPTION VALUE ...]")
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(dataclass_types, **kwargs)
        self.collapse_foreign = collapse_foreign
        self.foreign_groups: list[argparse._ArgumentGroup] = []
        self._regroup()

    def _regroup(self) -> None:
        first = self.add_argument_group("recipe and help")
        first._group_actions.append(self._move_out(self._option_string_actions["-h"]))
        first.add_argument(
            "--config", metavar="RECIPE.yaml", default=argparse.SUPPRESS,
            help="YAML file whose keys set any option below (e.g. recipes/demo/cpu.yaml); options given on the "
                 "command line override it.",
        )
        first.add_argument("--help_all", action=_HelpAll,
                           help="Show this help with TRL's and transformers' options described in full.")

        own, foreign, dests = {}, {}, {}
        for dtype in self.dataclass_types:
            for field in dataclasses.fields(dtype):
                if not field.init:
                    continue
                klass = declaring_class(dtype, field.name)
                package = _package_of(klass)
                if package is None:  # a project field, even when it lives in a subclass of a TRL config
                    key, table = dtype, own
                    parent = dtype.__mro__[1]
                    title = getattr(dtype, "_argument_group_name", dtype.__name__)
                    if _package_of(parent) is not None:
                        title = f"{dtype.__name__} (trl-icd's additions to {parent.__name__})"
                    description = _docstring_summary(dtype)
                else:  # TRL's class docstrings are pages long: the title says enough
                    klass = _public(dtype, klass)
                    key, table, title, description = klass, foreign, f"{klass.__name__} ({package})", None
                if key not in table:
                    table[key] = self.add_argument_group(title, description)
                dests.setdefault(key, set()).add(field.name)
        for key, group in [*own.items(), *foreign.items()]:
            for action in [a for a in self._actions if a.dest in dests[key]]:
                group._group_actions.append(self._move_out(action))
        # TRL's / transformers' groups: for each dataclass, most derived class first (GRPOConfig before
        # TrainingArguments), not in field order (which starts with the base class's fields).
        rank = {k: (i, d.__mro__.index(k)) for i, d in enumerate(self.dataclass_types) for k in d.__mro__}
        foreign = dict(sorted(foreign.items(), key=lambda item: rank[item[0]]))
        self.foreign_groups = list(foreign.values())
        # Help lists groups in this order: recipe/help, the project's, then TRL's and transformers'.
        keep = [first, *own.values(), *foreign.values()]
        self._action_groups = keep + [g for g in self._action_groups if g not in keep and g._group_actions]

    def _move_out(self, action: argparse.Action) -> argparse.Action:
        """Detach `action` from the group that holds it (for display only: the parser still owns it)."""
        for group in self._action_groups:
            if action in group._group_actions:
                group._group_actions.remove(action)
        return action

    def format_help(self) -> str:
        """Help with, for display only: TRL's/transformers' groups collapsed to their option names (unless
        `collapse_foreign`), one spelling per option (HF adds a hyphenated alias to each), and the `--no_X` switch
        of a boolean described as such."""
        changes = []  # (object, attribute, value to restore)

        def set_(obj, attr, value):
            changes.append((obj, attr, getattr(obj, attr)))
            setattr(obj, attr, value)

        try:
            for action in self._actions:
                spellings = [o for o in action.option_strings if not (o.startswith("--") and "-" in o[2:])]
                set_(action, "option_strings", spellings or action.option_strings)
                if isinstance(action, argparse._StoreFalseAction) and spellings[0] == f"--no_{action.dest}":
                    set_(action, "help", f"Same as --{action.dest} false.")
                    set_(action, "default", argparse.SUPPRESS)
            if self.collapse_foreign:
                for group in self.foreign_groups:
                    names = list(dict.fromkeys(a.option_strings[0] for a in group._group_actions
                                               if not isinstance(a, argparse._StoreFalseAction)))
                    set_(group, "description", textwrap.fill(
                        f"{len(names)} options (--help_all describes them): " + ", ".join(names), width=100,
                        break_on_hyphens=False,
                    ))
                    set_(group, "_group_actions", [])
            return super().format_help()
        finally:
            for obj, attr, value in reversed(changes):
                setattr(obj, attr, value)


def load_script(path: str | Path):
    """A script file (the examples and benchmarks live outside the package) imported as a module, once per process,
    so another script or a test can call its `main(argv)`. It is registered in `sys.modules` (as `_script_<stem>`)
    because dataclasses resolve their annotations through their module."""
    path = Path(path).resolve()
    module_name = f"_script_{path.stem}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[module_name]
            raise
    return sys.modules[module_name]


__all__ = ["HelpFormatter", "ICDArgumentParser", "declaring_class", "load_script"]
