"""Independent reference of the official SmallThinker forward pass, for parity tests.

Written only from the model contract (SMALLTHINKER.md sections 2-3): plain torch functions over a state
dict that uses the OFFICIAL checkpoint names (per-expert ``block_sparse_moe.experts.{j}.{gate,up,down}``)
and an official ``config.json`` dict. It deliberately imports nothing from ``smallthinker`` or from
transformers, and loops over experts in Python like the official remote code, so that an agreement
with the packaged model is evidence that both read the contract the same way.

Numerics follow the official code where it matters in bf16: RMSNorm statistics in fp32, RoPE tables in
fp32 cast to the activation dtype, sigmoid routing in the logits' dtype, softmax routing in fp32, expert
outputs accumulated into a buffer of the activation dtype in ascending expert order, logits not upcast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

StateDict = dict[str, torch.Tensor]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama-style RMSNorm: statistics in fp32, normalised value cast back, then times the weight."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def rope_cos_sin(seq_len: int, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """NEOX RoPE tables [S, D] over the full head_dim, computed in fp32 and cast to the activation dtype."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))  # [D/2]
    positions = torch.arange(seq_len, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq)  # [S, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [S, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def attention_bias(seq_len: int, window: int | None, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [S, S]: causal, and with a window each query sees itself plus window-1 earlier keys."""
    q = torch.arange(seq_len)[:, None]
    k = torch.arange(seq_len)[None, :]
    allowed = k <= q
    if window is not None:
        allowed &= k > q - window
    bias = torch.zeros(seq_len, seq_len, dtype=dtype)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)


def attention(x: torch.Tensor, sd: StateDict, prefix: str, cfg: dict, layer: int) -> torch.Tensor:
    """Self-attention of one layer on the normalised input x [B, S, H] -> [B, S, H] (before the residual)."""
    bsz, seq_len, _ = x.shape
    n_heads, n_kv, head_dim = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    q = F.linear(x, sd[f"{prefix}.q_proj.weight"]).view(bsz, seq_len, n_heads, head_dim).transpose(1, 2)
    k = F.linear(x, sd[f"{prefix}.k_proj.weight"]).view(bsz, seq_len, n_kv, head_dim).transpose(1, 2)
    v = F.linear(x, sd[f"{prefix}.v_proj.weight"]).view(bsz, seq_len, n_kv, head_dim).transpose(1, 2)
    # q [B, NH, S, D], k/v [B, NKV, S, D]
    if cfg["rope_layout"][layer] == 1:
        cos, sin = rope_cos_sin(seq_len, head_dim, cfg["rope_theta"], x.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
    # GQA: query head h reads kv head h // (NH / NKV), i.e. each kv head is repeated for consecutive heads.
    k = k.repeat_interleave(n_heads // n_kv, dim=1)  # [B, NH, S, D]
    v = v.repeat_interleave(n_heads // n_kv, dim=1)
    window = cfg["sliding_window_size"] if cfg["sliding_window_layout"][layer] == 1 else None
    scores = (q @ k.transpose(-1, -2)) * head_dim**-0.5  # [B, NH, S, S]
    scores = scores + attention_bias(seq_len, window, scores.dtype)
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    out = (probs @ v).transpose(1, 2).reshape(bsz, seq_len, n_heads * head_dim)  # [B, S, NH*D]
    return F.linear(out, sd[f"{prefix}.o_proj.weight"])


def route(router_logits: torch.Tensor, top_k: int, apply_softmax: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k on the raw logits [T, E] -> (weights [T, K], expert ids [T, K])."""
    top_logits, top_ids = torch.topk(router_logits, top_k, dim=-1)  # [T, K]
    if apply_softmax:  # 21B: softmax over the top-k logits, in fp32
        weights = torch.softmax(top_logits.float(), dim=-1).to(router_logits.dtype)
    else:  # 4B: sigmoid renormalised to sum 1, in the logits' dtype
        scores = torch.sigmoid(top_logits)
        weights = scores / scores.sum(dim=-1, keepdim=True)
    return weights, top_ids


def moe(h: torch.Tensor, router_logits: torch.Tensor, sd: StateDict, prefix: str, cfg: dict) -> torch.Tensor:
    """Routed ReGLU experts on h [T, H] with a per-expert Python loop in ascending expert order."""
    weights_TK, ids_TK = route(
        router_logits,
        cfg["moe_num_active_primary_experts"],
        cfg.get("moe_primary_router_apply_softmax", False),
    )
    out = torch.zeros_like(h)  # accumulated in the activation dtype, like the official code
    for j in range(cfg["moe_num_primary_experts"]):
        token_idx, slot = torch.where(ids_TK == j)
        if token_idx.numel() == 0:
            continue
        x = h[token_idx]
        gate = F.linear(x, sd[f"{prefix}.experts.{j}.gate.weight"])
        up = F.linear(x, sd[f"{prefix}.experts.{j}.up.weight"])
        y = F.linear(up * torch.relu(gate), sd[f"{prefix}.experts.{j}.down.weight"])
        out.index_add_(0, token_idx, y * weights_TK[token_idx, slot, None])
    return out


def decoder_layer(x: torch.Tensor, sd: StateDict, cfg: dict, layer: int) -> torch.Tensor:
    """One decoder layer on the residual stream x [B, S, H]."""
    p = f"model.layers.{layer}"
    eps = cfg["rms_norm_eps"]
    bsz, seq_len, hidden = x.shape
    # The router reads the raw layer input, before input_layernorm: its choice is known before attention.
    router_logits = F.linear(
        x.reshape(-1, hidden), sd[f"{p}.block_sparse_moe.primary_router.weight"]
    )  # [T, E]
    x = x + attention(rms_norm(x, sd[f"{p}.input_layernorm.weight"], eps), sd, f"{p}.self_attn", cfg, layer)
    h = rms_norm(x, sd[f"{p}.post_attention_layernorm.weight"], eps).reshape(-1, hidden)  # [T, H]
    return x + moe(h, router_logits, sd, f"{p}.block_sparse_moe", cfg).view(bsz, seq_len, hidden)


def reference_logits(sd: StateDict, cfg: dict, input_ids: torch.Tensor) -> torch.Tensor:
    """Official forward pass: input ids [B, S] -> logits [B, S, V] in the weights' dtype (no padding mask)."""
    x = F.embedding(input_ids, sd["model.embed_tokens.weight"])  # [B, S, H], no embedding scaling
    for layer in range(cfg["num_hidden_layers"]):
        x = decoder_layer(x, sd, cfg, layer)
    x = rms_norm(x, sd["model.norm.weight"], cfg["rms_norm_eps"])
    head = sd["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings", True) else sd["lm_head.weight"]
    return F.linear(x, head)
