"""Full lm-eval runs (`lm_eval.simple_evaluate`) of the suites on MMLU/GPQA-format data with a tiny model."""

from __future__ import annotations

import json

import pytest
from transformers import PreTrainedTokenizerFast

from smallthinker.eval import EvalError, SmallThinkerLM, evaluate_suite


@pytest.fixture(scope="module")
def lm(tiny_model, tokenizer) -> SmallThinkerLM:
    return SmallThinkerLM(pretrained=tiny_model, tokenizer=tokenizer, batch_size=8)


def read_samples(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_loglikelihood_samples(samples: list[dict], value: float) -> None:
    """Every sample's acc is whether the gold choice has the highest log-likelihood; the mean is the headline."""
    for s in samples:
        loglikelihoods = [resp[0][0] for resp in s["resps"]]
        best = max(range(len(loglikelihoods)), key=loglikelihoods.__getitem__)
        # MMLU targets are indices; GPQA targets are the labels "(A)".."(D)".
        gold = s["target"] if isinstance(s["target"], int) else "ABCD".index(s["target"][1])
        assert s["acc"] == float(best == gold)
    assert value == pytest.approx(sum(s["acc"] for s in samples) / len(samples))


def test_mmlu_5shot(lm, benchmark_dir, tmp_path):
    record = evaluate_suite(lm, "mmlu", tmp_path, data_dir=benchmark_dir, limit=2)
    head = record["headline"]
    assert head["task"] == "smallthinker_mmlu" and head["metric"] == "acc,none"
    assert head["n_samples"] == 4  # limit 2 per subject, 2 subjects
    assert 0.0 <= head["value"] <= 1.0
    assert record["n_shot"] == {
        "smallthinker_mmlu": 5,
        "smallthinker_mmlu_anatomy": 5,
        "smallthinker_mmlu_world_history": 5,
    }
    assert record["task_versions"]["smallthinker_mmlu_anatomy"] == 1.0
    assert record["lm_eval_version"] == "0.4.13" and record["chat_template"] is False

    samples = read_samples(tmp_path / "samples.jsonl")
    assert len(samples) == 4
    check_loglikelihood_samples(samples, head["value"])
    # The 5 examples are the first dev rows of the question's own subject, as in lm-eval's mmlu.
    prompt = samples[0]["arguments"][0][0]
    assert prompt.startswith("The following are multiple choice questions (with answers) about anatomy.\n\n")
    assert prompt.count("Answer:") == 6 and "(dev 4)" in prompt and "(dev 5)" not in prompt
    assert "world history" not in prompt

    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["headline"] == head
    assert saved["lm_eval_results"]["groups"]["smallthinker_mmlu"]["acc,none"] == pytest.approx(head["value"])
    markdown = (tmp_path / "results.md").read_text()
    assert "5-shot log-likelihood" in markdown and "not directly comparable" in markdown
    assert "| 66.11 | 84.43 |" in markdown and f"{100 * head['value']:.2f}" in markdown


def test_gpqa_diamond_zeroshot_from_a_checkpoint_path(checkpoint, benchmark_dir, tmp_path):
    record = evaluate_suite(str(checkpoint), "gpqa_diamond", tmp_path, data_dir=benchmark_dir, limit=4)
    head = record["headline"]
    assert head["n_samples"] == 4 and 0.0 <= head["value"] <= 1.0
    assert record["n_shot"] == {"smallthinker_gpqa_diamond": 0}
    assert record["model"]["model_class"] == "SmallThinkerForCausalLM"
    samples = read_samples(tmp_path / "samples.jsonl")
    check_loglikelihood_samples(samples, head["value"])
    assert samples[0]["arguments"][0][0].startswith(
        "What is the correct answer to this question:Which animal"
    )
    assert [a[1] for a in samples[0]["arguments"]] == [" (A)", " (B)", " (C)", " (D)"]
    markdown = (tmp_path / "results.md").read_text()
    assert "GPQA-Diamond" in markdown and "| 31.31 | 55.05 |" in markdown


def test_bad_requests_are_refused_before_any_work(lm, benchmark_dir, tmp_path):
    with pytest.raises(EvalError, match="unknown suite 'mmlu_5shot'"):
        evaluate_suite(lm, "mmlu_5shot", tmp_path, data_dir=benchmark_dir)
    with pytest.raises(EvalError, match="exactly one data source"):
        evaluate_suite(lm, "mmlu", tmp_path, data_dir=benchmark_dir, hub=True)
    with pytest.raises(EvalError, match="exactly one data source"):
        evaluate_suite(lm, "mmlu", tmp_path)
    with pytest.raises(EvalError, match="scores log-likelihoods; max_gen_toks does not apply"):
        evaluate_suite(lm, "gpqa_diamond", tmp_path, data_dir=benchmark_dir, max_gen_toks=8)
    with pytest.raises(
        EvalError, match="max_gen_toks 4096 leaves no room for the prompt in the model's 2048-token"
    ):
        evaluate_suite(
            lm, "gpqa_diamond_cot", tmp_path, data_dir=benchmark_dir
        )  # default budget, tiny context
    assert not (tmp_path / "results.json").exists()


def test_chat_suite_needs_a_chat_template(tiny_model, tokenizer, benchmark_dir, tmp_path):
    base_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    lm = SmallThinkerLM(pretrained=tiny_model, tokenizer=base_tokenizer)
    with pytest.raises(EvalError, match="renders prompts with the chat template, but the tokenizer has none"):
        evaluate_suite(lm, "mmlu_cot", tmp_path, data_dir=benchmark_dir, max_gen_toks=4)


@pytest.mark.parametrize(
    ("suite", "n"),
    [("mmlu_continuation", 4), ("gpqa_diamond_continuation", 4)],
)
def test_continuation_suites_score_the_answer_texts(lm, benchmark_dir, tmp_path, suite, n):
    record = evaluate_suite(
        lm, suite, tmp_path, data_dir=benchmark_dir, limit=2 if suite.startswith("mmlu") else 4
    )
    head = record["headline"]
    assert head["n_samples"] == n and 0.0 <= head["value"] <= 1.0
    samples = read_samples(tmp_path / "samples.jsonl")
    for s in samples:
        prompt, continuations = s["arguments"][0][0], [a[1] for a in s["arguments"]]
        assert prompt.rstrip().endswith("Answer:") and "Question: " in prompt and "(A)" not in prompt
        assert all(c.startswith(" the ") for c in continuations)  # the choice texts, not letters
        gold = continuations[s["target"]].strip()
        doc = s["doc"]
        assert gold == (
            doc["choices"][doc["answer"]]
            if "choices" in doc and "Correct Answer" not in doc
            else doc["Correct Answer"]
        )
        loglikelihoods = [resp[0][0] for resp in s["resps"]]
        assert s["acc"] == float(max(range(4), key=loglikelihoods.__getitem__) == s["target"])
