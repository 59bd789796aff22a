"""Merge checkpoints by weighted linear interpolation (streams tensors shard by shard).

python -m scripts.merge --inputs ckpt/sft-a ckpt/sft-b --weights 0.5 0.5 --out ckpt/merged
"""

from __future__ import annotations

import argparse

from smallthinker.merge import merge_checkpoints


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--inputs", nargs="+", required=True, help="checkpoint directories (same config)")
    parser.add_argument("--weights", nargs="+", type=float, required=True, help="one weight per input")
    parser.add_argument("--out", required=True, help="output checkpoint directory")
    parser.add_argument(
        "--no-normalize", action="store_true", help="use weights as given (need not sum to 1)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = parser.parse_args(argv)
    try:
        out = merge_checkpoints(
            args.inputs, args.weights, args.out, normalize=not args.no_normalize, overwrite=args.overwrite
        )
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        parser.error(str(e))
    print(f"merged {len(args.inputs)} checkpoints -> {out}")


if __name__ == "__main__":
    main()
