"""Alias of `smallthinker pretrain` (same arguments; `smallthinker pretrain --help` shows them with examples).

python -m scripts.pretrain --help
"""

from smallthinker.cli import alias

if __name__ == "__main__":
    alias("pretrain")
