"""Neuron-sparse ReGLU and int8 experts against the dense reference formula."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from smallthinker.inference import native
from smallthinker.inference.formats import (
    dequantize_int4,
    pack_nibbles,
    quantize_activations_q8,
    quantize_int4_groups,
    rows_first,
)
from smallthinker.inference.quant import dequantize_int8_rows, int8_linear, quantize_int8_rows
from smallthinker.inference.sparse import calibrate_sparse_threshold, reglu_decode, reglu_dense

HIDDEN, FFN = 96, 64


def _expert(dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    gate, up = (torch.randn(FFN, HIDDEN, generator=g) * 0.1 for _ in range(2))
    down = torch.randn(HIDDEN, FFN, generator=g) * 0.1
    x = torch.randn(1, HIDDEN, generator=g)
    w = {"gate": gate.to(dtype), "up": up.to(dtype), "down_t": down.t().contiguous().to(dtype)}
    return w, (gate, up, down), x.to(dtype)


def _reference(x, gate, up, down, act=lambda t: t):
    """The expert; `act` is what the kernels do to activations before a quantised matrix meets them."""
    return F.linear(act(F.linear(act(x), up) * F.relu(F.linear(act(x), gate))), down)


def _q8_if_native(t: torch.Tensor) -> torch.Tensor:
    """The native int8 / int4 kernels quantise activations per block of 32 (llama.cpp's Q8_0); torch's do not."""
    return quantize_activations_q8(t) if native.available() else t


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_sparse_decode_equals_dense(dtype, tol):
    w, (gate, up, down), x = _expert(dtype)
    ref = _reference(x.float(), gate, up, down)
    sparse = reglu_decode(x, w, threshold=1.0)  # always the sparse branch
    dense = reglu_decode(x, w, threshold=-1.0)  # always the dense branch
    live = (F.linear(x, w["gate"]) > 0).float().mean()
    assert 0.2 < live < 0.8  # the sparse branch really skipped neurons
    torch.testing.assert_close(sparse.float(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(dense.float(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(reglu_dense(x.repeat(3, 1), w).float(), ref.repeat(3, 1), atol=tol, rtol=tol)


def test_all_neurons_dead_gives_zero():
    w, _, x = _expert(torch.float32)
    w["gate"] = -w["gate"].abs()
    out = reglu_decode(x.abs(), w, threshold=1.0)
    assert torch.equal(out, torch.zeros(1, HIDDEN))


def test_int8_quantisation_and_kernel():
    w, (gate, up, down), x = _expert(torch.float32, seed=1)
    q, scale = quantize_int8_rows(gate, torch.float32)
    assert q.dtype == torch.int8 and scale.shape == (FFN,)
    assert ((dequantize_int8_rows(q, scale) - gate).abs() <= scale[:, None] / 2 + 1e-7).all()
    torch.testing.assert_close(
        int8_linear(x, q, scale), x @ dequantize_int8_rows(q, scale).t(), atol=1e-4, rtol=1e-4
    )

    wq = {}
    for name, mat in (("gate", gate), ("up", up), ("down", down)):
        wq[f"{name}_q"], wq[f"{name}_scale"] = quantize_int8_rows(mat, torch.float32)
    deq = [dequantize_int8_rows(wq[f"{n}_q"], wq[f"{n}_scale"]) for n in ("gate", "up", "down")]
    ref = _reference(x, *deq, act=_q8_if_native)
    torch.testing.assert_close(reglu_decode(x, wq, threshold=1.0), ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(reglu_decode(x, wq, threshold=-1.0), ref, atol=1e-4, rtol=1e-4)
    # Quantisation error relative to the unquantised expert stays at the int8 rounding level.
    exact = _reference(x, gate, up, down)
    assert (ref - exact).norm() / exact.norm() < 0.02


def test_int4_records_sparse_and_dense():
    """int4 records (nibbles, per-row scales): the sparse branch reads only the live rows of `up` and equals the
    dense branch and the dequantised expert."""
    w, (gate, up, down), x = _expert(torch.float32, seed=2)
    x = x.bfloat16()
    rec, deq = {}, []
    for name, mat in (("gate", gate), ("up", up), ("down", down)):
        codes, sz = quantize_int4_groups(mat, 32)
        rec[f"{name}_q4"], rec[f"{name}_sz"] = pack_nibbles(codes), rows_first(sz).bfloat16()
        deq.append(dequantize_int4(rec[f"{name}_q4"], rec[f"{name}_sz"]))
    ref = _reference(x.float(), *deq, act=lambda t: _q8_if_native(t.bfloat16().float()))
    for threshold in (1.0, -1.0):
        torch.testing.assert_close(reglu_decode(x, rec, threshold).float(), ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(
        reglu_dense(x.repeat(3, 1), rec).float(), ref.repeat(3, 1), atol=2e-2, rtol=2e-2
    )
    assert 0.0 <= calibrate_sparse_threshold(rec, repeats=2) <= 0.7


def test_calibrated_threshold_is_a_fraction():
    w, _, _ = _expert(torch.float32)
    assert 0.0 <= calibrate_sparse_threshold(w, repeats=2) <= 0.7
