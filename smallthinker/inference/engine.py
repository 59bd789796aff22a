"""``load_offloaded``: a SmallThinkerForCausalLM whose experts live on disk behind a fixed-size cache.

How it plugs into the unchanged model:

- a forward hook on each layer's ``primary_router`` sees the routing before attention runs, takes the same
  top-k the MoE block will take, pins those experts in the cache and starts background reads for the
  missing ones (optionally also a speculative read of the next layer's experts, scored with the next
  router on the current layer input: the residual stream changes little from one layer to the next);
- each ``block_sparse_moe.experts`` module is replaced by ``OffloadedExperts`` (same forward signature),
  which waits only for reads that have not finished, computes the experts from the cache slots (neuron-sparse
  for a single token) and unpins them.

Everything else (embeddings, attention, norms, routers, head) is resident, so ``generate()``, chat templates
and lm-eval work on the returned model as on a resident one.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from smallthinker.inference.cache import CacheStats, ExpertCache
from smallthinker.inference.decoder import enable_native_decode
from smallthinker.inference.formats import quantize_model
from smallthinker.inference.sparse import (
    DEFAULT_SPARSE_THRESHOLD,
    calibrate_sparse_threshold,
    reglu_decode,
    reglu_dense,
)
from smallthinker.inference.stats import current_rss_bytes, peak_rss_bytes
from smallthinker.inference.store import RESIDENT_FILE, ExpertStore, load_resident, resident_size
from smallthinker.modeling import SmallThinkerConfig, SmallThinkerForCausalLM
from smallthinker.modeling.modeling_smallthinker import reset_rope, top_k_experts
from smallthinker.modeling.sizes import kv_cache_bytes

DEFAULT_OVERHEAD = "128MiB"  # activations, logits, routing and allocator slack reserved inside the budget
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
}


class MemoryBudgetError(ValueError):
    """The memory budget cannot hold the resident weights, the KV cache and one layer's experts."""


