"""prepare_synthetic / make_synthetic: one folder with everything, idempotent, never clobbering data."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from datasets import load_dataset
from transformers import AutoTokenizer

from smallthinker.synthetic import prepare_synthetic

SMALL = {"num_entities": 30, "num_documents": 200, "vocab_size": 512, "gpqa_size": 20}
JSONL = [
    "train",
    "validation",
    "sft_train",
    "sft_validation",
    "sft_train_prompt_response",
    "sft_validation_prompt_response",
    "heldout_qa",
    "mmlu_dev",
    "mmlu_validation",
    "mmlu_test",
    "gpqa_diamond",
]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_synthetic(tmp_path_factory.mktemp("data") / "synthetic", seed=0, **SMALL)


def test_every_file_loads_with_datasets(prepared, tmp_path):
    manifest = json.loads(prepared["manifest"].read_text())
    for name in JSONL:
        ds = load_dataset("json", data_files=str(prepared[name]), split="train", cache_dir=str(tmp_path))
        assert ds.num_rows == manifest["rows"][name] > 0, name
    tokenizer = AutoTokenizer.from_pretrained(str(prepared["tokenizer"]))
    assert tokenizer.chat_template and len(tokenizer) <= SMALL["vocab_size"]
    assert (prepared["benchmarks"] / "mmlu" / "test.jsonl").is_file()
    assert (prepared["benchmarks"] / "gpqa" / "gpqa_diamond.jsonl").is_file()


def test_same_parameters_same_bytes(prepared, tmp_path):
    again = prepare_synthetic(tmp_path / "again", seed=0, **SMALL)
    for name in JSONL:
        assert again[name].read_bytes() == prepared[name].read_bytes(), name
    for file in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (again["tokenizer"] / file).read_bytes() == (prepared["tokenizer"] / file).read_bytes()
    other = prepare_synthetic(tmp_path / "other", seed=1, **SMALL)
    assert other["train"].read_bytes() != prepared["train"].read_bytes()


def test_second_call_reuses_the_folder(prepared):
    stamps = {name: prepared[name].stat().st_mtime_ns for name in JSONL}
    again = prepare_synthetic(prepared["root"], seed=0, **SMALL)
    assert again == prepared
    assert {name: again[name].stat().st_mtime_ns for name in JSONL} == stamps


def test_other_parameters_need_overwrite(tmp_path):
    out = tmp_path / "syn"
    first = prepare_synthetic(out, seed=0, **SMALL)
    before = first["train"].read_bytes()
    with pytest.raises(ValueError, match=r"other parameters.*'seed': \(0, 2\).*overwrite"):
        prepare_synthetic(out, seed=2, **SMALL)
    assert first["train"].read_bytes() == before  # untouched
    replaced = prepare_synthetic(out, seed=2, overwrite=True, **SMALL)
    assert replaced["train"].read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["syn"]  # no temporary folders left behind


def test_a_folder_of_an_older_format_is_regenerated(tmp_path):
    out = tmp_path / "syn"
    first = prepare_synthetic(out, seed=0, **SMALL)
    manifest = json.loads(first["manifest"].read_text())
    current = manifest["params"]["format_version"]
    manifest["params"]["format_version"] = current - 1
    first["manifest"].write_text(json.dumps(manifest))
    again = prepare_synthetic(out, seed=0, **SMALL)
    assert json.loads(again["manifest"].read_text())["params"]["format_version"] == current
    assert again["chat_train"].is_file()


def test_foreign_folder_is_never_touched(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a synthetic data folder"):
        prepare_synthetic(tmp_path, overwrite=True, **SMALL)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_make_synthetic_script(prepared):
    # Reuses the module's folder: the script validates the parameters and reports without regenerating.
    args = ["--out", str(prepared["root"]), "--entities", "30", "--documents", "200", "--vocab-size", "512"]
    cmd = [sys.executable, "-m", "scripts.make_synthetic", *args, "--gpqa-size", "20"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "mmlu_test" in result.stdout and "heldout_qa" in result.stdout
    result = subprocess.run(cmd + ["--seed", "5"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--overwrite" in result.stderr
