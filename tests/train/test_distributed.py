"""Two CPU processes (gloo) reach the same losses as one process on the same global batches; the
balance-loss scopes reduce expert counts over the right ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from smallthinker.train.config import save_train_config
from smallthinker.train.loop import train
from smallthinker.train.losses import dp_groups
from tests.train.scope_worker import scope_worker
from tests.train.train_fixtures import tiny_config

REPO = Path(__file__).resolve().parents[2]


def read(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # starts two interpreters through `accelerate launch`
@pytest.mark.parametrize(
    ("scope", "two_accum", "one_accum"),
    [("micro_batch", 1, 2), ("global_batch", 1, 2), ("global_batch", 2, 4)],
)
def test_two_processes_match_one_process(tmp_path, scope, two_accum, one_accum):
    """2 ranks x (2 rows x A micro-batches) == 1 process x (2 rows x 2A micro-batches), shard for shard. With
    the global_batch scope the balance loss is that of the whole global batch, however it is split."""
    common = ("data_shards=2", "max_steps=4", f"loss.balance_scope={scope}", "micro_batch_size=2",
              "loss.balance_coef=0.5")  # fmt: skip
    two = tiny_config(tmp_path / "two", *common, f"grad_accum_steps={two_accum}", "checkpoint.every=2")
    save_train_config(two, tmp_path / "two.yaml")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "configs/accelerate/cpu_2proc.yaml"), "--main_process_port", "29517",
           "-m", "scripts.pretrain", "--config", str(tmp_path / "two.yaml")]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    one = train(tiny_config(tmp_path / "one", *common, f"grad_accum_steps={one_accum}"))
    two_records = read(tmp_path / "two" / "run")
    assert len(two_records) == len(one.history) == 4
    for a, b in zip(two_records, one.history):
        assert a["target_tokens"] == b["target_tokens"] and a["tokens_seen"] == b["tokens_seen"]
        for key in ("loss", "aux_loss", "z_loss"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    # Each rank wrote its own data position into the checkpoint.
    last = tmp_path / "two" / "run" / "checkpoints" / "step_00000004"
    assert (last / "data_rank0.pt").is_file() and (last / "data_rank1.pt").is_file()


@pytest.mark.slow  # four spawned interpreters importing transformers
def test_balance_loss_scopes_over_four_ranks(tmp_path):
    """Equal token counts per rank: the global scope equals the loss of the whole batch on one process,
    the DP-group scope the mean over groups of 2 ranks, the micro-batch scope the mean over ranks."""
    out = tmp_path / "out.json"
    mp.spawn(scope_worker, args=(4, str(tmp_path / "init"), str(out)), nprocs=4, join=True)
    r = json.loads(out.read_text())
    assert r["global_batch"] == pytest.approx(r["whole"], abs=1e-6)
    assert r["dp_group"] == pytest.approx(r["groups"], abs=1e-6)
    assert r["micro_batch"] == pytest.approx(r["ranks"], abs=1e-6)
    assert len({round(r[k], 4) for k in ("whole", "groups", "ranks")}) == 3  # the scopes differ


def test_dp_group_size_must_divide_ranks():
    assert dp_groups(8, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(ValueError, match="does not divide the 6 data-parallel ranks"):
        dp_groups(6, 4)
