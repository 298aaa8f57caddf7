"""The in-context reward: prompt building, scoring backends, reward components, shaping and the cache."""

from .._lazy import lazy_module_getattr

_NAMES = {
    "InContextPrompt": ".prompt",
    "PromptFormat": ".prompt",
    "RewardBackend": ".backend",
    "PartialBatchError": ".backend",
    "shape_reward": ".shaping",
    "REWARD_MODES": ".shaping",
    "QwenVLBackend": ".qwen_vl",
    "Qwen2_5_VLImageOnlyProcessor": ".qwen_vl",
    "VLLMBackend": ".vllm",
    "SimulatedBackend": ".simulated",
    "SimulatorRule": ".simulated",
    "OracleResult": ".simulated",
    "RewardCache": ".cache",
    "reward_components": ".components",
    "InContextReward": ".in_context",
    "QwenVLInContextReward": ".in_context",
}
__all__ = sorted(_NAMES)
__getattr__ = lazy_module_getattr(__name__, _NAMES)
