"""Alias of `smallthinker chat` (same arguments; `smallthinker chat --help` shows them with examples).

python -m scripts.chat --help
"""

from smallthinker.cli import alias

if __name__ == "__main__":
    alias("chat")
