"""The selector under TRL: the fused-head log-probs TRL trains on equal the model's own (any temperature, bf16
autocast), and ICDGRPOTrainer really trains it (pointer and stop), also with LoRA and with a reference model."""

import copy
import math

import pytest
import torch
from datasets import Dataset
from trl.trainer.utils import add_fused_lm_head

from trl_icd import ICDGRPOConfig, ICDGRPOTrainer
from trl_icd.selector import parse_selection, selector_prompt
from trl_icd.selector.vocabulary import SLOT_OFFSET, STOP_ID
from trl_icd.testing.selector import random_pools, selector_prompts, tiny_selector




def sampled_batch(model, tokenizer, pools, temperature, samples=4):
    """(input_ids, attention_mask, prompt_length): sampled sequences laid out as TRL scores them (left-padded
    prompt, completion masked after the first stop, padding replaced by pad ids)."""
    encoded = tokenizer(selector_prompts(pools, tokenizer), return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(
            **encoded,
            do_sample=True,
            temperature=temperature,
            max_new_tokens=model.config.max_completion_length,
            num_return_sequences=samples,
        )
    prompt_length = encoded["input_ids"].shape[1]
    completions = out[:, prompt_length:]
    is_stop = completions == STOP_ID
    completion_mask = (torch.arange(completions.shape[1])[None] <= is_stop.int().argmax(1)[:, None]).long()
    attention_mask = torch.cat([encoded["attention_mask"].repeat_interleave(samples, 0), completion_mask], 1)
    return out.masked_fill(attention_mask == 0, tokenizer.pad_token_id), attention_mask, prompt_length


def own_log_probs(model, input_ids, attention_mask, prompt_length, temperature):
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    log_probs = (logits[:, prompt_length - 1 : -1] / temperature).log_softmax(-1)
    return log_probs.gather(-1, input_ids[:, prompt_length:, None])[..., 0]


@pytest.mark.parametrize("item_vocab", ["code", "token"])
@pytest.mark.parametrize("temperature", [1.0, 0.5, 1.7])
def test_fused_head_log_probs_equal_the_models_own(item_vocab, temperature):
    model, tokenizer = tiny_selector(num_slots=6, min_shots=1, max_shots=4, peaked=True, item_vocab=item_vocab)
    input_ids, attention_mask, prompt_length = sampled_batch(
        model, tokenizer, random_pools(14, 40, 6, seed=1), temperature
    )
    own = own_log_probs(model, input_ids, attention_mask, prompt_length, temperature)

    fused_model = copy.deepcopy(model)
    add_fused_lm_head(fused_model, temperature=temperature, outputs=("log_probs", "entropy"))
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :prompt_length] = -100
    out = fused_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
    fused = out.log_probs[:, prompt_length - 1 :]
    scored = attention_mask[:, prompt_length:].bool()
    assert scored.sum() > 100
    torch.testing.assert_close(fused[scored], own[scored], rtol=0, atol=1e-5)
    assert own[scored].min() > -20  # sampled tokens are valid: far from the mask value's log-prob
    assert torch.isfinite(out.entropy).all()
    out.log_probs.sum().backward()  # finite gradients despite the mask constant
    grads = [p.grad for p in fused_model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_fused_head_matches_under_bf16_autocast_with_fp32_head():
    """The backbone ignores autocast (it always runs in its parameters' dtype), so with TRL's
    `cast_lm_head_to_fp32=True` bf16 mixed-precision training scores exactly what the sampler drew."""
    model, tokenizer = tiny_selector(num_slots=6, peaked=True)
    input_ids, attention_mask, prompt_length = sampled_batch(model, tokenizer, random_pools(7, 40, 6, seed=2), 1.0)
    own = own_log_probs(model, input_ids, attention_mask, prompt_length, 1.0)
    add_fused_lm_head(model, cast_lm_head_to_fp32=True)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :prompt_length] = -100
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
    scored = attention_mask[:, prompt_length:].bool()
    torch.testing.assert_close(out.log_probs[:, prompt_length - 1 :][scored], own[scored], rtol=0, atol=1e-5)


# ---- learning under ICDGRPOTrainer ------------------------------------------------------------------------------

NUM_ITEMS, NUM_SLOTS, TARGET_LENGTH = 40, 6, 2


def preference_task(tokenizer, features):
    """Queries whose 2 most similar candidates are 'preferred'; the reward is the fraction of preferred picks plus 1
    for choosing exactly TARGET_LENGTH demonstrations (so both the pointer and the stop decision must learn)."""
    pools = random_pools(8, NUM_ITEMS, NUM_SLOTS, seed=5, sizes=[4, 5, 6])
    rows, preferred = [], {}
    for query, candidates in pools:
        ids = [f"item-{row}" for row in candidates]  # corpus ids travel in the dataset; prompts name table rows
        similarity = features[candidates] @ features[query]
        preferred[f"item-{query}"] = {ids[i] for i in similarity.argsort(descending=True)[:2].tolist()}
        rows.append(
            {
                "prompt": selector_prompt(query, candidates, vocabulary=tokenizer),
                "query_id": f"item-{query}",
                "candidate_ids": ids,
            }
        )

    def preference_reward(prompts, completions, completion_ids, query_id, candidate_ids, **kwargs):
        rewards = []
        for ids, text, query, candidates in zip(completion_ids, completions, query_id, candidate_ids):
            chosen = parse_selection(ids, candidates, tokenizer)
            assert parse_selection(text, candidates, tokenizer) == chosen
            hits = sum(c in preferred[query] for c in chosen)
            rewards.append(hits / len(chosen) + 0.5 * float(len(chosen) == TARGET_LENGTH))
        return rewards

    return Dataset.from_list(rows), preferred, preference_reward


