"""Trains the ICD selector with ICDGRPOTrainer (beta > 0: a reference model loaded from the path) for two steps on a
global batch of 12 rows, reading a feature table that every process memory-maps, and writes what each process saw:
rewards, advantages, the reference model's greedy selections, and what DDP syncs.

    python tests/selector_distributed_run.py TABLE_DIR SELECTOR_DIR OUT_DIR
    torchrun --standalone --nproc_per_node 2 tests/selector_distributed_run.py TABLE_DIR SELECTOR_DIR OUT_DIR

`test_selector_distributed.py` compares the two runs."""

import json
import os
import sys

import numpy as np
import torch
from datasets import Dataset
from torch.nn.parallel import DistributedDataParallel

from trl_icd import ICDGRPOConfig, ICDGRPOTrainer
from trl_icd.data import FeatureTable
from trl_icd.selector import selector_prompt

GLOBAL_BATCH, GROUP = 12, 4
QUERIES = [(0, [5, 9, 13, 17, 21]), (1, [30, 31, 32]), (2, [40, 3, 44, 7, 50, 11]), (3, [8, 16, 24, 32, 48, 56])]

# Bytes DDP broadcasts to keep buffers in sync (it does so before every forward of a module that has buffers).
BROADCAST = {"calls": 0, "bytes": 0}
_broadcast = DistributedDataParallel._distributed_broadcast_coalesced


def _counting_broadcast(self, tensors, buffer_size, authoritative_rank=0):
    BROADCAST["calls"] += 1
    BROADCAST["bytes"] += sum(t.numel() * t.element_size() for t in tensors)
    return _broadcast(self, tensors, buffer_size, authoritative_rank)


DistributedDataParallel._distributed_broadcast_coalesced = _counting_broadcast


def global_row(i: int, batch: int) -> int:
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    return rank * batch + i


def row_reward(prompts, completions, query_id, **kwargs):
    """Depends on the query and the row's place in the global batch only (not on the sampled selection), so a
    1-process and a 2-process run see the same rewards; with contrast inside every group."""
    return [float((7 * q + 3 * global_row(i, len(prompts))) % 5) for i, q in enumerate(query_id)]


class Recording(ICDGRPOTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.records = []

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self.records.append({"query_ids": [x["query_id"] for x in inputs], "rewards": rewards[:, 0].tolist()})
        return rewards

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        self.records[-1]["advantages"] = output["advantages"].tolist()
        return output


def table_tensors(model) -> list[str]:
    """Names of parameters or buffers shaped like a feature table (rows x feature_dim)."""
    rows, dim = model.config.feature_table["rows"], model.config.feature_dim
    named = list(model.named_parameters()) + list(model.named_buffers())
    return [name for name, tensor in named if tensor.dim() == 2 and tuple(tensor.shape) == (rows, dim)]


def main(table_dir: str, selector_dir: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    table = FeatureTable.load(table_dir)  # memory-mapped read-only; registered for selectors loaded from paths

    dataset = Dataset.from_list([
        {"prompt": selector_prompt(q, cands, 6), "query_id": q, "candidate_ids": cands} for q, cands in QUERIES
    ])
    trainer = Recording(
        model=selector_dir,  # policy and reference both loaded from the path: each finds the mapped table
        reward_funcs=row_reward,
        args=ICDGRPOConfig(
            output_dir=os.path.join(out_dir, "trainer"), use_cpu=True, bf16=False, report_to="none",
            save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0, num_generations=GROUP,
            per_device_train_batch_size=GLOBAL_BATCH // world_size, max_completion_length=4, max_steps=2,
            learning_rate=1e-2, beta=0.04, gradient_checkpointing=False, shuffle_dataset=False,
        ),
        train_dataset=dataset,
    )
    trainer.train()

    policy, reference = trainer.accelerator.unwrap_model(trainer.model), trainer.ref_model
    wrapped = trainer.model_wrapped
    ddp = {"wrapped": isinstance(wrapped, DistributedDataParallel)}
    if ddp["wrapped"]:
        ddp["synced_buffers"] = list(wrapped.named_module_buffers)
        ddp["synced_buffer_bytes"] = sum(b.numel() * b.element_size() for b in wrapped.modules_buffers)
        ddp["syncs_buffers"] = wrapped.will_sync_module_buffers()
        ddp["broadcast"] = dict(BROADCAST)
        # control: a module that does hold a buffer is broadcast, and the counter sees it
        probe = DistributedDataParallel(torch.nn.BatchNorm1d(3))
        probe(torch.randn(4, 3))
        ddp["probe_broadcast_bytes"] = BROADCAST["bytes"] - ddp["broadcast"]["bytes"]

    item_table = table.item_table()
    rows = table.combined_rows
    greedy = reference.select_demonstrations(
        rows([q for q, _ in QUERIES]), [rows(c) for _, c in QUERIES]
    )
    result = {
        "world_size": world_size,
        "records": trainer.records,
        "ddp": ddp,
        "mapped": isinstance(table.image, np.memmap) and not table.image.flags.writeable,
        "policy_reads_mapped_table": policy.feature_table is item_table,
        "reference_reads_mapped_table": reference.feature_table is item_table,
        "table_tensors": table_tensors(policy) + table_tensors(reference),
        "reference_greedy": greedy,
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
