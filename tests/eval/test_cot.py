"""Chain-of-thought suites: chat-template prompts, generation budget and answer extraction, with scripted
generations standing in for the model's text (the rest of the run is real lm-eval)."""

from __future__ import annotations

import json
import re

import pytest

from smallthinker.eval import SmallThinkerLM, evaluate_suite
from smallthinker.eval.tasks.utils import AnswerLetterFilter, extract_answer_letter

from .conftest import gpqa_rows


@pytest.mark.parametrize(
    ("text", "strict", "flexible"),
    [
        ("Otters swim. The answer is (C).", "C", "C"),
        ("First I thought the answer is (A), but no: the final answer is: B", "B", "B"),
        ("The correct answer is **(D)**", "D", "D"),
        ("A heron is a bird, so the best choice is B.", None, "B"),
        ("The answer is Because otters swim", None, None),
        ("no letter here", None, None),
    ],
)
def test_extract_answer_letter(text, strict, flexible):
    assert extract_answer_letter(text, fallback_to_last_letter=False) == strict
    assert extract_answer_letter(text, fallback_to_last_letter=True) == flexible


def test_filter_keeps_one_answer_per_response():
    out = AnswerLetterFilter(fallback_to_last_letter=True).apply(
        [["so D", "nothing"], ["The answer is (A)"]], [{}, {}]
    )
    assert out == [["D", "[invalid]"], ["A"]]


class ScriptedLM(SmallThinkerLM):
    """The tiny model with its generations replaced by a script keyed on the question in the prompt."""

    def __init__(self, script, **kwargs) -> None:
        super().__init__(**kwargs)
        self.script = script
        self.seen: list[tuple[str, dict]] = []

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        self.seen += [r.args for r in requests]
        return [self.script(context) for context, _ in (r.args for r in requests)]


def mmlu_script(context: str) -> str:
    """Test question i of each subject has answer i % 4; i=0 stated right, i=1 only a trailing letter, i=2 wrong."""
    i = int(re.search(r"\(test (\d+)\)", context).group(1))
    gold = "ABCD"[i % 4]
    return {
        0: f"Otters are number zero. The answer is ({gold}).",
        1: f"Counting the animals, it must be {gold}",
        2: "Herons fly. The answer is (D).",
    }[i]


def test_mmlu_cot_extracts_answers_from_chat_generations(tiny_model, tokenizer, benchmark_dir, tmp_path):
    lm = ScriptedLM(mmlu_script, pretrained=tiny_model, tokenizer=tokenizer)
    record = evaluate_suite(lm, "mmlu_cot", tmp_path, data_dir=benchmark_dir, max_gen_toks=64)
    groups = record["lm_eval_results"]["groups"]["smallthinker_mmlu_cot"]
    # 2 subjects x 3 questions: strict reads "The answer is" (i=0 right, i=2 wrong); flexible also i=1.
    assert groups["exact_match,strict-match"] == pytest.approx(2 / 6)
    assert groups["exact_match,flexible-extract"] == pytest.approx(4 / 6)
    assert record["headline"]["value"] == pytest.approx(4 / 6) and record["headline"]["n_samples"] == 6
    assert record["max_gen_toks"] == 64 and record["chat_template"] is True

    context, gen_kwargs = next(args for args in lm.seen if "In anatomy (test 0)" in args[0])
    assert context == (
        "<|im_start|>user\nThe following is a multiple choice question about anatomy. Think step by step, then "
        'finish your answer with "The answer is (X)" where X is the letter of the correct choice.\n\n'
        "In anatomy (test 0), which animal is number 0?\n(A) the otter\n(B) the heron\n(C) the lynx\n"
        "(D) the marten<|im_end|>\n<|im_start|>assistant\n"
    )
    assert gen_kwargs["max_gen_toks"] == 64 and gen_kwargs["do_sample"] is False
    assert "<|im_end|>" in gen_kwargs["until"]

    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    flexible = {
        (s["task"], s["doc_id"]): s["filtered_resps"][0] for s in samples if s["filter"] == "flexible-extract"
    }
    assert flexible[("smallthinker_mmlu_cot_anatomy", 1)] == "B"
    assert "report protocol" in (tmp_path / "results.md").read_text()


def test_gpqa_cot_uses_lm_evals_extraction(tiny_model, tokenizer, benchmark_dir, tmp_path):
    rows = {r["Question"]: r for r in gpqa_rows(6)}

    def script(context: str) -> str:
        question = re.search(r"question:(.*?)\nChoices", context).group(1)
        # Answer with the gold label for even days, the label of "Incorrect Answer 1" for odd days.
        text = rows[question][
            "Correct Answer"
            if int(re.search(r"day (\d+)", question).group(1)) % 2 == 0
            else "Incorrect Answer 1"
        ]
        label = re.search(r"\(([A-D])\) " + re.escape(text) + r"\n", context + "\n").group(1)
        return f"Let me recall the animals. The answer is ({label})."

    lm = ScriptedLM(script, pretrained=tiny_model, tokenizer=tokenizer)
    record = evaluate_suite(lm, "gpqa_diamond_cot", tmp_path, data_dir=benchmark_dir, max_gen_toks=32)
    results = record["lm_eval_results"]["results"]["smallthinker_gpqa_diamond_cot"]
    assert results["exact_match,strict-match"] == pytest.approx(0.5)
    assert results["exact_match,flexible-extract"] == pytest.approx(0.5)
    assert record["headline"]["n_samples"] == 6
    context = next(c for c, _ in lm.seen if "day 0?" in c)
    # rec0000's seeded shuffle puts the correct "the otter" third.
    assert context == (
        "<|im_start|>user\nWhat is the correct answer to this question:Which animal was seen on day 0?\nChoices:\n"
        "(A) the heron\n(B) the lynx\n(C) the otter\n(D) the marten\nLet's think step by step: <|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_chat_prompts_use_non_thinking_mode(tiny_model, tokenizer):
    """A template with a thinking switch (as Qwen3's) renders its non-thinking form; plain ChatML is unchanged."""
    switch = "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}"
    thinking = tokenizer.__class__(
        tokenizer_object=tokenizer.backend_tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=tokenizer.chat_template + switch,
    )
    messages = [{"role": "user", "content": "Which animal?"}]
    lm = SmallThinkerLM(pretrained=tiny_model, tokenizer=thinking)
    assert lm.apply_chat_template(messages).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    plain = SmallThinkerLM(pretrained=tiny_model, tokenizer=tokenizer)
    assert (
        plain.apply_chat_template(messages)
        == "<|im_start|>user\nWhich animal?<|im_end|>\n<|im_start|>assistant\n"
    )
