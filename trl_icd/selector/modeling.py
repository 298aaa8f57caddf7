"""`ICDSelectorForCausalLM`: a pointer network over a prompt's candidate demonstrations, packaged as a Hugging Face
causal LM so TRL can sample it, score it, wrap it in PEFT and save/load it.

How masking stays exact under TRL. TRL 1.16 scores training log-probs with a fused head,
`log_softmax(base_model(...).last_hidden_state @ get_output_embeddings().weight.T / T)`, never calling this model's
`forward`. So every rule lives in what the backbone returns: per position a row `[K slot scores, stop score, NEG]`
in which every forbidden action already holds the finite constant NEG (`config.mask_value`). The output head is a
frozen 0/1 matrix that copies column `k` to token `<slot_k>`, column K to `<stop>` and column K+1 (NEG) to every
other token. A product with a 0/1 matrix that has one 1 per row is exact in floating point, so `forward`'s logits,
the sampler's logits and TRL's fused-head logits are the same numbers, and a forbidden token's probability is
exactly 0 (fp32 `exp` underflows) at any temperature up to `config.max_safe_temperature`.

Where the item vectors live. Prompts name rows of a feature table that stays outside the model: an `ItemTable`
(`trl_icd.data.features`) attached to the selector, memory-mapped read-only and shared by every process, never a
buffer or parameter (DDP would broadcast a buffer before every forward, ZeRO-3 does not shard buffers, and a
checkpoint would carry it). The config records the table's featuriser and content hash; a selector loaded from a path
(e.g. TRL's reference model) finds a table with that hash among those mapped in its process. `select_demonstrations`
takes feature vectors directly, so a trained selector serves items that are in no table.

Architecture (at least the research pointer network's expressiveness: cross-attention of the query over the
candidates, a state updated by each pick, plus a trained stop):
1. items: feature row (read from the attached table) -> Linear -> LayerNorm, plus a role embedding (query /
   candidate / empty slot);
2. context encoder: `num_layers` pre-LN transformer layers over [query, candidates] (candidates unordered: no
   position embedding, so the policy is equivariant to the candidate order);
3. pointer decoder: `num_decoder_layers` layers over [begin, pick_1, ..., pick_t] with causal self-attention (the
   state after each pick) and cross-attention to the encoded query and candidates;
4. heads: pointer scores `<W_q h_t, W_k c_k> / sqrt(d)` and a stop score `w . h_t + log(#valid slots)`, the offset
   making the initial stop decision a fair coin whatever K is (zero-initialised heads: uniform starting policy).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput

from ..data.features import FeaturizerSpec, ItemTable, as_item_table, find_item_table, registered_item_tables
from .configuration import ICDSelectorConfig
from .vocabulary import EMPTY_ID, SLOT_OFFSET, STOP_ID, SelectorVocabulary

logger = logging.getLogger(__name__)

# Weight name under which checkpoints written before the table moved out of the model stored it.
LEGACY_TABLE_KEY = "model.items.features"

# Roles of a prompt position and kinds of decoder inputs (rows of two small embeddings).
ROLE_QUERY, ROLE_CANDIDATE, ROLE_EMPTY = 0, 1, 2
STEP_BEGIN, STEP_PICK, STEP_DONE = 0, 1, 2


# --------------------------------------------------------------------------------------------------------------------
# Reading a batch: prompt items and completion picks
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class SelectorBatch:
    """What a (possibly left-padded) batch of selector sequences says, position-aligned per row.

    `start[b]`: first visible token of row b (the prompt begins there); `rows`/`empty`: the prompt's query and
    candidate items; `picks[b, j]`: the slot named by completion token j; `alive[b, s]`: the first s completion
    tokens are all slot tokens (the decoder is still choosing at step s).
    """

    start: torch.Tensor  # [B] long
    rows: torch.Tensor  # [B, 1+K] long (0 where empty)
    empty: torch.Tensor  # [B, 1+K] bool
    picks: torch.Tensor  # [B, C] long, clamped to [0, K)
    alive: torch.Tensor  # [B, C+1] bool


def _decode_item_rows(
    tokens: torch.Tensor, vocabulary: SelectorVocabulary
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Feature-table rows named by prompt tokens `[B, 1+K, words_per_item]` -> (rows, empty, invalid), each
    `[B, 1+K]`; `invalid` marks words that name no row (or an empty query)."""
    empty = (tokens == EMPTY_ID).all(-1)
    digits = tokens - vocabulary.item_offset
    in_range = ((digits >= 0) & (digits < vocabulary.num_item_words)).all(-1)
    if vocabulary.item_vocab == "token":
        rows = digits[..., 0]
    else:
        place = vocabulary.code_base ** torch.arange(
            vocabulary.code_length - 1, -1, -1, device=tokens.device, dtype=torch.long
        )
        rows = (digits.clamp(min=0) * place).sum(-1)
    is_item = in_range & (rows < vocabulary.max_items)
    invalid = ~(is_item | empty)
    invalid[:, 0] |= empty[:, 0]  # the query must be an item
    return torch.where(is_item, rows, 0), empty, invalid


