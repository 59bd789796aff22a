"""Routing traces for offload benchmarks: recorded from a model, or drawn from a documented distribution, and
replayed through any model of the same depth; plus a cache simulator that predicts hit rate, bytes read and
tokens/s from a trace.

Random weights route almost uniformly and keep picking the experts they picked before, which says little
about real decoding. A trace fixes which experts each token uses in each layer:
- `record_trace(model, ids)`: the experts a (trained) model picks, token by token.
- `synthetic_trace(...)`: per layer, experts are popular by a Zipf law of exponent `skew` over a random order of
  the experts (0 = uniform); each token keeps each of the previous token's experts with probability `reuse`
  and draws the rest by popularity. `fit_trace_statistics` measures both from a recorded trace, so a trace of
  a small trained model can be re-drawn at the 4B's shapes.
- `replay_trace(model, trace)`: forward hooks that make every router pick the trace's experts (the hooks run
  before the offload engine's, which then prefetches exactly those).
- `simulate_cache(trace, slots, ...)`: the engine's slot cache (same eviction policies) run on the trace alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from smallthinker.inference.cache import POLICIES
from smallthinker.modeling.modeling_smallthinker import top_k_experts

Trace = torch.Tensor  # [tokens, layers, k] expert ids, int64


@torch.no_grad()
def record_trace(model: nn.Module, input_ids: torch.Tensor) -> Trace:
    """The top-k experts of every token of `input_ids` [1, S] in every layer of `model`."""
    picks: dict[int, torch.Tensor] = {}
    k = model.config.moe_num_active_primary_experts

    def hook(layer: int):
        def record(module: nn.Module, args: tuple, logits: torch.Tensor) -> None:
            picks[layer] = top_k_experts(logits.reshape(-1, logits.shape[-1]), k)[1]

        return record

    routers = [layer.block_sparse_moe.primary_router for layer in model.model.layers]
    handles = [r.register_forward_hook(hook(i)) for i, r in enumerate(routers)]
    try:
        model(input_ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return torch.stack([picks[i] for i in range(len(routers))], dim=1).sort(dim=-1).values


def synthetic_trace(
    tokens: int, layers: int, experts: int, k: int, skew: float, reuse: float, seed: int = 0
) -> Trace:
    """Experts per token and layer: Zipf(`skew`) popularity per layer, each previous expert kept with
    probability `reuse` (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, experts + 1, dtype=torch.float64)
    popularity = ranks.pow(-skew)
    weights = [popularity[torch.randperm(experts, generator=gen)] for _ in range(layers)]
    out = torch.empty(tokens, layers, k, dtype=torch.long)
    for layer in range(layers):
        previous: list[int] = []
        for t in range(tokens):
            keep = [e for e in previous if torch.rand((), generator=gen).item() < reuse]
            fresh: list[int] = []
            if len(keep) < k:
                w = weights[layer].clone()
                w[keep] = 0
                fresh = torch.multinomial(w, k - len(keep), replacement=False, generator=gen).tolist()
            previous = sorted(keep + fresh)
            out[t, layer] = torch.tensor(previous)
    return out


@dataclass(frozen=True)
class TraceStatistics:
    skew: float  # Zipf exponent fitted to the per-layer expert popularity (0 = uniform)
    reuse: float  # share of a token's experts that the previous token also used, beyond chance
    top_share: float  # share of assignments that go to the most popular quarter of the experts


