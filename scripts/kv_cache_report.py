"""KV-cache memory of a SmallThinker layout, hybrid (sliding-window layers keep only their window) vs all-global.

    python -m scripts.kv_cache_report --preset smallthinker-21b --tokens 16384

The byte counts are `smallthinker.modeling.sizes.kv_cache_bytes`: what transformers' DynamicCache holds, every
key and value on a full-attention layer, the last `sliding_window_size - 1` on a sliding-window layer.
"""

from __future__ import annotations

import argparse

from smallthinker.modeling import load_model_config
from smallthinker.modeling.sizes import kv_cache_bytes


def report(preset: str, tokens: int, batch: int = 1, bytes_per_value: int = 2) -> str:
    config = load_model_config(preset)
    hybrid = kv_cache_bytes(config, tokens, batch, bytes_per_value)
    global_only = load_model_config(preset, sliding_window_layout=[0] * config.num_hidden_layers)
    all_global = kv_cache_bytes(global_only, tokens, batch, bytes_per_value)
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="smallthinker-21b")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--bytes-per-value", type=int, default=2, help="2 for bf16, 4 for fp32")
    args = parser.parse_args()
    print(report(args.preset, args.tokens, args.batch, args.bytes_per_value))


if __name__ == "__main__":
    main()
