"""Entry points: `smallthinker evaluate`, and lm-eval finding `--model smallthinker` by name."""

from __future__ import annotations

import json

import lm_eval
from lm_eval.tasks import TaskManager
from transformers import LlamaConfig

from smallthinker.cli import main

from .conftest import mmlu_rows, write_benchmark_dir, write_jsonl


def test_evaluate_script_then_lm_eval_by_model_name(checkpoint, benchmark_dir, tmp_path, capsys):
    main(["evaluate", "--suite", "gpqa_diamond,mmlu", "--model", str(checkpoint), "--data", str(benchmark_dir),
          "--limit", "2", "--out", str(tmp_path), "--batch-size", "4"])  # fmt: skip
    printed = capsys.readouterr().out
    for suite, n in (("gpqa_diamond", 2), ("mmlu", 4)):
        record = json.loads((tmp_path / suite / "results.json").read_text())
        assert record["suite"] == suite and record["headline"]["n_samples"] == n
        assert f"suite `{suite}`" in printed
    # What lm-eval's command line (smallthinker.eval.cli) does after parsing: look the model class up by
    # name and build it from the model_args string, then run the task folder the script wrote.
    task_manager = TaskManager(include_path=str(tmp_path / "gpqa_diamond" / "tasks"), include_defaults=False)
    results = lm_eval.simple_evaluate(
        model="smallthinker",
        model_args=f"pretrained={checkpoint},dtype=float32",
        tasks=["smallthinker_gpqa_diamond"],
        task_manager=task_manager,
        limit=2,
        batch_size=2,
    )
    assert results["config"]["model"] == "smallthinker"
    ours = json.loads((tmp_path / "gpqa_diamond" / "results.json").read_text())["lm_eval_results"]["results"]
    assert (
        results["results"]["smallthinker_gpqa_diamond"]["acc,none"]
        == ours["smallthinker_gpqa_diamond"]["acc,none"]
    )


def test_script_errors_are_clear(checkpoint, benchmark_dir, tmp_path, capsys):
    def expect_exit(argv: list[str], message: str) -> None:
        assert main(["evaluate", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("smallthinker evaluate: error: ") and err.count("\n") == 1, err
        assert message in err

    common = ["--data", str(benchmark_dir), "--out", str(tmp_path / "out")]
    expect_exit(
        ["--suite", "mmlu_zeroshot", "--model", str(checkpoint), *common],
        "error: unknown suite 'mmlu_zeroshot'",
    )

    LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, vocab_size=32).save_pretrained(
        tmp_path / "llama"
    )
    expect_exit(
        ["--suite", "mmlu", "--model", str(tmp_path / "llama"), *common], "is not a SmallThinker checkpoint"
    )

    bad = write_benchmark_dir(tmp_path / "bad")
    rows = mmlu_rows("validation", "anatomy", 3)
    rows[1]["choices"] = "A or B"
    write_jsonl(bad / "mmlu" / "validation.jsonl", rows)
    bad_args = [
        "--suite",
        "mmlu",
        "--model",
        str(checkpoint),
        "--data",
        str(bad),
        "--out",
        str(tmp_path / "o"),
    ]
    expect_exit(bad_args, "[validation] row 1: 'choices' must be a list of 4 strings")
    expect_exit(["--suite", "gpqa_diamond", "--model", str(checkpoint), "--data", str(tmp_path / "nowhere")],
                "missing benchmark file")  # fmt: skip