def parse_bytes(size: str | int) -> int:
    """``"1GB"`` -> 10**9, ``"512MiB"`` -> 2**29, ``1234`` -> 1234."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(size))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {size!r} as a size; write e.g. 1GB, 2.5GiB, 512MB or a byte count")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


@dataclass(frozen=True)
class BudgetPlan:
    budget: int
    resident_bytes: int
    kv_bytes: int
    overhead_bytes: int
    record_bytes: int
    num_slots: int


def plan_budget(
    budget: int, resident: int, kv: int, overhead: int, record: int, top_k: int, total_experts: int
) -> BudgetPlan:
    """Slots = what the budget leaves after resident weights, KV cache and overhead, at least one layer's top-k."""
    minimum = resident + kv + overhead + top_k * record
    if budget < minimum:
        raise MemoryBudgetError(
            f"memory budget {_mb(budget)} is too small: the minimum is {_mb(minimum)} ({minimum} bytes) = "
            f"resident weights {_mb(resident)} + KV cache {_mb(kv)} + overhead {_mb(overhead)} "
            f"+ one layer's {top_k} experts {_mb(top_k * record)}. "
            "Raise --memory-budget, lower --max-context, or use an int8 store."
        )
    slots = min((budget - resident - kv - overhead) // record, total_experts)
    return BudgetPlan(budget, resident, kv, overhead, record, int(slots))


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def plan_for_store(
    path: str | os.PathLike,
    memory_budget: str | int,
    max_context: int = 4096,
    overhead: str | int = DEFAULT_OVERHEAD,
) -> BudgetPlan:
    """The slot plan ``load_offloaded`` would use (raises ``MemoryBudgetError`` with the minimum)."""
    path = Path(path)
    store = ExpertStore(path, direct=False)
    config = SmallThinkerConfig.from_pretrained(path)
    resident, dtype = resident_size(path / RESIDENT_FILE)
    store.close()
    return plan_budget(
        parse_bytes(memory_budget),
        resident,
        kv_cache_bytes(config, max_context, bytes_per_value=dtype.itemsize),
        parse_bytes(overhead),
        store.record_bytes,
        config.moe_num_active_primary_experts,
        store.num_layers * store.num_experts,
    )


def minimum_budget(
    path: str | os.PathLike, max_context: int = 4096, overhead: str | int = DEFAULT_OVERHEAD
) -> int:
    """Smallest budget the store at ``path`` runs under: resident + KV + overhead + one layer's top-k experts."""
    try:
        plan_for_store(path, 0, max_context, overhead)
    except MemoryBudgetError as err:
        return int(re.search(r"\(([0-9]+) bytes\)", str(err)).group(1))
    raise AssertionError("a zero budget cannot fit")


class OffloadEngine:
    """Routing hooks, the expert cache and the expert compute of one offloaded model."""

    def __init__(
        self,
        model: SmallThinkerForCausalLM,
        cache: ExpertCache,
        prefetch: bool = True,
        speculative: bool = False,
        sparse_threshold: float = DEFAULT_SPARSE_THRESHOLD,
    ) -> None:
        config = model.config
        self.cache, self.prefetch, self.speculative = cache, prefetch, speculative
        self.sparse_threshold = sparse_threshold
        self.top_k, self.num_experts = config.moe_num_active_primary_experts, config.moe_num_primary_experts
        self.routers = [layer.block_sparse_moe.primary_router for layer in model.model.layers]
        self._pinned: dict[int, list[int]] = {}
        self._hooks = []
        if prefetch:
            for i, router in enumerate(self.routers):
                self._hooks.append(router.register_forward_hook(self._router_hook(i)))
        self.plan: BudgetPlan | None = None
        self.reset_stats()

    def reset_stats(self) -> None:
        self.cache.stats = CacheStats()
        self.tokens, self.moe_s = 0, 0.0

    def _top_experts(self, logits_TE: torch.Tensor) -> list[int]:
        """Distinct experts of the top-k (same call as the MoE block's), ascending, capped at the slot count."""
        index_TK = top_k_experts(logits_TE, self.top_k)[1]
        return torch.unique(index_TK).tolist()[: self.cache.num_slots]

    def _router_hook(self, layer: int):
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], logits: torch.Tensor) -> None:
            with torch.no_grad():
                experts = self._top_experts(logits.reshape(-1, self.num_experts))
                self.cache.release(layer, self._pinned.pop(layer, []))  # a forward that never reached the MoE
                self.cache.acquire(layer, experts)
                self._pinned[layer] = experts
                if self.speculative and layer + 1 < len(self.routers):
                    x_TH = args[0].reshape(-1, args[0].shape[-1])
                    next_logits_TE = nn.functional.linear(x_TH, self.routers[layer + 1].weight)
                    self.cache.prefetch(layer + 1, self._top_experts(next_logits_TE))

        return hook

    def experts_forward(
        self, layer: int, x_TH: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """Same math as ``SmallThinkerExperts.forward`` (ascending experts, accumulation in x's dtype)."""
        start = time.perf_counter()
        if layer == 0:
            self.tokens += x_TH.shape[0]
        out_TH = torch.zeros_like(x_TH)
        experts = torch.unique(top_k_index).tolist()
        pinned = self._pinned.pop(layer, [])
        slots = self.cache.num_slots
        # More distinct experts than slots (long prefill, tiny budget): compute them in slot-sized rounds.
        for first in range(0, len(experts), slots):
            chunk = experts[first : first + slots]
            if chunk != pinned:
                self.cache.release(layer, pinned)
                self.cache.acquire(layer, chunk)
            pinned = []
            try:
                for expert in chunk:
                    self._add_expert(layer, expert, x_TH, top_k_index, top_k_weights, out_TH)
            finally:
                self.cache.release(layer, chunk)
        self.moe_s += time.perf_counter() - start
        return out_TH

    def _add_expert(self, layer, expert, x_TH, top_k_index, top_k_weights, out_TH) -> None:
        w = self.cache.get(layer, expert)
        token_idx, k_pos = torch.where(top_k_index == expert)
        x = x_TH[token_idx]
        if x.shape[0] == 1 and self.sparse_threshold > 0:
            y = reglu_decode(x, w, self.sparse_threshold)
        else:
            y = reglu_dense(x, w)
        y = y * top_k_weights[token_idx, k_pos, None]
        out_TH.index_add_(0, token_idx, y.to(out_TH.dtype))

    def native_layer(self, decoder, layer: int, pos: int) -> None:
        """One layer of a native decode step (`decoder.NativeDecoder`): route, pin the experts and start their
        reads, run attention while they load (after it, without `prefetch`), then the experts from their slots."""
        experts = decoder.route(layer).tolist()
        pinned = sorted(experts)  # the order the router hook pins them in
        if not self.prefetch:
            decoder.attend(layer, pos)
        self.cache.acquire(layer, pinned)
        if self.speculative and layer + 1 < len(self.routers):
            next_logits = nn.functional.linear(decoder.hidden(), self.routers[layer + 1].weight)
            self.cache.prefetch(layer + 1, self._top_experts(next_logits))
        if self.prefetch:
            decoder.attend(layer, pos)
        start = time.perf_counter()
        if layer == 0:
            self.tokens += 1
        try:
            records = [self.cache.get(layer, e) for e in experts]
            decoder.moe_with([t for w in records for t in record_tensors(w)], "down_t" in records[0])
        finally:
            self.cache.release(layer, pinned)
        self.moe_s += time.perf_counter() - start

    def stats(self) -> dict[str, float]:
        """Cache hit rate, bytes read per token, I/O wait vs compute time, prefetch hits, peak RSS."""
        s = self.cache.stats
        demanded = max(s.hits + s.misses, 1)
        tokens = max(self.tokens, 1)
        return {
            "tokens": self.tokens,
            "cache_slots": self.cache.num_slots,
            "hit_rate": s.hits / demanded,
            "prefetch_hits": s.prefetch_hits,
            "speculative_loads": s.speculative_loads,
            "loads": s.loads,
            "bytes_read": s.bytes_read,
            "bytes_per_token": s.bytes_read / tokens,
            "io_wait_s": s.io_wait_s,
            "read_s": s.read_s,
            "moe_compute_s": self.moe_s - s.io_wait_s,
            "sparse_threshold": self.sparse_threshold,
            "peak_rss_bytes": peak_rss_bytes(),
            "rss_bytes": current_rss_bytes(),
        }

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self.cache.close()


def record_tensors(w: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """An expert record's matrices as the native decoder takes them: gate, its aux, up, its aux, down, its aux."""
    empty = torch.empty(0)
    if "gate_q4" in w:
        return [w[n] for n in ("gate_q4", "gate_sz", "up_q4", "up_sz", "down_q4", "down_sz")]
    if "gate_q" in w:
        return [w[n] for n in ("gate_q", "gate_scale", "up_q", "up_scale", "down_q", "down_scale")]
    return [w["gate"], empty, w["up"], empty, w["down_t"], empty]


class OffloadedExperts(nn.Module):
    """Drop-in for ``SmallThinkerExperts``: forward(hidden_states [T,H], top_k_index [T,K], top_k_weights [T,K])."""

    def __init__(self, engine: OffloadEngine, layer_idx: int) -> None:
        super().__init__()
        self.engine = engine  # plain attribute: the engine is not a module and holds no parameters
        self.layer_idx = layer_idx

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        return self.engine.experts_forward(self.layer_idx, hidden_states, top_k_index, top_k_weights)

    def extra_repr(self) -> str:
        return f"layer={self.layer_idx}, offloaded"


def load_offloaded(
    path: str | os.PathLike,
    memory_budget: str | int = "1GB",
    max_context: int = 4096,
    overhead: str | int = DEFAULT_OVERHEAD,
    policy: str = "lru",
    io_threads: int = 2,
    prefetch: bool = True,
    speculative: bool = False,
    sparse: bool = True,
    sparse_threshold: float | None = None,
    verify: bool = True,
    direct: bool = True,
    weight_format: str | None = None,
    native_decode: bool = True,
) -> SmallThinkerForCausalLM:
    """Load a store written by ``convert_checkpoint`` under ``memory_budget``; ``model.offload_engine.stats()``.

    ``max_context`` sizes the KV-cache reservation; ``overhead`` is reserved for activations and logits.
    ``sparse_threshold`` (live-neuron fraction) is measured on this machine when not given; ``sparse=False``
    always computes experts densely. ``verify`` checks each expert's crc32 the first
    time it is read. ``weight_format`` ("bf16", "int8", "int4": the store's expert format) also converts the
    attention projections and the LM head, so the model equals the resident ``formats.quantize_model(model, fmt)``;
    None leaves them as stored. With a `weight_format` and the native kernels (and `native_decode`), single-token
    steps run natively (`decoder.NativeDecoder`), the engine bringing each layer's experts in during its attention.
    """
    path = Path(path)
    plan = plan_for_store(path, memory_budget, max_context, overhead)  # fail fast, before allocating
    store = ExpertStore(path, direct=direct)
    if weight_format is not None:
        _check_weight_format(weight_format, store)
    config = SmallThinkerConfig.from_pretrained(path)
    resident = load_resident(path / RESIDENT_FILE)
    with torch.device("meta"):
        model = SmallThinkerForCausalLM(config)
    cache = ExpertCache(store, plan.num_slots, policy=policy, io_threads=io_threads, verify=verify)
    if not sparse:
        threshold = 0.0
    elif sparse_threshold is None:
        threshold = calibrate_sparse_threshold(cache._views[0])
    else:
        threshold = sparse_threshold
    engine = OffloadEngine(model, cache, prefetch, speculative, threshold)
    engine.plan = plan
    for i, layer in enumerate(model.model.layers):
        layer.block_sparse_moe.experts = OffloadedExperts(engine, i)
    _materialize(model, resident)
    if weight_format is not None:
        quantize_model(model, weight_format)
        # Single-token steps in one native pass per layer, the experts coming from the cache (when built here).
        if native_decode and enable_native_decode(model, engine.native_layer):
            model.native_decoder.impl.set_sparse_threshold(threshold)
    model.offload_engine = engine
    return model.eval()


def _check_weight_format(weight_format: str, store: ExpertStore) -> None:
    expected = "bf16" if store.quant == "none" else store.quant
    if weight_format != expected or store.dtype != torch.bfloat16:
        raise ValueError(
            f"weight_format={weight_format!r} does not match the store at {store.path} ({store.quant} experts, "
            f"{store.dtype}); convert a bf16 checkpoint with --quant "
            f"{'none' if weight_format == 'bf16' else weight_format} for it, or pass weight_format={expected!r}"
        )


def _materialize(model: SmallThinkerForCausalLM, resident: dict[str, torch.Tensor]) -> None:
    """Move the meta-device skeleton onto the resident tensors (no copies) and rebuild computed buffers."""
    result = model.load_state_dict(resident, strict=False, assign=True)
    tied = model.config.tie_word_embeddings
    missing = [k for k in result.missing_keys if not (tied and k == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"resident weights do not match the model: missing {missing[:10]}, unexpected "
            f"{result.unexpected_keys[:10]}; was the store converted from a SmallThinker checkpoint?"
        )
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    reset_rope(model)  # computed buffers: still on the meta device after loading
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        raise ValueError(f"tensors left without weights after loading the store: {still_meta[:10]}")
