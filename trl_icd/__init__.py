"""trl-icd: learn which in-context demonstrations a vision-language model should see, with TRL's GRPOTrainer."""

from ._lazy import lazy_module_getattr

__version__ = "0.1.0"

_NAMES = {
    # advantages and trainer
    "ADVANTAGE_MODES": ".advantages",
    "register_advantage": ".advantages",
    "compute_group_advantages": ".advantages",
    "advantage_stats": ".advantages",
    "aggregate_rewards": ".advantages",
    "AdaptiveKLCallback": ".trainer",
    "ICDGRPOConfig": ".config",
    "ICDGRPOTrainer": ".trainer",
    "RCEConfig": ".config",
    "RCETrainer": ".rce",
    # metric
    "normalize_answer": ".metrics",
    "vqa_accuracy": ".metrics",
    "VQA_PROTOCOLS": ".metrics",
    "register_vqa_protocol": ".metrics",
    # selector
    "ICDSelectorConfig": ".selector",
    "ICDSelectorForCausalLM": ".selector",
    "build_selector_tokenizer": ".selector",
    "selector_prompt": ".selector",
    "parse_selection": ".selector",
    # reward
    "InContextReward": ".rewards",
    "QwenVLInContextReward": ".rewards",
    "QwenVLBackend": ".rewards",
    "VLLMBackend": ".rewards",
    "SimulatedBackend": ".rewards",
    "shape_reward": ".rewards",
    # data
    "Corpus": ".data",
    "build_selector_dataset": ".data",
}
__all__ = sorted(_NAMES)
__getattr__ = lazy_module_getattr(__name__, _NAMES)
