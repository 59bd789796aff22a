"""Multiple-choice questions about the world, in the exact schemas of MMLU and GPQA.

The files load with `datasets.load_dataset("json", data_files=...)` and have the columns the
lm-eval tasks read, so `mmlu_*` / `gpqa_diamond_*` task code runs unchanged with only
`dataset_path` / `dataset_kwargs` pointed at them:

- MMLU (`cais/mmlu`): `question`, `subject`, `choices` (4 str), `answer` (int 0-3); splits `dev`
  (exactly 5 per subject, for 5-shot), `validation`, `test`. One question per fact, distractors
  drawn from the same value set, answer positions balanced within every split and subject.
- GPQA (`Idavidrein/gpqa`, `gpqa_diamond`, split `train`): two-hop questions ("Which river flows
  through the city where the person X was born?"): the answer is not stated in any one sentence
  of the corpus, it needs two facts chained.
"""

from __future__ import annotations

import random
from pathlib import Path

from smallthinker.synthetic.corpus import state, write_jsonl
from smallthinker.synthetic.instructions import ask
from smallthinker.synthetic.world import Fact, World

MMLU_DEV_PER_SUBJECT = 5  # the 5 few-shot examples lm-eval takes with `sampler: first_n`
MMLU_VALIDATION_FRACTION = 0.2  # of each subject's questions left after dev; the rest is test
GPQA_SIZE = 100
LETTERS = "ABCD"


def _choices(world: World, fact: Fact, position: int, rng: random.Random) -> list[str]:
    """Four distinct choices, the true object at `position`, three false ones from the same value set."""
    wrong = [c for c in world.candidates(world.relations[fact.relation]) if c != fact.object]
    choices = rng.sample(wrong, 3)
    choices.insert(position, fact.object)
    return choices


def _balanced_positions(n: int, rng: random.Random) -> list[int]:
    """`n` answer positions, each of 0-3 used n/4 times (+-1), in random order."""
    offset = rng.randrange(4)  # so the +1 remainders of many small groups do not all land on A
    positions = [(i + offset) % 4 for i in range(n)]
    rng.shuffle(positions)
    return positions


def _mmlu_rows(world: World, facts: list[Fact], rng: random.Random) -> list[dict]:
    positions = _balanced_positions(len(facts), rng)
    return [
        {"question": ask(world, f), "subject": f.category, "choices": _choices(world, f, p, rng), "answer": p}
        for f, p in zip(facts, positions)
    ]


def build_mmlu(world: World, seed: int = 0) -> dict[str, list[dict]]:
    """{"dev", "validation", "test"} -> rows; each fact is asked once, in exactly one split."""
    rng = random.Random(f"mmlu-{world.seed}-{seed}")
    splits: dict[str, list[dict]] = {"dev": [], "validation": [], "test": []}
    for subject in world.categories:
        facts = [f for f in world.facts if f.category == subject]
        rng.shuffle(facts)
        rest = facts[MMLU_DEV_PER_SUBJECT:]
        num_val = round(len(rest) * MMLU_VALIDATION_FRACTION)
        splits["dev"] += _mmlu_rows(world, facts[:MMLU_DEV_PER_SUBJECT], rng)
        splits["validation"] += _mmlu_rows(world, rest[:num_val], rng)
        splits["test"] += _mmlu_rows(world, rest[num_val:], rng)
    return splits


def two_hop_chains(world: World) -> list[tuple[Fact, Fact]]:
    """All (link fact, fact about the linked entity) pairs whose answer is not the starting entity."""
    chains = []
    for first in world.facts:
        if world.relations[first.relation].target_kind is None:
            continue
        chains += [
            (first, second) for second in world.facts_about(first.object) if second.object != first.subject
        ]
    return chains


def _record_id(rng: random.Random) -> str:
    """An id shaped like GPQA's Airtable record ids ("rec" + 14 alphanumerics)."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    return "rec" + "".join(rng.choice(alphabet) for _ in range(14))


def _gpqa_row(world: World, first: Fact, second: Fact, rng: random.Random) -> dict[str, str]:
    link = world.relations[first.relation]
    reference = link.description.format(s=world.by_name[first.subject].reference)
    question = world.relations[second.relation].questions[0].format(s=reference)
    wrong = _choices(world, second, 0, rng)[1:]
    explanation = f"{state(world, first, rng)} {state(world, second, rng)} So the answer is {second.object}."
    return {
        "Question": question,
        "Correct Answer": second.object,
        "Incorrect Answer 1": wrong[0],
        "Incorrect Answer 2": wrong[1],
        "Incorrect Answer 3": wrong[2],
        "Record ID": _record_id(rng),
        "Subdomain": f"{first.relation} then {second.relation}",
        "High-level domain": first.category,
        "Explanation": explanation,
    }


def build_gpqa(world: World, size: int = GPQA_SIZE, seed: int = 0) -> list[dict[str, str]]:
    """`size` two-hop questions (fewer if the world has fewer chains), in world order."""
    rng = random.Random(f"gpqa-{world.seed}-{seed}")
    chains = two_hop_chains(world)
    picked = sorted(rng.sample(range(len(chains)), min(size, len(chains))))
    return [_gpqa_row(world, *chains[i], rng) for i in picked]


def write_benchmarks(
    world: World, out_dir: str | Path, seed: int = 0, gpqa_size: int = GPQA_SIZE
) -> dict[str, Path]:
    """Write `mmlu/{split}.jsonl` (all subjects), `mmlu/{subject}/{split}.jsonl` and `gpqa/gpqa_diamond.jsonl`."""
    out = Path(out_dir)
    paths: dict[str, Path] = {}
    for split, rows in build_mmlu(world, seed).items():
        paths[f"mmlu_{split}"] = write_jsonl(rows, out / "mmlu" / f"{split}.jsonl")
        for subject in world.categories:
            subject_rows = [r for r in rows if r["subject"] == subject]
            write_jsonl(subject_rows, out / "mmlu" / subject / f"{split}.jsonl")
    paths["gpqa_diamond"] = write_jsonl(
        build_gpqa(world, gpqa_size, seed), out / "gpqa" / "gpqa_diamond.jsonl"
    )
    return paths
