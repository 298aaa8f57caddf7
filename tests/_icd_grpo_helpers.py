"""Shared pieces of the ICDGRPOTrainer tests (imported by test_trainer*.py and the torchrun script)."""

import re

import torch
from datasets import Dataset

from trl_icd import ICDGRPOTrainer
from trl_icd.testing.text import tiny_qwen2_lm
from trl_icd.testing.tokenizer import tiny_chat_tokenizer

BASE_CONFIG = dict(
    use_cpu=True,
    bf16=False,
    gradient_checkpointing=False,
    report_to="none",
    save_strategy="no",
    logging_steps=1,
    max_completion_length=6,
    num_generations=4,
    seed=0,
    disable_tqdm=True,
)


def tiny_policy(seed: int = 0):
    tokenizer = tiny_chat_tokenizer()
    return tiny_qwen2_lm(tokenizer, seed=seed), tokenizer


def prompt_dataset(n: int = 8) -> Dataset:
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": f"Question {i}: what is {i} plus 1?"}] for i in range(n)]})


def _question_number(prompt) -> int:
    content = prompt[0]["content"]
    if not isinstance(content, str):  # structured (vision-language) content
        content = " ".join(part.get("text") or "" for part in content)
    return int(re.search(r"Question (\d+)", content).group(1))


def _global_row(i: int, batch: int) -> int:
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    return rank * batch + i


def position_reward(prompts, completions, **kwargs):
    """Depends only on the prompt and the row's position in the global batch, so a 1-process and a 2-process run
    with the same global batch see the same rewards. Ties and `None` (rows 5 mod 7) included."""
    out = []
    for i, prompt in enumerate(prompts):
        row = _global_row(i, len(prompts))
        out.append(None if row % 7 == 5 else float((3 * row + _question_number(prompt)) % 5))
    return out


def parity_reward(prompts, completions, **kwargs):
    """A second function: `None` on rows 5 and 6 mod 7 (so rows 5 mod 7 are unscorable, rows 6 mod 7 partial)."""
    out = []
    for i in range(len(prompts)):
        row = _global_row(i, len(prompts))
        out.append(None if row % 7 in (5, 6) else float(row % 3))
    return out


def completion_reward(completions, **kwargs):
    """Depends on the sampled text (so it varies within a group); `None` on rows 1 mod 4 (with `position_reward`,
    row 5 of a batch is unscorable)."""
    return [None if i % 4 == 1 else float(len(c[0]["content"]) % 4) for i, c in enumerate(completions)]


class RecordingTrainer(ICDGRPOTrainer):
    """Records, per generation, the gathered rewards, the advantages handed to the loss (before TRL's shuffle) and
    the advantages the loss actually received."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.records = []

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self.records.append(
            {
                "mode": "train" if self.model.training else "eval",
                "rewards_per_func": rewards_per_func.detach().clone(),
                "prompts": [p[0]["content"] for p in prompts],
                "loss_advantages": [],
            }
        )
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        self.records[-1]["local_advantages"] = output["advantages"].detach().clone()
        return output

    def _compute_loss(self, model, inputs):
        self.records[-1]["loss_advantages"].append(inputs["advantages"].detach().clone())
        self.records[-1]["beta"] = self.beta
        return super()._compute_loss(model, inputs)
