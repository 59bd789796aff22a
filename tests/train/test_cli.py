"""The offline default: the tiny presets run end to end from an empty folder (synthetic data made on
the fly, no downloads); pre-training lowers the loss well below its start; SFT continues from it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from smallthinker.synthetic.prepare import prepare_for_run
from smallthinker.train.cli import main
from smallthinker.train.config import ConfigError

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
        config = str(REPO / "configs/train/pretrain_tiny.yaml")
        # As `scripts.pretrain` runs it: the entry point generates the data, the training package does not.
        result = main(["--config", config, *SHORT], "pretrain", prepare_data=prepare_for_run)
    return root, result


def test_pretrain_tiny_runs_offline_and_learns(fresh_machine):
    root, result = fresh_machine
    assert result.step == 60 and (root / "data/generated/synthetic/manifest.json").is_file()
    losses = [r["loss"] for r in result.history]
    assert losses[0] == pytest.approx(math.log(2048), abs=0.3)  # uniform over the synthetic vocabulary
    assert sum(losses[-5:]) / 5 < losses[0] - 2.0
    run = root / "runs/pretrain_tiny"
    saved = (run / "config.yaml").read_text()
    assert "tiny-4b-style" in saved and "seq_len: 64" in saved  # the resolved config, overrides applied
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step_00000030", "step_00000060"]
    assert any((run / "tensorboard").iterdir())


def test_sft_tiny_continues_from_the_checkpoint(fresh_machine, monkeypatch):
    root, _ = fresh_machine
    monkeypatch.chdir(root)
    init = root / "runs/pretrain_tiny/checkpoints/step_00000060"
    result = main(["--config", str(REPO / "configs/train/sft_tiny.yaml"), f"--model.init_from={init}",
                   "--max_steps=12", "--data.seq_len=128", "--micro_batch_size=4", "--optim.lr=2e-3",
                   "--schedule.warmup_steps=2", "--logging.progress_bar=false"], "sft")  # fmt: skip
    first, last = result.history[0], result.history[-1]
    # SFT loss is on assistant tokens only: far fewer targets than tokens.
    assert 0 < first["target_tokens"] < 4 * 128 / 2
    assert last["loss"] < first["loss"]
    out = root / "runs/sft_tiny/checkpoints/step_00000012"
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template and model.config.vocab_size >= len(tokenizer)
    assert json.loads((out / "trainer_state.json").read_text())["step"] == 12


def test_entry_point_checks_the_task(fresh_machine, monkeypatch):
    monkeypatch.chdir(fresh_machine[0])
    with pytest.raises(ConfigError, match="is a 'pretrain' config; this entry point runs 'sft'"):
        main(["--config", str(REPO / "configs/train/pretrain_tiny.yaml")], "sft")
    with pytest.raises(SystemExit):
        main(["--config", str(REPO / "configs/train/pretrain_tiny.yaml"), "max_steps=3"], "pretrain")
