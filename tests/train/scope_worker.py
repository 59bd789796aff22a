"""Worker for the balance-loss scope test, in its own module so spawned processes import little."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from smallthinker.modeling.modeling_smallthinker import load_balancing_loss
from smallthinker.train.config import LossConfig
from smallthinker.train.losses import build_count_reducer, dp_groups


def scope_worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    logits = tuple(torch.randn(world * 16, 8) * 2 for _ in range(3))  # identical on every rank
    mine = tuple(layer[rank * 16 : (rank + 1) * 16] for layer in logits)
    results = {}
    for scope, group_size in (("global_batch", 1), ("dp_group", 2), ("micro_batch", 1)):
        reducer = build_count_reducer(LossConfig(balance_scope=scope, dp_group_size=group_size))
        local = load_balancing_loss(mine, 8, 2, True, count_reducer=reducer)
        averaged = local.clone()
        dist.all_reduce(averaged)  # what DDP's gradient averaging applies the loss as
        results[scope] = averaged.item() / world
    # References computed on one process: the whole batch, each group's rows, each rank's rows.
    results["whole"] = load_balancing_loss(logits, 8, 2, True).item()
    groups = [tuple(layer[g[0] * 16 : (g[-1] + 1) * 16] for layer in logits) for g in dp_groups(world, 2)]
    results["groups"] = sum(load_balancing_loss(g, 8, 2, True).item() for g in groups) / len(groups)
    ranks = [tuple(layer[r * 16 : (r + 1) * 16] for layer in logits) for r in range(world)]
    results["ranks"] = sum(load_balancing_loss(r, 8, 2, True).item() for r in ranks) / world
    if rank == 0:
        Path(out_file).write_text(json.dumps(results))
    dist.destroy_process_group()
