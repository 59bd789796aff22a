"""Peak RSS of an offloaded model stays within its memory budget (measured in a fresh subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import torch

from smallthinker.inference.engine import minimum_budget, plan_for_store
from smallthinker.inference.store import ExpertStore, convert_checkpoint

from .conftest import build_checkpoint

SLACK = 48 * 2**20  # Python objects of the model skeleton, thread stacks, allocator slack: outside the budget

CHILD = textwrap.dedent(
    """
    import json, sys, torch
    torch.set_num_threads(1)
    from smallthinker.inference import load_offloaded
    from smallthinker.inference.stats import current_rss_bytes, peak_rss_bytes
    torch.ones(1) @ torch.ones(1)  # initialise the math libraries before the baseline
    baseline = current_rss_bytes()
    model = load_offloaded(sys.argv[1], memory_budget=int(sys.argv[2]), max_context=64, overhead=0,
                           sparse_threshold=0.5)
    with torch.no_grad():
        model.generate(torch.tensor([[1, 2, 3, 4]]), max_new_tokens=12, do_sample=False)
    stats = model.offload_engine.stats()
    print(json.dumps({"baseline": baseline, "peak": peak_rss_bytes(), "loads": stats["loads"]}))
    """
)


def test_peak_rss_within_budget(tmp_path):
    _, ckpt = build_checkpoint(
        "tiny-4b-style",
        tmp_path,
        dtype=torch.bfloat16,
        hidden_size=512,
        moe_ffn_hidden_size=1024,
        moe_num_primary_experts=16,
    )
    store = convert_checkpoint(ckpt, tmp_path / "store")
    all_experts = ExpertStore(store).expert_bytes_total  # 64 experts x 3.1 MB (bf16)
    budget = minimum_budget(store, 64, overhead=0) + 12 * plan_for_store(store, "1GB", 64, 0).record_bytes
    assert all_experts > budget + SLACK, "the test must use a budget that cannot hold every expert"
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(store), str(budget)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["loads"] > 16  # experts really were streamed through the small pool
    grown = measured["peak"] - measured["baseline"]
    print(f"peak RSS grew {grown / 1e6:.1f} MB under a {budget / 1e6:.1f} MB budget", measured)
    assert grown > 0.5 * budget  # the measurement saw the pool fill up (it is not hidden by import peaks)
    assert grown <= budget + SLACK, f"peak RSS grew by {grown / 1e6:.1f} MB, budget {budget / 1e6:.1f} MB"
