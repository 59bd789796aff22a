"""MMLU/GPQA-format rows: valid schema, one true answer, balanced positions, loadable by datasets."""

from __future__ import annotations

from collections import Counter

import pytest
from datasets import load_dataset

from smallthinker.synthetic.benchmarks import build_gpqa, build_mmlu, two_hop_chains, write_benchmarks
from smallthinker.synthetic.instructions import ask
from smallthinker.synthetic.world import build_world

GPQA_COLUMNS = [
    "Question",
    "Correct Answer",
    "Incorrect Answer 1",
    "Incorrect Answer 2",
    "Incorrect Answer 3",
    "Record ID",
    "Subdomain",
    "High-level domain",
    "Explanation",
]


@pytest.fixture(scope="module")
def world():
    return build_world(0)


def test_mmlu_rows_are_valid_and_true(world):
    facts = {ask(world, f): f for f in world.facts}
    splits = build_mmlu(world)
    seen = set()
    for rows in splits.values():
        for row in rows:
            assert list(row) == ["question", "subject", "choices", "answer"]
            assert len(row["choices"]) == 4 and len(set(row["choices"])) == 4
            assert row["answer"] in range(4)
            fact = facts[row["question"]]
            assert row["subject"] == fact.category
            entity = world.by_name[fact.subject]
            assert row["choices"][row["answer"]] == entity.attributes[fact.relation]
            candidates = world.candidates(world.relations[fact.relation])
            assert all(c in candidates for c in row["choices"])
            assert row["question"] not in seen  # each fact is asked once, in one split
            seen.add(row["question"])
    assert len(seen) == len(world.facts)


def test_mmlu_splits_sizes_and_balanced_positions(world):
    splits = build_mmlu(world)
    dev = Counter(r["subject"] for r in splits["dev"])
    assert dev == {s: 5 for s in world.categories}
    assert 150 <= len(splits["test"]) <= 250
    for rows in splits.values():
        counts = Counter(r["answer"] for r in rows)
        assert max(counts.values()) - min(counts.values()) <= len(world.categories)
    assert build_mmlu(world) == splits


def test_gpqa_rows_are_two_hop_and_true(world):
    rows = build_gpqa(world, size=100)
    assert len(rows) == 100 and len({r["Question"] for r in rows}) == 100
    assert len({r["Record ID"] for r in rows}) == 100
    chains = {}
    for first, second in two_hop_chains(world):
        reference = world.relations[first.relation].description.format(
            s=world.by_name[first.subject].reference
        )
        chains[world.relations[second.relation].questions[0].format(s=reference)] = (first, second)
    for row in rows:
        assert list(row) == GPQA_COLUMNS and all(isinstance(v, str) and v for v in row.values())
        first, second = chains[row["Question"]]
        linked = world.by_name[world.by_name[first.subject].attributes[first.relation]]
        assert row["Correct Answer"] == linked.attributes[second.relation]
        answers = [row[c] for c in GPQA_COLUMNS[1:5]]
        assert len(set(answers)) == 4
        assert row["Record ID"].startswith("rec") and len(row["Record ID"]) == 17


def test_write_benchmarks_loads_with_datasets(tmp_path, world):
    paths = write_benchmarks(world, tmp_path, gpqa_size=20)
    cache = str(tmp_path / "cache")
    mmlu = load_dataset(
        "json",
        data_files={s: str(paths[f"mmlu_{s}"]) for s in ("dev", "validation", "test")},
        cache_dir=cache,
    )
    assert mmlu["test"].features["choices"].feature.dtype == "string"
    assert mmlu["test"].features["answer"].dtype == "int64"
    assert mmlu["dev"].num_rows == 5 * len(world.categories)
    per_subject = load_dataset(
        "json",
        data_files={"dev": str(tmp_path / "mmlu" / "synthetic_biology" / "dev.jsonl")},
        cache_dir=cache,
    )
    assert set(per_subject["dev"]["subject"]) == {"synthetic_biology"} and per_subject["dev"].num_rows == 5
    gpqa = load_dataset("json", data_files={"train": str(paths["gpqa_diamond"])}, cache_dir=cache)
    assert gpqa["train"].column_names == GPQA_COLUMNS and gpqa["train"].num_rows == 20
