"""Batch-1 decode and prefill, ours per weight format against llama.cpp on the same weights, in one run.

    flock /tmp/smallthinker-bench.lock .venv/bin/python -m scripts.bench_decode --workdir /tmp/st-decode
    .venv/bin/python -m scripts.bench_decode --preset tiny-4b-style --workdir /tmp/st-decode-tiny   # a quick check

Writes a random checkpoint with the preset's shapes in the official layout once (bf16, N(0, 0.02); 8 GB for the
4B), then for each thread count: our resident model in bf16, int8 and int4 (`formats.quantize_model`), and, when
`llama-cpp-python` is installed (`pip install -e ".[bench]"`; it builds llama.cpp from source), llama.cpp on GGUFs
made from the same checkpoint by llama.cpp's own converter (BF16, Q8_0) and its quantize API (Q4_0). The
converter is the `convert_hf_to_gguf.py` of a llama.cpp source tree: `--llama-cpp-src DIR` (the sdist's
`vendor/llama.cpp`). Random weights need no real vocabulary: the checkpoint gets a small byte-level BPE
tokenizer, and the converter is told it uses Qwen2's pre-tokenizer (it cannot recognise an unknown one).

`--quality CHECKPOINT` instead reports each format's quality on held-out text (perplexity, logit errors, top-1
agreement against bf16).

Each measurement: a 16-token prompt (prefill tok/s), then 32 greedy tokens one at a time (decode tok/s, median
of per-token times). Ours and llama.cpp alternate for `--rounds` rounds on the same bits (the model loaded once),
and the table gives the medians: the load of a shared machine hits both alike. It names the CPU's ISA flags and
the native kernels' branch; ratios compare the same bit width in the same run.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from scripts.bench_offload import write_random_checkpoint
from smallthinker.inference import native
from smallthinker.inference.decoder import NativeDecodeForCausalLM, NativeKVCache, decode_cache
from smallthinker.inference.formats import FORMATS, quantize_model
from smallthinker.inference.quality import compare_formats, format_quality_table, load_token_sequences
from smallthinker.inference.stats import isa_flags
from smallthinker.modeling import SmallThinkerForCausalLM, load_model_config

PROMPT_LEN, DECODE_TOKENS, WARMUP = 16, 32, 3
LLAMA_TYPES = {"bf16": "BF16", "int8": "Q8_0", "int4": "Q4_0"}


def prompt_ids(vocab: int) -> list[int]:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(100, min(vocab, 1000), (PROMPT_LEN,), generator=gen).tolist()


def write_tokenizer(ckpt: Path) -> None:
    """A small byte-level BPE tokenizer next to random weights (llama.cpp's converter needs one)."""
    if (ckpt / "tokenizer.json").exists():
        return
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["the quick brown fox jumps over the lazy dog " * 4, "sparse experts decode on laptops"] * 50
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(ckpt)


# ------------------------------------------------------------------------------------------------
# Ours
# ------------------------------------------------------------------------------------------------
def new_cache(model: SmallThinkerForCausalLM, per_op: bool = False) -> DynamicCache | NativeKVCache:
    """The cache `generate()` would use: the native one where the model has the native step (or the per-op
    path's `DynamicCache` when `per_op`)."""
    return DynamicCache(config=model.config) if per_op else decode_cache(model)


@torch.no_grad()
def time_ours(model: SmallThinkerForCausalLM, ids: list[int], per_op: bool = False) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) of greedy batch-1 generation with a KV cache."""
    prompt = torch.tensor([ids])
    cache = new_cache(model, per_op)
    model(prompt[:, :4], past_key_values=new_cache(model, per_op), use_cache=True)  # warm the kernels
    start = time.perf_counter()
    # Logits of the last position only, as generation (and llama.cpp's eval) computes them.
    logits = model(prompt, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    prefill = len(ids) / (time.perf_counter() - start)
    times = []
    for _ in range(WARMUP + DECODE_TOKENS):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        start = time.perf_counter()
        logits = model(nxt, past_key_values=cache, use_cache=True).logits
        times.append(time.perf_counter() - start)
    return prefill, 1 / statistics.median(times[WARMUP:])


def load_ours(ckpt: Path, fmt: str) -> SmallThinkerForCausalLM:
    model = SmallThinkerForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16).eval()
    model = quantize_model(model, fmt)
    gc.collect()
    return model


def median_row(system: str, fmt: str, threads: int, runs: list[tuple[float, float]]) -> dict:
    """One table row from rounds of (prefill tok/s, decode tok/s): medians, and every round's decode rate."""
    return {
        "system": system,
        "format": fmt,
        "threads": threads,
        "prefill": statistics.median(r[0] for r in runs),
        "decode": statistics.median(r[1] for r in runs),
        "decode_rounds": [round(r[1], 2) for r in runs],
    }


