"""The scripts' `--help`: `--config` listed, the project's options first in one titled group per dataclass, TRL's
and transformers' after them (collapsed to names; `--help_all` in full); parsing identical to `TrlParser`'s."""

import re

import pytest
from e2e_scripts import ROOT, load_script
from trl import TrlParser

from trl_icd.cli import ICDArgumentParser, declaring_class

DEMO = str(ROOT / "recipes" / "demo" / "cpu.yaml")
PROJECT = ["recipe and help", "TrainScriptArguments", "DataArguments", "RewardArguments", "SelectorArguments",
           "RCEArguments", "ICDGRPOConfig (trl-icd's additions to GRPOConfig)", "ConsoleArguments", "HeldoutArguments"]
FOREIGN = ["GRPOConfig (TRL)", "TrainingArguments (transformers)", "ModelConfig (TRL)"]


def group_titles(help_text: str) -> list[str]:
    return [line[:-1] for line in help_text.splitlines() if re.match(r"^\S.*:$", line) and not line.startswith("usage")]


def test_train_help_lists_config_and_groups_in_order():
    parser = load_script("train_okvqa").make_parser()
    text = parser.format_help()
    assert group_titles(text) == PROJECT + FOREIGN
    assert re.search(r"^  --config RECIPE\.yaml", text, re.M) and "--help_all" in text
    # project options are described; TRL's/transformers' are listed by name only
    assert re.search(r"^  --advantage_mode ADVANTAGE_MODE\n\s+How rewards become advantages", text, re.M)
    assert "--learning_rate" in text and not re.search(r"^  --learning_rate LEARNING_RATE", text, re.M)
    assert text.index("--pool_size") < text.index("--advantage_mode") < text.index("--learning_rate")
    # one spelling per option, and the --no_X switch of a boolean says what it does
    assert "--pool-size" not in text and "--no_run_grpo         Same as --run_grpo false." in text
    assert len(text.splitlines()) < 400  # was 1,558 lines
    parser.collapse_foreign = False
    full = parser.format_help()
    assert group_titles(full) == PROJECT + FOREIGN
    assert re.search(r"^  --learning_rate LEARNING_RATE", full, re.M)
    assert parser.format_help() == full and "--pool-size" not in full
    parser.collapse_foreign = True
    assert parser.format_help() == text  # formatting leaves the parser as it was


@pytest.mark.parametrize(
    "script, titles",
    [
        ("evaluate_okvqa", ["recipe and help", "EvalArguments", "DataArguments", "RewardArguments", "SelectorArguments"]),
        ("generate_rl_data", ["recipe and help", "RLDataArguments", "DataArguments", "RewardArguments",
                              "SelectorArguments"]),
    ],
)
def test_other_scripts_help(script, titles, capsys):
    with pytest.raises(SystemExit) as info:
        load_script(script).main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert group_titles(text) == titles and re.search(r"^  --config RECIPE\.yaml", text, re.M)
    assert "[--config RECIPE.yaml] [--OPTION VALUE ...]" in text.splitlines()[0]


def test_parsing_is_unchanged():
    """Same dataclasses, same values as TRL's own parser on a recipe plus command-line overrides (both spellings,
    a boolean switch)."""
    types = load_script("train_okvqa").make_parser().dataclass_types
    argv = ["--config", DEMO, "--max_steps", "7", "--pool-size", "4", "--no_run_grpo", "--output_dir", "x"]
    ours = ICDArgumentParser(types).parse_args_and_config(list(argv))
    theirs = TrlParser(types).parse_args_and_config(list(argv))
    assert [type(a) for a in ours] == list(types)
    for a, b in zip(ours, theirs, strict=True):
        assert a == b or a.to_dict() == b.to_dict()
    assert ours[0].run_grpo is False and ours[1].pool_size == 4 and ours[5].max_steps == 7


def test_declaring_class_finds_the_most_derived_declaration():
    from trl import GRPOConfig
    from transformers import TrainingArguments

    from trl_icd import ICDGRPOConfig

    assert declaring_class(ICDGRPOConfig, "advantage_mode") is ICDGRPOConfig
    assert declaring_class(ICDGRPOConfig, "num_generations") is GRPOConfig
    assert declaring_class(ICDGRPOConfig, "seed") is TrainingArguments
