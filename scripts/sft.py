"""Alias of `smallthinker sft` (same arguments; `smallthinker sft --help` shows them with examples).

python -m scripts.sft --help
"""

from smallthinker.cli import alias

if __name__ == "__main__":
    alias("sft")
