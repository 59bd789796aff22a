"""Attention for CPU decoding: one query token against the cache without the flash-attention machinery.

For a single query, PyTorch's CPU `scaled_dot_product_attention` costs 75-150 µs per layer in setup alone (a
4B decode step has 32 layers); two small matmuls over grouped heads cost about half of that and no key/value copy
per query head. Prompts (several query tokens) go to `sdpa` unchanged. Registered with transformers as
"smallthinker_decode"; `formats.quantize_model` selects it.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "smallthinker_decode"


def decode_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query [B, Hq, S, D], key/value [B, Hkv, K, D] (the cache: sliding-window layers hold only their window)
    -> ([B, S, Hq, D], None). One query token: grouped fp32 matmuls and softmax; otherwise `sdpa`."""
    b, hq, s, d = query.shape
    if s != 1 or dropout > 0:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    hkv = key.shape[1]
    scale = d**-0.5 if scaling is None else scaling
    # fp32: the key length grows by one every step, and oneDNN's bf16 batched matmul builds a new kernel for each
    # new shape (~0.4 ms); MKL's fp32 GEMM has no such cost, and the cast touches only this layer's cache.
    q = query.reshape(b, hkv, hq // hkv, d).float()  # the query heads that share each key/value head
    scores = torch.matmul(q, key.float().transpose(2, 3)) * scale  # [B, Hkv, rep, K]
    if attention_mask is not None:
        mask = attention_mask[:, :, -1:, : key.shape[2]]  # [B, 1, 1, K]: this token's row
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, value.float())  # [B, Hkv, rep, D]
    return out.reshape(b, 1, hq, d).to(query.dtype), None


AttentionInterface.register(NAME, decode_attention_forward)
# The masks `sdpa` gets (causal, sliding window, padding): the prompt path is `sdpa` itself.
AttentionMaskInterface.register(NAME, sdpa_mask)
