"""Benchmark data: validation names the bad row, the prepared layout, missing data explains what to do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from smallthinker.eval.data import (
    EvalDataError,
    check_fewshot_pool,
    prepare_gpqa,
    prepare_mmlu,
    subject_key,
)
from smallthinker.eval.tasks.utils import shuffle_gpqa_choices

from .conftest import SUBJECTS, gpqa_rows, mmlu_rows, write_benchmark_dir, write_jsonl


def test_mmlu_is_split_per_subject(benchmark_dir, tmp_path):
    data = prepare_mmlu(benchmark_dir, tmp_path)
    assert data.subjects == {s: 3 for s in SUBJECTS}
    assert data.num_rows == {"dev": 10, "validation": 4, "test": 6}
    assert set(data.sha256) == {
        str(benchmark_dir / "mmlu" / f"{s}.jsonl") for s in ("dev", "validation", "test")
    }
    rows = [
        json.loads(line) for line in (tmp_path / "mmlu" / "anatomy" / "test.jsonl").read_text().splitlines()
    ]
    assert rows == mmlu_rows("test", "anatomy", 3)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"answer": 4}, r"test\] row 2: 'answer' must be an integer index 0-3"),
        ({"answer": True}, r"row 2: 'answer' must be an integer"),
        ({"choices": ["a", "b", "c"]}, r"row 2: 'choices' must be a list of 4 strings"),
        ({"question": "  "}, r"row 2: 'question' must be a non-empty string"),
        ({"subject": None}, r"row 2: 'subject' must be a non-empty string"),
        ({"subject": "?!"}, r"row 2: subject '\?!' has no letters or digits"),
    ],
)
def test_malformed_mmlu_row_is_named(tmp_path, change, message):
    root = write_benchmark_dir(tmp_path / "src")
    rows = mmlu_rows("test", "anatomy", 4)
    rows[2] = {**rows[2], **change}
    write_jsonl(root / "mmlu" / "test.jsonl", rows)
    with pytest.raises(EvalDataError, match=message):
        prepare_mmlu(root, tmp_path / "out")


def test_missing_column_and_bad_json_are_named(tmp_path):
    root = write_benchmark_dir(tmp_path / "src")
    rows = mmlu_rows("dev", "anatomy", 2)
    del rows[1]["answer"]
    write_jsonl(root / "mmlu" / "dev.jsonl", rows)
    with pytest.raises(EvalDataError, match=r"\[dev\] row 1: missing column\(s\) \['answer'\]"):
        prepare_mmlu(root, tmp_path / "out")
    (root / "mmlu" / "dev.jsonl").write_text('{"question": "q"}\n{not json\n')
    with pytest.raises(EvalDataError, match=r"dev.jsonl: line 2 is not valid JSON"):
        prepare_mmlu(root, tmp_path / "out")


def test_missing_file_says_how_to_get_the_data(tmp_path):
    with pytest.raises(
        EvalDataError, match=r"missing benchmark file .*gpqa_diamond.jsonl(.|\n)*--hub(.|\n)*HF_TOKEN"
    ):
        prepare_gpqa(tmp_path, tmp_path / "out")


def test_gpqa_duplicate_answers_are_refused(tmp_path):
    rows = gpqa_rows(3)
    rows[1]["Incorrect Answer 2"] = " " + rows[1]["Correct Answer"]
    write_jsonl(tmp_path / "gpqa" / "gpqa_diamond.jsonl", rows)
    with pytest.raises(EvalDataError, match=r"gpqa_diamond.jsonl row 1: the four answers are not distinct"):
        prepare_gpqa(tmp_path, tmp_path / "out")


def test_fewshot_pool_must_hold_five_dev_rows(tmp_path):
    data = prepare_mmlu(write_benchmark_dir(tmp_path / "src", n_dev=3), tmp_path / "out")
    with pytest.raises(EvalDataError, match="subject 'anatomy' has 3 dev rows, 5-shot needs 5"):
        check_fewshot_pool(data, 5)


def test_subject_key():
    assert subject_key(" High School Biology ") == "high_school_biology"
    assert subject_key("abstract_algebra") == "abstract_algebra"


def test_gpqa_shuffle_is_seeded_by_the_question_and_keeps_the_gold_answer():
    row = gpqa_rows(1)[0]
    first, again = shuffle_gpqa_choices(row), shuffle_gpqa_choices(dict(row))
    assert first == again
    assert sorted(first["choices"]) == sorted(row[k] for k in row if "Answer" in k)
    gold = "ABCD".index(first["answer"][1])
    assert first["choices"][gold] == row["Correct Answer"]
    # Over many questions the gold answer lands on every letter.
    letters = {shuffle_gpqa_choices(r)["answer"] for r in gpqa_rows(40)}
    assert letters == {"(A)", "(B)", "(C)", "(D)"}


def test_hub_unreachable_offline_gives_instructions(tmp_path):
    """A real subprocess with an empty HF cache and offline mode: no data anywhere."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    code = (
        "from pathlib import Path\n"
        "from smallthinker.eval.data import EvalDataError, prepare_gpqa\n"
        "try:\n"
        f"    prepare_gpqa(None, Path({str(tmp_path / 'out')!r}))\n"
        "except EvalDataError as err:\n"
        "    print(err)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "could not load Idavidrein/gpqa (gpqa_diamond)" in out.stdout
    assert "HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set" in out.stdout
    assert "DIR/gpqa/gpqa_diamond.jsonl" in out.stdout
    assert not Path(tmp_path / "out" / "gpqa").exists()


def test_hub_rows_take_the_same_path_as_local_files(benchmark_dir, tmp_path, monkeypatch):
    """What `datasets.load_dataset` returns for cais/mmlu "all" and Idavidrein/gpqa is laid out like local files."""
    import datasets

    hub = {
        ("cais/mmlu", "all"): datasets.DatasetDict(
            {
                s: datasets.Dataset.from_list([r for x in SUBJECTS for r in mmlu_rows(s, x, 5)])
                for s in ("dev", "validation", "test")
            }
        ),
        ("Idavidrein/gpqa", "gpqa_diamond"): datasets.DatasetDict(
            {"train": datasets.Dataset.from_list(gpqa_rows(6))}
        ),
    }
    monkeypatch.setattr(datasets, "load_dataset", lambda repo, name: hub[(repo, name)])
    data = prepare_mmlu(None, tmp_path / "hub")
    assert data.source == "hub:cais/mmlu" and data.subjects == {s: 5 for s in SUBJECTS}
    gpqa = prepare_gpqa(None, tmp_path / "hub")
    assert gpqa.source == "hub:Idavidrein/gpqa/gpqa_diamond" and gpqa.num_rows == {"train": 6}
    local = tmp_path / "local"
    prepare_mmlu(write_benchmark_dir(tmp_path / "src", n_test=5), local)
    for split in ("dev", "test"):
        assert (tmp_path / "hub/mmlu/anatomy" / f"{split}.jsonl").read_text() == (
            local / "mmlu/anatomy" / f"{split}.jsonl"
        ).read_text()
