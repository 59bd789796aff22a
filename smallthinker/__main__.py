"""`python -m smallthinker ...` runs the `smallthinker` command (for environments without it on PATH)."""

from smallthinker.cli import entry

entry()
