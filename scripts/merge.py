"""Alias of `smallthinker merge` (same arguments; `smallthinker merge --help` shows them with examples).

python -m scripts.merge --help
"""

from smallthinker.cli import alias

if __name__ == "__main__":
    alias("merge")