def run_pair(
    model: SmallThinkerForCausalLM,
    gguf: Path | None,
    fmt: str,
    threads: int,
    ids: list[int],
    rounds: int,
    per_op: bool = True,
) -> list[dict]:
    """Ours and llama.cpp on the same bits, alternating round by round, so that the load of a shared machine hits
    both alike; medians over the rounds. `per_op`: also our per-op decode path (a `DynamicCache`) in the rounds."""
    torch.set_num_threads(threads)
    ours, ours_per_op, llama = [], [], []
    per_op = per_op and isinstance(model, NativeDecodeForCausalLM)
    for _ in range(rounds):
        ours.append(time_ours(model, ids))
        if per_op:
            ours_per_op.append(time_ours(model, ids, per_op=True))
        if gguf is not None:
            llama.append(time_llama(gguf, threads, ids))
    step = "native step" if isinstance(model, NativeDecodeForCausalLM) else "per-op"
    rows = [median_row(f"ours, resident {fmt} ({step})", fmt, threads, ours)]
    if per_op:
        rows.append(median_row(f"ours, resident {fmt} (per-op)", fmt, threads, ours_per_op))
    if gguf is not None:
        rows.append(median_row(f"llama.cpp {LLAMA_TYPES[fmt]}", fmt, threads, llama))
    return rows


def run_default(ckpt: Path, threads: int, ids: list[int]) -> dict:
    """The model as `from_pretrained` gives it (its default experts implementation), as the baseline."""
    torch.set_num_threads(threads)
    model = SmallThinkerForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16).eval()
    prefill, decode = time_ours(model, ids)
    name = f"ours, bf16, {model.config._experts_implementation} experts"
    del model
    gc.collect()
    return {"system": name, "format": "bf16", "threads": threads, "prefill": prefill, "decode": decode}


@torch.no_grad()
def per_token_overhead(preset: str, fmt: str, threads: int) -> dict:
    """What a native decode step spends outside its weight kernels, on a one-layer model with the preset's layer
    shapes (vocabulary 256): per layer, the C++ step minus its matrix products (attention, norms, RoPE, routing,
    the cache write: the decoder's own clock); per step, the Python call around it (wall time minus the C++ step).
    """
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = load_model_config(preset, num_hidden_layers=1, vocab_size=256)
    model = quantize_model(SmallThinkerForCausalLM(config).eval(), fmt)
    if not isinstance(model, NativeDecodeForCausalLM):
        raise SystemExit(
            "the per-token overhead is measured on the native step; build the native kernels first"
        )
    impl = model.native_decoder.impl
    cache = decode_cache(model)
    model(torch.tensor([list(range(8))]), past_key_values=cache, use_cache=True)
    wall = 0.0
    for i in range(WARMUP + DECODE_TOKENS):
        if i == WARMUP:
            impl.reset_timings()
            wall = 0.0
        start = time.perf_counter()
        model(torch.tensor([[i % 200]]), past_key_values=cache, use_cache=True)
        wall += time.perf_counter() - start
    kernel_s, step_s, steps = impl.timings()
    return {"format": fmt, "threads": threads, "kernels_ms": 1e3 * kernel_s / steps,
            "layer_ms": 1e3 * (step_s - kernel_s) / steps, "call_ms": 1e3 * (wall - step_s) / steps}  # fmt: skip


