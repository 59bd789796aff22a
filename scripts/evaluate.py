"""Evaluate a SmallThinker checkpoint on MMLU / GPQA-Diamond with lm-evaluation-harness.

    python -m scripts.evaluate --suite mmlu --model DIR --data data/generated/synthetic/benchmarks --limit 20
    python -m scripts.evaluate --suite mmlu_cot,gpqa_diamond_cot --model PowerInfer/SmallThinker-4BA0.6B-Instruct --hub

Suites: mmlu (5-shot log-likelihood), mmlu_cot (0-shot chain of thought, chat template: the report's
protocol), gpqa_diamond (0-shot log-likelihood), gpqa_diamond_cot (0-shot chain of thought, chat template).
Each suite writes results.json, results.md and samples.jsonl to OUT/SUITE and prints the markdown table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from smallthinker.eval import SUITES, EvalError, evaluate_suite, get_suite


def _batch_size(value: str) -> int | str:
    if value == "auto" or (value.isdigit() and int(value) > 0):
        return value if value == "auto" else int(value)
    raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {value!r}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--suite", required=True, help=f"one or more of {sorted(SUITES)}, comma-separated")
    parser.add_argument(
        "--model", required=True, help="checkpoint directory or hub id of a SmallThinker model"
    )
    parser.add_argument(
        "--tokenizer", help="tokenizer directory or hub id (default: the one saved with --model)"
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--data", type=Path, help="folder with mmlu/{dev,validation,test}.jsonl, gpqa/gpqa_diamond.jsonl"
    )
    source.add_argument(
        "--hub", action="store_true", help="cais/mmlu and Idavidrein/gpqa from the hub or its cache"
    )
    parser.add_argument("--limit", type=int, help="at most this many questions per task (per MMLU subject)")
    parser.add_argument(
        "--out", type=Path, default=Path("runs/eval"), help="results go to OUT/SUITE (default runs/eval)"
    )
    parser.add_argument(
        "--batch-size", type=_batch_size, default=8, help="requests per forward pass, or 'auto' (GPU)"
    )
    parser.add_argument("--max-gen-toks", type=int, help="generation budget of the CoT suites (default 4096)")
    parser.add_argument("--device", help="cpu, cuda, cuda:0 ... (default: cuda when available)")
    parser.add_argument("--dtype", default="auto", help="auto (the checkpoint's), bfloat16, float32")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        suites = [get_suite(name.strip()).name for name in args.suite.split(",")]
        for suite in suites:
            record = evaluate_suite(
                args.model,
                suite,
                args.out / suite,
                data_dir=args.data,
                hub=args.hub,
                tokenizer=args.tokenizer,
                limit=args.limit,
                batch_size=args.batch_size,
                max_gen_toks=args.max_gen_toks,
                device=args.device,
                dtype=args.dtype,
            )
            print((args.out / suite / "results.md").read_text())
            print(
                f"{suite}: {record['headline']['metric']} = {record['headline']['value']:.4f} -> {args.out / suite}"
            )
    except EvalError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
