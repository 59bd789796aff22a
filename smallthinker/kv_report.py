"""KV-cache memory of a SmallThinker layout, hybrid (sliding-window layers keep only their window) vs all-global.

The byte counts follow transformers' DynamicCache: a full-attention layer keeps every key and value, a
sliding-window layer keeps the last `sliding_window_size - 1` of them (plus the tokens of the current step).
`smallthinker kv-report` prints the table.
"""

from __future__ import annotations

from smallthinker.modeling import SmallThinkerConfig, load_model_config


def kv_cache_bytes(config: SmallThinkerConfig, tokens: int, batch: int = 1, bytes_per_value: int = 2) -> int:
    """Bytes held by the KV cache after `tokens` tokens, per the config's per-layer attention layout."""
    per_token_layer = (
        2 * config.num_key_value_heads * config.head_dim * bytes_per_value * batch
    )  # keys + values
    total = 0
    for sliding in config.sliding_window_layout:
        kept = min(tokens, config.sliding_window_size - 1) if sliding else tokens
        total += kept * per_token_layer
    return total


def report(preset: str, tokens: int, batch: int = 1, bytes_per_value: int = 2) -> str:
    config = load_model_config(preset)
    hybrid = kv_cache_bytes(config, tokens, batch, bytes_per_value)
    all_global = config.num_hidden_layers * tokens * 2 * config.num_key_value_heads * config.head_dim
    all_global *= bytes_per_value * batch
    sliding = sum(config.sliding_window_layout)
    return "\n".join(
        [
            f"| layout ({preset}, {tokens} tokens, batch {batch}, {8 * bytes_per_value}-bit) | KV cache |",
            "|---|---|",
            f"| all {config.num_hidden_layers} layers global | {all_global / 2**30:.3f} GiB |",
            f"| hybrid: {config.num_hidden_layers - sliding} global + {sliding} sliding-window "
            f"({config.sliding_window_size}) | {hybrid / 2**30:.3f} GiB ({hybrid / all_global:.1%}) |",
        ]
    )
