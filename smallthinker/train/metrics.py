"""Training metrics: throughput and MFU, per-layer MoE load, ReGLU neuron sparsity, JSONL/TensorBoard."""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from smallthinker.modeling.modeling_smallthinker import SmallThinkerExperts
from smallthinker.modeling.sizes import active_params

# Dense peak FLOP/s of one device, used for MFU when `logging.peak_flops` is not set.
# CPU: the PyTorch GEMM rate measured on the project's 2-core AVX-512 bf16 machine (ANCHORS.md);
# GPU: vendor dense tensor-core numbers (H100 SXM), the common MFU reference.
DEFAULT_PEAK_FLOPS = {
    ("cpu", "fp32"): 140e9,
    ("cpu", "bf16"): 390e9,
    ("cuda", "fp32"): 67e12,  # H100 SXM fp32 (non tensor-core)
    ("cuda", "bf16"): 989e12,  # H100 SXM bf16 dense
}


def default_peak_flops(device_type: str, precision: str) -> float:
    return DEFAULT_PEAK_FLOPS.get((device_type, precision), DEFAULT_PEAK_FLOPS[("cuda", precision)])


def flops_per_token(config: Any, seq_len: int) -> float:
    """Training FLOPs per token: 6 x active params (with the LM head) + attention scores (PaLM, arXiv 2204.02311,
    App. B).

    Attention adds 12 * heads * head_dim * context per layer (forward QK^T and AV, times 3 for
    backward); context is the sequence length, or the window on sliding-window layers.
    """
    windows = getattr(config, "sliding_window_layout", None) or [0] * config.num_hidden_layers
    attn = 0
    for uses_window in windows:
        context = min(seq_len, config.sliding_window_size) if uses_window else seq_len
        attn += 12 * config.num_attention_heads * config.head_dim * context
    return 6 * active_params(config, include_head=True) + attn


def load_summary(counts_LE: torch.Tensor) -> dict[str, list[float]]:
    """Per-layer load statistics from accumulated counts.

    expert_share is each expert's share of the layer's assignments; min/max load are relative to a perfectly uniform split (1.0 = balanced); entropy is normalised
    by log E (1.0 = uniform); dead = experts that received no token in the window.
    """
    num_experts = counts_LE.shape[-1]
    total_L1 = counts_LE.sum(-1, keepdim=True).clamp_min(1)
    share_LE = counts_LE / total_L1
    entropy_L = -(share_LE * share_LE.clamp_min(1e-12).log()).sum(-1) / math.log(num_experts)
    return {
        "load_min": (share_LE.min(-1).values * num_experts).tolist(),
        "load_max": (share_LE.max(-1).values * num_experts).tolist(),
        "load_entropy": entropy_L.tolist(),
        "dead_experts": (counts_LE == 0).sum(-1).tolist(),
        "expert_share": share_LE.tolist(),  # [L][E], sums to 1 per layer
    }


def _experts_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, SmallThinkerExperts)]


@contextmanager
def _zero_neuron_hooks(model: nn.Module, out: list[list[float]]):
    """Forward hooks on each experts module recording (zero gate neurons, total gate neurons)."""

    def make_hook(layer: int):
        def hook(module, args, kwargs, output):
            hidden_TH, top_k_index_TK = _experts_inputs(args, kwargs)
            ffn = module.down_proj.shape[-1]
            zeros = total = 0
            for expert in top_k_index_TK.unique().tolist():
                rows = (top_k_index_TK == expert).any(-1)
                gate_tF = hidden_TH[rows] @ module.gate_up_proj[expert, :ffn].T  # gate rows first
                zeros += int((gate_tF <= 0).sum())  # relu(gate) == 0
                total += gate_tF.numel()
            out[layer] = [zeros, total]

        return hook

    handles = [
        m.register_forward_hook(make_hook(i), with_kwargs=True) for i, m in enumerate(_experts_modules(model))
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _experts_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    names = ("hidden_states", "top_k_index")
    values = list(args[:2]) + [kwargs[n] for n in names[len(args[:2]) :]]
    return values[0], values[1]


@torch.no_grad()
def neuron_sparsity(model: nn.Module, batch: dict[str, torch.Tensor]) -> list[float]:
    """Fraction of ReGLU neurons with relu(gate) == 0 per layer, over routed (token, expert) pairs.

    The report finds > 60 % zeros inside routed experts: this is what neuron-sparse decode exploits.
    """
    num_layers = len(_experts_modules(model))
    stats: list[list[float]] = [[0, 0] for _ in range(num_layers)]
    was_training = model.training
    model.eval()
    try:
        with _zero_neuron_hooks(model, stats):
            model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)
    finally:
        model.train(was_training)
    return [zeros / max(1, total) for zeros, total in stats]


class MetricsLogger:
    """Appends one JSON object per logged step to `metrics.jsonl`, mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool, enabled: bool) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.writer = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint so the file reads as one clean run."""
        if not self.enabled or not self.path.exists():
            return
        lines = self.path.read_text().splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, int | float) and key != "step":
                    self.writer.add_scalar(key, value, record["step"])
                elif isinstance(value, list) and value and isinstance(value[0], int | float):
                    for layer, v in enumerate(value):
                        self.writer.add_scalar(f"{key}/layer_{layer:02d}", v, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a training run directory?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
