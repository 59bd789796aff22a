"""The demo at its default settings: its SFT model answers questions about entities SFT never saw (held-out
exact match at least 60 %), and the README's chat example gets the answer the corpus states."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HELDOUT_THRESHOLD = 0.6


@pytest.mark.slow  # the full demo: about 5 minutes on 2 cores
def test_default_demo_answers_heldout_questions_and_the_readme_example(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    demo = subprocess.run([sys.executable, "-m", "smallthinker", "demo", "--out", "demo"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=1800)  # fmt: skip
    assert demo.returncode == 0, demo.stderr[-4000:]
    numbers = json.loads((tmp_path / "demo" / "summary.json").read_text())["numbers"]
    assert numbers["heldout_em_sft"] >= HELDOUT_THRESHOLD, numbers["heldout_em_sft"]

    # The README's example, run as written (its model path is the demo's default output folder).
    readme = (ROOT / "README.md").read_text()
    line = re.search(r"^smallthinker chat --model runs/quickstart/merged --prompt .*$", readme, re.M).group(0)
    argv = shlex.split(line.split("#", 1)[0])
    argv[argv.index("--model") + 1] = str(tmp_path / "demo" / "merged")
    question = argv[argv.index("--prompt") + 1]
    chat = subprocess.run([sys.executable, "-m", "smallthinker", *argv[1:]], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert chat.returncode == 0, chat.stderr[-2000:]
    answer = chat.stdout.splitlines()[0].strip().rstrip(".").lower()
    heldout = tmp_path / "data" / "generated" / "synthetic" / "sft" / "heldout_qa.jsonl"
    expected = {r["question"]: r["answer"] for r in map(json.loads, heldout.read_text().splitlines())}
    assert question in expected, "the README's example must be a held-out question"
    assert answer == expected[question].lower(), (question, chat.stdout)
