"""Alias of `smallthinker plot` (same arguments; `smallthinker plot --help` shows them with examples).

python -m scripts.plot_run --help
"""

from smallthinker.cli import alias

if __name__ == "__main__":
    alias("plot")
