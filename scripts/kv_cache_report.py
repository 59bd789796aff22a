"""Alias of `smallthinker kv-report` (same arguments; `smallthinker kv-report --help` shows them).

python -m scripts.kv_cache_report --preset smallthinker-21b --tokens 16384
"""

from smallthinker.cli import alias
from smallthinker.kv_report import report

__all__ = ["report"]

if __name__ == "__main__":
    alias("kv-report")
