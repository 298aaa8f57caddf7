"""The reward as a drop-in TRL reward function: stock `trl.GRPOTrainer`, a tiny text policy that writes corpus ids,
and `QwenVLInContextReward` over a tiny random Qwen2.5-VL."""

import re

import pytest
from datasets import Dataset
from PIL import Image
from trl import GRPOConfig, GRPOTrainer

from trl_icd.data.corpus import Corpus
from trl_icd.rewards.in_context import QwenVLInContextReward
from trl_icd.testing.qwen_vl import tiny_qwen2_5_vl
from trl_icd.testing.text import tiny_qwen2_lm
from trl_icd.testing.tokenizer import tiny_chat_tokenizer

COLOURS = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (220, 220, 30), (200, 200, 200)]


def grid_corpus(n: int = 100) -> Corpus:
    records = []
    for i in range(n):
        image = Image.new("RGB", (28 + 14 * (i % 3), 28), COLOURS[i % 5])
        records.append({"id": i, "image": image, "image_id": 500 + i, "question": f"what is item {i % 7}?",
                        "answers": [f"thing {i % 4}"] * 7 + ["other"] * 3})
    return Corpus.from_records(records)


def id_list_tokens(tokenizer) -> list[int]:
    """Tokens a policy may emit to write an id list ("12, 3"): single digits, commas, spaces, the end token."""
    keep = {i for i in range(len(tokenizer)) if re.fullmatch(r"[0-9]|[, ]+", tokenizer.decode([i]) or "x")}
    return sorted(keep | {tokenizer.eos_token_id})


@pytest.mark.slow
def test_plain_grpo_trainer_trains_with_the_qwen_vl_reward(tmp_path):
    tokenizer = tiny_chat_tokenizer()
    vl_model, processor = tiny_qwen2_5_vl()
    vl_model.save_pretrained(tmp_path / "scorer")
    corpus = grid_corpus()
    reward = QwenVLInContextReward(
        tmp_path / "scorer", corpus, backend_kwargs={"processor": processor, "max_new_tokens": 3},
        cache_path=tmp_path / "rewards.sqlite", max_shots=3, mode="hard_plus_gtprob_plus_rel", rel_weight=0.5,
    )
    allowed = set(id_list_tokens(tokenizer))
    queries = [0, 9, 18, 27]
    dataset = Dataset.from_dict({"prompt": [f"Write demonstration ids for query {q}:" for q in queries],
                                 "query_id": queries})
    args = GRPOConfig(
        output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, gradient_checkpointing=False,
        per_device_train_batch_size=8, num_generations=4, max_completion_length=6, max_steps=3,
        learning_rate=1e-3, logging_steps=1, report_to="none", save_strategy="no", seed=0,
        generation_kwargs={"suppress_tokens": [i for i in range(len(tokenizer)) if i not in allowed]},
    )
    trainer = GRPOTrainer(model=tiny_qwen2_lm(tokenizer), processing_class=tokenizer, reward_funcs=[reward],
                          args=args, train_dataset=dataset)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()

    assert sum(reward.status_counts.values()) == 3 * 8
    assert reward.status_counts["ok"] >= 4 and reward.cache_misses >= 4
    assert set(reward.status_counts) <= {"ok", "empty", "unknown_id", "duplicate_id", "too_many_shots",
                                         "query_as_demo", "unparseable"}
    logs = [entry for entry in trainer.state.log_history if "in_context_reward/invalid_rate" in entry]
    assert len(logs) == 3
    assert any("in_context_reward/soft" in entry and "rewards/in_context_reward/mean" in entry for entry in logs)
    assert reward.cache.count(reward.scorer_hash) == reward.cache_misses
    assert any(entry["reward_std"] > 0 for entry in logs)  # wrong answers are graded by relevance
    assert any(not (p.detach() == before[n]).all() for n, p in trainer.model.named_parameters())


@pytest.mark.slow
def test_icd_grpo_trainer_with_the_selector_and_the_reward(tmp_path):
    import torch

    from trl_icd import ICDGRPOConfig, ICDGRPOTrainer
    from trl_icd.data.features import fallback_features
    from trl_icd.data.samplers import sample_candidate_pools
    from trl_icd.data.selector_dataset import build_selector_dataset
    from trl_icd.rewards.in_context import InContextReward
    from trl_icd.rewards.qwen_vl import QwenVLBackend
    from trl_icd.selector import ICDSelectorForCausalLM, build_selector_tokenizer

    corpus = grid_corpus(30)
    features = fallback_features(corpus, text_dim=32, show_progress=False)
    pools = sample_candidate_pools(corpus, features, query_ids=[0, 1, 2, 3], pool_ids=list(range(4, 30)), k=6,
                                   show_progress=False)
    selector = ICDSelectorForCausalLM.from_features(torch.as_tensor(features.combined()), num_slots=6, max_shots=3)
    tokenizer = build_selector_tokenizer(selector.config)
    dataset = build_selector_dataset(corpus, pools, vocabulary=tokenizer)
    vl_model, processor = tiny_qwen2_5_vl()
    reward = InContextReward(corpus, QwenVLBackend(vl_model, processor, max_new_tokens=3), tokenizer=tokenizer,
                             mode="hard_plus_gtprob_plus_rel", rel_weight=0.5)
    chosen = []
    original = reward._finish_call

    def record(statuses, components, *args):
        chosen.extend((c["query_id"], c["demo_ids"]) for c in components if c is not None)
        return original(statuses, components, *args)

    reward._finish_call = record
    args = ICDGRPOConfig(
        output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, gradient_checkpointing=False,
        per_device_train_batch_size=8, num_generations=4, max_completion_length=4, max_steps=2,
        learning_rate=1e-3, logging_steps=1, report_to="none", save_strategy="no", seed=0,
    )
    trainer = ICDGRPOTrainer(model=selector, processing_class=tokenizer, reward_funcs=[reward], args=args,
                             train_dataset=dataset)
    trainer.train()

    assert dict(reward.status_counts) == {"ok": 2 * 8}  # a selector never writes an invalid selection
    assert len(chosen) == 16 and all(1 <= len(d) <= 3 and set(d) <= set(pools[q]) for q, d in chosen)
    logs = [entry for entry in trainer.state.log_history if "in_context_reward/soft" in entry]
    assert len(logs) == 2 and all(entry["in_context_reward/invalid_rate"] == 0 for entry in logs)
