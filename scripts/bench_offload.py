"""Decode speed of the offload engine on a random model with the 4B preset's shapes, against the resident model
and transformers/accelerate disk offload at the same memory budget.

Launch (one benchmark at a time on a shared machine; the 8 GB checkpoint and the stores are written once into
--workdir and reused):
    flock /tmp/smallthinker-bench.lock .venv/bin/python -m scripts.bench_offload --workdir /tmp/st-bench
    .venv/bin/python -m scripts.bench_offload --workdir /tmp/st-bench --only offload --memory-budget 2.6GB -v
    .venv/bin/python -m scripts.bench_offload --workdir /tmp/st-bench --only curve --plot offload_curve.png \
        --trace-from runs/quickstart/merged

Routing: random weights route almost uniformly and keep re-picking the same experts, so by default every router
is driven by a synthetic trace (`smallthinker.inference.routing`): per layer, expert popularity follows a Zipf law
of exponent --skew over a random order of the experts, and each token keeps each of the previous token's experts
with probability --reuse. --trace-from fits both to a trained checkpoint's own routing on held-out text;
--uniform-routing uses the random weights' routing instead. `--only curve` sweeps budgets holding 10-100 % of the
experts and writes hit rate, MB read per token and tok/s against the budget (PNG), beside the cache simulator's
prediction from the trace and the measured disk speed. Random weights leave ~50 % of ReGLU neurons alive
(trained SmallThinker weights: 60-90 % dead), so the gain of neuron sparsity measured here is the pessimistic end.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import AutoModelForCausalLM
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME

from smallthinker.inference import (
    ExpertStore,
    convert_checkpoint,
    load_offloaded,
    native,
    parse_bytes,
    plan_for_store,
)
from smallthinker.inference.decoder import decode_cache
from smallthinker.inference.io import ALIGNMENT, DirectFile, align_up, aligned_buffer, measure_read_bandwidth
from smallthinker.inference.quality import load_token_sequences
from smallthinker.inference.routing import (
    fit_trace_statistics,
    record_trace,
    replay_trace,
    simulate_cache,
    synthetic_trace,
)
from smallthinker.inference.stats import format_stats, isa_flags
from smallthinker.inference.store import MANIFEST
from smallthinker.modeling import load_model_config
from smallthinker.modeling.modeling_smallthinker import (
    EXPERT_PROJECTIONS,
    expert_tensor_name,
    official_tensor_shapes,
)

PROMPT_LEN = 16
WARMUP = 3  # decode steps before the measured ones
IO_THREADS = 2  # load_offloaded's default
MAX_CONTEXT = 128  # KV reservation in the budget: prompt + warm-up + measured tokens fit
OVERHEAD = "256MiB"


def write_random_checkpoint(
    path: Path,
    preset: str = "smallthinker-4b",
    seed: int = 0,
    gate_sparsity: float | None = None,
    **overrides,
) -> Path:
    """Official file layout, bf16 weights N(0, 0.02), one shard per layer (skipped when already there).

    `gate_sparsity` (e.g. 0.8) makes the ReGLU gates about that sparse, as trained SmallThinker experts are: the
    embedding gets a large constant channel 0, which dominates the residual stream (values and `up` ignore it, so
    no layer adds noise of its size), RMSNorm turns it into a large positive input feature, and every gate row
    gets a negative weight on it: a bias that puts that share of the gate's pre-activations below zero. Measure
    the sparsity reached (`train.metrics.neuron_sparsity`); this sets it only roughly.
    """
    if (path / SAFE_WEIGHTS_INDEX_NAME).exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    config = load_model_config(preset, **overrides)
    config.dtype = torch.bfloat16
    config.save_pretrained(path)
    gen = torch.Generator().manual_seed(seed)
    std, h = config.initializer_range, config.hidden_size

    def init(shape: tuple[int, ...]) -> torch.Tensor:  # norms are ones, matrices N(0, initializer_range)
        if len(shape) == 1:
            return torch.ones(shape, dtype=torch.bfloat16)
        return (torch.randn(*shape, generator=gen) * std).to(torch.bfloat16)

    bias_weight, channel = None, 30.0
    if gate_sparsity is not None:
        # RMSNorm of (C, N(0, std^2) ...): channel 0 -> x0, the others ~ N(0, xr^2); a gate row w has w.x ~
        # -b * x0 + N(0, (std * xr)^2 * (h - 1)): P(w.x <= 0) = gate_sparsity at b = z * std * xr * sqrt(h-1) / x0.
        rms = ((channel**2 + std**2 * (h - 1)) / h) ** 0.5
        x0, xr = channel / rms, std / rms
        z = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(gate_sparsity)).item()
        bias_weight = z * std * xr * (h - 1) ** 0.5 / x0

    def tensor(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        t = init(shape)
        if bias_weight is None:
            return t
        if name == "model.embed_tokens.weight":
            t[:, 0] = channel
        elif name.endswith(".gate.weight"):
            t[:, 0] = -bias_weight
        elif name.endswith((".up.weight", ".v_proj.weight")):
            t[:, 0] = 0.0
        return t

    # Every tensor of an official file, one shard per layer plus one for the rest.
    shards: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, shape in official_tensor_shapes(config).items():
        parts = name.split(".")
        shard = f"model-layer{int(parts[2]):02d}" if parts[1] == "layers" else "model-embed"
        shards.setdefault(f"{shard}.safetensors", {})[name] = shape
    weight_map = {}
    for shard, shapes in tqdm(sorted(shards.items()), desc="random checkpoint", unit="shard"):
        save_file(
            {n: tensor(n, shape) for n, shape in shapes.items()}, str(path / shard), metadata={"format": "pt"}
        )
        weight_map.update(dict.fromkeys(shapes, shard))
    index = {"metadata": {}, "weight_map": weight_map}
    (path / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index))
    return path


def ensure_store(ckpt: Path, dst: Path, quant: str) -> Path:
    if not (dst / MANIFEST).exists():
        convert_checkpoint(ckpt, dst, quant=quant)
    return dst


def drop_page_cache(paths: list[Path]) -> None:
    """posix_fadvise(DONTNEED) on every file: the kernel forgets their cached pages (no root needed)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


