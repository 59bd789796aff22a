"""Train a byte-level BPE tokenizer (Qwen2-style, ChatML template) on your own text files.

    python -m scripts.train_tokenizer --data corpus.jsonl more.txt --vocab-size 4096 --out runs/tokenizer

`.jsonl` files give their `text` column (or the contents of chat `messages`), `.txt` files one text per line.
"""

from __future__ import annotations

import argparse

from smallthinker.tokenizer import iter_texts, train_tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", nargs="+", required=True, help=".jsonl / .txt files to train on")
    parser.add_argument(
        "--vocab-size", type=int, default=4096, help="vocabulary size, special tokens included"
    )
    parser.add_argument("--out", required=True, help="folder to save the tokenizer in (save_pretrained)")
    parser.add_argument("--text-column", default="text", help="column of .jsonl rows holding the text")
    args = parser.parse_args(argv)
    try:
        tokenizer = train_tokenizer(iter_texts(args.data, args.text_column), args.vocab_size, args.out)
    except (ValueError, FileNotFoundError) as err:
        parser.exit(2, f"error: {err}\n")
    print(f"saved a {len(tokenizer)}-token tokenizer to {args.out}")


if __name__ == "__main__":
    main()
