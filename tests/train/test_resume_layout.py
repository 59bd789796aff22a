"""Resuming on another number of processes: which layouts continue the same data stream and global
batch, the messages for those that cannot, and how the data shards are dealt out again."""

from __future__ import annotations

from pathlib import Path

import pytest

from smallthinker.train.build import regroup_stream_states
from smallthinker.train.config import ConfigError, TrainConfig
from smallthinker.train.distributed import check_resume_layout

CKPT = Path("runs/x/checkpoints/step_00000010")


def cfg(micro: int, accum: int, shards: int | None) -> TrainConfig:
    return TrainConfig(micro_batch_size=micro, grad_accum_steps=accum, data_shards=shards)


@pytest.mark.parametrize(
    ("before", "saved_world", "now", "world"),
    [
        (cfg(2, 1, None), 2, cfg(2, 2, 2), 1),  # 2 -> 1: both shards on one process, twice the accumulation
        (cfg(2, 2, 2), 1, cfg(2, 1, None), 2),  # 1 -> 2: one shard each
        (cfg(1, 4, 8), 2, cfg(1, 2, 8), 4),  # 2 -> 4 with 8 shards
        (cfg(2, 3, None), 2, cfg(2, 3, None), 2),  # same layout
    ],
)
def test_layouts_that_continue_the_same_stream(before, saved_world, now, world):
    check_resume_layout(before, now, saved_world, world, CKPT)


def test_shard_count_must_not_change():
    with pytest.raises(ConfigError, match=r"split into 2 shards .* into 1; set --data_shards=2 to continue"):
        check_resume_layout(cfg(2, 1, None), cfg(2, 2, None), 2, 1, CKPT)
    with pytest.raises(
        ConfigError, match=r"split into 4 shards .* into 3; use a process count that divides 4"
    ):
        check_resume_layout(cfg(1, 1, None), cfg(1, 1, None), 4, 3, CKPT)


def test_global_batch_must_not_change():
    with pytest.raises(
        ConfigError, match=r"2 x 1 x 2 = 4 sequences, .* = 2 x 1 x 1 = 2; set --grad_accum_steps=2"
    ):
        check_resume_layout(cfg(2, 1, 2), cfg(2, 1, 2), 2, 1, CKPT)
    with pytest.raises(
        ConfigError, match=r"= 6 sequences, .*no grad_accum_steps gives 6 with micro_batch_size 4"
    ):
        check_resume_layout(cfg(3, 1, 2), cfg(4, 1, 2), 2, 1, CKPT)


def shard(i: int) -> dict:
    return {"cursor": i}


def test_shards_are_dealt_out_again_in_global_order():
    saved = [{"turn": 0, "last_stage": "s1", "shards": [shard(0), shard(1)]},
             {"turn": 0, "last_stage": "s1", "shards": [shard(2), shard(3)]}]  # fmt: skip
    assert regroup_stream_states(saved, 0, 1)["shards"] == [shard(i) for i in range(4)]
    four = [regroup_stream_states(saved, r, 4) for r in range(4)]
    assert [s["shards"] for s in four] == [[shard(i)] for i in range(4)]
    assert all(s["turn"] == 0 and s["last_stage"] == "s1" for s in four)
    with pytest.raises(ValueError, match="4 data shards cannot be regrouped over 3 processes"):
        regroup_stream_states(saved, 0, 3)
    saved[1]["turn"] = 1
    with pytest.raises(ValueError, match="cannot be regrouped"):
        regroup_stream_states(saved, 0, 2)
