"""Expert compute on store records: dense ReGLU for many tokens, neuron-sparse ReGLU for one.

ReGLU is ``down(up(x) * relu(gate(x)))``: every neuron whose gate is <= 0 contributes exactly zero, so
after a dense ``gate`` projection only the live neurons' rows of ``up`` and of ``down^T`` need to be read
(SmallThinker report, section on sparse inference: > 60 % of neurons are dead inside a routed expert).
Whether the gather pays depends on the fraction of live neurons and on the machine, so the switch point
is measured (``calibrate_sparse_threshold``) rather than assumed.

Record layouts (see ``store.record_layout``): ``gate [F, H]``, ``up [F, H]``, ``down_t [F, H]``; int8:
``gate_q``, ``up_q`` ``[F, H]``, ``down_q [H, F]`` with per-output-channel scales.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from smallthinker.inference.formats import DEFAULT_GROUP_SIZE as INT4_GROUP_SIZE
from smallthinker.inference.formats import int4_linear
from smallthinker.inference.quant import int8_linear

DEFAULT_SPARSE_THRESHOLD = 0.4  # live-neuron fraction below which the sparse path is used, if not calibrated


def reglu_dense(x_TH: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
    """One expert on T tokens -> [T, H]."""
    if "gate_q4" in w:
        g_TF = int4_linear(x_TH, w["gate_q4"], w["gate_sz"], INT4_GROUP_SIZE)
        u_TF = int4_linear(x_TH, w["up_q4"], w["up_sz"], INT4_GROUP_SIZE)
        return int4_linear(F.relu(g_TF) * u_TF, w["down_q4"], w["down_sz"], INT4_GROUP_SIZE)
    if "gate_q" in w:
        g_TF = int8_linear(x_TH, w["gate_q"], w["gate_scale"])
        u_TF = int8_linear(x_TH, w["up_q"], w["up_scale"])
        return int8_linear(u_TF * F.relu(g_TF), w["down_q"], w["down_scale"])
    h_TF = F.linear(x_TH, w["up"]) * F.relu(F.linear(x_TH, w["gate"]))
    return F.linear(h_TF, w["down_t"].t())


def reglu_decode(x_1H: torch.Tensor, w: dict[str, torch.Tensor], threshold: float) -> torch.Tensor:
    """One expert on one token -> [1, H]; neuron-sparse when few enough gate neurons are alive (bf16 and int8
    records: the int4 kernel's packed rows cannot be gathered one neuron at a time)."""
    if "gate_q4" in w:
        return reglu_dense(x_1H, w)
    if "gate_q" in w:
        g_1F = int8_linear(x_1H, w["gate_q"], w["gate_scale"])
    else:
        g_1F = F.linear(x_1H, w["gate"])
    live_N = (g_1F[0] > 0).nonzero().flatten()
    if live_N.numel() > threshold * g_1F.shape[1]:
        return _finish_dense(x_1H, g_1F, w)
    if live_N.numel() == 0:
        return x_1H.new_zeros(x_1H.shape)
    g_N = g_1F[0, live_N]
    if "gate_q" in w:
        u_1N = int8_linear(x_1H, w["up_q"].index_select(0, live_N), w["up_scale"][live_N])
        h_1F = torch.zeros_like(g_1F)
        h_1F[0, live_N] = u_1N[0] * g_N
        return int8_linear(h_1F, w["down_q"], w["down_scale"])
    u_1N = F.linear(x_1H, w["up"].index_select(0, live_N))
    # Rows of down^T are contiguous, so the gather is a plain row copy (columns of down would be strided).
    return F.linear(u_1N * g_N, w["down_t"].index_select(0, live_N).t())


def _finish_dense(x_1H: torch.Tensor, g_1F: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
    if "gate_q" in w:
        u_1F = int8_linear(x_1H, w["up_q"], w["up_scale"])
        return int8_linear(u_1F * F.relu(g_1F), w["down_q"], w["down_scale"])
    return F.linear(F.linear(x_1H, w["up"]) * F.relu(g_1F), w["down_t"].t())


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