def policy_statistics(model, tokenizer, dataset, preferred) -> tuple[float, float]:
    """Exact, averaged over queries: P(first pick is preferred) and P(exactly TARGET_LENGTH picks), by enumerating
    every ordered pair of first two picks."""
    model.eval()
    first_preferred, length_two = [], []
    for row in dataset:
        prompt = tokenizer(row["prompt"])["input_ids"]
        size = len(row["candidate_ids"])
        pairs = [(a, b) for a in range(size) for b in range(size) if a != b]
        ids = torch.tensor([prompt + [SLOT_OFFSET + a, SLOT_OFFSET + b] for a, b in pairs])
        with torch.no_grad():
            probs = model(input_ids=ids).logits[:, -3:].float().softmax(-1)
        first = probs[0, 0]
        good = [k for k, c in enumerate(row["candidate_ids"]) if c in preferred[row["query_id"]]]
        first_preferred.append(sum(first[SLOT_OFFSET + k].item() for k in good))
        length_two.append(
            sum(
                first[SLOT_OFFSET + a].item() * probs[i, 1, SLOT_OFFSET + b].item() * probs[i, 2, STOP_ID].item()
                for i, (a, b) in enumerate(pairs)
            )
        )
    model.train()
    return sum(first_preferred) / len(first_preferred), sum(length_two) / len(length_two)


def grpo_config(tmp_path, **overrides) -> ICDGRPOConfig:
    values = {
        "output_dir": str(tmp_path / "run"),
        "use_cpu": True,
        "bf16": False,
        "per_device_train_batch_size": 16,
        "num_generations": 8,
        "max_completion_length": 4,
        "learning_rate": 5e-3,
        "lr_scheduler_type": "constant",
        "max_steps": 24,
        "logging_steps": 4,
        "save_strategy": "no",
        "report_to": "none",
        "seed": 0,
        "dataloader_num_workers": 0,
    }
    return ICDGRPOConfig(**{**values, **overrides})


def fresh_selector():
    return tiny_selector(num_items=NUM_ITEMS, num_slots=NUM_SLOTS, min_shots=1, max_shots=3, seed=3)


def test_icd_grpo_trainer_learns_preferred_picks_and_when_to_stop(tmp_path):
    model, tokenizer = fresh_selector()
    dataset, preferred, reward = preference_task(tokenizer, model.model.items.features)
    chance_pick, chance_length = policy_statistics(model, tokenizer, dataset, preferred)
    assert math.isclose(chance_length, 0.25, abs_tol=1e-6)  # fair stop coin at step 1 and at step 2
    args = grpo_config(tmp_path, temperature=0.9)  # gradient checkpointing on (TRL's default)
    assert args.gradient_checkpointing
    trainer = ICDGRPOTrainer(
        model=model, reward_funcs=reward, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.train()
    pick, length = policy_statistics(trainer.model, tokenizer, dataset, preferred)
    assert pick > chance_pick + 0.25, (chance_pick, pick)  # measured: 0.36 -> 0.70
    assert length > chance_length + 0.4, (chance_length, length)  # measured: 0.25 -> 0.97

    # what the trainer scores is what the sampler draws, at the trainer's temperature
    input_ids, attention_mask, prompt_length = sampled_batch(
        trainer.model, tokenizer, random_pools(6, NUM_ITEMS, NUM_SLOTS, seed=9), args.temperature
    )
    with torch.no_grad():
        trainer_log_probs, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, input_ids, attention_mask, input_ids.shape[1] - prompt_length
        )
    own = own_log_probs(trainer.model, input_ids, attention_mask, prompt_length, args.temperature)
    scored = attention_mask[:, prompt_length:].bool()
    torch.testing.assert_close(trainer_log_probs[scored], own[scored], rtol=0, atol=1e-5)


def test_icd_grpo_trainer_learns_with_lora(tmp_path):
    from peft import LoraConfig, PeftModel

    model, tokenizer = fresh_selector()
    dataset, preferred, reward = preference_task(tokenizer, model.model.items.features)
    chance_pick, chance_length = policy_statistics(model, tokenizer, dataset, preferred)
    trainer = ICDGRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=grpo_config(tmp_path, learning_rate=1e-2),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
    )
    assert isinstance(trainer.model, PeftModel)
    trainer.train()
    pick, length = policy_statistics(trainer.model, tokenizer, dataset, preferred)
    assert pick > chance_pick + 0.15, (chance_pick, pick)  # measured: 0.36 -> 0.65
    assert length > chance_length + 0.3, (chance_length, length)  # measured: 0.25 -> 0.85


def test_icd_grpo_trainer_with_reference_model_from_a_saved_path(tmp_path):
    model, tokenizer = fresh_selector()
    model.save_pretrained(tmp_path / "selector")
    tokenizer.save_pretrained(tmp_path / "selector")
    dataset, preferred, reward = preference_task(tokenizer, model.model.items.features)
    chance_pick, _ = policy_statistics(model, tokenizer, dataset, preferred)
    trainer = ICDGRPOTrainer(
        model=str(tmp_path / "selector"),
        reward_funcs=reward,
        args=grpo_config(tmp_path, beta=0.04),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    assert type(trainer.ref_model).__name__ == "ICDSelectorForCausalLM"
    trainer.train()
    kls = [entry["kl"] for entry in trainer.state.log_history if "kl" in entry]
    assert kls and all(math.isfinite(kl) for kl in kls) and max(kls) > 0
    pick, _ = policy_statistics(trainer.model, tokenizer, dataset, preferred)
    assert pick > chance_pick + 0.2, (chance_pick, pick)
