"""The native decode kernels, each SIMD branch built and loaded here, against their exact reference.

Reference: bf16 -> `x @ w.T` in fp32; int8 / int4 -> `quantize_activations_q8(x) @ dequant(W).T` in fp32 (the
kernels quantise activations per block of 32 as llama.cpp does). Tolerance: fp32 summation order, relative
error < 1e-5 of the output's scale. Branches: this CPU's (`native`), AVX2 (`x86-64-v3`, which AVX-512 CPUs run
too) and plain C++ (`x86-64`), each under its own op namespace so that all three load into one process.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from smallthinker.inference import native
from smallthinker.inference.formats import (
    dequantize_int4,
    pack_nibbles,
    quantize_activations_q8,
    quantize_int4_groups,
    rows_first,
)
from smallthinker.inference.quant import quantize_int8_rows

BRANCHES = {"native": None, "x86-64-v3": "avx2", "x86-64": "scalar"}
# (N, K): the 4B's shapes scaled down, K % 64 == 32 (a half chunk on AVX-512), K / 32 odd (a group left over
# after the last quad of groups), and tiny.
SHAPES = [(256, 1536), (96, 768), (40, 96), (33, 160), (16, 32)]


@pytest.fixture(scope="module", params=list(BRANCHES))
def ops(request):
    march = request.param
    namespace = "smallthinker_test_" + march.replace("-", "_")
    loaded = native.load(march, namespace)
    expected = BRANCHES[march]
    if expected is not None:
        assert loaded.isa().endswith(f"int8/int4={expected}"), loaded.isa()
    return loaded


def close(got: torch.Tensor, ref: torch.Tensor, tol: float = 1e-5) -> None:
    scale = ref.abs().max().clamp_min(1e-6)
    err = ((got.float() - ref).abs().max() / scale).item()
    assert err < tol, err


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("tokens", [1, 3])
def test_matrix_vector_kernels(ops, n, k, tokens):
    g = torch.Generator().manual_seed(n * k + tokens)
    w = torch.randn(n, k, generator=g) * 0.05
    x = torch.randn(tokens, k, generator=g) * 3
    x[:, :5] *= 40  # an outlier channel block, as real activations have
    xq = quantize_activations_q8(x)
    rows = torch.tensor(sorted({0, n - 1, n // 2, n // 3}), dtype=torch.long)

    wb = w.bfloat16()
    close(ops.gemv_bf16(x, wb), x @ wb.float().t())
    close(ops.gemv_bf16(x.bfloat16(), wb), x.bfloat16().float() @ wb.float().t(), tol=1e-2)  # bf16 output
    close(ops.gemv_bf16(x, wb, rows), (x @ wb.float().t())[:, rows])

    q, scale = quantize_int8_rows(w, torch.float32)
    ref8 = xq @ (q.float() * scale[:, None]).t()
    close(ops.gemv_int8(x, q, scale), ref8)
    close(ops.gemv_int8(x, q, scale.bfloat16()), xq @ (q.float() * scale.bfloat16().float()[:, None]).t())
    close(ops.gemv_int8(x, q, scale, rows), ref8[:, rows])

    codes, sz = quantize_int4_groups(w, 32)
    packed, sz_rows = pack_nibbles(codes), rows_first(sz).bfloat16()
    ref4 = xq @ dequantize_int4(packed, sz_rows).t()
    close(ops.gemv_int4(x, packed, sz_rows), ref4)
    close(ops.gemv_int4(x, packed, sz_rows, rows), ref4[:, rows])


@pytest.mark.parametrize("f,k", [(64, 1536), (48, 96), (7, 40)])
def test_axpy_rows(ops, f, k):
    g = torch.Generator().manual_seed(f + k)
    w = torch.randn(f, k, generator=g)
    h = torch.randn(5, generator=g)
    rows = torch.tensor([f - 1, 0, 3, 2, 1])
    wb = w.bfloat16()
    close(ops.axpy_rows(h, wb, rows), (h @ wb.float()[rows])[None])
    q, scale = quantize_int8_rows(w, torch.float32)
    close(ops.axpy_rows(h, q, rows, scale), (h @ (q.float() * scale[:, None])[rows])[None])


def test_zero_input_and_zero_rows(ops):
    w = torch.randn(32, 64)
    q, scale = quantize_int8_rows(w, torch.float32)
    codes, sz = quantize_int4_groups(w, 32)
    x = torch.zeros(1, 64)
    assert torch.equal(ops.gemv_int8(x, q, scale), torch.zeros(1, 32))
    out = ops.gemv_int4(x, pack_nibbles(codes), rows_first(sz).bfloat16())
    assert torch.equal(out, torch.zeros(1, 32))
    assert ops.gemv_bf16(x, w.bfloat16(), torch.zeros(0, dtype=torch.long)).shape == (1, 0)


def test_bad_inputs_are_refused_with_a_message(ops):
    w = torch.randn(32, 64).bfloat16()
    with pytest.raises(RuntimeError, match=r"x must be \[T, 64\]"):
        ops.gemv_bf16(torch.randn(1, 63), w)
    with pytest.raises(RuntimeError, match="takes 1 to 16 tokens"):
        ops.gemv_bf16(torch.randn(17, 64), w)
    with pytest.raises(RuntimeError, match="row 32 out of range for 32 rows"):
        ops.gemv_bf16(torch.randn(1, 64), w, torch.tensor([32]))
    with pytest.raises(RuntimeError, match="multiple of 32"):
        ops.gemv_int8(torch.randn(1, 48), torch.zeros(4, 48, dtype=torch.int8), torch.ones(4))


def test_threads_give_the_same_result(ops):
    """Rows are split across threads, never a row's sum: any thread count gives the same bits."""
    w = torch.randn(512, 1536) * 0.02
    q, scale = quantize_int8_rows(w, torch.float32)
    x = torch.randn(1, 1536)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.gemv_int8(x, q, scale)
        torch.set_num_threads(2)
        two = ops.gemv_int8(x, q, scale)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


FALLBACK_PROBE = """
import warnings
import torch
from smallthinker.inference import native
from smallthinker.inference.formats import QuantizedMatrix
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert not native.available()
assert any("native decode kernels unavailable" in str(w.message) for w in caught), [str(w.message) for w in caught]
w = torch.randn(64, 128) * 0.02
x = torch.randn(1, 128).bfloat16()
for fmt in ("bf16", "int8", "int4"):
    m = QuantizedMatrix(w, fmt)
    assert m.path != "native", m.path
    ref = x.float() @ m.dequantize().t()
    assert ((m(x).float() - ref).norm() / ref.norm()).item() < 1e-2
print(native.describe())
"""


def test_without_a_compiler_the_torch_kernels_take_over(tmp_path):
    env = {
        **os.environ,
        "CXX": str(tmp_path / "no-such-compiler"),
        "SMALLTHINKER_KERNEL_CACHE": str(tmp_path),
    }
    done = subprocess.run([sys.executable, "-c", FALLBACK_PROBE], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "native kernels unavailable"


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("SMALLTHINKER_NATIVE_KERNELS", "0")
    assert not native.available() and native.describe() == "native kernels off (environment)"
