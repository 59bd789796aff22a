"""The offline default: `smallthinker pretrain` / `sft` run the tiny recipes end to end from an empty folder (synthetic data made on
the fly, no downloads); pre-training lowers the loss well below its start; SFT continues from it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from smallthinker.cli import main

REPO = Path(__file__).resolve().parents[2]
# The tiny preset, shortened: 60 steps of 4 x 64 tokens.
SHORT = ["--max_steps=60", "--data.seq_len=64", "--micro_batch_size=4", "--schedule.warmup_steps=6",
         "--optim.lr=5e-3", "--checkpoint.every=30", "--logging.progress_bar=false"]  # fmt: skip


@pytest.fixture(scope="module")
def fresh_machine(tmp_path_factory):
    """An empty working directory in which the tiny pre-training preset has run."""
    root = tmp_path_factory.mktemp("fresh")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        assert main(["pretrain", "--config", "pretrain_tiny", *SHORT]) == 0
    return root, root / "runs/pretrain_tiny"


def logged(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


def test_pretrain_tiny_runs_offline_and_learns(fresh_machine):
    root, run = fresh_machine
    records = logged(run)
    assert records[-1]["step"] == 60 and (root / "data/generated/synthetic/manifest.json").is_file()
    losses = [r["loss"] for r in records]
    vocab = json.loads((run / "checkpoints/step_00000060/config.json").read_text())["vocab_size"]
    assert losses[0] == pytest.approx(math.log(vocab), abs=0.3)  # uniform over the model's vocabulary
    assert sum(losses[-5:]) / 5 < losses[0] - 2.0
    saved = (run / "config.yaml").read_text()
    assert "tiny-4b-style" in saved and "seq_len: 64" in saved  # the resolved config, overrides applied
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step_00000030", "step_00000060"]
    assert any((run / "tensorboard").iterdir())


def test_sft_tiny_continues_from_the_checkpoint(fresh_machine, monkeypatch):
    root, _ = fresh_machine
    monkeypatch.chdir(root)
    init = root / "runs/pretrain_tiny/checkpoints/step_00000060"
    status = main(["sft", "--config", str(REPO / "configs/train/sft_tiny.yaml"), f"--model.init_from={init}",
                   "--max_steps=12", "--data.seq_len=128", "--micro_batch_size=4", "--optim.lr=2e-3",
                   "--schedule.warmup_steps=2", "--logging.progress_bar=false"])  # fmt: skip
    assert status == 0
    records = logged(root / "runs/sft_tiny")
    first, last = records[0], records[-1]
    # SFT loss is on assistant tokens only: far fewer targets than tokens.
    assert 0 < first["target_tokens"] < 4 * 128 / 2
    assert last["loss"] < first["loss"]
    out = root / "runs/sft_tiny/checkpoints/step_00000012"
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template and model.config.vocab_size >= len(tokenizer)
    assert json.loads((out / "trainer_state.json").read_text())["step"] == 12


def test_entry_point_checks_the_task(fresh_machine, monkeypatch, capsys):
    monkeypatch.chdir(fresh_machine[0])
    assert main(["sft", "--config", "pretrain_tiny"]) == 2
    assert capsys.readouterr().err == (
        "smallthinker sft: error: pretrain_tiny is a pretrain recipe; run it with `smallthinker pretrain`\n"
    )
    assert main(["pretrain", "--config", "pretrain_tiny", "max_steps=3"]) == 2
    assert "config overrides are written --section.field=value" in capsys.readouterr().err
