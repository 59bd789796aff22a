"""SmallThinker: a mixture-of-experts decoder with a pre-attention router, ReGLU experts and hybrid attention.

Reads top to bottom: norms and RoPE, attention, experts and routing, the decoder layer, the model, the causal-LM
head with its training losses. Shape suffixes: B batch, S sequence, T tokens (B*S), H hidden, F expert FFN width,
E experts, K experts per token, L layers.

This file imports nothing from the `smallthinker` package: `save_pretrained` copies it next to the weights so
plain transformers can load our checkpoints with `trust_remote_code=True`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter
from transformers.generation import GenerationMixin
from transformers.integrations import use_experts_implementation
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_smallthinker import SmallThinkerConfig

# Official files store one matrix per expert (`experts.{j}.gate.weight`, ...); in memory the experts are 3-D
# tensors. The mapping stacks them on load and splits them again on `save_pretrained`, so files on disk keep the
# official names and shapes. `overwrite` because this module may be imported twice (package and remote code).
register_checkpoint_conversion_mapping(
    "smallthinker",
    [
        WeightConverter(
            source_patterns=[
                "block_sparse_moe.experts.*.gate.weight",
                "block_sparse_moe.experts.*.up.weight",
            ],
            target_patterns="block_sparse_moe.experts.gate_up_proj",
            operations=[MergeModulelist(dim=0), Concatenate(dim=1)],
        ),
        WeightConverter(
            source_patterns="block_sparse_moe.experts.*.down.weight",
            target_patterns="block_sparse_moe.experts.down_proj",
            operations=[MergeModulelist(dim=0)],
        ),
    ],
    overwrite=True,
)


class SmallThinkerRMSNorm(nn.Module):
    """RMSNorm, Llama convention: statistics in fp32, cast back to the input dtype, then scaled."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        x = hidden_states.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(input_dtype)


