"""Alias of `smallthinker evaluate` (same arguments; `smallthinker evaluate --help` shows them with examples).

python -m scripts.evaluate --help
"""

from smallthinker.cli import alias

if __name__ == "__main__":
    alias("evaluate")