def fit_trace_statistics(trace: Trace, experts: int) -> TraceStatistics:
    """Popularity skew and token-to-token reuse of a trace, the parameters of `synthetic_trace`."""
    tokens, layers, k = trace.shape
    counts = torch.zeros(layers, experts)
    for layer in range(layers):
        counts[layer] = torch.bincount(trace[:, layer].reshape(-1), minlength=experts).float()
    share = (counts / counts.sum(-1, keepdim=True)).sort(dim=-1, descending=True).values.mean(0)
    ranks = torch.arange(1, experts + 1, dtype=torch.float32)
    live = share > 0
    # Least squares on log share = -skew * log rank + c over the experts that were used.
    x, y = ranks[live].log(), share[live].log()
    skew = float(-((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum().clamp_min(1e-12))
    same = (
        (trace[1:, :, :, None] == trace[:-1, :, None, :]).any(-1).float().mean().item() if tokens > 1 else 0.0
    )
    chance = k / experts
    reuse = max(0.0, (same - chance) / (1 - chance))
    return TraceStatistics(
        skew=max(skew, 0.0), reuse=reuse, top_share=float(share[: max(1, experts // 4)].sum())
    )


@contextmanager
def replay_trace(model: nn.Module, trace: Trace) -> Iterator[None]:
    """Every router of `model` picks the trace's experts: token t of the next forwards (counted across calls, so
    prefill then decode steps follow the trace) gets trace[t]; the logits keep their real values elsewhere."""
    position = {"next": 0}
    routers = [layer.block_sparse_moe.primary_router for layer in model.model.layers]

    def hook(layer: int):
        def force(module: nn.Module, args: tuple, logits: torch.Tensor) -> torch.Tensor:
            flat = logits.reshape(-1, logits.shape[-1])
            start = position["next"]
            rows = torch.arange(start, start + flat.shape[0]) % trace.shape[0]
            picks = trace[rows, layer]  # [T, k]
            # Above every real logit, in the trace's order: the top-k are exactly the trace's experts.
            lifted = flat.detach().amax(-1, keepdim=True) + 1 + torch.arange(picks.shape[1], 0, -1).to(flat)
            forced = flat.scatter(1, picks.to(flat.device), lifted)
            if layer == len(routers) - 1:
                position["next"] = start + flat.shape[0]
            return forced.reshape(logits.shape)

        return force

    handles = [r.register_forward_hook(hook(i), prepend=True) for i, r in enumerate(routers)]
    # A model with the native decode step routes inside it: hand it each token's picks before the step.
    decoder = getattr(model, "native_decoder", None)
    if decoder is not None:
        native_step = decoder.step

        def step(token: int, cache) -> torch.Tensor:
            decoder.impl.force_routing(trace[position["next"] % trace.shape[0]].long())
            position["next"] += 1
            return native_step(token, cache)

        decoder.step = step
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        if decoder is not None:
            del decoder.step  # the class's method again
            decoder.impl.force_routing(torch.empty(0, dtype=torch.long))


@dataclass(frozen=True)
class SimulatedCache:
    slots: int
    hit_rate: float
    loads_per_token: float


def simulate_cache(trace: Trace, slots: int, policy: str = "lru", warmup_tokens: int = 0) -> SimulatedCache:
    """The offload engine's slot cache on a trace: per layer the token's experts are pinned (so never evicted
    while in use), missing ones take a free slot or evict by `policy`. Tokens before `warmup_tokens` fill the
    cache but are not counted."""
    evict = POLICIES[policy]()
    resident: set[tuple[int, int]] = set()
    hits = misses = 0
    tokens, layers, _ = trace.shape
    for t in range(tokens):
        for layer in range(layers):
            pinned = {(layer, e) for e in trace[t, layer].tolist()}
            for key in sorted(pinned):
                if key in resident:
                    hits += t >= warmup_tokens
                else:
                    misses += t >= warmup_tokens
                    if len(resident) >= slots:
                        victim = evict.victim(resident - pinned)
                        if victim is None:
                            raise ValueError(f"{slots} slots cannot hold one layer's {len(pinned)} experts")
                        resident.discard(victim)
                        evict.remove(victim)
                    resident.add(key)
                evict.touch(key)
    counted = max(tokens - warmup_tokens, 1)
    return SimulatedCache(slots, hits / max(hits + misses, 1), misses / counted)
