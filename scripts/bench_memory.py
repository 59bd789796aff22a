"""Per-rank training-state memory under FSDP2 on CPU processes (gloo): parameter, gradient and AdamW
bytes each rank holds after one training step, for 1, 2 and 4 processes (1 process: the plain model).

    python -m scripts.bench_memory                                  # tiny-4b-style, 1 / 2 / 4 processes
    python -m scripts.bench_memory --preset tiny-21b-style --procs 1 2

Counts the bytes of the tensors each rank owns (its DTensor shards), not process RSS: the numbers are
exact and independent of machine load. Sharding uses the trainer's own `shard_model`.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from smallthinker.modeling import SmallThinkerForCausalLM, load_model_config
from smallthinker.train.config import OptimConfig
from smallthinker.train.distributed import FSDPSettings, shard_model
from smallthinker.train.optim import build_optimizer


def local_bytes(tensor: torch.Tensor) -> int:
    """Bytes this rank stores for `tensor` (its shard when the tensor is a DTensor)."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        tensor = tensor.to_local()
    return tensor.numel() * tensor.element_size()


def measure(preset: str, seq_len: int, batch: int) -> dict[str, int]:
    """One forward, backward and AdamW step on this rank; the bytes of its parameters, gradients
    (right after backward) and optimizer states (after the step)."""
    torch.manual_seed(0)
    model = SmallThinkerForCausalLM(load_model_config(preset))
    if dist.is_initialized():
        settings = FSDPSettings(
            "SmallThinkerDecoderLayer", reshard_after_forward=True, activation_checkpointing=False
        )
        shard_model(model, settings, "fp32", torch.device("cpu"))
    optimizer = build_optimizer(model, OptimConfig())
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len))
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    grads = sum(local_bytes(p.grad) for p in model.parameters() if p.grad is not None)
    optimizer.step()
    states = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    return {
        "params": sum(local_bytes(p) for p in model.parameters()),
        "grads": grads,
        "optimizer": sum(local_bytes(t) for t in states),
        "total_params": sum(p.numel() for p in model.parameters()),
    }


def worker(
    rank: int, world: int, init_file: str, out_file: str, preset: str, seq_len: int, batch: int
) -> None:
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    result = measure(preset, seq_len, batch)
    gathered = [result]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, result)
        dist.destroy_process_group()
    if rank == 0:
        Path(out_file).write_text(json.dumps(gathered))


def run(world: int, preset: str, seq_len: int, batch: int) -> list[dict[str, int]]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        args = (world, os.path.join(tmp, "init"), out, preset, seq_len, batch)
        mp.spawn(worker, args=args, nprocs=world, join=True)
        return json.loads(Path(out).read_text())


def mib(n: float) -> str:
    return f"{n / 2**20:.3f}"


def markdown(preset: str, results: dict[int, list[dict[str, int]]]) -> str:
    one = results[min(results)][0]
    single = one["params"] + one["grads"] + one["optimizer"]
    lines = [
        f"{preset}: {one['total_params']:,} parameters (fp32 weights, fp32 gradients, AdamW fp32 exp_avg + exp_avg_sq)",
        "",
        "| processes | params MiB / rank | grads MiB / rank | AdamW MiB / rank | total MiB / rank (max rank) | "
        "x of 1 process | ideal 1/N |",
        "|---|---|---|---|---|---|---|",
    ]
    for world, ranks in sorted(results.items()):
        worst = max(ranks, key=lambda r: r["params"] + r["grads"] + r["optimizer"])
        total = worst["params"] + worst["grads"] + worst["optimizer"]
        lines.append(
            f"| {world} | {mib(worst['params'])} | {mib(worst['grads'])} | {mib(worst['optimizer'])} | "
            f"{mib(total)} | {total / single:.3f} | {1 / world:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny-4b-style")
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args(argv)
    results = {world: run(world, args.preset, args.seq_len, args.batch) for world in args.procs}
    print(markdown(args.preset, results))


if __name__ == "__main__":
    main()
