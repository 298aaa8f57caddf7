"""Two processes (torchrun, gloo, CPU) train the selector reading one memory-mapped feature table: nothing of the
table is broadcast or held by the model (DDP syncs no buffer), and the advantages and the reference model's
selections are those one process computes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from trl_icd.data import FeatureTable
from trl_icd.selector import ICDSelectorForCausalLM, build_selector_tokenizer

SCRIPT = Path(__file__).with_name("selector_distributed_run.py")


def _run(command, cwd):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", WANDB_DISABLED="true")
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.slow
def test_two_processes_map_the_table_and_match_one(tmp_path):
    rng = np.random.default_rng(0)
    unit = lambda m: (m / np.linalg.norm(m, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    table = FeatureTable(list(range(64)), unit(rng.standard_normal((64, 12))), unit(rng.standard_normal((64, 12))),
                         {"featurizer": "synthetic"})
    table.save(tmp_path / "table")
    torch.manual_seed(0)
    model = ICDSelectorForCausalLM.from_features(table, num_slots=6, min_shots=1, max_shots=3, hidden_size=16,
                                                 num_heads=2, num_layers=1, num_decoder_layers=1)
    with torch.no_grad():  # a confident start policy, so greedy selections are not ties
        for parameter in model.model.pointer.parameters():
            parameter.normal_(0.0, 3.0)
    model.save_pretrained(tmp_path / "selector")
    build_selector_tokenizer(model.config).save_pretrained(tmp_path / "selector")
    paths = [str(tmp_path / "table"), str(tmp_path / "selector")]
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    _run([sys.executable, str(SCRIPT), *paths, str(tmp_path / "one")], cwd=SCRIPT.parent)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT), *paths,
          str(tmp_path / "two")], cwd=SCRIPT.parent)
    one = json.loads((tmp_path / "one" / "rank0.json").read_text())
    ranks = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert one["world_size"] == 1 and [r["world_size"] for r in ranks] == [2, 2]

    for run in [one, *ranks]:
        # every process maps the file read-only; policy and reference read that very table; no tensor holds it
        assert run["mapped"] and run["policy_reads_mapped_table"] and run["reference_reads_mapped_table"]
        assert run["table_tensors"] == []
    for run in ranks:
        ddp = run["ddp"]
        assert ddp["wrapped"]
        assert ddp["synced_buffers"] == [] and ddp["synced_buffer_bytes"] == 0 and not ddp["syncs_buffers"]
        assert ddp["broadcast"] == {"calls": 0, "bytes": 0}  # nothing broadcast in any training forward
        assert ddp["probe_broadcast_bytes"] > 0  # the counter does see a module that has buffers

    assert len(one["records"]) == 2
    for step, single in enumerate(one["records"]):
        parts = [r["records"][step] for r in ranks]
        assert parts[0]["query_ids"] + parts[1]["query_ids"] == single["query_ids"]
        assert parts[0]["rewards"] == parts[1]["rewards"] == single["rewards"]  # gathered: the global batch
        assert len(set(single["rewards"][4:8])) > 1  # the group split across the two processes has contrast
        torch.testing.assert_close(torch.tensor(parts[0]["advantages"] + parts[1]["advantages"]),
                                   torch.tensor(single["advantages"]))
    assert ranks[0]["reference_greedy"] == ranks[1]["reference_greedy"] == one["reference_greedy"]
    assert any(len(picks) > 1 for picks in one["reference_greedy"])
