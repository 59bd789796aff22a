"""Weight formats for inference: bf16, int8 and int4 weight-only, for the experts, the attention projections and
the LM head. Routers, norms and the embedding table keep their precision.

- int8: symmetric, one scale per output channel (`quant.quantize_int8_rows`), multiplied by
  `torch._weight_int8pack_mm` without a dequantised copy of the weight.
- int4: asymmetric, a scale and a zero per group of `group_size` input channels (what llama.cpp's Q4_1 keeps;
  Q4_0 keeps a scale only), multiplied by `torch.ops.aten._weight_int4pack_mm_for_cpu`. That kernel wants the
  codes packed by `_convert_weight_to_int4pack_for_cpu`, whose byte layout depends on the matrix shape and the
  build, so it is made in memory from the codes and never written to disk.
- The portable path dequantises in plain PyTorch: correct on every machine and dtype, slow. It is used where a
  kernel cannot take a matrix (int4 needs N % 16 == 0 and K % group_size == 0) or when
  `SMALLTHINKER_PORTABLE_KERNELS=1`, and the tests hold the kernels to it.

`quantize_model(model, "int8")` converts a loaded model in place; `QuantizedExperts` keeps the experts' forward
signature and computes only the experts a token was routed to (no work for the others, one GEMM per projection of
each routed expert for a prefill).
"""

from __future__ import annotations

import os
import zlib

import torch
import torch.nn.functional as F
from torch import nn

from smallthinker.inference import attention
from smallthinker.inference.quant import quantize_int8_rows
from smallthinker.modeling.modeling_smallthinker import SmallThinkerExperts, SmallThinkerForCausalLM

FORMATS = ("bf16", "int8", "int4")
# Without native bf16 (AVX2), a bf16 GEMM runs emulated: from this many rows on (a prefill), upcasting the weight
# and multiplying in fp32 is faster (1536x1536, one thread, AVX2 dispatch: 0.54 vs 0.64 ms at 4 rows, 1.06 vs
# 2.56 ms at 16; slower at 1-2 rows, so decode stays in bf16). The int kernels are fastest on bf16 activations
# with either ISA (fp32 activations: 14-55x slower under AVX2), so they always get bf16.
FP32_PREFILL_MIN_ROWS = 4
DEFAULT_GROUP_SIZE = 32  # llama.cpp's Q4 block size
INT4_LEVELS = 15


def portable_kernels() -> bool:
    """Whether the plain-PyTorch path is forced (`SMALLTHINKER_PORTABLE_KERNELS=1`)."""
    return os.environ.get("SMALLTHINKER_PORTABLE_KERNELS", "") not in ("", "0")


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return fmt


def quantize_int4_groups(w_NK: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes 0..15 [N, K] (int32) and scales-and-zeros [K / group_size, N, 2] (fp32), so that
    w ≈ (code - 8) * scale + zero within each group of `group_size` input channels."""
    n, k = w_NK.shape
    if k % group_size:
        raise ValueError(f"int4 needs the input width {k} to be a multiple of the group size {group_size}")
    w = w_NK.float().reshape(n, k // group_size, group_size)
    lo, hi = w.amin(-1), w.amax(-1)
    scale = (hi - lo).clamp_min(1e-12) / INT4_LEVELS
    codes = torch.round((w - lo[..., None]) / scale[..., None]).clamp_(0, INT4_LEVELS).to(torch.int32)
    zero = lo + 8 * scale  # the kernel's convention: (code - 8) * scale + zero
    scales_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()
    return codes.reshape(n, k), scales_zeros


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX), as oneDNN sees it (`ONEDNN_MAX_CPU_ISA`)."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def mkldnn_linear_available() -> bool:
    """Whether oneDNN can multiply by a prepacked bf16 weight here (CPUs with native bf16)."""
    return not portable_kernels() and native_bf16()


def int4_kernel_available(out_features: int) -> bool:
    """Whether `_weight_int4pack_mm_for_cpu` takes a matrix of this many rows here (and is not switched off)."""
    return not portable_kernels() and out_features % 16 == 0


def pack_int4_for_kernel(codes_NK: torch.Tensor) -> torch.Tensor:
    """The int4 kernel's own packed layout of codes 0..15 [N, K] -> uint8 [N, K / 2]."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes_NK.to(torch.int32), 1)


def int4_layout_signature(out_features: int, in_features: int) -> int:
    """crc32 of the kernel's packing of a fixed probe matrix: equal signatures mean packed bytes written elsewhere
    (an expert store converted on another machine or torch build) mean the same codes here."""
    probe = (torch.arange(out_features * in_features, dtype=torch.int32) * 7 % 16).reshape(
        out_features, in_features
    )
    return zlib.crc32(pack_int4_for_kernel(probe).numpy().tobytes())


def int4_linear(
    x_TK: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    """`x @ dequant(w).T` on kernel-packed int4 weights -> [T, N] in x's dtype."""
    if scales_zeros.dtype != x_TK.dtype:
        scales_zeros = scales_zeros.to(x_TK.dtype)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x_TK, packed, group_size, scales_zeros)


def _pack_nibbles(codes_NK: torch.Tensor) -> torch.Tensor:
    """Two codes a byte, even input channel in the low nibble: the portable layout."""
    c = codes_NK.to(torch.uint8)
    return c[:, 0::2] | (c[:, 1::2] << 4)


def _unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    low, high = packed & 0xF, packed >> 4
    return torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1)


