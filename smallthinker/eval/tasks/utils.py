"""Python pieces of the task YAMLs in this folder (referenced there as `!function smallthinker.eval.tasks.utils.X`)."""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from lm_eval.api.filter import Filter

if TYPE_CHECKING:
    import datasets

LETTERS = "ABCD"
# "The answer is (B)", "the final answer is: C", "The correct answer is **(D)**"; the letter must stand
# alone so that "The answer is Because ..." does not read as B.
_STATED_ANSWER = re.compile(r"[Tt]he (?:final |correct )?answer is:?\s*\**\s*\(?([A-D])\b")
_STANDALONE_LETTER = re.compile(r"\b([A-D])\b")


def extract_answer_letter(text: str, fallback_to_last_letter: bool) -> str | None:
    """The letter of the last "The answer is (X)" in `text`; else, if allowed, its last standalone A-D."""
    stated = _STATED_ANSWER.findall(text)
    if stated:
        return stated[-1]
    if fallback_to_last_letter:
        letters = _STANDALONE_LETTER.findall(text)
        if letters:
            return letters[-1]
    return None


class AnswerLetterFilter(Filter):
    """lm-eval filter: each generated text -> its answer letter (or `fallback` when none is found)."""

    def __init__(self, fallback_to_last_letter: bool = True, fallback: str = "[invalid]") -> None:
        self.fallback_to_last_letter = fallback_to_last_letter
        self.fallback = fallback

    def apply(self, resps: Iterable[Sequence[str]], docs: Sequence[dict[str, Any]]) -> list[list[str]]:
        def letters(texts: Sequence[str]) -> list[str]:
            found = (extract_answer_letter(t or "", self.fallback_to_last_letter) for t in texts)
            return [letter or self.fallback for letter in found]

        return [letters(texts) for texts in resps]


def clean_gpqa_text(text: str | None) -> str:
    # Same normalisation as lm-eval's gpqa utils.preprocess.
    if text is None:
        return " "
    return text.strip().replace(" [title]", ". ").replace("  ", " ")


def shuffle_gpqa_choices(doc: dict[str, Any]) -> dict[str, Any]:
    """Four shuffled choices and the gold label "(A)".."(D)" for one GPQA row.

    lm-eval shuffles with the process-global `random` state, so a question's gold letter depends on
    which other tasks ran before it. Seeding from the question's own id (or text) gives every run,
    and both GPQA suites, the same order.
    """
    correct = clean_gpqa_text(doc["Correct Answer"])
    choices = [clean_gpqa_text(doc[f"Incorrect Answer {i}"]) for i in (1, 2, 3)] + [correct]
    random.Random(str(doc.get("Record ID") or doc["Question"])).shuffle(choices)
    gold = choices.index(correct)
    return {
        **{f"choice{i + 1}": c for i, c in enumerate(choices)},
        "choices": choices,
        "answer": f"({LETTERS[gold]})",
    }


def process_gpqa_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    return dataset.map(shuffle_gpqa_choices)