def read_selector_batch(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, vocabulary: SelectorVocabulary
) -> SelectorBatch:
    """Locate each row's prompt (after any left padding) and completion; raise ValueError on anything that is not a
    selector sequence (a silent misread would train on garbage)."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
    batch, length = input_ids.shape
    device = input_ids.device
    if attention_mask is None:  # transformers 5 `generate` drops an all-ones mask
        visible = torch.ones_like(input_ids, dtype=torch.bool)
    else:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"the selector takes a 2-D padding mask shaped like input_ids {tuple(input_ids.shape)}, got "
                f"{tuple(attention_mask.shape)}"
            )
        visible = attention_mask.bool()
    if not visible.any(-1).all():
        raise ValueError("a row of attention_mask is all zeros")
    start = visible.int().argmax(-1)
    prompt_length = vocabulary.prompt_length
    if int(start.max()) + prompt_length > length:
        raise ValueError(
            f"a selector sequence starts with a prompt of exactly {prompt_length} tokens (the query and "
            f"{vocabulary.num_slots} candidate slots, {vocabulary.words_per_item} token(s) each); got a row with only "
            f"{length - int(start.max())} visible tokens. Build prompts with selector_prompt()."
        )
    prompt_positions = start[:, None] + torch.arange(prompt_length, device=device)
    if not visible.gather(1, prompt_positions).all():
        raise ValueError("padding inside a selector prompt: prompts must be left-padded")
    words = vocabulary.words_per_item
    prompt = input_ids.gather(1, prompt_positions).view(batch, 1 + vocabulary.num_slots, words)
    rows, empty, invalid = _decode_item_rows(prompt, vocabulary)
    if invalid.any():
        b, slot = (int(i) for i in invalid.nonzero()[0])
        what = "the query" if slot == 0 else f"candidate slot {slot - 1}"
        raise ValueError(
            f"row {b}: {what} is not a feature-table row below {vocabulary.max_items} written in this selector's "
            f"{vocabulary.item_vocab!r} vocabulary (tokens {prompt[b, slot].tolist()}); build prompts with "
            "selector_prompt(..., vocabulary=config)"
        )

    completion_length = length - prompt_length - int(start.min())
    positions = start[:, None] + prompt_length + torch.arange(completion_length, device=device)
    inside = positions < length
    positions = positions.clamp(max=length - 1)
    tokens = input_ids.gather(1, positions)
    slots = tokens - SLOT_OFFSET
    is_pick = inside & visible.gather(1, positions) & (slots >= 0) & (slots < vocabulary.num_slots)
    alive = torch.cat([torch.ones(batch, 1, dtype=torch.bool, device=device), is_pick.cumprod(-1).bool()], dim=1)
    return SelectorBatch(start, rows, empty, slots.clamp(0, vocabulary.num_slots - 1), alive)


def action_masks(
    batch: SelectorBatch, min_shots: int, max_shots: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which actions are allowed at each decoder step s (after s picks): (slot_allowed [B,S,K], stop_allowed [B,S],
    n_allowed_slots [B,S]).

    A slot is allowed while the selection is alive, has fewer than `max_shots` picks, and the slot is non-empty and
    not chosen yet. Stop is allowed from `min_shots` picks on, or earlier when no slot is left (a pool smaller than
    `min_shots`), and is the only action once the selection ended (stop or padding).
    """
    picks, alive = batch.picks, batch.alive
    num_slots = batch.empty.shape[1] - 1
    steps = alive.shape[1]
    picked = F.one_hot(picks, num_slots).to(torch.int32) * alive[:, 1:, None]  # picks made while alive
    chosen_before = F.pad(picked.cumsum(1), (0, 0, 1, 0)) > 0  # [B, S, K]: chosen in the first s picks
    step = torch.arange(steps, device=picks.device)
    slot_allowed = (
        alive[:, :, None] & ~batch.empty[:, None, 1:] & ~chosen_before & (step < max_shots)[None, :, None]
    )
    n_allowed = slot_allowed.sum(-1)
    stop_allowed = ~alive | (step >= min_shots)[None, :] | (n_allowed == 0)
    return slot_allowed, stop_allowed, n_allowed


