"""Two processes (torchrun, gloo, CPU) whose groups are split across ranks get the advantages one process gets; with
selective rollout and dropped flat groups, every process holds the same history as the single process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trl_icd import compute_group_advantages
from trl_icd.advantages import aggregate_rewards

SCRIPT = Path(__file__).with_name("icd_grpo_distributed_run.py")
GROUP = 4


def _run(command, cwd):
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        WANDB_DISABLED="true",
    )
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _load(directory, rank):
    return json.loads((directory / f"rank{rank}.json").read_text())


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    single_dir, multi_dir = tmp_path / "single", tmp_path / "multi"
    single_dir.mkdir()
    multi_dir.mkdir()
    _run([sys.executable, str(SCRIPT), str(single_dir)], cwd=SCRIPT.parent)
    _run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT), str(multi_dir)],
        cwd=SCRIPT.parent,
    )
    single = _load(single_dir, 0)
    ranks = [_load(multi_dir, 0), _load(multi_dir, 1)]
    assert single["world_size"] == 1 and [r["world_size"] for r in ranks] == [2, 2]
    assert len(single["records"]) == 2

    for step, one in enumerate(single["records"]):
        parts = [r["records"][step] for r in ranks]
        # same global batch: the ranks' prompts in rank order are the single process's, and every rank saw the
        # same gathered rewards as the single process
        assert parts[0]["prompts"] + parts[1]["prompts"] == one["prompts"]
        assert parts[0]["rewards_per_func"] == parts[1]["rewards_per_func"] == one["rewards_per_func"]

        rewards = aggregate_rewards(torch.tensor(one["rewards_per_func"]), [1.0, 0.5], GROUP)
        split_group = rewards[GROUP : 2 * GROUP]  # rows 4..7: two on rank 0, two on rank 1
        assert len(set(split_group[~torch.isnan(split_group)].tolist())) > 1  # it has contrast to get wrong

        expected = compute_group_advantages(rewards, GROUP)
        torch.testing.assert_close(torch.tensor(one["local_advantages"]), expected)
        torch.testing.assert_close(torch.tensor(parts[0]["local_advantages"] + parts[1]["local_advantages"]), expected)
        for part in parts:  # the loss got each rank's slice (in TRL's shuffled order)
            assert sorted(part["loss_advantages"]) == pytest.approx(sorted(part["local_advantages"]))

        # adaptive KL: the coefficient is the same on every rank (the KL it follows is reduced over processes)
        assert parts[0]["beta"] == parts[1]["beta"]
    assert ranks[0]["final_beta"] == ranks[1]["final_beta"]

    # zero-contrast run: same skip decisions, same history and counters on every rank and in the single process
    single_zc = json.loads((single_dir / "zero_contrast_rank0.json").read_text())
    ranks_zc = [json.loads((multi_dir / f"zero_contrast_rank{r}.json").read_text()) for r in (0, 1)]
    assert single_zc["summary"]["zero_contrast/queries_skipped"] > 0
    for part in ranks_zc:
        assert part["flat_streak"] == single_zc["flat_streak"]
        assert part["times_scored"] == single_zc["times_scored"]
        assert part["summary"] == single_zc["summary"]
        assert part["rewards"] == single_zc["rewards"]
    for step, advantages in enumerate(single_zc["local_advantages"]):
        both = ranks_zc[0]["local_advantages"][step] + ranks_zc[1]["local_advantages"][step]
        assert both == pytest.approx(advantages)
