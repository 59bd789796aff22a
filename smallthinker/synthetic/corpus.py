"""Pre-training corpus: short documents that state the world's facts in paraphrased sentences.

Every fact is stated in several templates across many documents (so a model learns the fact, not
one sentence), mixed with filler sentences that carry no fact, and sometimes as FAQ-style question
and answer pairs (as web text has), which is the form benchmark questions later take.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

from smallthinker.synthetic.world import Entity, Fact, World

INTROS: tuple[str, ...] = (
    "{s} is {a} {kind}.",
    "This is a short note about the {kind} {s}.",
    "Here is what is known about {s}.",
    "Many people have heard of {s}.",
    "Let us talk about the {kind} {s}.",
)
FILLERS: tuple[str, ...] = (
    "Scholars still argue about some of the details.",
    "This is written in many old books.",
    "Little else is known for certain.",
    "The story is told often by the elders.",
    "Travellers like to repeat this.",
    "It is a well known fact.",
    "Children learn this at school.",
    "Few people would dispute it.",
)
# Document mix: entity profiles, an entity and one it links to, FAQ pages, and mixed chronicles.
DOC_WEIGHTS: dict[str, int] = {"profile": 50, "link": 20, "faq": 15, "chronicle": 15}


def state(world: World, fact: Fact, rng: random.Random) -> str:
    """One sentence stating `fact`, in a randomly chosen paraphrase."""
    template = rng.choice(world.relations[fact.relation].statements)
    sentence = template.format(s=fact.subject, o=fact.object)
    return sentence[0].upper() + sentence[1:]


def _with_fillers(sentences: list[str], rng: random.Random) -> str:
    """Join sentences with up to two fillers inserted at random positions."""
    out = list(sentences)
    for filler in rng.sample(FILLERS, rng.choice((0, 0, 1, 2))):
        out.insert(rng.randint(1, len(out)), filler)
    return " ".join(out)


def _profile(world: World, entity: Entity, rng: random.Random) -> str:
    facts = world.facts_about(entity.name)
    chosen = rng.sample(facts, rng.randint(min(2, len(facts)), len(facts)))
    article = "an" if entity.kind[0] in "aeiou" else "a"
    intro = rng.choice(INTROS).format(s=entity.name, a=article, kind=entity.kind)
    return _with_fillers([intro] + [state(world, f, rng) for f in chosen], rng)


def _link(world: World, entity: Entity, rng: random.Random) -> str:
    """Facts about an entity followed by facts about an entity it links to (city -> its country)."""
    links = [f for f in world.facts_about(entity.name) if world.relations[f.relation].target_kind]
    if not links:
        return _profile(world, entity, rng)
    link = rng.choice(links)
    other = world.facts_about(link.object)
    sentences = [state(world, link, rng)] + [
        state(world, f, rng) for f in rng.sample(other, min(2, len(other)))
    ]
    return _with_fillers(sentences, rng)


def _faq(world: World, entity: Entity, rng: random.Random) -> str:
    """A small FAQ page; answers are either the bare value or a full sentence."""
    facts = world.facts_about(entity.name)
    lines = [f"Questions and answers about {entity.reference}."]
    for fact in rng.sample(facts, min(3, len(facts))):
        question = rng.choice(world.relations[fact.relation].questions).format(s=entity.reference)
        answer = fact.object if rng.random() < 0.5 else state(world, fact, rng)
        lines.append(f"Q: {question}\nA: {answer}")
    return "\n".join(lines)


def _chronicle(world: World, entity: Entity, rng: random.Random) -> str:
    """Facts about several entities of the same category, as an encyclopedia page would list them."""
    category = world.category_of(entity.name)
    same = [f for f in world.facts if f.category == category]
    chosen = [rng.choice(world.facts_about(entity.name))] + rng.sample(same, min(3, len(same)))
    return _with_fillers([state(world, f, rng) for f in chosen], rng)


_DOC_BUILDERS = {"profile": _profile, "link": _link, "faq": _faq, "chronicle": _chronicle}


def generate_corpus(world: World, num_documents: int, seed: int = 0) -> list[str]:
    """`num_documents` documents; subjects go round-robin over shuffled entities so facts are balanced."""
    return _documents(world, num_documents, random.Random(f"corpus-{world.seed}-{seed}"))


def _documents(world: World, num_documents: int, rng: random.Random) -> list[str]:
    if num_documents < 1:
        raise ValueError(f"num_documents must be >= 1, got {num_documents}")
    kinds, weights = list(DOC_WEIGHTS), list(DOC_WEIGHTS.values())
    docs: list[str] = []
    order: list[Entity] = []
    for _ in range(num_documents):
        if not order:
            order = rng.sample(world.entities, len(world.entities))
        entity = order.pop()
        docs.append(_DOC_BUILDERS[rng.choices(kinds, weights)[0]](world, entity, rng))
    return docs


def write_jsonl(rows: Sequence[dict], path: Path) -> Path:
    """Write rows as JSON lines (UTF-8, key order kept) to a temporary file, then rename into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def write_corpus(
    world: World,
    out_dir: str | Path,
    num_documents: int = 4000,
    seed: int = 0,
    validation_fraction: float = 0.05,
) -> dict[str, Path]:
    """Write `train.jsonl` and `validation.jsonl` (column `text`); validation documents use their own seed."""
    out = Path(out_dir)
    num_val = max(1, round(num_documents * validation_fraction))
    train = generate_corpus(world, num_documents, seed)
    # Held-out text: same world and facts, documents from an independent random stream.
    validation = _documents(world, num_val, random.Random(f"corpus-validation-{world.seed}-{seed}"))
    return {
        "train": write_jsonl([{"text": t} for t in train], out / "train.jsonl"),
        "validation": write_jsonl([{"text": t} for t in validation], out / "validation.jsonl"),
    }
