"""Alias of `smallthinker convert-store` (same arguments; `smallthinker convert-store --help` shows them with examples).

python -m scripts.convert_store --help
"""

from smallthinker.cli import alias

if __name__ == "__main__":
    alias("convert-store")
