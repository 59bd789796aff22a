"""The GPU path in one command, on one CUDA device:

1. every experts implementation (eager, and each one registered in transformers' experts interface:
   grouped_mm, batched_mm, sorted_mm, and kernel packages when installed) against eager in bf16, forward
   logits and the gradients of every parameter, on the 4B layer shapes;
2. training tokens/s, MFU and peak memory of the 4B preset at sequence 4096 through the training loop
   (bf16 autocast, fp32 AdamW), at full depth if it fits, with and without activation checkpointing.
   MFU counts the model's FLOPs only (6 x active parameters + attention), not the recomputation that
   checkpointing adds.

    python -m scripts.gpu_check                                   # writes gpu_check.md
    python -m scripts.gpu_check --steps 20 --micro_batch_size 2 --out gpu_check.md

Paste the written table into BENCHMARKS.md. Exits with status 1 when an available implementation
disagrees with eager.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from smallthinker.modeling import SmallThinkerForCausalLM, load_model_config

REPO = Path(__file__).resolve().parents[1]
# bf16 rounding accumulates differently in each kernel: a relative (Frobenius) error of 2 % on logits
# and gradients separates rounding from a wrong result (a wrong expert or weight gives O(1) errors).
TOLERANCE = 2e-2


@dataclass
class ParityRow:
    name: str
    logits_error: float | None = None
    grad_error: float | None = None
    worst_grad: str = ""
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and max(self.logits_error, self.grad_error) <= TOLERANCE


@dataclass
class ThroughputRow:
    layers: int
    full_depth: int
    checkpointing: bool
    tokens_per_step: int
    tokens_per_s: float
    mfu: float
    peak_memory_gib: float


def implementations() -> list[str]:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    import smallthinker.modeling.experts  # noqa: F401  (registers sorted_mm)

    return ["eager", *sorted(ALL_EXPERTS_FUNCTIONS.keys())]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12)).item()


def experts_parity(
    device: str = "cuda", layers: int = 2, batch: int = 2, seq_len: int = 512
) -> list[ParityRow]:
    """Each implementation's logits and gradients against eager's, same bf16 weights and tokens."""
    torch.manual_seed(0)
    config = load_model_config("smallthinker-4b", num_hidden_layers=layers, vocab_size=4096)
    model = SmallThinkerForCausalLM(config).to(device=device, dtype=torch.bfloat16).train()
    for layer in model.model.layers:  # routing that differs from token to token
        torch.nn.init.normal_(layer.block_sparse_moe.primary_router.weight, std=0.5)
    ids = torch.randint(0, config.vocab_size, (batch, seq_len), device=device)
    results: dict[str, tuple[torch.Tensor, dict[str, torch.Tensor]]] = {}
    rows = []
    for name in implementations():
        row = ParityRow(name)
        try:
            model.zero_grad(set_to_none=True)
            model.set_experts_implementation(name)
            out = model(input_ids=ids, labels=ids, use_cache=False)
            out.loss.backward()
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
            results[name] = (out.logits.detach(), grads)
        except Exception as e:  # a kernel package that is not installed, or no kernel for this GPU
            row.error = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        rows.append(row)
    want_logits, want_grads = results["eager"]
    for row in rows:
        if row.error is None:
            logits, grads = results[row.name]
            row.logits_error = relative_error(logits, want_logits)
            errors = {n: relative_error(grads[n], g) for n, g in want_grads.items()}
            row.worst_grad = max(errors, key=errors.get)
            row.grad_error = errors[row.worst_grad]
    return rows


def train_config(depth: int, checkpointing: bool, micro_batch: int, seq_len: int, run_dir: Path, device: str):
    from smallthinker.train.config import load_train_config

    synthetic = REPO / "data/generated/synthetic"  # absolute: the check may start from any directory
    overrides = [
        f"synthetic_dir={synthetic}",
        f"data.sources=[{{path: '{synthetic / 'corpus/train.jsonl'}', text_field: text}}]",
        "model.preset=smallthinker-4b",
        f"model.overrides={{num_hidden_layers: {depth}, vocab_size: 151936}}",
        "model.experts_implementation=grouped_mm",
        f"model.activation_checkpointing={str(checkpointing).lower()}",
        "precision=bf16", f"cpu={str(device == 'cpu').lower()}", f"micro_batch_size={micro_batch}",
        "grad_accum_steps=1", f"data.seq_len={seq_len}", f"run_dir={run_dir}", "checkpoint.every=0",
        "max_steps=1000000", "logging.tensorboard=false", "logging.progress_bar=false",
        "logging.neuron_sparsity_every=0", "logging.moe_metrics_every=0",
    ]  # fmt: skip
    # The synthetic corpus (prepared offline on first use) feeds the loop; the model keeps the 4B vocabulary.
    return load_train_config(REPO / "configs/train/pretrain_tiny.yaml", overrides)


def measure_training(
    depth: int, checkpointing: bool, steps: int, warmup: int, micro_batch: int, seq_len: int,
    peak_flops: float | None, device: str = "cuda",
) -> ThroughputRow:  # fmt: skip
    """Median step time of the training loop (data, forward, backward, clipping, AdamW) over `steps`."""
    from smallthinker.synthetic.prepare import prepare_for_run
    from smallthinker.train.loop import next_micro_batches, setup, train_step
    from smallthinker.train.metrics import default_peak_flops, flops_per_token

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = train_config(depth, checkpointing, micro_batch, seq_len, Path(tmp) / "run", device)
        run = setup(cfg, prepare_for_run)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times, tokens = [], 0
        for i in range(warmup + steps):
            sync()
            start = time.perf_counter()
            tokens = train_step(run, next_micro_batches(run))["tokens"]
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - start)
        run.logger.close()
    tokens_per_s = tokens / statistics.median(times)
    peak = peak_flops or default_peak_flops(device, "bf16")
    mfu = flops_per_token(run.unwrapped.config, seq_len) * tokens_per_s / peak
    memory = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
    full = load_model_config("smallthinker-4b").num_hidden_layers
    return ThroughputRow(depth, full, checkpointing, tokens, tokens_per_s, mfu, memory)


def deepest_fitting(checkpointing: bool, args: argparse.Namespace, device: str = "cuda") -> ThroughputRow:
    """Full depth, else halve the layers until the step fits in memory."""
    depth = load_model_config("smallthinker-4b").num_hidden_layers
    while True:
        try:
            return measure_training(depth, checkpointing, args.steps, args.warmup, args.micro_batch_size,
                                    args.seq_len, args.peak_flops, device)  # fmt: skip
        except torch.cuda.OutOfMemoryError:
            if depth <= 1:
                raise
            depth //= 2
        finally:
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()


def parity_table(rows: list[ParityRow]) -> str:
    lines = [
        f"| experts implementation | logits rel. error | worst gradient rel. error | parameter | within {TOLERANCE} |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        if r.error is not None:
            lines.append(f"| {r.name} | not available: {r.error} | | | |")
        else:
            lines.append(f"| {r.name} | {r.logits_error:.2e} | {r.grad_error:.2e} | {r.worst_grad} | "
                         f"{'yes' if r.ok else 'NO'} |")  # fmt: skip
    return "\n".join(lines)


def throughput_table(rows: list[ThroughputRow], seq_len: int, micro_batch: int) -> str:
    lines = [
        f"| 4B preset, seq {seq_len}, micro-batch {micro_batch} | activation checkpointing | tokens/step | "
        "tokens/s | MFU | peak memory |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        depth = f"{r.layers} layers" + (
            " (full depth)" if r.layers == r.full_depth else f" of {r.full_depth}"
        )
        lines.append(f"| {depth} | {'on' if r.checkpointing else 'off'} | {r.tokens_per_step} | "
                     f"{r.tokens_per_s:,.0f} | {100 * r.mfu:.1f} % | {r.peak_memory_gib:.1f} GiB |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="gpu_check.md", help="markdown file the tables are written to")
    parser.add_argument("--seq_len", type=int, default=4096)
    parser.add_argument("--micro_batch_size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10, help="measured training steps per case")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--peak_flops", type=float, default=None, help="device peak bf16 FLOP/s (default H100 SXM)"
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit(
            "scripts.gpu_check needs a CUDA device and none is visible (torch.cuda.is_available() is False)"
        )
    parity = experts_parity()
    print(parity_table(parity), flush=True)
    rows = [deepest_fitting(checkpointing, args) for checkpointing in (False, True)]
    name = torch.cuda.get_device_name()
    text = "\n\n".join([
        f"GPU: {name}, torch {torch.__version__}, `python -m scripts.gpu_check --seq_len {args.seq_len} "
        f"--micro_batch_size {args.micro_batch_size} --steps {args.steps}`",
        parity_table(parity),
        throughput_table(rows, args.seq_len, args.micro_batch_size),
    ])  # fmt: skip
    Path(args.out).write_text(text + "\n")
    print(text)
    if not all(r.ok for r in parity if r.error is None):
        sys.exit(f"an experts implementation disagrees with eager beyond {TOLERANCE}: see {args.out}")


if __name__ == "__main__":
    main()
