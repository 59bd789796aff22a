"""Expert compute on store records: dense ReGLU for many tokens, neuron-sparse ReGLU for one.

ReGLU is ``down(up(x) * relu(gate(x)))``: every neuron whose gate is <= 0 contributes exactly zero, so
after a dense ``gate`` projection only the live neurons' rows of ``up`` and of ``down^T`` need to be read
(SmallThinker report, section on sparse inference: > 60 % of neurons are dead inside a routed expert). The native
kernels read those rows in place (`rows=`, `axpy_rows`); without them the rows are gathered first. Whether the
sparse path pays depends on the fraction of live neurons and on the machine, so the switch point is measured
(``calibrate_sparse_threshold``) rather than assumed.

Record layouts (see ``store.record_layout``): ``gate [F, H]``, ``up [F, H]``, ``down_t [F, H]``; int8:
``gate_q``, ``up_q`` ``[F, H]``, ``down_q [H, F]`` with per-output-channel scales; int4: ``gate_q4``, ``up_q4``
``[F, H / 2]``, ``down_q4 [H, F / 2]`` nibble-packed with ``*_sz`` scales and zeros.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from smallthinker.inference import native
from smallthinker.inference.formats import (
    int4_matmul,
    int8_matmul,
    native_bf16_decode,
    native_int8_takes,
)

DEFAULT_SPARSE_THRESHOLD = 0.4  # live-neuron fraction below which the sparse path is used, if not calibrated


def project(x_TH: torch.Tensor, w: dict[str, torch.Tensor], name: str, rows: torch.Tensor | None = None):
    """x @ W.T for the record's "gate" or "up" matrix [F, H] -> [T, F], or only its `rows` -> [T, len(rows)]
    (read in place by the native kernels; gathered otherwise)."""
    if f"{name}_q4" in w:
        codes, sz = w[f"{name}_q4"], w[f"{name}_sz"]
        if rows is None:
            return int4_matmul(x_TH, codes, sz)
        if native.available():
            return native.ops().gemv_int4(x_TH, codes, sz, rows)
        return int4_matmul(x_TH, codes.index_select(0, rows), sz.index_select(0, rows))
    if f"{name}_q" in w:
        q, scale = w[f"{name}_q"], w[f"{name}_scale"]
        if rows is None:
            return int8_matmul(x_TH, q, scale)
        if native_int8_takes(q):
            return native.ops().gemv_int8(x_TH, q, scale, rows)
        return int8_matmul(x_TH, q.index_select(0, rows), scale[rows])
    weight = w[name]
    if native_bf16_decode(x_TH, weight):
        return native.ops().gemv_bf16(x_TH, weight, rows)
    return F.linear(x_TH, weight if rows is None else weight.index_select(0, rows))


def down(h_TF: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
    """The down projection of hidden activations [T, F] -> [T, H]."""
    if "down_q4" in w:
        return int4_matmul(h_TF, w["down_q4"], w["down_sz"])
    if "down_q" in w:
        return int8_matmul(h_TF, w["down_q"], w["down_scale"])
    return F.linear(h_TF, w["down_t"].t())


def reglu_dense(x_TH: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
    """One expert on T tokens -> [T, H]."""
    return down(F.relu(project(x_TH, w, "gate")) * project(x_TH, w, "up"), w)


def reglu_decode(x_1H: torch.Tensor, w: dict[str, torch.Tensor], threshold: float) -> torch.Tensor:
    """One expert on one token -> [1, H]; neuron-sparse when few enough gate neurons are alive: only the live rows
    of `up` are read, and of `down` too where it is stored transposed (bf16 records); the quantised records
    multiply `down` by the hidden vector with its dead neurons at zero."""
    g_1F = project(x_1H, w, "gate")
    live_N = (g_1F[0] > 0).nonzero().flatten()
    if live_N.numel() > threshold * g_1F.shape[1]:
        return down(F.relu(g_1F) * project(x_1H, w, "up"), w)
    if live_N.numel() == 0:
        return x_1H.new_zeros(x_1H.shape)
    h_1N = project(x_1H, w, "up", rows=live_N) * g_1F[:, live_N]
    if "down_t" not in w:
        h_1F = torch.zeros_like(g_1F)
        h_1F[:, live_N] = h_1N
        return down(h_1F, w)
    down_t = w["down_t"]
    if native.available() and down_t.dtype == torch.bfloat16:
        return native.ops().axpy_rows(h_1N[0], down_t, live_N).to(x_1H.dtype)
    # Rows of down^T are contiguous, so the gather is a plain row copy (columns of down would be strided).
    return F.linear(h_1N, down_t.index_select(0, live_N).t())


def calibrate_sparse_threshold(w: dict[str, torch.Tensor], repeats: int = 7) -> float:
    """Largest live-neuron fraction at which the sparse path beats the dense one on this machine (0 if none).

    ``w`` is any record-shaped expert (e.g. a cache slot's views); its values do not matter for timing.
    """
    best = 0.0
    for frac in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7):
        if sparse_over_dense_time(_with_live_fraction(w, frac), repeats) < 1.0:
            best = frac
    return best


def _with_live_fraction(w: dict[str, torch.Tensor], frac: float) -> dict[str, torch.Tensor]:
    """A variant of ``w`` whose gate makes exactly ``frac`` of the neurons live for an all-ones input."""
    if "gate_sz" in w:  # int4: scale 0 and zero +-1 make each gate row a constant +-1
        sz = torch.zeros_like(w["gate_sz"])
        sz[..., 1] = -1
        sz[: max(1, int(frac * sz.shape[0])), :, 1] = 1
        return {**w, "gate_sz": sz}
    key = "gate_q" if "gate_q" in w else "gate"
    gate = w[key]
    sign_F1 = torch.full((gate.shape[0], 1), -1, dtype=gate.dtype)
    sign_F1[: max(1, int(frac * gate.shape[0]))] = 1
    probe = {**w, key: sign_F1.expand_as(gate).contiguous()}
    if "gate_scale" in w:
        probe["gate_scale"] = torch.ones_like(w["gate_scale"])
    return probe


def sparse_over_dense_time(w: dict[str, torch.Tensor], repeats: int) -> float:
    """Median over ``repeats`` of time(sparse) / time(dense) for ``w`` on the all-ones input.

    The two paths alternate call by call so that load from other processes hits both alike.
    """
    if "gate_q4" in w:
        ones = torch.ones(1, w["gate_q4"].shape[1] * 2, dtype=torch.bfloat16)
    else:
        gate = w["gate_q"] if "gate_q" in w else w["gate"]
        dtype = w["gate_scale"].dtype if "gate_q" in w else gate.dtype
        ones = torch.ones(1, gate.shape[1], dtype=dtype)
    ratios = []
    for _ in range(repeats + 1):
        times = []
        for threshold in (1.0, -1.0):  # 1.0 forces sparse, -1.0 forces dense
            start = time.perf_counter()
            reglu_decode(ones, w, threshold)
            times.append(time.perf_counter() - start)
        ratios.append(times[0] / max(times[1], 1e-12))
    return statistics.median(ratios[1:])  # the first round is a warm-up
