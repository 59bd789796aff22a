"""On a CUDA device: every experts implementation matches eager in bf16 and the training loop runs the
4B layer shapes with and without activation checkpointing. Skipped without CUDA (`make test` deselects
the `gpu` marker); `python -m scripts.gpu_check` measures the full-depth numbers."""

from __future__ import annotations

import pytest
import torch

from scripts.gpu_check import experts_parity, measure_training

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_every_available_experts_implementation_matches_eager_in_bf16():
    rows = experts_parity(layers=1, batch=1, seq_len=256)
    available = {r.name for r in rows if r.error is None}
    assert {"eager", "grouped_mm", "batched_mm", "sorted_mm"} <= available
    assert all(r.ok for r in rows if r.error is None), [r for r in rows if not r.ok and r.error is None]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_loop_steps_the_4b_layers_on_gpu(checkpointing):
    row = measure_training(2, checkpointing, steps=2, warmup=1, micro_batch=1, seq_len=1024, peak_flops=None)
    assert row.tokens_per_step == 1024 and row.tokens_per_s > 0 and 0 < row.mfu < 1
    assert row.peak_memory_gib > 0