class SmallThinkerRotaryEmbedding(nn.Module):
    """NEOX-style RoPE over the full head_dim; tables computed in fp32, cast to the activation dtype."""

    def __init__(self, config: SmallThinkerConfig) -> None:
        super().__init__()
        self.config = config
        self.rope_type = "default"
        inv_freq = self.compute_default_rope_parameters(config)[0]
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: SmallThinkerConfig, **kwargs) -> tuple[torch.Tensor, float]:
        dim = config.head_dim
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Recompute the tables from the config: after a `rope_theta` change, or on a model built on the meta
        device (the tables are computed buffers, never stored in checkpoints)."""
        inv_freq = self.compute_default_rope_parameters(self.config)[0]
        if self.inv_freq.is_meta:
            self.register_buffer("inv_freq", inv_freq, persistent=False)
            self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)
        else:
            self.inv_freq.copy_(inv_freq)
            self.original_inv_freq.copy_(inv_freq)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs_BSd = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb_BSD = torch.cat((freqs_BSd, freqs_BSd), dim=-1)
        return emb_BSD.cos().to(x.dtype), emb_BSD.sin().to(x.dtype)


def reset_rope(model: nn.Module) -> None:
    """Recompute every RoPE table of `model` from its config (see `SmallThinkerRotaryEmbedding.reset_parameters`)."""
    for module in model.modules():
        if isinstance(module, SmallThinkerRotaryEmbedding):
            module.reset_parameters()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, S, D]: broadcast over heads
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, kv_heads, S, D] -> [B, kv_heads * n_rep, S, D] for grouped-query attention."""
    if n_rep == 1:
        return hidden_states
    b, kv, s, d = hidden_states.shape
    return hidden_states[:, :, None].expand(b, kv, n_rep, s, d).reshape(b, kv * n_rep, s, d)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention: softmax in fp32; `attention_mask` is the additive/boolean mask from masking_utils."""
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()  # [B, S, heads, D]
    return out, probs


class SmallThinkerAttention(nn.Module):
    """GQA with an explicit head_dim; RoPE or NoPE and full or sliding-window attention per layer."""

    def __init__(self, config: SmallThinkerConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        self.use_rope = bool(config.rope_layout[layer_idx])
        self.sliding_window = config.sliding_window_size if config.sliding_window_layout[layer_idx] else None
        h, d = config.hidden_size, self.head_dim
        self.q_proj = nn.Linear(h, config.num_attention_heads * d, bias=False)
        self.k_proj = nn.Linear(h, config.num_key_value_heads * d, bias=False)
        self.v_proj = nn.Linear(h, config.num_key_value_heads * d, bias=False)
        self.o_proj = nn.Linear(config.num_attention_heads * d, h, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        heads_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(heads_shape).transpose(1, 2)  # [B, heads, S, D]
        k = self.k_proj(hidden_states).view(heads_shape).transpose(1, 2)  # [B, kv_heads, S, D]
        v = self.v_proj(hidden_states).view(heads_shape).transpose(1, 2)
        if self.use_rope:
            q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        out, weights = attention_interface(
            self,
            q,
            k,
            v,
            attention_mask,
            dropout=self.config.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


class SmallThinkerRouter(nn.Linear):
    """The pre-attention router: a bias-free H -> E projection of the raw layer input.

    A class of its own so hooks and output recording can find it: a forward hook on it fires before the
    attention of its layer runs, which is when an inference engine starts loading the chosen experts.
    """

    def __init__(self, config: SmallThinkerConfig) -> None:
        super().__init__(config.hidden_size, config.moe_num_primary_experts, bias=False)


@use_experts_implementation
class SmallThinkerExperts(nn.Module):
    """All experts of a layer as 3-D tensors; this forward is the readable eager reference.

    `gate_up_proj[e]` stacks the gate rows then the up rows ([E, 2F, H]); `down_proj` is [E, H, F]. Each expert is
    ReGLU: down(up(x) * relu(gate(x))). Faster paths (`grouped_mm`, `batched_mm`, or any function registered in
    transformers' experts interface) are picked by `config._experts_implementation`.
    """

    def __init__(self, config: SmallThinkerConfig) -> None:
        super().__init__()
        self.num_experts = config.moe_num_primary_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.moe_ffn_hidden_size
        self.gate_up_proj = nn.Parameter(
            torch.empty(self.num_experts, 2 * self.intermediate_dim, self.hidden_dim)
        )
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim))
        self.act_fn = nn.ReLU()

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        # hidden_states [T, H], top_k_index / top_k_weights [T, K] -> [T, H]
        out_TH = torch.zeros_like(hidden_states)
        with torch.no_grad():
            hit_E = torch.zeros(self.num_experts, dtype=torch.bool, device=hidden_states.device)
            hit_E[top_k_index.reshape(-1)] = True
        # One unbind instead of indexing per expert: the backward of `param[e]` would build, zero-fill and add a
        # gradient the size of the whole 3-D tensor for every expert; unbind's backward stacks them once.
        gate_up_FH, down_HF = self.gate_up_proj.unbind(0), self.down_proj.unbind(0)
        # Ascending expert order and accumulation in the activation dtype, as the official implementation does.
        for expert in hit_E.nonzero().flatten().tolist():
            token_idx, k_pos = torch.where(top_k_index == expert)
            x = hidden_states[token_idx]
            gate, up = F.linear(x, gate_up_FH[expert]).chunk(2, dim=-1)
            y = F.linear(self.act_fn(gate) * up, down_HF[expert])
            y = y * top_k_weights[token_idx, k_pos, None]
            out_TH.index_add_(0, token_idx, y.to(out_TH.dtype))
        return out_TH


def top_k_experts(router_logits_TE: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The experts a token is routed to: top-k of the raw router logits, as (logits [.., K], indices [.., K]).

    The one place routing picks experts: the MoE block, the router losses, expert-load statistics and the offload
    engine's prefetch all call it, so they agree on ties and order.
    """
    return torch.topk(router_logits_TE, top_k, dim=-1)


def route(
    router_logits_TE: torch.Tensor, top_k: int, apply_softmax: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k on the raw logits, then softmax (fp32) or sigmoid renormalised to sum 1 (logits dtype) over the k."""
    topk_logits_TK, topk_index_TK = top_k_experts(router_logits_TE, top_k)
    if apply_softmax:
        weights_TK = F.softmax(topk_logits_TK, dim=-1, dtype=torch.float32)
    else:
        weights_TK = torch.sigmoid(topk_logits_TK)
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    return topk_index_TK, weights_TK


class SmallThinkerMoeBlock(nn.Module):
    """Routed ReGLU experts; no shared experts, no capacity limit, no token dropping."""

    def __init__(self, config: SmallThinkerConfig) -> None:
        super().__init__()
        self.top_k = config.moe_num_active_primary_experts
        self.apply_softmax = config.moe_primary_router_apply_softmax
        self.primary_router = SmallThinkerRouter(config)
        self.experts = SmallThinkerExperts(config)

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """`router_logits` [B, S, E] come from the layer input (before attention), `hidden_states` [B, S, H]."""
        b, s, h = hidden_states.shape
        top_k_index, top_k_weights = route(router_logits.reshape(b * s, -1), self.top_k, self.apply_softmax)
        out_TH = self.experts(
            hidden_states.reshape(b * s, h), top_k_index, top_k_weights.to(hidden_states.dtype)
        )
        return out_TH.reshape(b, s, h)


class SmallThinkerDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: SmallThinkerConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = SmallThinkerRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = SmallThinkerAttention(config, layer_idx)
        self.post_attention_layernorm = SmallThinkerRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.block_sparse_moe = SmallThinkerMoeBlock(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        # Routing first, from the raw layer input: the choice of experts is known before attention runs.
        router_logits = self.block_sparse_moe.primary_router(hidden_states)  # [B, S, E]
        attn_out, _ = self.self_attn(
            self.input_layernorm(hidden_states),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            cache=cache,
            **kwargs,
        )
        hidden_states = hidden_states + attn_out
        moe_out = self.block_sparse_moe(self.post_attention_layernorm(hidden_states), router_logits)
        return hidden_states + moe_out


class SmallThinkerPreTrainedModel(PreTrainedModel):
    config_class = SmallThinkerConfig
    config: SmallThinkerConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["SmallThinkerDecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False  # the eager expert loop is data-dependent
    _can_record_outputs = {
        "router_logits": OutputRecorder(SmallThinkerRouter, index=None),
        "hidden_states": SmallThinkerDecoderLayer,
        "attentions": OutputRecorder(SmallThinkerAttention, index=1),
    }

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, SmallThinkerExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, SmallThinkerRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, SmallThinkerRotaryEmbedding):
            inv_freq = module.compute_default_rope_parameters(module.config)[0]
            init.copy_(module.inv_freq, inv_freq)
            init.copy_(module.original_inv_freq, inv_freq)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As `PreTrainedModel.save_pretrained`; `auto_map` also names the `AutoModel` class, as the official files
        do (transformers itself writes only the saved class's own Auto class)."""
        if self._auto_class is not None:
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            auto_map.setdefault("AutoModel", "modeling_smallthinker.SmallThinkerModel")
            self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """As `PreTrainedModel.from_pretrained`, but a local checkpoint with missing or misshaped tensors is a
        `ValueError` naming them, not a load report or a silently random-initialised model."""
        if isinstance(pretrained_model_name_or_path, (str, os.PathLike)) and os.path.isdir(
            pretrained_model_name_or_path
        ):
            config = kwargs.get("config")
            if not isinstance(config, SmallThinkerConfig):
                config = SmallThinkerConfig.from_pretrained(pretrained_model_name_or_path)
            check_checkpoint_tensors(pretrained_model_name_or_path, config)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)


# Official checkpoint tensor names of the experts: one matrix per (layer, expert, projection).
EXPERT_PROJECTIONS = ("gate", "up", "down")
EXPERT_TENSOR_NAME = re.compile(
    r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(gate|up|down)\.weight$"
)
# The in-memory 3-D tensors, as a `state_dict` of the model names them.
FUSED_EXPERT_TENSOR_NAME = re.compile(
    r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(gate_up_proj|down_proj)$"
)


def experts_prefix(layer: int) -> str:
    """Name prefix of layer `layer`'s experts, in files (`{prefix}.{j}.gate.weight`) and in the model."""
    return f"model.layers.{layer}.block_sparse_moe.experts"


def expert_tensor_name(layer: int, expert: int, projection: str) -> str:
    """Official file name of one expert matrix: gate and up are [F, H], down is [H, F]."""
    return f"{experts_prefix(layer)}.{expert}.{projection}.weight"


def is_expert_tensor(name: str) -> bool:
    """Whether `name` is an expert weight, per-expert (files) or fused 3-D (model state dicts)."""
    return bool(EXPERT_TENSOR_NAME.match(name) or FUSED_EXPERT_TENSOR_NAME.match(name))


def official_tensor_shapes(config: SmallThinkerConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of an official checkpoint file, with its shape ([out, in] for linears)."""
    h, f, e, d = (
        config.hidden_size,
        config.moe_ffn_hidden_size,
        config.moe_num_primary_experts,
        config.head_dim,
    )
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (config.vocab_size, h),
        "model.norm.weight": (h,),
    }
    expert_shapes = {"gate": (f, h), "up": (f, h), "down": (h, f)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "block_sparse_moe.primary_router.weight": (e, h),
        }
        for j in range(e):
            shapes |= {expert_tensor_name(i, j, n): shape for n, shape in expert_shapes.items()}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    return shapes


def check_checkpoint_tensors(path: str | os.PathLike, config: SmallThinkerConfig) -> None:
    """Compare the safetensors headers under `path` with `official_tensor_shapes`; raise naming every problem."""
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        return  # other formats are left to transformers' own loading checks
    found: dict[str, tuple[int, ...]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                found[name] = tuple(handle.get_slice(name).get_shape())
    expected = official_tensor_shapes(config)
    missing = sorted(set(expected) - set(found))
    misshaped = [
        f"{n}: file {found[n]}, config expects {s}"
        for n, s in expected.items()
        if n in found and found[n] != s
    ]
    if missing or misshaped:
        problems = [f"missing {n}" for n in missing[:20]] + misshaped[:20]
        raise ValueError(
            f"Checkpoint {os.fspath(path)} does not match its config.json ({len(missing)} missing, "
            f"{len(misshaped)} misshaped tensor(s)):\n  " + "\n  ".join(problems)
        )


def _check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(
            f"input_ids must lie in [0, {vocab_size - 1}] (vocab_size), got values in [{lo}, {hi}]: "
            "the tokenizer does not match this model."
        )


def _input_checks_enabled() -> bool:
    """Range checks make the host wait for the device on every forward, decode steps included, so they run only
    when asked (`SMALLTHINKER_CHECK_INPUTS=1`); tokenizers and data pipelines validate token ids instead."""
    return os.environ.get("SMALLTHINKER_CHECK_INPUTS", "") not in ("", "0")


class SmallThinkerModel(SmallThinkerPreTrainedModel):
    def __init__(self, config: SmallThinkerConfig) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            SmallThinkerDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = SmallThinkerRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = SmallThinkerRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def causal_masks(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: Cache | None,
        position_ids: torch.Tensor,
    ) -> dict[str, torch.Tensor | None]:
        """One mask per attention type present ("full_attention", "sliding_attention")."""
        kwargs = dict(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        masks = {}
        if "full_attention" in self.config.layer_types:
            masks["full_attention"] = create_causal_mask(**kwargs)
        if "sliding_attention" in self.config.layer_types:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
        return masks

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoeModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if inputs_embeds is None:
            if _input_checks_enabled():
                _check_token_ids(input_ids, self.config.vocab_size)
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)[None] + past
        masks = attention_mask
        if not isinstance(masks, dict):  # `generate` may have prepared them already
            masks = self.causal_masks(inputs_embeds, attention_mask, cache, position_ids)

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for layer, layer_type in zip(self.layers, self.config.layer_types):
            hidden_states = layer(
                hidden_states,
                attention_mask=masks[layer_type],
                position_embeddings=position_embeddings,
                cache=cache,
                position_ids=position_ids,
                **kwargs,
            )
        return MoeModelOutputWithPast(last_hidden_state=self.norm(hidden_states), cache=cache)


# ------------------------------------------------------------------------------------------------
# Router statistics and losses: the one implementation the trainer, the metrics and the model's own loss share.
# `router_logits` is a sequence of per-layer [B, S, E] or [T, E] tensors, as `output_router_logits=True` returns.
# ------------------------------------------------------------------------------------------------
def token_mask(attention_mask: torch.Tensor | None, num_tokens: int, device: torch.device) -> torch.Tensor:
    """[T] float mask of real (non-padding) tokens from a [B, S] padding mask; all ones without one."""
    if attention_mask is None or attention_mask.dim() != 2:
        return torch.ones(num_tokens, device=device)
    return attention_mask.reshape(-1).to(device=device, dtype=torch.float32)


def router_probabilities(router_logits_TE: torch.Tensor, apply_softmax: bool) -> torch.Tensor:
    """Per-expert probabilities matching the routing mode: softmax, or sigmoid renormalised over all experts."""
    logits = router_logits_TE.float()
    if apply_softmax:
        return F.softmax(logits, dim=-1)
    scores = torch.sigmoid(logits)
    return scores / scores.sum(dim=-1, keepdim=True)


def _stack_layers(router_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack([r.reshape(-1, r.shape[-1]) for r in router_logits])  # [L, T, E]


@torch.no_grad()
def _counts_LE(logits_LTE: torch.Tensor, top_k: int, mask_T: torch.Tensor) -> torch.Tensor:
    num_layers, _, num_experts = logits_LTE.shape
    index_LTK = top_k_experts(logits_LTE.detach(), top_k)[1]
    # One weighted bincount over (layer, expert) pairs: no [L, T, K, E] one-hot tensor.
    offset_L11 = torch.arange(num_layers, device=index_LTK.device)[:, None, None] * num_experts
    weights = mask_T[None, :, None].expand(index_LTK.shape).reshape(-1)
    flat = torch.bincount((index_LTK + offset_L11).reshape(-1), weights, minlength=num_layers * num_experts)
    return flat.reshape(num_layers, num_experts).float()


def expert_counts(
    router_logits: Sequence[torch.Tensor], top_k: int, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """[L, E] number of real tokens routed to each expert of each layer (padding excluded, no gradient)."""
    logits_LTE = _stack_layers(router_logits)
    return _counts_LE(logits_LTE, top_k, token_mask(attention_mask, logits_LTE.shape[1], logits_LTE.device))


def load_balancing_loss(
    router_logits: Sequence[torch.Tensor],
    num_experts: int,
    top_k: int,
    apply_softmax: bool,
    attention_mask: torch.Tensor | None = None,
    count_reducer: Callable[[torch.Tensor], torch.Tensor] | None = None,
    *,
    expert_load: tuple[torch.Tensor, torch.Tensor] | None = None,
    per_layer: bool = False,
) -> torch.Tensor:
    """Switch-style balance loss E * sum_e f_e * P_e per layer, averaged over layers (`per_layer`: the [L] values).

    f_e is the fraction of top-k assignments that go to expert e, P_e the mean router probability; padding
    (`attention_mask` == 0) is excluded from both.
    - `count_reducer` (e.g. an all-reduce over data-parallel ranks): the assignment counts and the token count
      are reduced before f is formed, P keeps its local gradient and normalisation.
    - `expert_load` = (counts [L, E], tokens) of a span this batch is part of (all micro-batches of an optimizer
      step on all ranks of a balance group): f comes from the span, and P is this batch's probability sum divided
      by the span's tokens, so the losses of the span's batches add up to the loss of the whole span seen at once
      (the report's global-batch balance).
    """
    logits_LTE = _stack_layers(router_logits)
    mask_T = token_mask(attention_mask, logits_LTE.shape[1], logits_LTE.device)
    probs_LTE = router_probabilities(logits_LTE, apply_softmax)
    if expert_load is None:
        with torch.no_grad():
            counts_LE, tokens = _counts_LE(logits_LTE, top_k, mask_T), mask_T.sum().reshape(1)
            if count_reducer is not None:
                counts_LE, tokens = count_reducer(counts_LE), count_reducer(tokens)
        prob_tokens = mask_T.sum()
    else:
        counts_LE, tokens = expert_load
        prob_tokens = tokens
    f_LE = counts_LE / (tokens.clamp(min=1) * top_k)
    p_LE = (probs_LTE * mask_T[None, :, None]).sum(dim=1) / prob_tokens.clamp(min=1)
    loss_L = num_experts * (f_LE * p_LE).sum(dim=-1)
    return loss_L if per_layer else loss_L.mean()


def router_z_loss(
    router_logits: Sequence[torch.Tensor],
    attention_mask: torch.Tensor | None = None,
    *,
    per_layer: bool = False,
) -> torch.Tensor:
    """ST-MoE router z-loss: mean over real tokens of logsumexp(logits)^2, averaged over layers (or [L])."""
    logits_LTE = _stack_layers(router_logits)
    mask_T = token_mask(attention_mask, logits_LTE.shape[1], logits_LTE.device)
    z_LT = torch.logsumexp(logits_LTE.float(), dim=-1).square()
    z_L = (z_LT * mask_T).sum(dim=-1).div(mask_T.sum().clamp(min=1))
    return z_L if per_layer else z_L.mean()


@dataclass
class SmallThinkerCausalLMOutput(MoeCausalLMOutputWithPast):
    """`MoeCausalLMOutputWithPast` plus the router z-loss."""

    z_loss: torch.FloatTensor | None = None


class SmallThinkerForCausalLM(SmallThinkerPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: SmallThinkerConfig) -> None:
        super().__init__(config)
        self.model = SmallThinkerModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SmallThinkerCausalLMOutput:
        cfg = self.config
        if output_router_logits is None:
            output_router_logits = cfg.output_router_logits
        # The training losses need the full [T, E] router logits even when the caller did not ask for them.
        wants_router_losses = labels is not None and (
            cfg.router_aux_loss_coef > 0 or cfg.router_z_loss_coef > 0
        )
        if "past_key_values" in kwargs:  # the pre-5.24 spelling, still used by some callers
            cache = kwargs.pop("past_key_values")
        outputs: MoeModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits or wants_router_losses,
            **kwargs,
        )
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(outputs.last_hidden_state[:, keep, :])

        loss = aux_loss = z_loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
        if output_router_logits or wants_router_losses:
            aux_loss = load_balancing_loss(
                outputs.router_logits,
                cfg.moe_num_primary_experts,
                cfg.moe_num_active_primary_experts,
                cfg.moe_primary_router_apply_softmax,
                attention_mask,
            )
            z_loss = router_z_loss(outputs.router_logits, attention_mask)
            if loss is not None:
                loss = loss + cfg.router_aux_loss_coef * aux_loss + cfg.router_z_loss_coef * z_loss
        router_logits = None
        if output_router_logits:
            router_logits = tuple(r.reshape(-1, cfg.moe_num_primary_experts) for r in outputs.router_logits)
        return SmallThinkerCausalLMOutput(
            loss=loss,
            aux_loss=aux_loss,
            z_loss=z_loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=router_logits,
        )


__all__ = [
    "EXPERT_PROJECTIONS",
    "SmallThinkerPreTrainedModel",
    "SmallThinkerModel",
    "SmallThinkerForCausalLM",
    "check_checkpoint_tensors",
    "expert_counts",
    "expert_tensor_name",
    "experts_prefix",
    "is_expert_tensor",
    "load_balancing_loss",
    "official_tensor_shapes",
    "reset_rope",
    "route",
    "router_probabilities",
    "router_z_loss",
    "token_mask",
    "top_k_experts",
]
