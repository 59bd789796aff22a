"""Training-step and decode throughput of our model vs transformers' Qwen3-MoE at the same shapes, on CPU.

Launch (one benchmark at a time on a shared machine):
    flock /tmp/smallthinker-bench.lock .venv/bin/python -m scripts.bench_model
    flock /tmp/smallthinker-bench.lock .venv/bin/python -m scripts.bench_model --layers 1 --dtypes bf16 \
        --profile grouped_mm eager --profile-only

Shapes: the real SmallThinker-4B layer (hidden 1536, 12/2 heads, head_dim 128, 32 experts top-4, FFN 768),
``--layers`` layers, vocab 8192 so the MoE dominates. Training step = forward + backward of the HF causal-LM
loss on batch x seq random tokens (no optimizer step). Decode = batch 1 with a KV cache, one token per
forward. All rows of a dtype are measured in the same run, round-robin (one step of each case in turn, the
median over rounds reported) and each model object is shared by its experts implementations, so ratios stay
meaningful on a shared machine even when absolute numbers drift.

The baseline is ``Qwen3MoeForCausalLM`` configured to the same shapes with a ReLU gate (ReGLU experts, like
ours); it cannot be configured without its per-head q/k RMSNorm, so it does slightly more work per layer.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from dataclasses import dataclass, field

import psutil
import torch
from tqdm import tqdm
from transformers import DynamicCache, PreTrainedModel, Qwen3MoeConfig, Qwen3MoeForCausalLM

from smallthinker.modeling import SmallThinkerForCausalLM, load_model_config

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
OUR_IMPLS = ["eager", "grouped_mm", "batched_mm", "sorted_mm"]
QWEN_IMPLS = ["eager", "grouped_mm"]


@dataclass
class Shapes:
    layers: int = 4
    vocab: int = 8192
    hidden: int = 1536
    heads: int = 12
    kv_heads: int = 2
    head_dim: int = 128
    experts: int = 32
    top_k: int = 4
    ffn: int = 768


@dataclass
class Row:
    model: str
    impl: str
    dtype: str
    train_tok_s: float | None
    decode_tok_s: float | None
    note: str = ""


def build_ours(s: Shapes, dtype: torch.dtype) -> PreTrainedModel:
    cfg = load_model_config(
        "smallthinker-4b",
        num_hidden_layers=s.layers,
        vocab_size=s.vocab,
        rope_layout=[1] * s.layers,
        sliding_window_layout=[0] * s.layers,
    )
    return SmallThinkerForCausalLM(cfg).to(dtype)


def build_qwen(s: Shapes, dtype: torch.dtype) -> PreTrainedModel:
    cfg = Qwen3MoeConfig(
        vocab_size=s.vocab,
        hidden_size=s.hidden,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        head_dim=s.head_dim,
        num_experts=s.experts,
        num_experts_per_tok=s.top_k,
        moe_intermediate_size=s.ffn,
        norm_topk_prob=True,
        hidden_act="relu",  # ReGLU experts, the same FLOPs as ours
        tie_word_embeddings=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    )
    cfg._attn_implementation = "sdpa"
    return Qwen3MoeForCausalLM(cfg).to(dtype)


@dataclass
class Case:
    """One row of the table: a model object (shared by its experts implementations) and an implementation."""

    model_name: str
    model: PreTrainedModel
    impl: str
    dtype: str
    train_s: list[float] = field(default_factory=list)
    decode_tok_s: list[float] = field(default_factory=list)
    note: str = ""

    def activate(self) -> PreTrainedModel:
        self.model.set_experts_implementation(self.impl)
        return self.model


def batched_mm_train_bytes(s: Shapes, tokens: int, dtype: torch.dtype) -> int:
    """batched_mm gathers one copy of the expert weights per (token, expert) pair, and its gradient too."""
    per_pair = 3 * s.ffn * s.hidden * torch.finfo(dtype).bits // 8
    return 2 * tokens * s.top_k * per_pair


def train_step_seconds(model: PreTrainedModel, ids: torch.Tensor) -> float:
    model.train()
    start = time.perf_counter()
    model(input_ids=ids, labels=ids).loss.backward()
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)  # frees the gradients before the next case runs
    return elapsed


@torch.no_grad()
def decode_tok_s(model: PreTrainedModel, prompt_len: int, warmup: int, steps: int) -> float:
    """1 / median seconds per token of one-token forwards with a KV cache, after a prefill."""
    model.eval()
    cache = DynamicCache(config=model.config)
    ids = torch.randint(
        0, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0)
    )
    logits = model(input_ids=ids, cache=cache, use_cache=True).logits
    times = []
    for i in range(warmup + steps):
        token = logits[:, -1:].argmax(-1)  # [1, 1]
        start = time.perf_counter()
        logits = model(input_ids=token, cache=cache, use_cache=True).logits
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return 1.0 / statistics.median(times)


def run_training(cases: list[Case], args: argparse.Namespace) -> None:
    """Warm-up, then round-robin over the cases so that load changes on a shared machine hit all of them alike."""
    ids = torch.randint(
        0, cases[0].model.config.vocab_size, (args.batch, args.seq), generator=torch.Generator()
    )
    runnable = []
    for case in cases:
        try:
            for _ in range(args.warmup):
                train_step_seconds(case.activate(), ids)
            runnable.append(case)
        except (RuntimeError, MemoryError) as err:  # the CPU allocator raises RuntimeError on OOM
            case.model.zero_grad(set_to_none=True)
            case.note = f"train: {type(err).__name__}: {str(err)[:80]}"
    for _ in tqdm(range(args.repeats), desc="training steps, round-robin", leave=False):
        for case in runnable:
            case.train_s.append(train_step_seconds(case.activate(), ids))
    gc.collect()


def run_decode(cases: list[Case], args: argparse.Namespace) -> None:
    for _ in tqdm(range(args.decode_rounds), desc="decode rounds, round-robin", leave=False):
        for case in cases:
            case.decode_tok_s.append(
                decode_tok_s(case.activate(), args.prompt, args.decode_warmup, args.decode_steps)
            )


def measure_dtype(s: Shapes, dtype_name: str, args: argparse.Namespace) -> list[Row]:
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    ours, qwen = build_ours(s, dtype), build_qwen(s, dtype)
    cases = [Case("SmallThinker", ours, impl, dtype_name) for impl in args.impls]
    cases += [Case("Qwen3-MoE", qwen, impl, dtype_name) for impl in QWEN_IMPLS if impl in args.impls]
    need = batched_mm_train_bytes(s, args.batch * args.seq, dtype)
    trainable = []
    for case in cases:
        if case.impl == "batched_mm" and need > 0.6 * psutil.virtual_memory().available:
            case.note = f"train: out of memory (needs ~{need / 2**30:.0f} GiB of gathered weight copies)"
        else:
            trainable.append(case)
    run_training(trainable, args)
    run_decode(cases, args)
    rows = []
    for c in cases:
        train = args.batch * args.seq / statistics.median(c.train_s) if c.train_s else None
        rows.append(Row(c.model_name, c.impl, c.dtype, train, statistics.median(c.decode_tok_s), c.note))
        print(f"  {c.model_name:12s} {c.impl:10s} {c.dtype}: train step s {[round(t, 2) for t in c.train_s]}")
    return rows


def fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.1f}"


def ratio(x: float | None, best: float | None) -> str:
    return "–" if x is None or not best else f"{x / best:.2f}×"


def markdown_table(rows: list[Row]) -> str:
    lines = [
        "| model | experts | dtype | train tok/s | vs best Qwen3-MoE | decode tok/s | vs best Qwen3-MoE | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for dtype in DTYPES:
        qwen = [r for r in rows if r.model == "Qwen3-MoE" and r.dtype == dtype]
        best_train = max((r.train_tok_s for r in qwen if r.train_tok_s), default=None)
        best_decode = max((r.decode_tok_s for r in qwen if r.decode_tok_s), default=None)
        for r in (r for r in rows if r.dtype == dtype):
            lines.append(
                f"| {r.model} | {r.impl} | {r.dtype} | {fmt(r.train_tok_s)} | {ratio(r.train_tok_s, best_train)} "
                f"| {fmt(r.decode_tok_s)} | {ratio(r.decode_tok_s, best_decode)} | {r.note} |"
            )
    return "\n".join(lines)


def goals(rows: list[Row]) -> str:
    out = []
    for dtype in DTYPES:
        ours = {r.impl: r.train_tok_s for r in rows if r.model == "SmallThinker" and r.dtype == dtype}
        qwen = [r.train_tok_s for r in rows if r.model == "Qwen3-MoE" and r.dtype == dtype and r.train_tok_s]
        if not ours or not qwen:
            continue
        best_ours = max(v for v in ours.values() if v)
        out.append(
            f"{dtype}: our fastest training path / Qwen3-MoE's fastest = {best_ours / max(qwen):.2f} (goal >= 1)"
        )
        if ours.get("grouped_mm") and ours.get("eager"):
            out.append(
                f"{dtype}: our grouped_mm / our eager = {ours['grouped_mm'] / ours['eager']:.2f} (goal >= 5)"
            )
    return "\n".join(out)


def profile_step(s: Shapes, impl: str, dtype_name: str, args: argparse.Namespace) -> None:
    """Where the time of one training step of our model goes, by operator."""
    model = build_ours(s, DTYPES[dtype_name])
    model.set_experts_implementation(impl)
    ids = torch.randint(0, s.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()  # warm-up
    model.zero_grad(set_to_none=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(input_ids=ids, labels=ids).loss.backward()
    print(f"\nProfile: SmallThinker {impl} {dtype_name}, one training step")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--impls", nargs="+", default=OUR_IMPLS, choices=OUR_IMPLS, help="experts implementations")
    p.add_argument("--warmup", type=int, default=1, help="training steps before timing")
    p.add_argument("--repeats", type=int, default=3, help="timed training steps (median reported)")
    p.add_argument("--prompt", type=int, default=32, help="decode prompt length")
    p.add_argument("--decode-warmup", type=int, default=4)
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--decode-rounds", type=int, default=3, help="round-robin decode rounds (median reported)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--profile",
        nargs="+",
        default=[],
        choices=OUR_IMPLS,
        help="profile one training step of ours per impl",
    )
    p.add_argument("--profile-only", action="store_true", help="skip the throughput table, only profile")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    s = Shapes(layers=args.layers, vocab=args.vocab)
    print(
        f"threads={torch.get_num_threads()} batch={args.batch}x{args.seq} layers={s.layers} vocab={s.vocab}"
    )
    if not args.profile_only:
        rows = []
        for dtype_name in args.dtypes:
            rows += measure_dtype(s, dtype_name, args)
        print()
        print(markdown_table(rows))
        print()
        print(goals(rows))
    for dtype_name in args.dtypes:
        for impl in args.profile:
            profile_step(s, impl, dtype_name, args)


if __name__ == "__main__":
    main()
