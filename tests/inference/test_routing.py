"""Routing traces: drawn, recorded, replayed through the offload engine, and the cache simulator against the
engine's own statistics."""

from __future__ import annotations

import pytest
import torch

from smallthinker.inference import load_offloaded
from smallthinker.inference.routing import (
    fit_trace_statistics,
    record_trace,
    replay_trace,
    simulate_cache,
    synthetic_trace,
)

PRESET = "tiny-21b-style"  # 8 experts, top-2, 4 layers


def test_synthetic_traces_have_the_asked_statistics():
    trace = synthetic_trace(tokens=400, layers=4, experts=32, k=4, skew=1.0, reuse=0.5, seed=0)
    assert trace.shape == (400, 4, 4)
    assert all(len(set(row.tolist())) == 4 for row in trace.reshape(-1, 4))  # k distinct experts
    stats = fit_trace_statistics(trace, 32)
    assert stats.reuse == pytest.approx(0.5, abs=0.1)
    assert stats.skew > 0.5
    flat = fit_trace_statistics(synthetic_trace(400, 4, 32, 4, skew=0.0, reuse=0.0), 32)
    assert flat.reuse < 0.05 and flat.skew < 0.3 and flat.top_share < stats.top_share


def test_recorded_trace_is_the_models_routing(tiny):
    model = tiny[PRESET][0]
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(0))
    trace = record_trace(model, ids)
    assert trace.shape == (12, model.config.num_hidden_layers, model.config.moe_num_active_primary_experts)
    forced = synthetic_trace(12, model.config.num_hidden_layers, 8, 2, skew=1.0, reuse=0.3, seed=1)
    with replay_trace(model, forced):
        replayed = record_trace(model, ids)
    assert torch.equal(replayed, forced) and not torch.equal(trace, forced)


def test_simulator_predicts_the_engine(tiny):
    """Decode token by token under a replayed trace: the engine's hits and misses are the simulator's."""
    store = tiny[PRESET][2]
    trace = synthetic_trace(40, 4, 8, 2, skew=1.2, reuse=0.4, seed=2)
    model = load_offloaded(store, memory_budget="1GB", max_context=64, sparse=False)
    engine = model.offload_engine
    slots = 10
    engine.cache.num_slots = slots  # a smaller pool than the budget allows: the slots beyond stay unused
    engine.cache._free = engine.cache._free[-slots:]
    try:
        with torch.no_grad(), replay_trace(model, trace):
            ids = torch.tensor([[5]])
            out = model(ids, use_cache=True)
            for _ in range(trace.shape[0] - 1):
                out = model(
                    out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values, use_cache=True
                )
        stats = engine.cache.stats
        simulated = simulate_cache(trace, slots)
        assert stats.hits / (stats.hits + stats.misses) == pytest.approx(simulated.hit_rate, abs=1e-9)
        assert stats.misses == pytest.approx(simulated.loads_per_token * trace.shape[0])
    finally:
        engine.close()
