"""Decode speed of the offload engine on a random model with the 4B preset's shapes, against the resident model
and transformers/accelerate disk offload at the same memory budget.

Launch (one benchmark at a time on a shared machine; the 8 GB checkpoint and the stores are written once into
--workdir and reused):
    flock /tmp/smallthinker-bench.lock .venv/bin/python -m scripts.bench_offload --workdir /tmp/st-bench
    .venv/bin/python -m scripts.bench_offload --workdir /tmp/st-bench --only offload --memory-budget 2.6GB -v

Random weights route almost uniformly (every expert equally likely) and leave ~50 % of ReGLU neurons alive;
trained SmallThinker weights are far more skewed (70-80 % of experts cold, 60-90 % of neurons dead), so hit
rates and the gain of neuron sparsity measured here are the pessimistic end.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME

from smallthinker.inference import (
    ExpertStore,
    convert_checkpoint,
    load_offloaded,
    parse_bytes,
    plan_for_store,
)
from smallthinker.inference.io import ALIGNMENT, DirectFile, align_up, aligned_buffer, measure_read_bandwidth
from smallthinker.inference.quality import compare_quantisation, load_token_sequences
from smallthinker.inference.stats import format_stats
from smallthinker.inference.store import MANIFEST
from smallthinker.modeling import load_model_config
from smallthinker.modeling.modeling_smallthinker import (
    EXPERT_PROJECTIONS,
    expert_tensor_name,
    official_tensor_shapes,
)

PROMPT_LEN = 16
MAX_CONTEXT = 128  # KV reservation in the budget: prompt + warm-up + measured tokens fit
OVERHEAD = "256MiB"


def write_random_checkpoint(path: Path, preset: str = "smallthinker-4b", seed: int = 0) -> Path:
    """Official file layout, bf16 weights N(0, 0.02), one shard per layer (skipped when already there)."""
    if (path / SAFE_WEIGHTS_INDEX_NAME).exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    config = load_model_config(preset)
    config.dtype = torch.bfloat16
    config.save_pretrained(path)
    gen = torch.Generator().manual_seed(seed)

    def init(shape: tuple[int, ...]) -> torch.Tensor:  # norms are ones, matrices N(0, initializer_range)
        if len(shape) == 1:
            return torch.ones(shape, dtype=torch.bfloat16)
        return (torch.randn(*shape, generator=gen) * config.initializer_range).to(torch.bfloat16)

    # Every tensor of an official file, one shard per layer plus one for the rest.
    shards: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, shape in official_tensor_shapes(config).items():
        parts = name.split(".")
        shard = f"model-layer{int(parts[2]):02d}" if parts[1] == "layers" else "model-embed"
        shards.setdefault(f"{shard}.safetensors", {})[name] = shape
    weight_map = {}
    for shard, shapes in tqdm(sorted(shards.items()), desc="random checkpoint", unit="shard"):
        save_file(
            {n: init(shape) for n, shape in shapes.items()}, str(path / shard), metadata={"format": "pt"}
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
    cache = DynamicCache(config=model.config)
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


def run_offloaded(name: str, store: Path, budget: int, tokens: int, verbose: bool, machine, **kwargs) -> dict:
    model = load_offloaded(store, memory_budget=budget, max_context=MAX_CONTEXT, overhead=OVERHEAD, **kwargs)
    engine = model.offload_engine
    tps = decode_tokens_per_s(model, tokens, warmup=3, on_warm=engine.reset_stats)
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
    parser.add_argument("--tokens", type=int, default=12, help="measured decode tokens per configuration")
    parser.add_argument("--accelerate-tokens", type=int, default=2)
    parser.add_argument(
        "--memory-budget", default=None, help="single offload run at this budget (e.g. 2.6GB)"
    )
    parser.add_argument("--only", choices=["all", "offload", "resident", "accelerate"], default="all")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; on a busy shared 2-core machine 2 OpenMP threads run 20x slower than 1",
    )
    parser.add_argument(
        "--quant-eval", default=None, help="trained checkpoint: int8 vs bf16 experts quality only"
    )
    parser.add_argument("--quant-eval-text", default="data/generated/synthetic/corpus/validation.jsonl")
    parser.add_argument("--quant-eval-docs", type=int, default=200)
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="print the engine statistics of each run"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    if args.quant_eval:
        sequences = load_token_sequences(args.quant_eval, args.quant_eval_text, args.quant_eval_docs)
        rows = compare_quantisation(args.quant_eval, workdir / "quant-eval", sequences)
        tokens = sum(s.shape[1] for s in sequences)
        print(f"\n{len(sequences)} documents, {tokens} tokens of {args.quant_eval_text}")
        print(
            "| experts | perplexity | max abs logit err | rel logit err (L2) | top-1 agreement |\n|---|---|---|---|---|"
        )
        for r in rows:
            print(
                f"| {r['experts']} | {r['perplexity']:.4f} | {r['max_abs_logit_err']:.4f} | "
                f"{r['rel_logit_err']:.4f} | {r['top1_agreement']:.4f} |"
            )
        return
    ckpt = write_random_checkpoint(workdir / "checkpoint")
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
    rows = []
    if args.only in ("all", "offload"):
        cases = [
            ("offload 25%, prefetch, sparse", store_dir, b25, {}),
            ("offload 25%, no prefetch, sparse", store_dir, b25, {"prefetch": False}),
            ("offload 25%, prefetch + speculative", store_dir, b25, {"speculative": True}),
            ("offload 25%, prefetch, dense experts", store_dir, b25, {"sparse": False}),
            ("offload 25%, prefetch, always neuron-sparse", store_dir, b25, {"sparse_threshold": 1.0}),
            ("offload 25% budget, int8 store", int8_dir, b25, {}),
        ]
        if not args.memory_budget:
            cases.insert(1, ("offload 50%, prefetch, sparse", store_dir, budget(0.5), {}))
        for name, path, b, kw in cases:
            name = f"{name} [{b / 1e9:.2f} GB]"
            rows.append(run_offloaded(name, path, b, args.tokens, args.verbose, machine, **kw))
            print(rows[-1], flush=True)
    if args.only in ("all", "resident"):
        rows.append(run_resident(ckpt, args.tokens, machine, store))
        print(rows[-1], flush=True)
    if args.only in ("all", "accelerate"):
        rows.append(run_accelerate(ckpt, b25, args.accelerate_tokens, workdir))
        print(rows[-1], flush=True)
    print_table(rows, machine)


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
