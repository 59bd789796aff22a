"""Pre-training corpus: every fact is stated repeatedly, in several paraphrases."""

from __future__ import annotations

from collections import Counter

import pytest
from datasets import load_dataset

from smallthinker.synthetic.corpus import generate_corpus, write_corpus
from smallthinker.synthetic.world import build_world


def _sentence(template: str, subject: str, obj: str) -> str:
    sentence = template.format(s=subject, o=obj)
    return sentence[0].upper() + sentence[1:]


def test_every_fact_is_stated_often_in_several_templates():
    world = build_world(0)
    text = "\n".join(generate_corpus(world, 2000, seed=0))
    for fact in world.facts:
        templates = world.relations[fact.relation].statements
        counts = Counter({t: text.count(_sentence(t, fact.subject, fact.object)) for t in templates})
        assert sum(counts.values()) >= 5, (fact, counts)
        assert sum(1 for c in counts.values() if c) >= 2, (fact, counts)


def test_corpus_is_deterministic_per_seed():
    world = build_world(0)
    assert generate_corpus(world, 50, seed=2) == generate_corpus(world, 50, seed=2)
    assert generate_corpus(world, 50, seed=2) != generate_corpus(world, 50, seed=3)


def test_write_corpus_loads_with_datasets(tmp_path):
    paths = write_corpus(build_world(0), tmp_path, num_documents=100, seed=0)
    ds = load_dataset(
        "json", data_files={k: str(p) for k, p in paths.items()}, cache_dir=str(tmp_path / "cache")
    )
    assert ds["train"].num_rows == 100 and ds["validation"].num_rows == 5
    assert ds["train"].column_names == ["text"]
    assert ds["validation"]["text"] != ds["train"]["text"][:5]


def test_no_documents_is_an_error():
    with pytest.raises(ValueError, match="num_documents"):
        generate_corpus(build_world(0), 0)