# ------------------------------------------------------------------------------------------------
# llama.cpp
# ------------------------------------------------------------------------------------------------
def convert_to_gguf(ckpt: Path, out: Path, outtype: str, src: Path) -> Path:
    """llama.cpp's own HF -> GGUF converter, run in a subprocess with the Qwen2 pre-tokenizer assumed."""
    if out.exists():
        return out
    code = (
        "import sys, runpy\n"
        f"sys.path.insert(0, {str(src)!r})\n"
        "from conversion import base\n"
        "base.TextModel.get_vocab_base_pre = lambda self, tokenizer: 'qwen2'\n"
        f"sys.argv = ['convert_hf_to_gguf.py', {str(ckpt)!r}, '--outtype', {outtype!r}, '--outfile', {str(out)!r}]\n"
        f"runpy.run_path({str(src / 'convert_hf_to_gguf.py')!r}, run_name='__main__')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=src)
    return out


def quantize_gguf(src_gguf: Path, out: Path, ftype_name: str) -> Path:
    """llama.cpp's quantize API (`llama_model_quantize`), e.g. BF16 -> Q4_0."""
    if out.exists():
        return out
    llama_cpp = importlib.import_module("llama_cpp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype_name}")
    params.nthread = os.cpu_count() or 1
    status = llama_cpp.llama_model_quantize(str(src_gguf).encode(), str(out).encode(), params)
    if status != 0:
        raise RuntimeError(f"llama_model_quantize failed ({status}) for {out}")
    return out


def time_llama(gguf: Path, threads: int, ids: list[int]) -> tuple[float, float]:
    llama_cpp = importlib.import_module("llama_cpp")
    llm = llama_cpp.Llama(
        model_path=str(gguf), n_ctx=128, n_threads=threads, n_threads_batch=threads, n_batch=64, verbose=False
    )
    llm.eval(ids[:4])  # warm
    llm.reset()
    start = time.perf_counter()
    llm.eval(ids)
    prefill = len(ids) / (time.perf_counter() - start)
    times = []
    for _ in range(WARMUP + DECODE_TOKENS):
        nxt = int(llm.scores[llm.n_tokens - 1].argmax())
        start = time.perf_counter()
        llm.eval([nxt])
        times.append(time.perf_counter() - start)
    llm.close()
    return prefill, 1 / statistics.median(times[WARMUP:])


def llama_ggufs(ckpt: Path, workdir: Path, src: Path) -> dict[str, Path]:
    bf16 = convert_to_gguf(ckpt, workdir / "model-BF16.gguf", "bf16", src)
    q8 = convert_to_gguf(ckpt, workdir / "model-Q8_0.gguf", "q8_0", src)
    q4 = quantize_gguf(bf16, workdir / "model-Q4_0.gguf", "Q4_0")
    return {"bf16": bf16, "int8": q8, "int4": q4}


# ------------------------------------------------------------------------------------------------
# Table
# ------------------------------------------------------------------------------------------------
def table(rows: list[dict]) -> str:
    lines = [
        "| system | threads | decode tok/s | prefill tok/s | decode vs llama.cpp (same bits) |",
        "|---|---|---|---|---|",
    ]
    llama = {(r["format"], r["threads"]): r["decode"] for r in rows if r["system"].startswith("llama.cpp")}
    for r in rows:
        ref = llama.get((r["format"], r["threads"]))
        ratio = f"{r['decode'] / ref:.2f}×" if ref and not r["system"].startswith("llama.cpp") else ""
        lines.append(f"| {r['system']} | {r['threads']} | {r['decode']:.2f} | {r['prefill']:.1f} | {ratio} |")
    return "\n".join(lines)


def overhead_table(overheads: list[dict], rows: list[dict], num_layers: int) -> str:
    """Per-token overhead (outside the weight kernels, per layer, times the depth, plus the call) against the full
    native decode step of the same format and threads."""
    full = {
        (r["format"], r["threads"]): 1e3 / r["decode"]
        for r in rows
        if r["system"].startswith("ours, resident") and "(native step)" in r["system"]
    }
    lines = [
        f"\nPer-token overhead of the native step, one-layer model: (outside the kernels per layer) x {num_layers} "
        "layers + the Python call",
        "| format | threads | kernels ms (1 layer) | outside kernels ms / layer | call ms / step | overhead per token ms "
        "| of a full step |",
        "|---|---|---|---|---|---|---|",
    ]
    for o in overheads:
        per_token = num_layers * o["layer_ms"] + o["call_ms"]
        step = full.get((o["format"], o["threads"]))
        share = f"{per_token / step:.1%}" if step else ""
        lines.append(f"| {o['format']} | {o['threads']} | {o['kernels_ms']:.3f} | {o['layer_ms']:.3f} | "
                     f"{o['call_ms']:.3f} | {per_token:.2f} | {share} |")  # fmt: skip
    return "\n".join(lines)


def record(row: dict, rows: list[dict]) -> None:
    rows.append(row)
    rounds = f" (rounds {row['decode_rounds']})" if "decode_rounds" in row else ""
    print(f"  {row['system']:<32} threads {row['threads']}: decode {row['decode']:.2f} tok/s{rounds}, "
          f"prefill {row['prefill']:.1f} tok/s", flush=True)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="smallthinker-4b")
    parser.add_argument("--workdir", default="/tmp/smallthinker-decode")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating rounds of ours and llama.cpp per row (medians)"
    )
    parser.add_argument(
        "--llama-cpp-src", default=None, help="llama.cpp source tree with convert_hf_to_gguf.py"
    )
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument(
        "--no-per-op", action="store_true", help="skip the rows of our per-op decode path (DynamicCache)"
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip the default-experts bf16 row")
    parser.add_argument(
        "--overhead-only",
        default=None,
        help="a --json of an earlier run: measure only the overhead against it",
    )
    parser.add_argument(
        "--quality", default=None, help="a trained checkpoint: quality of each format, then exit"
    )
    parser.add_argument("--quality-text", default="data/generated/synthetic/corpus/validation.jsonl")
    parser.add_argument("--quality-docs", type=int, default=200)
    args = parser.parse_args(argv)
    if args.quality:
        sequences = load_token_sequences(args.quality, args.quality_text, args.quality_docs)
        tokens = sum(s.shape[1] for s in sequences)
        print(f"{args.quality}: {len(sequences)} documents, {tokens} tokens of {args.quality_text}\n")
        print(format_quality_table(compare_formats(args.quality, sequences)))
        return
    if args.overhead_only:
        rows = json.loads(Path(args.overhead_only).read_text())
        threads = sorted({r["threads"] for r in rows})
        overheads = [per_token_overhead(args.preset, f, t) for t in threads for f in args.formats.split(",")]
        print(overhead_table(overheads, rows, load_model_config(args.preset).num_hidden_layers))
        return
    workdir = Path(args.workdir)
    ckpt = write_random_checkpoint(workdir / "checkpoint", args.preset)
    write_tokenizer(ckpt)
    vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]
    ids = prompt_ids(vocab)
    formats = args.formats.split(",")
    ggufs = {}
    if args.llama_cpp_src:
        ggufs = llama_ggufs(ckpt, workdir, Path(args.llama_cpp_src))
    print(
        f"ISA: {isa_flags()}; kernels: {native.describe()}; load average {os.getloadavg()[0]:.2f}", flush=True
    )
    rows: list[dict] = []
    overheads: list[dict] = []
    num_layers = json.loads((ckpt / "config.json").read_text())["num_hidden_layers"]
    thread_counts = [int(t) for t in args.threads.split(",")]
    if not args.no_baseline:
        for threads in thread_counts:
            record(run_default(ckpt, threads, ids), rows)
    for fmt in formats:
        for threads in thread_counts:
            overheads.append(per_token_overhead(args.preset, fmt, threads))
        model = load_ours(ckpt, fmt)
        for threads in thread_counts:
            pair = run_pair(model, ggufs.get(fmt), fmt, threads, ids, args.rounds, not args.no_per_op)
            for row in pair:
                record(row, rows)
        del model
        gc.collect()
    print(f"\n{args.preset}, random weights, batch 1, {PROMPT_LEN}-token prompt, {DECODE_TOKENS} decode tokens "
          f"(median); ISA: {isa_flags()}; kernels: {native.describe()}; "
          f"load average after: {os.getloadavg()[0]:.2f}\n")  # fmt: skip
    print(table(rows))
    print(overhead_table(overheads, rows, num_layers))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
