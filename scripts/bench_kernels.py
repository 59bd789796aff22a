"""Weight-only matmul kernels per format, on the 4B's matrix shapes, through a pool of weights larger than the
CPU caches (a decode step streams 1.7 GB of weights: cache-resident microbenchmarks flatter every kernel).

    flock /tmp/smallthinker-bench.lock .venv/bin/python -m scripts.bench_kernels --threads 1,2

Candidates (each checked against the dequantised reference before it is timed):
- bf16: `F.linear` on bf16 weights; oneDNN with the weight prepacked once (`mkldnn._reorder_linear_weight` +
  `mkldnn._linear_pointwise`, what inductor's freezing pass emits); our native kernel; fp32 `F.linear` for scale.
- int8 (per-channel): `torch._weight_int8pack_mm`; our native kernel; the portable dequantise-then-matmul path.
- int4 (group 32, scale and zero; 4.5 bits a weight with the bf16 scales and zeros): `_weight_int4pack_mm_for_cpu`;
  our native kernel; the portable path.
Rows: GB/s of weight bytes streamed and G weights/s, for one token (decode) and 16 tokens (prefill), with the
CPU's ISA flags. `formats.QuantizedMatrix` uses the winner of each format where it is available.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from smallthinker.inference import native
from smallthinker.inference.formats import (
    DEFAULT_GROUP_SIZE,
    QuantizedMatrix,
    int4_linear,
    mkldnn_linear_available,
    pack_int4_for_kernel,
    pack_nibbles,
    quantize_int4_groups,
    rows_first,
)
from smallthinker.inference.quant import quantize_int8_rows
from smallthinker.inference.stats import isa_flags

# (out, in) of the matrices a 4B decode step multiplies: fused gate+up, down, q/o, k/v, the LM head.
SHAPES = [(1536, 1536), (1536, 768), (256, 1536), (151936, 1536)]
POOL_BYTES = 512 << 20  # per shape and candidate: well beyond any L3


def pool_size(n: int, k: int, bytes_per_weight: float, name: str) -> int:
    if "portable" in name:  # compute-bound fallbacks: a couple of matrices show their speed
        return 2
    return max(2, int(POOL_BYTES / (n * k * bytes_per_weight)))


def candidates(
    w_NK: torch.Tensor,
) -> dict[str, tuple[float, Callable[[], Callable[[torch.Tensor], torch.Tensor]]]]:
    """name -> (bytes per weight, factory making one callable per pool entry)."""

    def portable(fmt: str) -> Callable:
        os.environ["SMALLTHINKER_PORTABLE_KERNELS"] = "1"
        try:
            return QuantizedMatrix(w_NK, fmt)
        finally:
            del os.environ["SMALLTHINKER_PORTABLE_KERNELS"]

    def bf16_linear() -> Callable:
        w = w_NK.bfloat16().clone()
        return lambda x: F.linear(x, w)

    def bf16_onednn() -> Callable:
        w = torch.ops.mkldnn._reorder_linear_weight(w_NK.bfloat16().contiguous(), 1)
        return lambda x: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")

    def fp32_linear() -> Callable:
        w = w_NK.float().clone()
        return lambda x: F.linear(x.float(), w)

    def int8(kernel: str) -> Callable:
        q, scale = quantize_int8_rows(w_NK, torch.bfloat16)
        if kernel == "native":
            return lambda x: native.ops().gemv_int8(x, q, scale)
        return lambda x: torch._weight_int8pack_mm(x, q, scale)

    def int4(kernel: str) -> Callable:
        codes, scales_zeros = quantize_int4_groups(w_NK, DEFAULT_GROUP_SIZE)
        if kernel == "native":
            packed, sz = pack_nibbles(codes), rows_first(scales_zeros).bfloat16()
            return lambda x: native.ops().gemv_int4(x, packed, sz)
        packed, sz = pack_int4_for_kernel(codes), scales_zeros.bfloat16()
        return lambda x: int4_linear(x, packed, sz, DEFAULT_GROUP_SIZE)

    out = {
        "bf16 F.linear": (2, bf16_linear),
        "bf16 oneDNN prepacked": (2, bf16_onednn),
        "bf16 native": (2, lambda: (lambda w: lambda x: native.ops().gemv_bf16(x, w))(w_NK.bfloat16())),
        "fp32 F.linear": (4, fp32_linear),
        "int8 _weight_int8pack_mm": (1, lambda: int8("torch")),
        "int8 native": (1, lambda: int8("native")),
        "int8 portable": (1, lambda: portable("int8")),
        "int4 _weight_int4pack_mm_for_cpu": (0.5625, lambda: int4("torch")),
        "int4 native": (0.5625, lambda: int4("native")),
        "int4 portable": (0.5625, lambda: portable("int4")),
    }
    if not mkldnn_linear_available():
        del out["bf16 oneDNN prepacked"]
    if not native.available():
        out = {name: c for name, c in out.items() if "native" not in name}
    elif w_NK.shape[0] % 16:
        del out["int4 _weight_int4pack_mm_for_cpu"]
    return out


def time_candidate(make: Callable, count: int, x: torch.Tensor, repeats: int = 3) -> float:
    """Seconds per matmul, cycling through `count` distinct weights so that each call reads from memory."""
    pool = [make() for _ in range(count)]
    for f in pool[:2]:
        f(x)
    best = []
    for _ in range(repeats):
        start = time.perf_counter()
        for f in pool:
            f(x)
        best.append((time.perf_counter() - start) / count)
    return statistics.median(best)


def reference_weight(w_NK: torch.Tensor, fmt: str) -> torch.Tensor:
    """The matrix a format stands for (the kernels differ only in rounding from x @ it.T)."""
    os.environ["SMALLTHINKER_PORTABLE_KERNELS"] = "1"
    try:
        return QuantizedMatrix(w_NK, fmt).dequantize()
    finally:
        del os.environ["SMALLTHINKER_PORTABLE_KERNELS"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--tokens", default="1,16", help="rows of x: 1 = decode, 16 = a prefill chunk")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print(f"ISA: {isa_flags()}; torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}; "
          f"kernels: {native.describe()}; load average {os.getloadavg()[0]:.2f}", flush=True)  # fmt: skip
    rows = []
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for n, k in SHAPES:
            w = torch.randn(n, k) * 0.02
            for m in (int(t) for t in args.tokens.split(",")):
                x = torch.randn(m, k).bfloat16()
                for name, (bpw, make) in candidates(w).items():
                    ref = None if "fp32" in name else x.float() @ reference_weight(w, name.split()[0]).t()
                    if ref is not None:
                        err = ((make()(x).float() - ref).norm() / ref.norm()).item()
                        assert err < 2e-2, (name, err)
                    s = time_candidate(make, pool_size(n, k, bpw, name), x)
                    rows.append((threads, f"{n}x{k}", m, name, n * k * bpw / s / 1e9, n * k / s / 1e9))
                    print(f"  threads {threads} {n}x{k} M={m} {name:<34} {rows[-1][4]:6.1f} GB/s "
                          f"{rows[-1][5]:6.1f} Gw/s", flush=True)  # fmt: skip
    print(f"\nISA: {isa_flags()}; load average after: {os.getloadavg()[0]:.2f}\n")
    print("| threads | matrix | tokens | kernel | GB/s of weights | G weights/s |\n|---|---|---|---|---|---|")
    for t, shape, m, name, gbs, gws in rows:
        print(f"| {t} | {shape} | {m} | {name} | {gbs:.1f} | {gws:.1f} |")


if __name__ == "__main__":
    main()
