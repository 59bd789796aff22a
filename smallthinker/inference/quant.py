"""Weight-only int8 quantisation of expert matrices (symmetric, one scale per output channel).

Compute uses ``torch._weight_int8pack_mm`` (the CPU kernel behind gpt-fast's int8 path), which multiplies
activations by an int8 ``[N, K]`` weight and scales each of the N outputs, without materialising a
dequantised copy of the weight.
"""

from __future__ import annotations

import torch

INT8_MAX = 127  # symmetric range [-127, 127]: -128 is left unused so that negation is exact


def quantize_int8_rows(w_NK: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (output channel) symmetric int8: returns ``q [N, K] int8`` and ``scale [N]``."""
    w = w_NK.float()
    scale_N = w.abs().amax(dim=1).clamp_min(1e-12) / INT8_MAX
    q_NK = torch.round(w / scale_N[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q_NK, scale_N.to(scale_dtype)


def dequantize_int8_rows(q_NK: torch.Tensor, scale_N: torch.Tensor) -> torch.Tensor:
    """The float matrix an int8 matrix stands for (reference for tests)."""
    return q_NK.float() * scale_N.float()[:, None]


def int8_linear(x_TK: torch.Tensor, q_NK: torch.Tensor, scale_N: torch.Tensor) -> torch.Tensor:
    """``x @ dequant(q).T`` computed directly on the int8 weight -> ``[T, N]`` in x's dtype."""
    return torch._weight_int8pack_mm(x_TK, q_NK, scale_N.to(x_TK.dtype))
