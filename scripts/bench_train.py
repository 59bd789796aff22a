"""Training tokens/s on CPU: the full training loop step vs a bare forward + backward + AdamW step,
side by side on the same batches (tiny preset and the 4B layer shape at 4 layers).

    flock /tmp/smallthinker-bench.lock .venv/bin/python -m scripts.bench_train
    flock /tmp/smallthinker-bench.lock .venv/bin/python -m scripts.bench_train --shapes small --precisions bf16
"""

from __future__ import annotations

import argparse

from smallthinker.train.bench import SHAPES, bench_train, markdown_table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=8, help="measured steps per case")
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    print(markdown_table(bench_train(args.shapes, args.precisions, args.steps, args.warmup)))


if __name__ == "__main__":
    main()
