"""Trains ICDGRPOTrainer for two steps on a global batch of 12 rows (3 groups of 4) and writes what each process saw;
then a second run with selective rollout and flat groups dropped (6 steps), writing each process's zero-contrast
history, counters and advantages.

Run with one process (`python tests/icd_grpo_distributed_run.py OUT_DIR`) or two
(`torchrun --standalone --nproc_per_node 2 tests/icd_grpo_distributed_run.py OUT_DIR`): with two, each process holds
6 rows, so the middle group is split across the processes. `test_trainer_distributed.py` compares the two runs."""

import json
import os
import sys

import torch
from _icd_grpo_helpers import (
    BASE_CONFIG,
    RecordingTrainer,
    _question_number,
    parity_reward,
    position_reward,
    prompt_dataset,
    tiny_policy,
)

from trl_icd import ICDGRPOConfig

GLOBAL_BATCH = 12


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    model, tokenizer = tiny_policy()
    policy_dir = os.path.join(out_dir, f"policy-rank{rank}")
    model.save_pretrained(policy_dir)  # beta > 0: TRL builds the reference model from a path
    trainer = RecordingTrainer(
        model=policy_dir,
        reward_funcs=[position_reward, parity_reward],
        args=ICDGRPOConfig(
            **dict(BASE_CONFIG, output_dir=os.path.join(out_dir, "trainer")),
            per_device_train_batch_size=GLOBAL_BATCH // world_size,
            max_steps=2,
            advantage_mode="zscore",
            reward_weights=[1.0, 0.5],
            beta=0.04,
            adaptive_kl=True,
        ),
        train_dataset=prompt_dataset(6),
        processing_class=tokenizer,
    )
    trainer.train()
    records = [
        {
            "prompts": r["prompts"],
            "rewards_per_func": r["rewards_per_func"].tolist(),
            "local_advantages": r["local_advantages"].tolist(),
            "loss_advantages": torch.cat(r["loss_advantages"]).tolist(),
            "beta": r["beta"],
        }
        for r in trainer.records
    ]
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"world_size": world_size, "rank": rank, "records": records, "final_beta": trainer.beta}, f)
    zero_contrast_run(out_dir, model, tokenizer, world_size, rank)
    # Tear the process group down before exit: left to interpreter shutdown, gloo's threads can abort the process
    # ("terminate called without an active exception") after the work is done.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def occurrence_reward(prompts, completions, **kwargs):
    """Flat for even question numbers; for odd ones, the row's occurrence parity among this call's rows of the same
    prompt. A group of 4 gets 0,1,0,1 whether it is whole or split 2+2 across processes, and whether or not other
    groups were skipped before the call, so 1 and 2 processes see the same rewards."""
    seen = {}
    out = []
    for prompt in prompts:
        number = _question_number(prompt)
        seen[number] = seen.get(number, -1) + 1
        out.append(0.5 if number % 2 == 0 else float(seen[number] % 2))
    return out


def zero_contrast_run(out_dir, model, tokenizer, world_size, rank) -> None:
    trainer = RecordingTrainer(
        model=model,
        reward_funcs=[occurrence_reward],
        args=ICDGRPOConfig(
            **dict(BASE_CONFIG, output_dir=os.path.join(out_dir, "zero_contrast")),
            per_device_train_batch_size=GLOBAL_BATCH // world_size,
            max_steps=6,
            learning_rate=0.0,
            shuffle_dataset=False,
            zero_contrast_groups="drop",
            selective_rollout=True,
            selective_rollout_keep_prob=0.5,
            selective_rollout_min_keep_prob=0.25,
        ),
        train_dataset=prompt_dataset(6),
        processing_class=tokenizer,
    )
    trainer.train()
    state = trainer.zero_contrast_state
    with open(os.path.join(out_dir, f"zero_contrast_rank{rank}.json"), "w") as f:
        json.dump(
            {
                "flat_streak": state.flat_streak.tolist(),
                "times_scored": state.times_scored.tolist(),
                "summary": trainer.cost_summary(),
                "rewards": [r["rewards_per_func"].tolist() for r in trainer.records],
                "local_advantages": [r["local_advantages"].tolist() for r in trainer.records],
            },
            f,
        )


if __name__ == "__main__":
    main(sys.argv[1])
