"""The offloaded model against the resident one: greedy generation, budgets, stats, int8, races."""

from __future__ import annotations

import pytest
import torch

from smallthinker.inference.engine import MemoryBudgetError, load_offloaded, minimum_budget, plan_for_store

PROMPT = torch.tensor([[5, 17, 99, 3, 250, 7, 42, 11]])
NEW_TOKENS = 256
MAX_CONTEXT = PROMPT.shape[1] + NEW_TOKENS
_REFERENCE = {}


def _generate(model, new_tokens: int = NEW_TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(PROMPT, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)


def _reference(tiny, preset: str) -> torch.Tensor:
    if preset not in _REFERENCE:
        _REFERENCE[preset] = _generate(tiny[preset][0])
    return _REFERENCE[preset]


def _budget_for_slots(store, slots: int) -> int:
    """The budget that leaves exactly `slots` expert slots (fp32 tiny models; no overhead reserved)."""
    base = minimum_budget(store, MAX_CONTEXT, overhead=0)
    top_k = plan_for_store(store, base, MAX_CONTEXT, overhead=0).num_slots
    record = plan_for_store(store, base, MAX_CONTEXT, overhead=0).record_bytes
    return base + (slots - top_k) * record


# The offload path computes the same math as the eager experts, but splits gate/up and skips dead neurons, so
# fp32 sums differ from the resident model in the last bits: the comparison is run in fp32 (see the README).
@pytest.mark.parametrize(
    "preset,slots,speculative,policy,new_tokens",
    [
        ("tiny-4b-style", 2, False, "lru", NEW_TOKENS),  # 2 slots = one layer's top-k, the minimum
        ("tiny-21b-style", 2, True, "lru", NEW_TOKENS),
        ("tiny-4b-style", 4, True, "lfu", 64),  # one expert per layer
        ("tiny-21b-style", 32, False, "lru", 64),  # every expert fits
    ],
)
def test_greedy_generation_matches_resident(tiny, preset, slots, speculative, policy, new_tokens):
    store = tiny[preset][2]
    model = load_offloaded(
        store,
        memory_budget=_budget_for_slots(store, slots),
        max_context=MAX_CONTEXT,
        overhead=0,
        speculative=speculative,
        policy=policy,
        sparse_threshold=0.5,
    )
    engine = model.offload_engine
    assert engine.cache.num_slots == slots
    out = _generate(model, new_tokens)
    assert torch.equal(out, _reference(tiny, preset)[:, : PROMPT.shape[1] + new_tokens])
    stats = engine.stats()
    assert stats["tokens"] == PROMPT.shape[1] + new_tokens - 1
    assert stats["bytes_read"] == stats["loads"] * engine.cache.record_bytes
    if slots == 32:  # everything fits: each expert is read at most once
        assert stats["loads"] <= 32 and stats["hit_rate"] > 0.9
    else:
        assert stats["loads"] > 32 and 0.0 <= stats["hit_rate"] < 1.0
    engine.close()


def test_dense_and_int8_paths(tiny):
    preset = "tiny-4b-style"
    dense = load_offloaded(tiny[preset][2], memory_budget="1GB", max_context=MAX_CONTEXT, sparse=False)
    assert dense.offload_engine.sparse_threshold == 0.0
    assert torch.equal(_generate(dense, 64), _reference(tiny, preset)[:, : PROMPT.shape[1] + 64])

    int8 = load_offloaded(tiny[preset][3], memory_budget="1GB", max_context=MAX_CONTEXT)
    with torch.no_grad():
        ref_logits = tiny[preset][0](PROMPT).logits
        q_logits = int8(PROMPT).logits
    rel = (q_logits - ref_logits).norm() / ref_logits.norm()
    assert rel < 0.05, f"int8 logits deviate by {rel:.3f} (relative L2)"
    assert (q_logits.argmax(-1) == ref_logits.argmax(-1)).float().mean() >= 0.75


def test_budget_below_minimum_states_the_minimum(tiny):
    store = tiny["tiny-21b-style"][2]
    minimum = minimum_budget(store, MAX_CONTEXT, overhead=0)
    with pytest.raises(MemoryBudgetError, match=rf"minimum is .*\({minimum} bytes\)"):
        load_offloaded(store, memory_budget=minimum - 1, max_context=MAX_CONTEXT, overhead=0)
    model = load_offloaded(store, memory_budget=minimum, max_context=MAX_CONTEXT, overhead=0)
    assert model.offload_engine.cache.num_slots == model.config.moe_num_active_primary_experts


def test_repeated_threaded_runs_are_identical(tiny):
    """Four I/O threads, speculative reads and the smallest pool, many times: no run may differ."""
    preset = "tiny-21b-style"
    store = tiny[preset][2]
    model = load_offloaded(
        store,
        memory_budget=_budget_for_slots(store, 3),
        max_context=MAX_CONTEXT,
        overhead=0,
        io_threads=4,
        speculative=True,
        sparse_threshold=0.5,
    )
    expected = _reference(tiny, preset)[:, : PROMPT.shape[1] + 24]
    for _ in range(8):
        assert torch.equal(_generate(model, 24), expected)
    assert model.offload_engine.stats()["speculative_loads"] > 0
