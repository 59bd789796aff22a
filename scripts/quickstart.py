"""Everything the project does, offline, in one command (about 10 minutes on 2 CPU cores).

    python -m scripts.quickstart                      # writes runs/quickstart/report.md, plots, checkpoints
    python -m scripts.quickstart --reduced --out runs/quickstart_ci   # the short version CI runs

Synthetic corpus + tokenizer -> pre-train a tiny SmallThinker -> SFT -> merge two SFT checkpoints ->
lm-eval on the synthetic MMLU- and GPQA-format tasks -> chat through the offload engine under memory
budgets smaller than the model -> report.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from smallthinker.quickstart import QuickstartConfig, run_quickstart, summary_table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("runs/quickstart"), help="output folder")
    parser.add_argument(
        "--data", type=Path, default=Path("data/generated/synthetic"), help="synthetic data folder"
    )
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--sft-steps", type=int, default=300)
    parser.add_argument("--eval-limit", type=int, default=None, help="questions per task (per MMLU subject)")
    parser.add_argument("--reduced", action="store_true", help="short run (CI): few steps, few questions")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    args = parser.parse_args(argv)
    cfg = QuickstartConfig(
        out_dir=args.out,
        data_dir=args.data,
        pretrain_steps=20 if args.reduced else args.pretrain_steps,
        sft_steps=10 if args.reduced else args.sft_steps,
        eval_limit=4 if args.reduced else args.eval_limit,
        heldout_questions=4 if args.reduced else 48,
        overwrite=args.overwrite,
    )
    report = run_quickstart(cfg)
    print()
    print(summary_table(report))
    print(f"\nreport: {cfg.out_dir / 'report.md'}")


if __name__ == "__main__":
    main()
