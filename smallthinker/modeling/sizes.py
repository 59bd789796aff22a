"""Sizes that follow from a configuration: parameter counts and KV-cache bytes.

Everything that plans memory or accounts FLOPs (the offload engine's budget, MFU, the KV-cache report, memory
estimates) reads these, so they agree with each other and with what the model really allocates.
"""

from __future__ import annotations

import math

from .configuration_smallthinker import SmallThinkerConfig
from .modeling_smallthinker import is_expert_tensor, official_tensor_shapes


def total_params(config: SmallThinkerConfig) -> int:
    """Parameters stored in an official checkpoint (a tied head is the embedding, counted once)."""
    return sum(math.prod(shape) for shape in official_tensor_shapes(config).values())


def expert_params(config: SmallThinkerConfig) -> int:
    """Parameters of all experts of all layers."""
    shapes = official_tensor_shapes(config)
    return sum(math.prod(shape) for name, shape in shapes.items() if is_expert_tensor(name))


def embedding_params(config: SmallThinkerConfig) -> int:
    """The input embedding plus an untied LM head."""
    matrices = 1 if config.tie_word_embeddings else 2
    return matrices * config.vocab_size * config.hidden_size


def active_params(config: SmallThinkerConfig, include_head: bool = False) -> int:
    """Parameters one token multiplies with: attention, routers, norms and its top-k experts, without embeddings
    (the report's "active" count: 0.631 B for the 4B, 2.94 B for the 21B). `include_head` adds the LM head's
    matrix, which every token also multiplies with (FLOP accounting)."""
    experts = expert_params(config)
    dense = total_params(config) - experts - embedding_params(config)
    active_experts = experts // config.moe_num_primary_experts * config.moe_num_active_primary_experts
    head = config.vocab_size * config.hidden_size if include_head else 0
    return dense + active_experts + head


def kv_cache_tokens(config: SmallThinkerConfig, tokens: int) -> list[int]:
    """Tokens each layer's cache holds after `tokens` tokens: all of them on full-attention layers, the last
    `sliding_window_size - 1` on sliding-window layers (the current token completes the window while it is
    processed), as transformers' `DynamicCache` keeps them."""
    window = config.sliding_window_size - 1
    return [min(tokens, window) if sliding else tokens for sliding in config.sliding_window_layout]


def kv_cache_bytes(config: SmallThinkerConfig, tokens: int, batch: int = 1, bytes_per_value: int = 2) -> int:
    """Bytes of keys and values the cache holds after `tokens` tokens, per the config's attention layout."""
    per_token_layer = (
        2 * config.num_key_value_heads * config.head_dim * bytes_per_value * batch
    )  # keys + values
    return per_token_layer * sum(kv_cache_tokens(config, tokens))


__all__ = [
    "active_params",
    "embedding_params",
    "expert_params",
    "kv_cache_bytes",
    "kv_cache_tokens",
    "total_params",
]