@torch.no_grad()
def decode_tokens_per_s(model, tokens: int, warmup: int = 2, between=None, on_warm=None) -> float:
    """Greedy batch-1 decode with a KV cache; times ``tokens`` single-token forwards after ``warmup`` ones."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 1000, (1, PROMPT_LEN), generator=gen)
    cache = decode_cache(model)  # what generate() uses: the native step's buffers where it has one
    logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
    start = None
    for step in range(warmup + tokens):
        if step == warmup:
            if on_warm is not None:
                on_warm()
            start = time.perf_counter()
        if between is not None:
            between()
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        logits = model(input_ids=nxt, past_key_values=cache, use_cache=True).logits
    return tokens / (time.perf_counter() - start)


def measure_machine(store: ExpertStore) -> dict[str, float]:
    """Disk (O_DIRECT, 4 MiB requests), memory read and PyTorch bf16 GEMV bandwidth, in bytes/s."""
    disk = measure_read_bandwidth(DirectFile(store.path / "experts.bin"), 1 << 30)
    big = torch.ones(1 << 28)  # 1 GiB fp32
    big.sum()
    start = time.perf_counter()
    for _ in range(3):
        big.sum()
    mem = 3 * big.numel() * 4 / (time.perf_counter() - start)
    w = torch.randn(151936, 1536).to(torch.bfloat16)
    x = torch.randn(1, 1536).to(torch.bfloat16)
    torch.nn.functional.linear(x, w)
    start = time.perf_counter()
    for _ in range(3):
        torch.nn.functional.linear(x, w)
    gemv = 3 * w.numel() * 2 / (time.perf_counter() - start)
    del big, w
    return {"disk_bw": disk, "mem_read_bw": mem, "gemv_bf16_bw": gemv}


def _tensor_spans(shard: Path) -> dict[str, tuple[int, int]]:
    """Absolute byte range of every tensor in a safetensors file (from its header)."""
    with open(shard, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    header.pop("__metadata__", None)
    return {
        n: (8 + header_len + i["data_offsets"][0], 8 + header_len + i["data_offsets"][1])
        for n, i in header.items()
    }


def compare_expert_reads(store: ExpertStore, ckpt: Path, samples: int = 48) -> dict[str, float]:
    """Useful GB/s reading random experts with O_DIRECT: one aligned store record vs the three tensors of the
    safetensors shard (each read as its 4 KiB-aligned enclosing span, since O_DIRECT needs alignment)."""
    gen = torch.Generator().manual_seed(1)
    picks = [
        (
            int(torch.randint(store.num_layers, (1,), generator=gen)),
            int(torch.randint(store.num_experts, (1,), generator=gen)),
        )
        for _ in range(samples)
    ]
    index = json.loads((ckpt / SAFE_WEIGHTS_INDEX_NAME).read_text())["weight_map"]
    mm, buf = aligned_buffer(2 * store.record_bytes)
    useful = 3 * store.manifest["ffn_size"] * store.manifest["hidden_size"] * 2
    start = time.perf_counter()
    for layer, j in picks:
        store.read(layer, j, buf[: store.record_bytes], verify=False)
    store_s = time.perf_counter() - start
    files, spans = {}, {}
    start = time.perf_counter()
    for layer, j in picks:
        for name in EXPERT_PROJECTIONS:
            key = expert_tensor_name(layer, j, name)
            shard = ckpt / index[key]
            if shard not in files:
                files[shard], spans[shard] = DirectFile(shard), _tensor_spans(shard)
            lo, hi = spans[shard][key]
            lo_aligned, hi_aligned = lo // ALIGNMENT * ALIGNMENT, align_up(hi)
            files[shard].read_into(memoryview(buf[: hi_aligned - lo_aligned].numpy()), lo_aligned, key)
    st_s = time.perf_counter() - start
    for f in files.values():
        f.close()
    del buf, mm
    return {"store_GBps": samples * useful / store_s / 1e9, "safetensors_GBps": samples * useful / st_s / 1e9}


def active_bytes_per_token(store: ExpertStore, config) -> int:
    """Weights a dense decode step touches: resident (minus the embedding table, one row of it) + top-k experts."""
    resident = os.path.getsize(store.path / "resident.safetensors")
    embed = config.vocab_size * config.hidden_size * 2
    if not config.tie_word_embeddings:
        resident -= embed  # the embedding table is only indexed; the untied head is read in full
    experts = config.num_hidden_layers * config.moe_num_active_primary_experts * store.record_bytes
    return resident + experts


def run_offloaded(
    name: str, store: Path, budget: int, tokens: int, verbose: bool, machine, trace=None, **kwargs
) -> dict:
    """Decode under `budget`; with a routing `trace` every router picks the trace's experts. Attention, routers
    and head run in the store's format with the resident model's decode kernels (`weight_format`), as in chat."""
    opened = ExpertStore(store)
    quant = opened.quant
    opened.close()
    kwargs.setdefault("weight_format", "bf16" if quant == "none" else quant)
    model = load_offloaded(store, memory_budget=budget, max_context=MAX_CONTEXT, overhead=OVERHEAD, **kwargs)
    engine = model.offload_engine
    with replay_trace(model, trace) if trace is not None else contextlib.nullcontext():
        tps = decode_tokens_per_s(model, tokens, warmup=WARMUP, on_warm=engine.reset_stats)
    stats = engine.stats()
    ex = engine.cache.store
    compute_s = active_bytes_per_token(ex, model.config) / machine["mem_read_bw"]
    io_s = stats["bytes_per_token"] / machine["disk_bw"]
    row = {
        "config": name,
        "tok_s": tps,
        "hit_rate": stats["hit_rate"],
        "MB_per_token": stats["bytes_per_token"] / 1e6,
        "io_wait_ms_per_token": 1e3 * stats["io_wait_s"] / max(stats["tokens"], 1),
        "roofline_tok_s": 1 / max(compute_s, io_s),
        "slots": engine.cache.num_slots,
        "peak_rss_GB": stats["peak_rss_bytes"] / 1e9,
    }
    row["of_roofline"] = row["tok_s"] / row["roofline_tok_s"]
    row["loads_per_token"] = stats["loads"] / max(stats["tokens"], 1)
    # Read rate of one I/O thread while it reads (the threads read in parallel), and compute time per token.
    row["read_GBps_per_thread"] = stats["bytes_read"] / max(stats["read_s"], 1e-9) / 1e9
    row["compute_ms_per_token"] = 1e3 / tps - row["io_wait_ms_per_token"]
    if verbose:
        print(f"--- {name}\n{format_stats(stats)}")
    engine.close()
    del model, engine
    gc.collect()
    return row


def run_resident(ckpt: Path, tokens: int, machine, store: ExpertStore) -> dict:
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16).eval()
    tps = decode_tokens_per_s(model, tokens)
    roof = machine["mem_read_bw"] / active_bytes_per_token(store, model.config)
    row = {"config": f"resident ({model.config._experts_implementation} experts)", "tok_s": tps}
    row.update(roofline_tok_s=roof, of_roofline=tps / roof)
    del model
    gc.collect()
    return row


def run_accelerate(ckpt: Path, budget: int, tokens: int, workdir: Path) -> dict:
    folder = workdir / "accelerate-offload"
    model = AutoModelForCausalLM.from_pretrained(
        ckpt,
        dtype=torch.bfloat16,
        device_map="auto",
        max_memory={"cpu": budget},
        offload_folder=str(folder),
    ).eval()
    on_disk = [p for p in folder.rglob("*") if p.is_file()]
    disk_modules = sum(1 for v in model.hf_device_map.values() if v == "disk")
    tps = decode_tokens_per_s(model, tokens, warmup=1, between=lambda: drop_page_cache(on_disk))
    row = {
        "config": f"accelerate disk offload ({disk_modules} modules on disk, page cache dropped)",
        "tok_s": tps,
    }
    del model
    gc.collect()
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", default="/tmp/smallthinker-bench", help="checkpoint and store cache dir")
    parser.add_argument("--preset", default="smallthinker-4b", help="shapes of the random checkpoint")
    parser.add_argument("--tokens", type=int, default=12, help="measured decode tokens per configuration")
    parser.add_argument("--accelerate-tokens", type=int, default=2)
    parser.add_argument(
        "--memory-budget", default=None, help="single offload run at this budget (e.g. 2.6GB)"
    )
    parser.add_argument(
        "--only", choices=["all", "offload", "resident", "accelerate", "curve", "sparsity"], default="all"
    )
    parser.add_argument(
        "--gate-sparsity", type=float, default=0.8, help="--only sparsity: target ReGLU sparsity"
    )
    parser.add_argument(
        "--sparsity-layers", type=int, default=8, help="--only sparsity: depth of its checkpoint"
    )
    parser.add_argument(
        "--skew", type=float, default=1.0, help="Zipf exponent of expert popularity per layer"
    )
    parser.add_argument(
        "--reuse", type=float, default=0.3, help="chance a token keeps a previous token's expert"
    )
    parser.add_argument(
        "--trace-from", default=None, help="trained checkpoint: fit skew and reuse to its routing"
    )
    parser.add_argument("--uniform-routing", action="store_true", help="the random weights' own routing")
    parser.add_argument(
        "--case", default=None, help="--only offload: run only the cases whose name contains this"
    )
    parser.add_argument("--plot", default="offload_curve.png", help="where --only curve writes its PNG")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; on a busy shared 2-core machine 2 OpenMP threads run 20x slower than 1",
    )
    parser.add_argument(
        "--trace-text",
        default="data/generated/synthetic/corpus/validation.jsonl",
        help="held-out text --trace-from routes",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="print the engine statistics of each run"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    print(
        f"ISA: {isa_flags()}; kernels: {native.describe()}; load average {os.getloadavg()[0]:.2f}", flush=True
    )
    if args.only == "sparsity":
        sparsity_rows(args, workdir)
        return
    ckpt = write_random_checkpoint(workdir / "checkpoint", args.preset)
    store_dir = ensure_store(ckpt, workdir / "store-bf16", "none")
    int8_dir = ensure_store(ckpt, workdir / "store-int8", "int8")
    store = ExpertStore(store_dir)
    machine = measure_machine(store)
    print({k: f"{v / 1e9:.2f} GB/s" for k, v in machine.items()})
    print("random expert reads, O_DIRECT, useful GB/s:", compare_expert_reads(store, ckpt), flush=True)

    base = plan_for_store(store_dir, "1TB", MAX_CONTEXT, OVERHEAD)
    fixed = base.resident_bytes + base.kv_bytes + base.overhead_bytes

    def budget(fraction: float) -> int:
        return int(fixed + fraction * store.expert_bytes_total)

    b25 = parse_bytes(args.memory_budget) if args.memory_budget else budget(0.25)
    config = load_model_config(args.preset)
    trace = (
        None if args.uniform_routing else routing_trace(args, config, PROMPT_LEN + WARMUP + args.tokens + 8)
    )
    if args.only == "curve":
        curve = budget_curve(args, store_dir, store, machine, budget, trace)
        cols = ["budget_GB", "slots", "tok_s", "sim_tok_s_low", "sim_tok_s_high", "hit_rate", "sim_hit_rate",
                "MB_per_token", "of_roofline"]  # fmt: skip
        print("\n| " + " | ".join(cols) + " |\n" + "|---" * len(cols) + "|")
        for r in curve:
            print("| " + " | ".join(f"{r[c]:.3g}" for c in cols) + " |")
        routing = "synthetic" if trace is not None else "the weights' own"
        title = f"{args.preset} shapes: offloaded decode vs memory budget ({routing} routing)"
        print(plot_curve(curve, Path(args.plot), title))
        return
    rows = []
    if args.only in ("all", "offload"):
        cases = [
            ("offload 25%, prefetch, sparse", store_dir, b25, {}),
            ("offload 25%, no prefetch, sparse", store_dir, b25, {"prefetch": False}),
            ("offload 25%, prefetch + speculative", store_dir, b25, {"speculative": True}),
            ("offload 25%, prefetch, dense experts", store_dir, b25, {"sparse": False}),
            ("offload 25%, prefetch, always neuron-sparse", store_dir, b25, {"sparse_threshold": 1.0}),
            ("offload 25% budget, int8 store", int8_dir, b25, {}),
            ("offload 25% budget, int4 store", workdir / "store-int4", b25, {}),
        ]
        if not args.memory_budget:
            cases.insert(1, ("offload 50%, prefetch, sparse", store_dir, budget(0.5), {}))
        cases = [c for c in cases if args.case is None or args.case in c[0]]
        for name, path, b, kw in cases:
            if name.endswith("int4 store"):
                ensure_store(ckpt, path, "int4")
            name = f"{name} [{b / 1e9:.2f} GB]"
            rows.append(run_offloaded(name, path, b, args.tokens, args.verbose, machine, trace, **kw))
            print(rows[-1], flush=True)
    if args.only in ("all", "resident"):
        rows.append(run_resident(ckpt, args.tokens, machine, store))
        print(rows[-1], flush=True)
    if args.only in ("all", "accelerate"):
        rows.append(run_accelerate(ckpt, b25, args.accelerate_tokens, workdir))
        print(rows[-1], flush=True)
    print_table(rows, machine)


def routing_trace(args: argparse.Namespace, config, tokens: int) -> torch.Tensor:
    """The decode benchmark's routing: drawn with the given skew and reuse, or with those fitted to a trained
    model's trace (`--trace-from`), at the benchmark model's shapes."""
    skew, reuse = args.skew, args.reuse
    if args.trace_from:
        model = AutoModelForCausalLM.from_pretrained(args.trace_from).eval()
        sequences = load_token_sequences(args.trace_from, args.trace_text, 8)
        fitted = [fit_trace_statistics(record_trace(model, ids), model.config.moe_num_primary_experts)
                  for ids in sequences]  # fmt: skip
        skew = sum(f.skew for f in fitted) / len(fitted)
        reuse = sum(f.reuse for f in fitted) / len(fitted)
        print(f"routing fitted to {args.trace_from}: skew {skew:.2f}, reuse {reuse:.2f}", flush=True)
    trace = synthetic_trace(
        tokens, config.num_hidden_layers, config.moe_num_primary_experts, config.moe_num_active_primary_experts,
        skew=skew, reuse=reuse, seed=0,
    )  # fmt: skip
    stats = fit_trace_statistics(trace, config.moe_num_primary_experts)
    print(f"routing trace: skew {stats.skew:.2f}, reuse {stats.reuse:.2f}, top quarter of the experts gets "
          f"{stats.top_share:.0%} of the assignments", flush=True)  # fmt: skip
    return trace


def budget_curve(args, store_dir: Path, store: ExpertStore, machine, budget, trace) -> list[dict]:
    """Real engine vs cache simulator over budgets holding 10-100 % of the experts, under the same trace."""
    rows = []
    for fraction in (0.1, 0.25, 0.5, 0.75, 1.0):
        b = budget(fraction)
        row = run_offloaded(
            f"{fraction:.0%} of experts", store_dir, b, args.tokens, args.verbose, machine, trace
        )
        sim = simulate_cache(trace[: PROMPT_LEN + WARMUP + args.tokens], row["slots"],
                             warmup_tokens=PROMPT_LEN + WARMUP)  # fmt: skip
        row.update(budget_GB=b / 1e9, fraction=fraction, sim_hit_rate=sim.hit_rate,
                   sim_loads_per_token=sim.loads_per_token)  # fmt: skip
        rows.append(row)
        print(row, flush=True)
    # Predicted tok/s from the simulated reads: compute time per token (the largest budget's, I/O waits removed)
    # and reads at the engine's own parallel read rate; reads overlap compute somewhere between not at all
    # (compute + I/O: the lower bound) and fully (max of the two: the upper bound).
    compute_s = rows[-1]["compute_ms_per_token"] / 1e3
    read_rates = [r["read_GBps_per_thread"] for r in rows if r["loads_per_token"] > 0]
    io_bw = sorted(read_rates)[len(read_rates) // 2] * 1e9 * IO_THREADS
    for row in rows:
        io_s = row["sim_loads_per_token"] * store.record_bytes / io_bw
        row["sim_tok_s_low"], row["sim_tok_s_high"] = 1 / (compute_s + io_s), 1 / max(compute_s, io_s)
        row["io_GBps"] = io_bw / 1e9
    return rows


def sparsity_rows(args: argparse.Namespace, workdir: Path) -> list[dict]:
    """Neuron-sparse vs dense expert compute, per store format, on a checkpoint whose gates are really sparse:
    MoE time per token against the ideal 1 / (1/3 + 2/3 * (1 - sparsity)) (gate dense, up and down on live rows)."""
    from smallthinker.train.metrics import neuron_sparsity

    layers = args.sparsity_layers
    ckpt = write_random_checkpoint(workdir / f"checkpoint-sparse{args.gate_sparsity}-{layers}l", args.preset,
                                   gate_sparsity=args.gate_sparsity, num_hidden_layers=layers)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16).eval()
    ids = torch.randint(100, 1000, (1, 64), generator=torch.Generator().manual_seed(0))
    zeros = neuron_sparsity(model, {"input_ids": ids})
    sparsity = sum(zeros) / len(zeros)
    ideal = 1 / (1 / 3 + 2 / 3 * (1 - sparsity))
    del model
    rows = []
    for quant in ("none", "int8", "int4"):
        store = ensure_store(ckpt, workdir / f"store-sparse{args.gate_sparsity}-{layers}l-{quant}", quant)
        measured = {}
        for mode, kwargs in (("dense", {"sparse": False}), ("sparse", {"sparse_threshold": 1.0})):
            model = load_offloaded(
                store,
                memory_budget="100GB",
                max_context=MAX_CONTEXT,
                overhead=OVERHEAD,
                weight_format="bf16" if quant == "none" else quant,  # as chat runs it: the native step
                **kwargs,
            )
            engine = model.offload_engine
            measured[f"tok_s_{mode}"] = decode_tokens_per_s(
                model, args.tokens, warmup=WARMUP, on_warm=engine.reset_stats
            )
            stats = engine.stats()
            measured[f"moe_ms_{mode}"] = 1e3 * stats["moe_compute_s"] / max(stats["tokens"], 1)
            engine.close()
            del model, engine
            gc.collect()
        # bf16 records hold down transposed, so its live rows are read alone; int8 / int4 records keep down as
        # [H, F] for their kernels and multiply all of it (dead neurons at zero): only gate and up shrink.
        own_ideal = ideal if quant == "none" else 1 / (2 / 3 + 1 / 3 * (1 - sparsity))
        row = {
            "format": "bf16" if quant == "none" else quant,
            "sparsity": sparsity,
            **measured,
            "ideal": ideal,
            "format_ideal": own_ideal,
        }
        row["speedup"] = row["moe_ms_dense"] / row["moe_ms_sparse"]
        row["of_ideal"] = row["speedup"] / ideal
        row["of_format_ideal"] = row["speedup"] / own_ideal
        rows.append(row)
        print(row, flush=True)
    print(f"\nneuron sparsity per layer: {[round(z, 3) for z in zeros]}")
    cols = ["format", "sparsity", "moe_ms_dense", "moe_ms_sparse", "speedup", "ideal", "of_ideal", "format_ideal",
            "of_format_ideal", "tok_s_dense", "tok_s_sparse"]  # fmt: skip
    print("| " + " | ".join(cols) + " |\n" + "|---" * len(cols) + "|")
    for r in rows:
        print("| " + " | ".join(r[c] if isinstance(r[c], str) else f"{r[c]:.3g}" for c in cols) + " |")
    return rows


def plot_curve(rows: list[dict], out: Path, title: str) -> Path:
    from smallthinker.train.plots import subplots

    fig, axes = subplots(1, 3, figsize=(13, 3.8), layout="constrained")
    x = [r["budget_GB"] for r in rows]
    panels = [
        ("decode tok/s", "tok_s", None),
        ("expert cache hit rate", "hit_rate", "sim_hit_rate"),
        ("MB read per token", "MB_per_token", None),
    ]
    axes[0].fill_between(x, [r["sim_tok_s_low"] for r in rows], [r["sim_tok_s_high"] for r in rows], alpha=0.25,
                         color="tab:orange", label="simulator (no overlap .. full overlap)")  # fmt: skip
    for ax, (label, real, sim) in zip(axes, panels):
        ax.plot(x, [r[real] for r in rows], "o-", label="engine")
        if sim:
            ax.plot(x, [r[sim] for r in rows], "s--", label="simulator")
        for xi, r in zip(x, rows):
            ax.annotate(f"{r[real]:.3g}", (xi, r[real]), textcoords="offset points", xytext=(0, 6), ha="center",
                        fontsize=8)  # fmt: skip
        ax.set_xlabel("memory budget (GB)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.savefig(out, dpi=120)
    return out


def print_table(rows: list[dict], machine: dict[str, float]) -> None:
    accel = next((r["tok_s"] for r in rows if r["config"].startswith("accelerate")), None)
    cols = ["tok_s", "hit_rate", "MB_per_token", "io_wait_ms_per_token", "roofline_tok_s", "of_roofline"]
    print("\n| configuration | " + " | ".join(cols) + (" | x accelerate |" if accel else " |"))
    print("|---" * (len(cols) + 1 + bool(accel)) + "|")
    for r in rows:
        cells = [f"{r[c]:.3g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols]
        ratio = [f"{r['tok_s'] / accel:.1f}"] if accel else []
        print(f"| {r['config']} | " + " | ".join(cells + ratio) + " |")
    print(
        "\nmachine: disk {disk_bw:.2f} GB/s (O_DIRECT, 4 MiB), memory read {mem_read_bw:.1f} GB/s, "
        "PyTorch bf16 GEMV {gemv_bf16_bw:.1f} GB/s".format(**{k: v / 1e9 for k, v in machine.items()})
    )


if __name__ == "__main__":
    main()
