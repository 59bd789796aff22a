"""Render PNG plots of a training run: loss curve, expert-load heatmaps per layer, neuron sparsity.

python -m scripts.plot_run runs/pretrain_tiny            # writes runs/pretrain_tiny/plots/*.png
python -m scripts.plot_run runs/pretrain_tiny --out figs
"""

from __future__ import annotations

import argparse

from smallthinker.train.plots import plot_run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", help="a training run directory (holds metrics.jsonl)")
    parser.add_argument("--out", default=None, help="output folder (default RUN_DIR/plots)")
    args = parser.parse_args(argv)
    for path in plot_run(args.run_dir, args.out):
        print(path)


if __name__ == "__main__":
    main()