class QuantizedMatrix(nn.Module):
    """An [N, K] weight in one format: `forward(x [..., K]) -> [..., N]` in the compute dtype, like a bias-free
    `nn.Linear`. Activations in another dtype are cast to it (the int kernels take one dtype for x and scales)."""

    def __init__(
        self,
        weight_NK: torch.Tensor,
        fmt: str,
        group_size: int = DEFAULT_GROUP_SIZE,
        compute_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        super().__init__()
        self.fmt, self.group_size, self.compute_dtype = check_format(fmt), group_size, compute_dtype
        self.out_features, self.in_features = weight_NK.shape
        self.kernel = not portable_kernels()
        with torch.no_grad():
            if fmt == "bf16":
                weight = weight_NK.to(compute_dtype).contiguous()
                # oneDNN's blocked layout, made once: its GEMV streams the weight at several times the rate of
                # `F.linear` on the same bf16 matrix (scripts.bench_kernels).
                self.kernel = compute_dtype == torch.bfloat16 and mkldnn_linear_available()
                self.upcast_prefill = compute_dtype == torch.bfloat16 and not native_bf16()
                if self.kernel:
                    weight = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
                self.register_buffer("weight", weight)
            elif fmt == "int8":
                q, scale = quantize_int8_rows(weight_NK, compute_dtype)
                self.register_buffer("qweight", q)
                self.register_buffer("scale", scale)
            else:
                codes, scales_zeros = quantize_int4_groups(weight_NK, group_size)
                self.kernel = int4_kernel_available(self.out_features)
                packed = pack_int4_for_kernel(codes) if self.kernel else _pack_nibbles(codes)
                self.register_buffer("qweight", packed)
                self.register_buffer("scales_zeros", scales_zeros.to(compute_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.dtype == self.compute_dtype:
            return self.matmul(x)
        shape = x.shape
        y = self.matmul(x.reshape(-1, self.in_features).to(self.compute_dtype))
        return y.reshape(*shape[:-1], self.out_features)

    def matmul(self, x_TK: torch.Tensor) -> torch.Tensor:
        """[T, K] in the compute dtype -> [T, N]: the kernel call alone (decode calls it directly: a module call
        costs microseconds a step adds up hundreds of times)."""
        if self.fmt == "bf16":
            if self.kernel:
                y = torch.ops.mkldnn._linear_pointwise(x_TK.contiguous(), self.weight, None, "none", [], "")
            elif self.upcast_prefill and x_TK.shape[0] >= FP32_PREFILL_MIN_ROWS:
                y = F.linear(x_TK.float(), self.weight.float()).to(self.compute_dtype)
            else:
                y = F.linear(x_TK, self.weight)
        elif not self.kernel:
            y = F.linear(x_TK, self.dequantize().to(self.compute_dtype))
        elif self.fmt == "int8":
            y = torch._weight_int8pack_mm(x_TK, self.qweight, self.scale)
        else:
            y = int4_linear(x_TK, self.qweight, self.scales_zeros, self.group_size)
        return y

    def dequantize(self) -> torch.Tensor:
        """The fp32 [N, K] matrix this weight stands for (the kernels' reference)."""
        if self.fmt == "bf16" and not self.kernel:
            return self.weight.float()
        if self.fmt == "bf16":  # opaque oneDNN layout: multiply the identity
            eye = torch.eye(self.in_features, dtype=self.compute_dtype)
            return torch.ops.mkldnn._linear_pointwise(eye, self.weight, None, "none", [], "").float().t()
        if self.fmt == "int8":
            return self.qweight.float() * self.scale.float()[:, None]
        if self.kernel:  # the packed layout is the kernel's own: let it multiply the identity
            eye = torch.eye(self.in_features, dtype=torch.float32)
            return int4_linear(eye, self.qweight, self.scales_zeros, self.group_size).t()
        n, k, g = self.out_features, self.in_features, self.group_size
        codes = _unpack_nibbles(self.qweight).float().reshape(n, k // g, g)
        scale, zero = self.scales_zeros.float().transpose(0, 1).unbind(-1)  # [N, K/g] each
        return ((codes - 8) * scale[..., None] + zero[..., None]).reshape(n, k)

    def weight_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.fmt == "int4" else ""
        path = "kernel" if self.kernel else "portable"
        return f"{self.in_features} -> {self.out_features}, {self.fmt}{group}, {path}"


class QuantizedExperts(nn.Module):
    """Drop-in for `SmallThinkerExperts`: forward(hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K]).

    Same math as the eager reference (ascending experts, outputs accumulated in the activation dtype), computing
    only the experts that received a token: a decode step touches K experts, a prefill runs one GEMM per projection
    of each routed expert over all of its tokens.
    """

    def __init__(
        self,
        experts: SmallThinkerExperts,
        fmt: str,
        group_size: int = DEFAULT_GROUP_SIZE,
        compute_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        super().__init__()
        self.num_experts = experts.num_experts
        args = (fmt, group_size, compute_dtype)
        with torch.no_grad():
            self.gate_up = nn.ModuleList(QuantizedMatrix(w, *args) for w in experts.gate_up_proj.unbind(0))
            self.down = nn.ModuleList(QuantizedMatrix(w, *args) for w in experts.down_proj.unbind(0))

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        if hidden_states.shape[0] == 1:
            return self._one_token(hidden_states, top_k_index[0], top_k_weights[0])
        out_TH = torch.zeros_like(hidden_states)
        # One read of the routing on the host: on a CPU this is a memory read, not a device sync.
        for expert in torch.unique(top_k_index).tolist():
            token_idx, k_pos = torch.where(top_k_index == expert)
            gate, up = self.gate_up[expert](hidden_states[token_idx]).chunk(2, dim=-1)
            y = self.down[expert](F.relu(gate) * up)
            y = y * top_k_weights[token_idx, k_pos, None].to(y.dtype)
            out_TH.index_add_(0, token_idx, y.to(out_TH.dtype))
        return out_TH

    def _one_token(self, x_1H: torch.Tensor, index_K: torch.Tensor, weights_K: torch.Tensor) -> torch.Tensor:
        """Decode: the token's k experts in ascending order, summed in the activation dtype (the eager order),
        without the gathers and scatters a batch needs."""
        out_1H = torch.zeros_like(x_1H)
        x_1H = x_1H.to(self.gate_up[0].compute_dtype)
        weights_K = weights_K.to(x_1H.dtype)
        experts = index_K.tolist()
        for k in sorted(range(len(experts)), key=experts.__getitem__):
            gate, up = self.gate_up[experts[k]].matmul(x_1H).chunk(2, dim=-1)
            y = self.down[experts[k]].matmul(F.relu(gate) * up) * weights_K[k]
            out_1H += y.to(out_1H.dtype)
        return out_1H


def _replace_linears(
    module: nn.Module, names: tuple[str, ...], fmt: str, group_size: int, compute_dtype: torch.dtype
) -> None:
    for name in names:
        linear = getattr(module, name)
        setattr(module, name, QuantizedMatrix(linear.weight.detach(), fmt, group_size, compute_dtype))


@torch.no_grad()
def quantize_model(
    model: SmallThinkerForCausalLM,
    fmt: str,
    group_size: int = DEFAULT_GROUP_SIZE,
    compute_dtype: torch.dtype = torch.bfloat16,
) -> SmallThinkerForCausalLM:
    """Convert the experts, the attention projections and the LM head of `model` to `fmt`, in place; the rest of
    the model (routers, norms, embedding table) is cast to `compute_dtype`, the dtype everything then runs in.

    A tied LM head gets its own copy in `fmt`; the embedding lookup keeps the table. Experts already replaced by
    the offload engine are left to its store's format. Quantisation reads the weights in their original dtype.
    """
    check_format(fmt)
    for layer in model.model.layers:
        _replace_linears(
            layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj"), fmt, group_size, compute_dtype
        )
        moe = layer.block_sparse_moe
        if isinstance(moe.experts, SmallThinkerExperts):
            moe.experts = QuantizedExperts(moe.experts, fmt, group_size, compute_dtype)
    model.lm_head = QuantizedMatrix(model.lm_head.weight.detach(), fmt, group_size, compute_dtype)
    model.to(compute_dtype)
    model.set_attn_implementation(attention.NAME)  # decode without the flash-attention setup per layer
    model.weight_format = fmt
    return model


def weight_bytes_per_token(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: every non-expert matrix plus the top-k experts of each layer
    (embedding: one row)."""
    config = model.config
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, QuantizedExperts):
            per_expert = module.gate_up[0].weight_bytes() + module.down[0].weight_bytes()
            total += per_expert * config.moe_num_active_primary_experts
        elif isinstance(module, QuantizedMatrix) and ".experts." not in name:
            total += module.weight_bytes()
    return total
