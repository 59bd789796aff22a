"""Convert a SmallThinker checkpoint directory into an offload expert store (run once per checkpoint).

Launch:
    .venv/bin/python -m scripts.convert_store --src CHECKPOINT_DIR --dst STORE_DIR [--quant int8] [--verify]

Then load it under a memory cap with ``smallthinker.inference.load_offloaded(STORE_DIR, memory_budget="1GB")``.
"""

from __future__ import annotations

import argparse

from smallthinker.inference.store import QUANT_MODES, ExpertStore, convert_checkpoint


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--src", required=True, help="checkpoint directory (config.json + *.safetensors)")
    parser.add_argument("--dst", required=True, help="new, empty directory for the store")
    parser.add_argument("--quant", choices=QUANT_MODES, default="none", help="expert weight format")
    parser.add_argument("--verify", action="store_true", help="read the store back and check every checksum")
    args = parser.parse_args(argv)
    dst = convert_checkpoint(args.src, args.dst, quant=args.quant)
    store = ExpertStore(dst)
    if args.verify:
        store.verify_all()
    print(
        f"wrote {dst}: {store.num_layers} layers x {store.num_experts} experts, "
        f"{store.record_bytes / 1e6:.2f} MB per expert, {store.expert_bytes_total / 1e9:.2f} GB of experts"
    )


if __name__ == "__main__":
    main()