# --------------------------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------------------------


class SelectorAttention(nn.Module):
    """Multi-head attention with separate q/k/v/o projections (names PEFT's LoRA targets)."""

    def __init__(self, config: ICDSelectorConfig):
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_heads
        self.dropout = config.dropout
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.o_proj = nn.Linear(hidden, hidden)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = x.shape
        return x.view(batch, length, self.num_heads, hidden // self.num_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """`visible`: bool [B, Lx, Lm] (True = may attend); every row must see at least one position."""
        q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(memory)), self._heads(self.v_proj(memory))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=visible[:, None], dropout_p=self.dropout if self.training else 0.0
        )
        return self.o_proj(out.transpose(1, 2).reshape(x.shape))


class SelectorMLP(nn.Module):
    def __init__(self, config: ICDSelectorConfig):
        super().__init__()
        self.fc_in = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc_out = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.gelu(self.fc_in(x)))


class SelectorEncoderLayer(GradientCheckpointingLayer):
    """Pre-LN self-attention over the query and its candidates."""

    def __init__(self, config: ICDSelectorConfig):
        super().__init__()
        self.attn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = SelectorAttention(config)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = SelectorMLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        normed = self.attn_norm(x)
        x = x + self.dropout(self.attn(normed, normed, visible))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class SelectorDecoderLayer(GradientCheckpointingLayer):
    """Pre-LN causal self-attention over the picks so far, cross-attention to the encoded items, MLP."""

    def __init__(self, config: ICDSelectorConfig):
        super().__init__()
        self.self_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = SelectorAttention(config)
        self.cross_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.cross_attn = SelectorAttention(config)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = SelectorMLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, causal: torch.Tensor, context_visible: torch.Tensor
    ) -> torch.Tensor:
        normed = self.self_norm(x)
        x = x + self.dropout(self.self_attn(normed, normed, causal))
        x = x + self.dropout(self.cross_attn(self.cross_norm(x), context, context_visible))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class _TableSlot:
    """Holds the item table a selector reads. Not a tensor, so never a buffer, parameter or checkpoint entry; deep
    copies (a reference model made by copying) share the table, pickles drop it (the copy re-resolves it by hash)."""

    def __init__(self, table: ItemTable | None = None):
        self.table = table

    def __deepcopy__(self, memo) -> _TableSlot:
        return _TableSlot(self.table)

    def __getstate__(self) -> dict:
        return {"table": None}


def missing_table_message(config: ICDSelectorConfig) -> str:
    """What a selector without its table needs, and how to give it."""
    record = config.feature_table or {}
    featurizer = FeaturizerSpec.from_dict(config.featurizer) if config.featurizer else None
    wanted = (
        f"it was saved reading table {record.get('hash', '?')[:12]} ({record.get('rows', '?')} rows x "
        f"{config.feature_dim}, {featurizer.describe() if featurizer else 'featuriser not recorded'}, from "
        f"{record.get('source', '?')})"
        if record
        else f"it records no table ({config.feature_dim}-dim item vectors)"
    )
    mapped = [t.describe() for t in registered_item_tables()]
    return (
        f"this ICD selector reads its item vectors from a feature table kept outside the model, and none is attached: "
        f"{wanted}. Attach one with `selector.attach_features(FeatureTable.load(DIR))` or "
        f"`ICDSelectorForCausalLM.from_pretrained(PATH, features=table)`; any table from the same featuriser works "
        f"(new queries, new pools). A table with the recorded hash that is loaded in this process is found "
        f"automatically. Tables mapped in this process: {mapped or 'none'}"
    )


