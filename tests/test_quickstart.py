"""The reduced demo (`smallthinker demo --reduced`) runs end to end in a real subprocess and its report shows
every stage."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = [
    "synthetic data + tokenizer",
    "pre-training",
    "lm-eval, pre-trained model",
    "SFT",
    "merge",
    "held-out questions",
    "lm-eval, SFT + merged model",
    "offloaded chat",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("quickstart")
    out = work / "run"
    cmd = [
        sys.executable,
        "-m",
        "smallthinker",
        "demo",
        "--reduced",
        "--out",
        str(out),
        "--data",
        str(work / "data"),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "offloaded = resident" in proc.stdout and "True" in proc.stdout
    return out


def test_report_lists_every_stage_with_numbers(run):
    summary = json.loads((run / "summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == STAGES
    numbers = summary["numbers"]
    first, last = numbers["pretrain_loss"]
    assert last < first  # even 20 steps move the loss
    for key in ("eval_base", "eval_sft"):
        assert set(numbers[key]) == {"mmlu", "mmlu_continuation", "gpqa_diamond", "gpqa_diamond_continuation"}
        assert all(0.0 <= v <= 1.0 for v in numbers[key].values())
    report = (run / "report.md").read_text()
    for stage in STAGES:
        assert f"| {stage} |" in report


def test_offloaded_chat_matches_resident_under_budgets_below_the_model_size(run):
    offload = json.loads((run / "summary.json").read_text())["numbers"]["offload"]
    assert len(offload["runs"]) == 3
    for r in offload["runs"]:
        assert r["identical_to_resident"]
        assert r["budget_bytes"] < offload["model_bytes"]
        assert r["expert_slots"] < offload["total_experts"]
    assert offload["runs"][0]["budget_bytes"] == offload["minimum_budget_bytes"]


def test_plots_and_checkpoints_are_written(run):
    pngs = sorted(p.name for p in (run / "plots").rglob("*.png"))
    assert "offload_hit_rate.png" in pngs and any("loss" in p for p in pngs)
    for png in (run / "plots").rglob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "merged" / "config.json").is_file()
    assert (run / "expert_store").is_dir()


def test_refuses_to_overwrite_an_existing_run(run):
    proc = subprocess.run(
        [sys.executable, "-m", "smallthinker", "demo", "--reduced", "--out", str(run)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "--overwrite" in proc.stderr and "Traceback" not in proc.stderr
    assert (run / "report.md").is_file()  # nothing was lost


def test_the_reported_minimum_budget_is_what_chat_accepts(run):
    """The report's chat command at the minimum budget runs; one byte less is refused with the same minimum."""
    command = (run / "report.md").read_text().split("```bash\n", 1)[1].split("\n```", 1)[0]
    argv = shlex.split(command)
    assert argv[:2] == ["smallthinker", "chat"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ok = subprocess.run([sys.executable, "-m", "smallthinker", *argv[1:], "--max-new-tokens", "4"], env=env,
                        capture_output=True, text=True, timeout=300)  # fmt: skip
    assert ok.returncode == 0, ok.stderr[-2000:]
    budget = argv.index("--memory-budget") + 1
    minimum = int(argv[budget])
    argv[budget] = str(minimum - 1)
    refused = subprocess.run([sys.executable, "-m", "smallthinker", *argv[1:]], env=env, capture_output=True,
                             text=True, timeout=300)  # fmt: skip
    assert refused.returncode == 2 and f"({minimum} bytes)" in refused.stderr
