"""Training throughput on CPU: the full loop step vs a bare forward + backward + AdamW step.

Both run on the same model shape and the same micro-batches, alternating one step each (round
robin) so machine noise hits both alike; the median over rounds is reported. The bare step is the
floor the loop can reach; the loop adds the global token count, router losses in the configured
scope, expert-load counting, gradient clipping, the LR schedule and the data stream.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from smallthinker.train.config import load_train_config
from smallthinker.train.loop import Run, next_micro_batches, setup, train_step
from smallthinker.train.metrics import flops_per_token

# Bench shapes. "small": the real 4B layer (hidden 1536, 12/2 heads, head_dim 128, 32 experts top-4,
# FFN 768), 4 layers, vocab 8192 so the MoE dominates: the ANCHORS.md training-step shape.
SHAPES: dict[str, list[str]] = {
    "tiny": ["model.preset=tiny-4b-style", "micro_batch_size=8", "data.seq_len=256"],
    "small": [
        "model.preset=smallthinker-4b",
        "model.overrides={num_hidden_layers: 4, vocab_size: 8192}",
        "micro_batch_size=4",
        "data.seq_len=256",
    ],  # fmt: skip
}


@dataclass
class BenchRow:
    shape: str
    precision: str
    tokens_per_step: int
    loop_tokens_per_s: float
    bare_tokens_per_s: float
    loop_mfu: float

    @property
    def ratio(self) -> float:
        return self.loop_tokens_per_s / self.bare_tokens_per_s


def bare_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: list[dict], bf16: bool
) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for batch in batches:
            model(**batch, use_cache=False).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def bench_shape(shape: str, precision: str, steps: int, warmup: int, run_root: Path) -> BenchRow:
    overrides = SHAPES[shape] + [
        f"precision={precision}", f"run_dir={run_root / f'{shape}_{precision}'}", "checkpoint.every=0",
        "logging.tensorboard=false", "logging.progress_bar=false", "logging.neuron_sparsity_every=0",
        f"max_steps={steps + warmup}",
        # The corpus alone, as before the recipe mixed in chat text: throughput numbers stay comparable.
        "data.sources=[{path: data/generated/synthetic/corpus/train.jsonl, text_field: text}]",
    ]  # fmt: skip
    run: Run = setup(load_train_config("pretrain_tiny", overrides))
    bare = copy.deepcopy(run.unwrapped)
    bare_optimizer = torch.optim.AdamW(bare.parameters(), lr=1e-4, foreach=False)
    loop_times, bare_times, tokens = [], [], 0
    for i in tqdm(range(warmup + steps), desc=f"{shape} {precision}", leave=False):
        start = time.perf_counter()
        micro = next_micro_batches(run)
        stats = train_step(run, micro)
        middle = time.perf_counter()
        bare_step(bare, bare_optimizer, [b for _, b in micro], precision == "bf16")
        end = time.perf_counter()
        if i >= warmup:
            loop_times.append(middle - start)
            bare_times.append(end - middle)
        tokens = stats["tokens"]
    loop_tps = tokens / statistics.median(loop_times)
    peak = run.cfg.logging.peak_flops or (390e9 if precision == "bf16" else 140e9)
    mfu = flops_per_token(run.unwrapped.config, run.cfg.data["seq_len"]) * loop_tps / peak
    return BenchRow(shape, precision, tokens, loop_tps, tokens / statistics.median(bare_times), mfu)


def bench_train(shapes: list[str], precisions: list[str], steps: int, warmup: int) -> list[BenchRow]:
    with tempfile.TemporaryDirectory() as tmp:
        return [bench_shape(s, p, steps, warmup, Path(tmp)) for s in shapes for p in precisions]


def markdown_table(rows: list[BenchRow]) -> str:
    lines = [
        "| shape | precision | tokens/step | loop tok/s | bare fwd+bwd+AdamW tok/s | loop / bare | loop MFU |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r.shape} | {r.precision} | {r.tokens_per_step} | {r.loop_tokens_per_s:.0f} | "
                     f"{r.bare_tokens_per_s:.0f} | {r.ratio:.2f} | {100 * r.loop_mfu:.1f} % |")  # fmt: skip
    return "\n".join(lines)
