"""Offline synthetic data: an invented world, its pre-training corpus, SFT chats and MMLU/GPQA-format benchmarks."""

from smallthinker.synthetic.benchmarks import build_gpqa, build_mmlu, write_benchmarks
from smallthinker.synthetic.corpus import generate_corpus, write_corpus
from smallthinker.synthetic.instructions import (
    generate_conversations,
    heldout_exact_match,
    heldout_questions,
    split_entities,
    to_prompt_response,
    write_instructions,
)
from smallthinker.synthetic.prepare import prepare_synthetic
from smallthinker.synthetic.world import Entity, Fact, Relation, World, build_world

__all__ = [
    "Entity",
    "Fact",
    "Relation",
    "World",
    "build_gpqa",
    "build_mmlu",
    "build_world",
    "generate_conversations",
    "generate_corpus",
    "heldout_exact_match",
    "heldout_questions",
    "prepare_synthetic",
    "split_entities",
    "to_prompt_response",
    "write_benchmarks",
    "write_corpus",
    "write_instructions",
]
