"""Alias of `smallthinker demo` (same arguments; `smallthinker demo --help` shows them with examples).

python -m scripts.quickstart --help
"""

from smallthinker.cli import alias

if __name__ == "__main__":
    alias("demo")