class ItemEmbedder(nn.Module):
    """Item vectors (rows of the attached feature table) -> learned item embeddings. The table is read, never
    trained and never stored here (see `_TableSlot`). This is the model's "input embedding" (PEFT and gradient
    checkpointing hook it)."""

    def __init__(self, config: ICDSelectorConfig):
        super().__init__()
        self._selector_config = config
        self._slot = _TableSlot()
        self.proj = nn.Linear(config.feature_dim, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.roles = nn.Embedding(3, config.hidden_size)

    @property
    def attached_table(self) -> ItemTable | None:
        return self._slot.table

    def attach(self, table: ItemTable) -> None:
        self._slot.table = table

    @property
    def features(self) -> ItemTable:
        """The item table the selector reads: the attached one, else the table with the config's recorded hash among
        those mapped in this process; raises an actionable RuntimeError when neither exists."""
        table = self._slot.table
        if table is None:
            record = self._selector_config.feature_table or {}
            table = find_item_table(record["hash"]) if record.get("hash") else None
            if table is None:
                raise RuntimeError(missing_table_message(self._selector_config))
            self._slot.table = table
        return table

    def lookup(self, rows: torch.Tensor) -> torch.Tensor:
        """Feature vectors of table `rows` (any shape) on this module's device and dtype. Rows repeated in a batch
        (TRL's G completions of a prompt) are read once."""
        unique, inverse = torch.unique(rows, return_inverse=True)
        vectors = torch.from_numpy(self.features.gather(unique.cpu().numpy()))
        return vectors.to(device=self.proj.weight.device, dtype=self.proj.weight.dtype)[inverse]

    def forward(self, features: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
        """`features` `[B, 1+K, D]` (query, then candidates) -> `[B, 1+K, hidden]`; `empty` marks empty slots."""
        vectors = self.norm(self.proj(features.to(self.proj.weight.dtype)))
        roles = torch.full(empty.shape, ROLE_CANDIDATE, dtype=torch.long, device=empty.device)
        roles[:, 0] = ROLE_QUERY
        roles = roles.masked_fill(empty, ROLE_EMPTY)
        return torch.where(empty[..., None], 0.0, vectors) + self.roles(roles)


class PointerHead(nn.Module):
    """Pointer scores over the K candidates and the stop score, from the decoder state (zero-initialised query
    and stop projections: the starting policy is uniform)."""

    def __init__(self, config: ICDSelectorConfig):
        super().__init__()
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.stop = nn.Linear(config.hidden_size, 1)
        self.query._zero_init = True
        self.stop._zero_init = True

    def forward(self, states: torch.Tensor, candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = 1.0 / math.sqrt(states.shape[-1])
        slot_scores = torch.einsum("bsh,bkh->bsk", self.query(states), self.key(candidates)) * scale
        return slot_scores, self.stop(states).squeeze(-1)


class SelectorOutputHead(nn.Module):
    """Frozen 0/1 map from the backbone's `[K slot scores, stop, NEG]` columns to the vocabulary.

    Not an `nn.Linear` and holding no parameter, so PEFT never adapts it and TRL's fused head reads the same matrix;
    `weight` is a non-persistent buffer rebuilt from the config (it is not stored in checkpoints)."""

    def __init__(self, config: ICDSelectorConfig):
        super().__init__()
        self.vocabulary = config.vocabulary
        self.register_buffer("weight", self.build_matrix(self.vocabulary), persistent=False)
        self.bias = None

    @staticmethod
    def build_matrix(vocabulary: SelectorVocabulary) -> torch.Tensor:
        num_slots = vocabulary.num_slots
        column = torch.full((vocabulary.vocab_size,), num_slots + 1, dtype=torch.long)
        column[SLOT_OFFSET : SLOT_OFFSET + num_slots] = torch.arange(num_slots)
        column[STOP_ID] = num_slots
        return F.one_hot(column, num_slots + 2).float()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden_states, self.weight.to(hidden_states.dtype))


# --------------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------------


class ICDSelectorPreTrainedModel(PreTrainedModel):
    config_class = ICDSelectorConfig
    config: ICDSelectorConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["SelectorEncoderLayer", "SelectorDecoderLayer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """1/sqrt(fan_in) linear layers, zero pointer-query and stop heads, N(0, 1) embeddings; the 0/1 head is
        rebuilt from the config (the feature table is not part of the model)."""
        if isinstance(module, nn.Linear):
            if getattr(module, "_zero_init", False):
                init.zeros_(module.weight)
            else:
                init.normal_(module.weight, std=module.in_features**-0.5)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, std=1.0)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, SelectorOutputHead):
            init.copy_(module.weight, SelectorOutputHead.build_matrix(module.vocabulary))


class ICDSelectorModel(ICDSelectorPreTrainedModel):
    """The backbone: `last_hidden_state[b, t]` is the masked score row `[K slot scores, stop, NEG]` of the token
    after position t."""

    def __init__(self, config: ICDSelectorConfig):
        super().__init__(config)
        self.vocabulary = config.vocabulary
        self.items = ItemEmbedder(config)
        self.encoder = nn.ModuleList(SelectorEncoderLayer(config) for _ in range(config.num_layers))
        self.encoder_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.step_kinds = nn.Embedding(3, config.hidden_size)
        self.step_positions = nn.Embedding(config.max_shots + 2, config.hidden_size)
        self.decoder = nn.ModuleList(SelectorDecoderLayer(config) for _ in range(config.num_decoder_layers))
        self.decoder_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.pointer = PointerHead(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.items

    def set_input_embeddings(self, value):
        raise NotImplementedError("the selector's inputs are feature-table rows; its item table is set at creation")

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, **kwargs):
        """Extra keyword arguments from TRL/generate (`use_cache`, `position_ids`, ...) are ignored: positions come
        from the mask and there is no cache."""
        if input_ids is None or kwargs.get("inputs_embeds") is not None:
            raise ValueError("the selector reads input_ids (feature-table rows and slot tokens), not inputs_embeds")
        # The selector is tiny: it always runs in its parameters' dtype, so an autocast context (TRL's bf16 training
        # forward vs. the sampler) cannot make scoring and sampling disagree.
        with torch.autocast(input_ids.device.type, enabled=False):
            return BaseModelOutput(last_hidden_state=self._score_rows(input_ids, attention_mask))

    def _score_rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        config = self.config
        batch = read_selector_batch(input_ids, attention_mask, self.vocabulary)
        step_scores = self.score_steps(self.items.lookup(batch.rows), batch, config.min_shots, config.max_shots)

        # align with token positions: the score row of step s sits at the position of prompt-last + s
        neg = config.mask_value
        length = input_ids.shape[1]
        last_prompt_position = batch.start[:, None] + self.vocabulary.prompt_length - 1
        step_at = torch.arange(length, device=input_ids.device) - last_prompt_position
        rows = step_scores.gather(1, step_at.clamp(min=0)[..., None].expand(-1, -1, step_scores.shape[-1]))
        filler = torch.full_like(step_scores[:, :1], neg)
        filler[..., config.num_slots] = 0.0  # prompt positions: never scored; a finite "stop only" row
        return torch.where((step_at >= 0)[..., None], rows, filler)

    def score_steps(
        self, item_features: torch.Tensor, batch: SelectorBatch, min_shots: int, max_shots: int
    ) -> torch.Tensor:
        """Masked scores `[B, S, K+2]` (K slots, stop, NEG) of decoder steps 0..S-1, from the item vectors
        `[B, 1+K, D]` (query, then candidates) and the picks in `batch`: the one computation behind the token path
        (`forward`) and the feature path (`ICDSelectorForCausalLM.select_demonstrations`)."""
        config = self.config
        device = item_features.device

        # 1. encode the query and its candidates
        context = self.items(item_features, batch.empty)
        context_visible = ~batch.empty[:, None, :]  # the query (never empty) keeps every row non-empty
        for layer in self.encoder:
            context = layer(context, context_visible.expand(-1, context.shape[1], -1))
        context = self.encoder_norm(context)
        candidates = context[:, 1:]

        # 2. decode: step 0 reads the query, step s >= 1 reads the s-th pick (or "done" once the selection ended)
        num_steps = batch.alive.shape[1]
        steps = torch.arange(num_steps, device=device)
        picked = candidates.gather(1, batch.picks[..., None].expand(-1, -1, candidates.shape[-1]))
        inputs = torch.cat([context[:, :1], torch.where(batch.alive[:, 1:, None], picked, 0.0)], dim=1)
        kinds = torch.where(batch.alive, STEP_PICK, STEP_DONE)
        kinds[:, 0] = STEP_BEGIN
        # (config.max_shots may be lowered after creation, e.g. to evaluate at a fixed shot count: clamp to the table)
        positions = steps.clamp(max=self.step_positions.num_embeddings - 1)
        states = inputs + self.step_kinds(kinds) + self.step_positions(positions)
        causal = torch.ones(num_steps, num_steps, dtype=torch.bool, device=device).tril()
        causal = causal.expand(states.shape[0], -1, -1)
        decoder_context_visible = context_visible.expand(-1, num_steps, -1)
        for layer in self.decoder:
            states = layer(states, context, causal, decoder_context_visible)
        states = self.decoder_norm(states)

        # 3. masked scores per step: [K slots, stop, NEG]
        slot_raw, stop_raw = self.pointer(states, candidates)
        slot_allowed, stop_allowed, n_allowed = action_masks(batch, min_shots, max_shots)
        cap = config.score_softcap
        neg = config.mask_value
        slot_scores = torch.where(slot_allowed, cap * torch.tanh(slot_raw / cap), neg)
        stop_scores = cap * torch.tanh(stop_raw / cap) + torch.log(n_allowed.clamp(min=1).to(stop_raw.dtype))
        stop_scores = torch.where(stop_allowed, stop_scores, neg)
        return torch.cat([slot_scores, stop_scores[..., None], torch.full_like(stop_scores[..., None], neg)], -1)


def _selection_inputs(query_features, candidate_features, config: ICDSelectorConfig):
    """Check and convert `select_demonstrations` inputs: (queries `[Q, D]` float32, list of Q pools `[K_q, D]`)."""
    dim = config.feature_dim

    def matrix(value, what: str) -> torch.Tensor:
        tensor = torch.as_tensor(value.detach().cpu() if hasattr(value, "detach") else np.asarray(value))
        tensor = tensor.to(torch.float32)
        if tensor.dim() != 2 or tensor.shape[1] != dim:
            raise ValueError(f"{what} must be [n, {dim}] (this selector's feature_dim), got {tuple(tensor.shape)}")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{what} contains NaN or inf")
        return tensor

    queries = matrix(query_features, "query_features")
    if hasattr(candidate_features, "dim") or isinstance(candidate_features, np.ndarray):
        grid = torch.as_tensor(candidate_features)
        if grid.dim() != 3:
            raise ValueError(f"candidate_features must be [queries, K, {dim}] or a list of [K, {dim}] arrays, got "
                             f"shape {tuple(grid.shape)}")
        candidate_features = list(grid)
    if not isinstance(candidate_features, Sequence) or len(candidate_features) != len(queries):
        count = len(candidate_features) if isinstance(candidate_features, Sequence) else type(candidate_features)
        raise ValueError(f"need one candidate pool per query: {len(queries)} queries, {count} pools")
    pools = []
    for n, pool in enumerate(candidate_features):
        pool = matrix(pool, f"candidate_features[{n}]")
        if len(pool) == 0:
            raise ValueError(f"query {n} has an empty candidate pool: there is nothing to choose from")
        if len(pool) > config.num_slots:
            raise ValueError(f"query {n} has {len(pool)} candidates; this selector has {config.num_slots} slots")
        pools.append(pool)
    return queries, pools


class ICDSelectorForCausalLM(ICDSelectorPreTrainedModel, GenerationMixin):
    """The ICD selector as a causal LM: prompt = query + K candidate slots, completion = slot tokens then `<stop>`."""

    _tied_weights_keys = {}
    # The 0/1 output head is a constant rebuilt from the config in every process: DDP need not broadcast it before
    # every forward (it would, as a buffer; for a token vocabulary of a large pool that is ~100 MB per step).
    _ddp_params_and_buffers_to_ignore = ("lm_head.weight",)

    def __init__(self, config: ICDSelectorConfig):
        super().__init__(config)
        self.model = ICDSelectorModel(config)
        self.lm_head = SelectorOutputHead(config)
        self.post_init()

    # ---- construction, loading, the feature table ----------------------------------------------------------------
    @classmethod
    def from_features(
        cls, features, num_slots: int, min_shots: int = 1, max_shots: int = 4, **config_overrides
    ) -> ICDSelectorForCausalLM:
        """A fresh selector that reads its item vectors from `features`: a `FeatureTable` (its combined rows, read
        from the memory maps on demand), an `ItemTable`, or a plain `[num_items, feature_dim]` matrix. The table
        stays outside the model (never a buffer, never in a checkpoint); the config records its featuriser and
        content hash. `config_overrides` are further `ICDSelectorConfig` fields."""
        for key in ("num_items", "feature_dim", "featurizer", "feature_table"):
            if key in config_overrides:
                raise ValueError(f"{key} comes from the features' shape and origin; do not pass it")
        table = as_item_table(features)
        config = ICDSelectorConfig(
            num_items=len(table),
            feature_dim=table.dim,
            num_slots=num_slots,
            min_shots=min_shots,
            max_shots=max_shots,
            featurizer=table.featurizer.to_dict(),
            **config_overrides,
        )
        return cls(config).attach_features(table)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, features=None, **kwargs):
        """`PreTrainedModel.from_pretrained`, but strict: a weight the checkpoint lacks or one the model does not
        have is an error (transformers only warns, leaving freshly initialised weights behind).

        `features` (a `FeatureTable`, `ItemTable` or matrix from the selector's featuriser) is attached at once;
        without it the selector uses the table with its recorded hash among those mapped in this process, found at
        first use (an actionable error names what it needs if there is none). A checkpoint written when the table
        was stored inside the model loads too: its table is read from the checkpoint into memory (a warning says to
        re-save it)."""
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        legacy = LEGACY_TABLE_KEY in (info.get("unexpected_keys") or ())
        if legacy:
            info["unexpected_keys"] = [key for key in info["unexpected_keys"] if key != LEGACY_TABLE_KEY]
        problems = {key: sorted(info.get(key) or ()) for key in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        problems = {key: value for key, value in problems.items() if value}
        if problems:
            raise RuntimeError(f"{cls.__name__}: checkpoint does not match the model exactly: {problems}")
        if legacy:
            from .legacy import read_legacy_table

            stored = read_legacy_table(pretrained_model_name_or_path, **kwargs)
            logger.warning(
                "%s stores its feature table inside the checkpoint (%d x %d; the format before tables moved out of "
                "the model): %s. Re-save it with save_pretrained to drop the table from the checkpoint; the saved "
                "selector then needs a table attached (e.g. the FeatureTable it was trained on).",
                pretrained_model_name_or_path, *stored.shape,
                "using it" if features is None else "ignored, the table passed as `features` is used",
            )
            if features is None:
                features = ItemTable.from_matrix(stored, source=f"{pretrained_model_name_or_path} (stored inside)")
        if features is not None:
            model.attach_features(features)
        return (model, info) if wants_info else model

    def attach_features(self, features) -> ICDSelectorForCausalLM:
        """Read item vectors from `features` from now on (a `FeatureTable`, an `ItemTable` or a `[N, D]` matrix):
        the table whose rows the prompts name. Any table from the featuriser recorded in the config is accepted
        (new queries, new pools: a selector serves items it was not trained on); a table from another featuriser
        raises ValueError naming both. Records the table's hash in the config (so a checkpoint saved now names its
        table) and returns the selector."""
        table = as_item_table(features)
        config = self.config
        spec = table.featurizer
        recorded = self.check_featurizer(spec, table.describe())
        if recorded is None or (recorded.name is None and spec.name is not None):
            config.featurizer = spec.to_dict()
        if config.item_vocab == "token" and len(table) > config.num_items:
            logger.warning(
                "%s has %d rows but this token-vocabulary selector's prompts name at most %d; the rest are reachable "
                "through select_demonstrations only (use item_vocab='code' for pools that grow)",
                table.describe(), len(table), config.num_items,
            )
        self.model.items.attach(table)
        config.feature_table = {"hash": table.content_hash, "rows": len(table), "source": table.source}
        return self

    def check_featurizer(self, spec: FeaturizerSpec, what: str = "these features") -> FeaturizerSpec | None:
        """Raise ValueError (naming both) unless vectors from `spec` can stand in for the ones this selector was
        trained on; returns the recorded spec (None when the config records none)."""
        config = self.config
        recorded = FeaturizerSpec.from_dict(config.featurizer) if config.featurizer else None
        expected = recorded or FeaturizerSpec(None, config.feature_dim)
        reason = expected.mismatch(spec)
        if reason:
            raise ValueError(
                f"this selector was trained on features from {expected.describe()}, but got features from "
                f"{spec.describe()} ({what}; {reason}): export the features with the selector's featuriser"
            )
        return recorded

    @property
    def feature_table(self) -> ItemTable:
        """The item table this selector reads (see `attach_features`)."""
        return self.model.items.features

    # ---- new queries: features in, demonstrations out -------------------------------------------------------------
    @torch.no_grad()
    def select_demonstrations(
        self,
        query_features,
        candidate_features,
        num_shots: int | None = None,
        do_sample: bool = False,
        *,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        batch_size: int = 256,
    ) -> list[list[int]]:
        """Demonstrations for queries given as feature vectors (items in no table: new images and questions).

        `query_features`: `[Q, D]` (the combined vectors a `FeatureTable` holds: `combined_rows`, or a featuriser's
        output for new items). `candidate_features`: per query, its pool's vectors, `[Q, K, D]` or a list of Q
        arrays `[K_q, D]` with 1 <= K_q <= num_slots. Returns, per query, the chosen positions in its candidate list
        in the order chosen: greedy by default (the same choices as greedy `generate` on the same items), sampled
        at `temperature` with `do_sample`; `num_shots` None lets the selector stop where it learned to (between
        min_shots and max_shots), an int asks for exactly that many (fewer when the pool is smaller)."""
        config = self.config
        queries, pools = _selection_inputs(query_features, candidate_features, config)
        if num_shots is None:
            min_shots, max_shots = config.min_shots, config.max_shots
        else:
            if isinstance(num_shots, bool) or not isinstance(num_shots, (int, np.integer)):
                raise ValueError(f"num_shots must be None or an int, got {num_shots!r}")
            if not 0 <= num_shots <= config.max_shots:
                raise ValueError(f"this selector picks at most max_shots={config.max_shots}, not num_shots={num_shots}")
            min_shots = max_shots = int(num_shots)
        if do_sample and not 0 < temperature <= config.max_safe_temperature:
            raise ValueError(f"temperature must be in (0, {config.max_safe_temperature:.1f}], got {temperature}")
        was_training = self.training
        self.eval()
        try:
            with torch.autocast(self.device.type, enabled=False):
                chosen: list[list[int]] = []
                for start in range(0, len(pools), batch_size):
                    chosen += self._select_batch(
                        queries[start : start + batch_size], pools[start : start + batch_size], min_shots, max_shots,
                        temperature if do_sample else None, generator,
                    )
        finally:
            self.train(was_training)
        return chosen

    def _select_batch(self, queries, pools, min_shots, max_shots, temperature, generator) -> list[list[int]]:
        """Decode one batch step by step through `score_steps` and the 0/1 head, as `generate` does with tokens."""
        num_slots, parameter = self.config.num_slots, next(self.parameters())
        batch = len(pools)
        items = torch.zeros(batch, 1 + num_slots, queries.shape[1])
        empty = torch.ones(batch, 1 + num_slots, dtype=torch.bool)
        items[:, 0], empty[:, 0] = queries, False
        for n, pool in enumerate(pools):
            items[n, 1 : 1 + len(pool)], empty[n, 1 : 1 + len(pool)] = pool, False
        items = items.to(device=parameter.device, dtype=parameter.dtype)
        empty = empty.to(parameter.device)
        chosen: list[list[int]] = [[] for _ in range(batch)]
        done = [False] * batch
        for step in range(max_shots + 1):
            made = torch.tensor([len(c) for c in chosen], device=empty.device)
            picks = torch.tensor([c[:step] + [0] * (step - len(c)) for c in chosen], dtype=torch.long)
            alive = torch.arange(step + 1, device=empty.device)[None, :] <= made[:, None]
            state = SelectorBatch(
                start=torch.zeros(batch, dtype=torch.long, device=empty.device),
                rows=torch.zeros(batch, 1 + num_slots, dtype=torch.long, device=empty.device),
                empty=empty, picks=picks.view(batch, step).to(empty.device), alive=alive,
            )
            scores = self.model.score_steps(items, state, min_shots, max_shots)[:, step]
            logits = self.lm_head(scores).float()
            if temperature is None:
                tokens = logits.argmax(-1)
            else:
                probs = (logits / temperature).softmax(-1).cpu()
                tokens = torch.multinomial(probs, 1, generator=generator)[:, 0]
            for n, token in enumerate(tokens.tolist()):
                if done[n]:
                    continue
                slot = token - SLOT_OFFSET
                if token == STOP_ID:
                    done[n] = True
                elif 0 <= slot < len(pools[n]) and slot not in chosen[n]:
                    chosen[n].append(slot)
                else:  # the masks make this impossible; never hand back an invalid selection
                    raise RuntimeError(f"invalid selection token {token} for a pool of {len(pools[n])}")
            if all(done):
                break
        return chosen

    # ---- what TRL and PEFT use -----------------------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.model.items

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> SelectorOutputHead:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        raise NotImplementedError("the selector's output head is a fixed 0/1 map derived from its config")

    @property
    def vocabulary(self) -> SelectorVocabulary:
        return self.model.vocabulary

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutput:
        scores = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        with torch.autocast(scores.device.type, enabled=False):
            logits = self.lm_head(scores[:, keep])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutput(loss=loss, logits=logits)

    # ---- generation: no cache, the whole sequence every step -----------------------------------------------------
    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, logits_to_keep=None, **kwargs):
        """Feed the full sequence (there is no cache; the stock method would feed only the last token once
        `use_cache` is set, silently corrupting the pointer state)."""
        inputs = {"input_ids": input_ids.contiguous(), "attention_mask": attention_mask}
        if logits_to_keep is not None:
            inputs["logits_to_keep"] = logits_to_keep
        return inputs

    def generate(self, *args, **kwargs):
        """`GenerationMixin.generate` after checking the sampling temperature keeps forbidden tokens at probability
        exactly 0 (see `ICDSelectorConfig.max_safe_temperature`)."""
        generation_config = kwargs.get("generation_config") or self.generation_config
        temperature = kwargs.get("temperature", generation_config.temperature)
        do_sample = kwargs.get("do_sample", generation_config.do_sample)
        if do_sample and temperature is not None and temperature > self.config.max_safe_temperature:
            raise ValueError(
                f"temperature={temperature} exceeds {self.config.max_safe_temperature:.1f}, above which a forbidden "
                "selection could get non-zero probability; lower it or make config.mask_value more negative"
            )
        return super().generate(*args, **kwargs)


AutoModel.register(ICDSelectorConfig, ICDSelectorModel, exist_ok=True)
AutoModelForCausalLM.register(ICDSelectorConfig, ICDSelectorForCausalLM, exist_ok=True)
