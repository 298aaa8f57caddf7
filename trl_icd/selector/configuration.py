"""`ICDSelectorConfig`: sizes, shot bounds and vocabulary layout of the ICD selector (registered with `AutoConfig`)."""

from __future__ import annotations

import math
from typing import ClassVar

from transformers import AutoConfig, PreTrainedConfig

from .vocabulary import PAD_ID, STOP_ID, SelectorVocabulary

# Output columns of the backbone: K slot scores, then these two.
STOP_COLUMN_OFFSET = 0  # column K
MASK_COLUMN_OFFSET = 1  # column K + 1: every token that may never be emitted maps here

# fp32 `exp` underflows to exactly 0 below about -103.97; the sampler's softmax then gives an invalid token
# probability of exactly 0. Kept with a margin for the log of the vocabulary size.
_FP32_EXP_UNDERFLOW = 104.0


class ICDSelectorConfig(PreTrainedConfig):
    r"""
    Configuration of [`ICDSelectorForCausalLM`], a pointer policy over a prompt's candidate demonstrations.

    Args:
        num_items (`int`): rows of the feature table the selector was created with. With `item_vocab="token"` it
            sizes the vocabulary (prompts name at most this many rows); with `"code"` prompts may name any row the
            code can write, and the attached table bounds them.
        feature_dim (`int`): width of a feature-table row (e.g. CLIP ViT-L/14 image + text, 1,536).
        featurizer (`dict`, *optional*): what produced the item vectors (`FeaturizerSpec.to_dict()`: name, dims,
            normalisation). A table from another featuriser is refused; one from the same featuriser is accepted
            (new queries, new pools).
        feature_table (`dict`, *optional*): the table the selector reads (`hash`, `rows`, `source`), set when one is
            attached: a checkpoint saved while training records its training table. The table itself is never part
            of the model or its checkpoints; a selector loaded in a process that has mapped a table with this hash
            finds it there (e.g. TRL's reference model).
        num_slots (`int`): K, candidate positions in every prompt (shorter pools fill the rest with `<empty>`).
        hidden_size (`int`): width of the transformer.
        intermediate_size (`int`, *optional*): MLP width (default `4 * hidden_size`).
        num_layers (`int`): context-encoder layers (self-attention over the query and its candidates).
        num_decoder_layers (`int`): pointer-decoder layers (causal self-attention over the picks so far +
            cross-attention to the encoded query and candidates).
        num_heads (`int`): attention heads.
        dropout (`float`): dropout in attention and residual branches (0: sampling and scoring see the same network).
        layer_norm_eps (`float`): LayerNorm epsilon.
        min_shots (`int`): fewest demonstrations before `<stop>` is allowed (fewer only if the pool runs out).
        max_shots (`int`): most demonstrations; `<stop>` is forced after that many.
        score_softcap (`float`): valid scores are `c * tanh(s / c)`, so they stay far above `mask_value` at any
            temperature up to `max_safe_temperature`.
        mask_value (`float`): finite score of every forbidden token (`-inf` would turn TRL's entropy and gradients
            into NaN).
        item_vocab (`str`): `"code"` (items written as `item_code_length` base-`item_code_base` digit tokens: the
            vocabulary does not grow with the pool) or `"token"` (one token per item).
        item_code_base (`int`), item_code_length (`int`): the code of `"code"` mode.
    """

    model_type = "icd_selector"
    # TRL reads `config.auto_map` when it rebuilds a reference model; transformers 5 configs no longer carry it.
    auto_map: ClassVar[dict] = {}
    attribute_map: ClassVar[dict[str, str]] = {
        "num_hidden_layers": "num_layers",
        "num_attention_heads": "num_heads",
    }

    num_items: int = 1
    feature_dim: int = 16
    num_slots: int = 16
    hidden_size: int = 128
    intermediate_size: int | None = None
    num_layers: int = 2
    num_decoder_layers: int = 2
    num_heads: int = 4
    dropout: float = 0.0
    layer_norm_eps: float = 1e-5
    min_shots: int = 1
    max_shots: int = 4
    score_softcap: float = 10.0
    mask_value: float = -1.0e4
    item_vocab: str = "code"
    item_code_base: int = 256
    item_code_length: int = 3
    featurizer: dict | None = None
    feature_table: dict | None = None
    vocab_size: int | None = None
    pad_token_id: int | None = PAD_ID
    eos_token_id: int | None = STOP_ID
    bos_token_id: int | None = None
    tie_word_embeddings: bool = False
    use_cache: bool = False

    def __post_init__(self, **kwargs):
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        vocabulary = SelectorVocabulary.from_config(self)  # validates the layout
        if self.vocab_size is not None and self.vocab_size != vocabulary.vocab_size:
            raise ValueError(
                f"vocab_size={self.vocab_size} contradicts the vocabulary layout ({vocabulary.vocab_size} tokens); "
                "leave it unset, it is derived"
            )
        self.vocab_size = vocabulary.vocab_size
        self.pad_token_id, self.eos_token_id, self.bos_token_id = PAD_ID, STOP_ID, None
        self._check_sizes()
        super().__post_init__(**kwargs)

    def _check_sizes(self) -> None:
        if self.num_items < 1 or self.feature_dim < 1:
            raise ValueError(f"num_items and feature_dim must be positive, got {self.num_items}, {self.feature_dim}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.num_layers < 0 or self.num_decoder_layers < 1:
            raise ValueError("num_layers must be >= 0 and num_decoder_layers >= 1")
        if not 0 <= self.min_shots <= self.max_shots or self.max_shots < 1:
            raise ValueError(
                f"need 0 <= min_shots <= max_shots and max_shots >= 1, got {self.min_shots}, {self.max_shots}"
            )
        if self.max_shots > self.num_slots:
            raise ValueError(f"max_shots={self.max_shots} exceeds num_slots={self.num_slots}")
        if not self.score_softcap > 0:
            raise ValueError(f"score_softcap must be > 0 (it bounds the valid scores), got {self.score_softcap}")
        if not math.isfinite(self.mask_value) or self.max_safe_temperature < 1.0:
            raise ValueError(
                f"mask_value={self.mask_value} must be finite and far below the valid scores (|score| <= "
                f"{self.max_valid_score:.1f}); e.g. -1e4"
            )

    @property
    def vocabulary(self) -> SelectorVocabulary:
        return SelectorVocabulary.from_config(self)

    @property
    def max_valid_score(self) -> float:
        """Bound on any valid token's score: slot scores are soft-capped; the stop score adds log(#valid slots)."""
        return self.score_softcap + math.log(self.num_slots)

    @property
    def max_safe_temperature(self) -> float:
        """Highest sampling temperature at which every forbidden token's probability is exactly 0 in fp32."""
        gap = -self.mask_value - self.max_valid_score
        return gap / (_FP32_EXP_UNDERFLOW + math.log(self.vocab_size))

    @property
    def max_completion_length(self) -> int:
        """Tokens of the longest completion (max_shots slot tokens + `<stop>`); set TRL's `max_completion_length`
        to at least this, or long selections are truncated before their stop."""
        return self.max_shots + 1


AutoConfig.register(ICDSelectorConfig.model_type, ICDSelectorConfig, exist_ok=True)
