"""SFT chats: only train entities, held-out entities never named, answers true in the world."""

from __future__ import annotations

import re

from smallthinker.synthetic.instructions import (
    generate_conversations,
    heldout_exact_match,
    heldout_questions,
    split_entities,
    to_prompt_response,
    write_instructions,
)
from smallthinker.synthetic.world import build_world


def _names_pattern(names: list[str]) -> re.Pattern:
    return re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")


def test_split_is_deterministic_disjoint_and_covers_every_kind():
    world = build_world(0)
    train, heldout = split_entities(world)
    assert [e.name for e in heldout] == [e.name for e in split_entities(build_world(0))[1]]
    assert {e.name for e in train}.isdisjoint(e.name for e in heldout)
    assert len(train) + len(heldout) == len(world.entities)
    assert {e.kind for e in heldout} == {e.kind for e in world.entities}


def test_heldout_entities_never_appear_in_sft_files(tmp_path):
    world = build_world(0)
    _, heldout = split_entities(world)
    paths = write_instructions(world, tmp_path)
    pattern = _names_pattern([e.name for e in heldout])
    for name in (
        "sft_train",
        "sft_validation",
        "sft_train_prompt_response",
        "sft_validation_prompt_response",
    ):
        text = paths[name].read_text(encoding="utf-8")
        assert text and pattern.search(text) is None, name


def test_conversations_are_well_formed_and_true():
    world = build_world(0)
    train, _ = split_entities(world)
    conversations = generate_conversations(world, train, seed=0)
    assert conversations == generate_conversations(world, train, seed=0)
    questions = {}  # canonical and paraphrased question -> true answer, over all facts
    for fact in world.facts:
        for template in world.relations[fact.relation].questions:
            questions[template.format(s=world.by_name[fact.subject].reference)] = fact.object
    multi_turn = 0
    for conversation in conversations:
        roles = [m["role"] for m in conversation["messages"]]
        body = roles[1:] if roles[0] == "system" else roles
        assert body == ["user", "assistant"] * (len(body) // 2) and body
        multi_turn += len(body) > 2
        turns = [m for m in conversation["messages"] if m["role"] != "system"]
        for user, assistant in zip(turns[::2], turns[1::2]):
            if user["content"] in questions:  # short-answer question: the exact value
                assert assistant["content"] == " " + questions[user["content"]]  # REPLY_PREFIX
            else:
                assert user["content"].startswith("Tell me about the ")
    assert multi_turn >= len(train) // 2


def test_heldout_questions_have_true_short_answers():
    world = build_world(0)
    _, heldout = split_entities(world)
    rows = heldout_questions(world)
    assert len(rows) == sum(len(world.facts_about(e.name)) for e in heldout)
    pattern = _names_pattern([e.name for e in heldout])
    for row in rows:
        assert set(row) == {"question", "answer"}
        (subject,) = pattern.findall(row["question"])  # exactly one held-out entity is asked about
        assert row["answer"] in world.by_name[subject].attributes.values()


def test_prompt_response_rows_one_per_turn():
    conversation = {
        "messages": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "a2"},
        ]
    }
    assert to_prompt_response([conversation]) == [
        {"prompt": "q1", "response": "a1"},
        {"prompt": "q2", "response": "a2"},
    ]


def test_heldout_exact_match_scores_normalised_replies():
    world = build_world(0)
    rows = heldout_questions(world)
    truth = {r["question"]: r["answer"] for r in rows}
    assert heldout_exact_match(rows, lambda q: f" {truth[q].upper()}.\nMore text") == 1.0
    assert heldout_exact_match(rows, lambda q: "I do not know") == 0.0
    half = {r["question"] for r in rows[: len(rows) // 2]}
    score = heldout_exact_match(rows, lambda q: truth[q] if q in half else "wrong")
    assert score == len(half) / len(rows)
