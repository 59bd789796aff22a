"""Generate the offline synthetic world: corpus, SFT chats, MMLU/GPQA-format benchmarks and tokenizer.

    python -m scripts.make_synthetic --out data/generated/synthetic [--seed 0 --entities 64 --documents 4000]

Re-running with the same parameters does nothing; other parameters need --overwrite.
"""

from __future__ import annotations

import argparse
import json

from smallthinker.synthetic.prepare import DEFAULT_DIR, prepare_synthetic


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=DEFAULT_DIR, help=f"output folder (default {DEFAULT_DIR})")
    parser.add_argument("--seed", type=int, default=0, help="world and sampling seed")
    parser.add_argument("--entities", type=int, default=64, help="number of invented entities (>= 24)")
    parser.add_argument("--documents", type=int, default=4000, help="pre-training corpus documents")
    parser.add_argument(
        "--vocab-size", type=int, default=2048, help="tokenizer vocabulary size (upper bound)"
    )
    parser.add_argument("--gpqa-size", type=int, default=100, help="number of two-hop GPQA-format questions")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a folder made with other parameters"
    )
    args = parser.parse_args(argv)
    try:
        paths = prepare_synthetic(
            args.out,
            seed=args.seed,
            num_entities=args.entities,
            num_documents=args.documents,
            vocab_size=args.vocab_size,
            gpqa_size=args.gpqa_size,
            overwrite=args.overwrite,
        )
    except ValueError as err:
        parser.exit(2, f"error: {err}\n")
    manifest = json.loads(paths["manifest"].read_text(encoding="utf-8"))
    print(f"synthetic data in {paths['root']} (generated in {manifest['seconds']} s)")
    for name, rows in manifest["rows"].items():
        print(f"  {name:32s} {rows:6d} rows  {paths[name].relative_to(paths['root'])}")
    print(f"  tokenizer                        {paths['tokenizer'].relative_to(paths['root'])}")


if __name__ == "__main__":
    main()
