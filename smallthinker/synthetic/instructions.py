"""Instruction (SFT) data: chat conversations asking about the world's facts.

The entities are split once, deterministically, into SFT-train entities and held-out entities. SFT
conversations only ask about train entities and never mention a held-out one (not even as an
answer), while the pre-training corpus states the facts of all entities. Questions about the
held-out entities (`heldout_questions`) therefore measure what SFT teaches: answering questions in
the chat format about facts the model only read during pre-training.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable
from pathlib import Path

from smallthinker.synthetic.corpus import state, write_jsonl
from smallthinker.synthetic.world import Entity, Fact, World

HELDOUT_FRACTION = 0.2  # share of each kind's entities never asked about in SFT data
VALIDATION_FRACTION = 0.1  # share of SFT conversations kept for validation
SYSTEM_PROMPTS: tuple[str, ...] = (
    "You are a helpful assistant.",
    "You are a helpful assistant. Answer briefly.",
    "You know the history, geography and nature of the invented world. Answer the question.",
)
SYSTEM_PROMPT_RATE = 0.3  # share of conversations that start with a system message
# Replies start with a space, so a reply's first word is the same token as that word inside a sentence of the
# corpus: byte-level BPE turns "humid" at a line start into another token than " humid" after a word. Without
# it a tiny model cannot answer about an entity with what it read about it: replies to held-out questions whose
# tokens are the same either way (years, spelled digit by digit) were all right, those naming an entity 1 in 32.
REPLY_PREFIX = " "


def split_entities(
    world: World, heldout_fraction: float = HELDOUT_FRACTION
) -> tuple[list[Entity], list[Entity]]:
    """(SFT-train entities, held-out entities): `heldout_fraction` of every kind, at least one, seeded."""
    rng = random.Random(f"split-{world.seed}")
    kinds = list(dict.fromkeys(e.kind for e in world.entities))
    heldout: set[str] = set()
    for kind in kinds:
        names = [e.name for e in world.of_kind(kind)]
        heldout.update(rng.sample(names, max(1, math.ceil(len(names) * heldout_fraction))))
    train = [e for e in world.entities if e.name not in heldout]
    return train, [e for e in world.entities if e.name in heldout]


def ask(world: World, fact: Fact, rng: random.Random | None = None) -> str:
    """A question about `fact`: the canonical phrasing, or a random paraphrase when `rng` is given."""
    questions = world.relations[fact.relation].questions
    template = rng.choice(questions) if rng is not None else questions[0]
    return template.format(s=world.by_name[fact.subject].reference)


def _chat(rng: random.Random, turns: list[tuple[str, str]]) -> dict:
    messages = []
    if rng.random() < SYSTEM_PROMPT_RATE:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    for question, answer in turns:
        messages += [
            {"role": "user", "content": question},
            {"role": "assistant", "content": REPLY_PREFIX + answer},
        ]
    return {"messages": messages}


def _askable(world: World, entity: Entity, allowed: set[str]) -> list[Fact]:
    """Facts about `entity` whose answer names no entity outside `allowed`."""
    return [f for f in world.facts_about(entity.name) if f.object not in world.by_name or f.object in allowed]


def generate_conversations(world: World, entities: list[Entity], seed: int = 0) -> list[dict]:
    """Chat conversations about `entities` only; no other entity is ever named.

    Per entity: every fact asked in each paraphrase with a short answer (the exact value), one
    multi-turn conversation of 2-3 such questions, and one "tell me about" request answered in
    full sentences. Returned in a seeded shuffled order.
    """
    rng = random.Random(f"sft-{world.seed}-{seed}")
    allowed = {e.name for e in entities}
    conversations = []
    for entity in entities:
        facts = _askable(world, entity, allowed)
        for fact in facts:
            for template in world.relations[fact.relation].questions:
                conversations.append(_chat(rng, [(template.format(s=entity.reference), fact.object)]))
        turns = rng.sample(facts, min(len(facts), rng.choice((2, 3))))
        conversations.append(_chat(rng, [(ask(world, f, rng), f.object) for f in turns]))
        description = " ".join(state(world, f, rng) for f in facts)
        conversations.append(_chat(rng, [(f"Tell me about {entity.reference}.", description)]))
    rng.shuffle(conversations)
    return conversations


def heldout_questions(world: World) -> list[dict[str, str]]:
    """Short exact-match questions about the held-out entities (canonical phrasing, one per fact)."""
    _, heldout = split_entities(world)
    return [
        {"question": ask(world, f), "answer": f.object} for e in heldout for f in world.facts_about(e.name)
    ]


def normalize_answer(text: str) -> str:
    """Lower case, first line only, outer punctuation and spaces stripped: "Forest.\n..." -> "forest"."""
    first_line = text.strip().split("\n", 1)[0]
    return re.sub(r"\s+", " ", first_line).strip(" .,;:!?\"'").lower()


def heldout_exact_match(rows: list[dict[str, str]], answer: Callable[[str], str]) -> float:
    """Share of `rows` ({"question", "answer"}) where `answer(question)` matches after normalisation.

    `answer` is any question -> reply function (e.g. chat-template generation with a model), so
    this stays independent of the model code.
    """
    if not rows:
        raise ValueError("no held-out questions to score")
    hits = sum(normalize_answer(answer(r["question"])) == normalize_answer(r["answer"]) for r in rows)
    return hits / len(rows)


def to_prompt_response(conversations: list[dict]) -> list[dict[str, str]]:
    """The prompt/response column variant: one row per (user, assistant) turn pair.

    Multi-turn questions always name their entity, so each turn stands on its own.
    """
    rows = []
    for conversation in conversations:
        messages = [m for m in conversation["messages"] if m["role"] != "system"]
        for user, assistant in zip(messages[::2], messages[1::2]):
            rows.append({"prompt": user["content"], "response": assistant["content"]})
    return rows


def write_instructions(world: World, out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write SFT conversations (messages and prompt/response variants) and the held-out questions."""
    out = Path(out_dir)
    train_entities, _ = split_entities(world)
    conversations = generate_conversations(world, train_entities, seed)
    num_val = max(1, round(len(conversations) * VALIDATION_FRACTION))
    train, validation = conversations[num_val:], conversations[:num_val]
    return {
        "sft_train": write_jsonl(train, out / "sft_train.jsonl"),
        "sft_validation": write_jsonl(validation, out / "sft_validation.jsonl"),
        "sft_train_prompt_response": write_jsonl(
            to_prompt_response(train), out / "sft_train_prompt_response.jsonl"
        ),
        "sft_validation_prompt_response": write_jsonl(
            to_prompt_response(validation), out / "sft_validation_prompt_response.jsonl"
        ),
        "heldout_qa": write_jsonl(heldout_questions(world), out / "heldout_qa.jsonl"),
    }
