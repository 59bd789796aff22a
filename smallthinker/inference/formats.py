"""Weight formats for inference: bf16, int8 and int4 weight-only, for the experts, the attention projections and
the LM head. Routers, norms and the embedding table keep their precision.

- int8: symmetric, one scale per output channel (`quant.quantize_int8_rows`).
- int4: asymmetric, a scale and a zero per group of `group_size` input channels (what llama.cpp's Q4_1 keeps;
  Q4_0 keeps a scale only), two codes a byte (`pack_nibbles`), scales and zeros per row ([N, K / 32, 2]).

Kernels, chosen by measurement (scripts.bench_kernels, BENCHMARKS.md):
- decode (up to a couple of tokens): the native matrix-vector kernels (`native`, compiled here): bf16 widened in
  registers or as native bf16 pairs; int8 / int4 weights against activations quantised to int8 per block of 32,
  as llama.cpp does (`quantize_activations_q8` is their reference);
- prefill: GEMMs: `F.linear` on the bf16 weight (fp32 on CPUs without native bf16, from `FP32_PREFILL_MIN_ROWS`
  rows), `torch._weight_int8pack_mm` for int8, and the native int4 kernel 16 tokens at a time (as fast as
  `_weight_int4pack_mm_for_cpu` there, without a second packed copy);
- without the native kernels: oneDNN's prepacked bf16 weight where the CPU has native bf16, `_weight_int8pack_mm`,
  and `_weight_int4pack_mm_for_cpu` on its own packing, made in memory from the codes;
- the portable path dequantises in plain PyTorch: correct on every machine and dtype, slow. It is used where no
  kernel takes a matrix or when `SMALLTHINKER_PORTABLE_KERNELS=1`, and the tests hold the kernels to it.

`quantize_model(model, "int8")` converts a loaded model in place; `QuantizedExperts` keeps the experts' forward
signature and computes only the experts a token was routed to (no work for the others, one GEMM per projection of
each routed expert for a prefill).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from smallthinker.inference import attention, native
from smallthinker.inference.quant import int8_linear, quantize_int8_rows
from smallthinker.modeling.modeling_smallthinker import (
    SmallThinkerExperts,
    SmallThinkerForCausalLM,
    SmallThinkerRouter,
)

FORMATS = ("bf16", "int8", "int4")
# Without native bf16 (AVX2), a bf16 GEMM runs emulated: from this many rows on (a prefill), upcasting the weight
# and multiplying in fp32 is faster (1536x1536, one thread, AVX2 dispatch: 0.54 vs 0.64 ms at 4 rows, 1.06 vs
# 2.56 ms at 16; slower at 1-2 rows, so decode stays in bf16). The int kernels are fastest on bf16 activations
# with either ISA (fp32 activations: 14-55x slower under AVX2), so they always get bf16.
FP32_PREFILL_MIN_ROWS = 4
DEFAULT_GROUP_SIZE = 32  # llama.cpp's Q4 block size
INT4_LEVELS = 15
ACT_BLOCK = 32  # the native int8 / int4 kernels quantise activations per block of this many channels
# Rows up to which the native bf16 / int8 matrix-vector kernels beat the GEMMs (1536x1536, AVX-512: 1 row 0.08 vs
# 0.19 ms (oneDNN bf16) and 0.08 vs 0.14 ms (int8); 4 rows 0.24 vs 0.16 and 0.32 vs 0.27 ms).
NATIVE_DECODE_ROWS = 2


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


def int4_linear(
    x_TK: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    """`x @ dequant(w).T` on `_weight_int4pack_mm_for_cpu`-packed int4 weights -> [T, N] in x's dtype."""
    if scales_zeros.dtype != x_TK.dtype:
        scales_zeros = scales_zeros.to(x_TK.dtype)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x_TK, packed, group_size, scales_zeros)


def pack_nibbles(codes_NK: torch.Tensor) -> torch.Tensor:
    """Two codes 0..15 a byte, even input channel in the low nibble: [N, K] -> uint8 [N, K / 2]. The native
    kernel's layout, the expert store's and the portable path's."""
    c = codes_NK.to(torch.uint8)
    return c[:, 0::2] | (c[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    low, high = packed & 0xF, packed >> 4
    return torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1)


def rows_first(scales_zeros: torch.Tensor) -> torch.Tensor:
    """[K / g, N, 2] (`quantize_int4_groups`) -> [N, K / g, 2] contiguous: each row's scales next to each other."""
    return scales_zeros.transpose(0, 1).contiguous()


def dequantize_int4(codes_packed: torch.Tensor, sz_NG2: torch.Tensor) -> torch.Tensor:
    """fp32 [N, K] from nibble-packed codes and per-row (scale, zero) groups."""
    n, g = sz_NG2.shape[0], sz_NG2.shape[1]
    codes = unpack_nibbles(codes_packed).float().reshape(n, g, -1)
    scale, zero = sz_NG2.float().unbind(-1)
    return ((codes - 8) * scale[..., None] + zero[..., None]).reshape(n, -1)


def quantize_activations_q8(x_TK: torch.Tensor, block: int = 32) -> torch.Tensor:
    """What the native int8 / int4 kernels multiply: x quantised to int8 per block of `block` channels
    (d = amax / 127, q = round(x / d)), dequantised back to fp32. Reference for their tests."""
    t, k = x_TK.shape
    xb = x_TK.float().reshape(t, k // block, block)
    d = xb.abs().amax(-1) / 127
    inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    return (torch.round(xb * inv[..., None]) * d[..., None]).reshape(t, k)


def native_int8_takes(q_NK: torch.Tensor) -> bool:
    """Whether the native int8 kernel can multiply this matrix here (its activation blocks need K % 32 == 0)."""
    return native.available() and q_NK.shape[1] % ACT_BLOCK == 0


def native_bf16_decode(x_TK: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `x @ weight.T` goes to the native bf16 matrix-vector kernel: decode-sized, bf16 both, available."""
    return (
        x_TK.shape[0] <= NATIVE_DECODE_ROWS
        and x_TK.dtype == weight.dtype == torch.bfloat16
        and native.available()
    )


def int8_matmul(x_TK: torch.Tensor, q_NK: torch.Tensor, scale_N: torch.Tensor) -> torch.Tensor:
    """`x @ dequant(q).T` -> [T, N] in x's dtype: the native kernel for decode, torch's int8 GEMM for more rows."""
    if x_TK.shape[0] <= NATIVE_DECODE_ROWS and native_int8_takes(q_NK):
        return native.ops().gemv_int8(x_TK, q_NK, scale_N)
    return int8_linear(x_TK, q_NK, scale_N)


def int4_matmul(x_TK: torch.Tensor, codes_packed: torch.Tensor, sz_NG2: torch.Tensor) -> torch.Tensor:
    """`x @ dequant(w).T` on nibble-packed int4 (group 32) -> [T, N] in x's dtype: the native kernel, 16 tokens
    a call; without it, the dequantised matrix."""
    if native.available():
        gemv = native.ops().gemv_int4
        if x_TK.shape[0] <= native.MAX_TOKENS:
            return gemv(x_TK, codes_packed, sz_NG2)
        return torch.cat([gemv(x, codes_packed, sz_NG2) for x in x_TK.split(native.MAX_TOKENS)])
    return F.linear(x_TK, dequantize_int4(codes_packed, sz_NG2).to(x_TK.dtype))


class QuantizedMatrix(nn.Module):
    """An [N, K] weight in one format: `forward(x [..., K]) -> [..., N]` in the compute dtype, like a bias-free
    `nn.Linear`. Activations in another dtype are cast to it (the int kernels take one dtype for x and scales).

    `path` says which kernels run: "native" (the compiled decode kernels, GEMMs for prefill), "onednn" (bf16
    prepacked), "torch" (torch's weight-only kernels) or "portable" (dequantise, then `F.linear`).
    """

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
        self.path = self._choose_path()
        self.upcast_prefill = fmt == "bf16" and compute_dtype == torch.bfloat16 and not native_bf16()
        with torch.no_grad():
            if fmt == "bf16":
                weight = weight_NK.to(compute_dtype).contiguous()
                if self.path == "onednn":  # oneDNN's blocked layout, made once
                    weight = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
                self.register_buffer("weight", weight)
            elif fmt == "int8":
                q, scale = quantize_int8_rows(weight_NK, compute_dtype)
                self.register_buffer("qweight", q)
                self.register_buffer("scale", scale)
            else:
                codes, scales_zeros = quantize_int4_groups(weight_NK, group_size)
                if self.path == "torch":
                    self.register_buffer("qweight", pack_int4_for_kernel(codes))
                    self.register_buffer("scales_zeros", scales_zeros.to(compute_dtype))
                else:  # native and portable: nibbles and per-row groups, the kernel's bf16 scales
                    self.register_buffer("qweight", pack_nibbles(codes))
                    self.register_buffer("scales_zeros", rows_first(scales_zeros).to(torch.bfloat16))

    def _choose_path(self) -> str:
        if portable_kernels():
            return "portable"
        n, k, fmt = self.out_features, self.in_features, self.fmt
        if native.available() and k % ACT_BLOCK == 0 and (fmt != "int4" or self.group_size == ACT_BLOCK):
            if fmt != "bf16" or self.compute_dtype == torch.bfloat16:
                return "native"
        if fmt == "bf16":
            return "onednn" if self.compute_dtype == torch.bfloat16 and mkldnn_linear_available() else "torch"
        if fmt == "int4" and not int4_kernel_available(n):
            return "portable"
        return "torch"

    @property
    def kernel(self) -> bool:
        """Whether a kernel (rather than the portable dequantise-then-multiply path) does the work."""
        return self.path != "portable"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.dtype == self.compute_dtype:
            return self.matmul(x)
        shape = x.shape
        y = self.matmul(x.reshape(-1, self.in_features).to(self.compute_dtype))
        return y.reshape(*shape[:-1], self.out_features)

    def matmul(self, x_TK: torch.Tensor) -> torch.Tensor:
        """[T, K] in the compute dtype -> [T, N]: the kernel call alone (decode calls it directly: a module call
        costs microseconds a step adds up hundreds of times)."""
        path, fmt = self.path, self.fmt
        if path == "portable":
            return F.linear(x_TK, self.dequantize().to(self.compute_dtype))
        if fmt == "bf16":
            if path == "native" and native_bf16_decode(x_TK, self.weight):
                return native.ops().gemv_bf16(x_TK, self.weight)
            if path == "onednn":
                return torch.ops.mkldnn._linear_pointwise(
                    x_TK.contiguous(), self.weight, None, "none", [], ""
                )
            if self.upcast_prefill and x_TK.shape[0] >= FP32_PREFILL_MIN_ROWS:
                return F.linear(x_TK.float(), self.weight.float()).to(self.compute_dtype)
            return F.linear(x_TK, self.weight)
        if fmt == "int8":
            return int8_matmul(x_TK, self.qweight, self.scale)
        if path == "native":
            return int4_matmul(x_TK, self.qweight, self.scales_zeros)
        return int4_linear(x_TK, self.qweight, self.scales_zeros, self.group_size)

    def dequantize(self) -> torch.Tensor:
        """The fp32 [N, K] matrix this weight stands for (the kernels' reference)."""
        if self.fmt == "bf16" and self.path != "onednn":
            return self.weight.float()
        if self.fmt == "bf16":  # opaque oneDNN layout: multiply the identity
            eye = torch.eye(self.in_features, dtype=self.compute_dtype)
            return torch.ops.mkldnn._linear_pointwise(eye, self.weight, None, "none", [], "").float().t()
        if self.fmt == "int8":
            return self.qweight.float() * self.scale.float()[:, None]
        if self.path == "torch":  # the packed layout is the kernel's own: let it multiply the identity
            eye = torch.eye(self.in_features, dtype=torch.float32)
            return int4_linear(eye, self.qweight, self.scales_zeros, self.group_size).t()
        return dequantize_int4(self.qweight, self.scales_zeros)

    def kernel_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, aux) as the native kernels take them: aux is the int8 scales, the int4 scales-and-zeros, or an
        empty tensor for bf16."""
        names = _BUFFERS[self.fmt]
        return getattr(self, names[0]), getattr(self, names[1]) if len(names) > 1 else torch.empty(0)

    def weight_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.fmt == "int4" else ""
        return f"{self.in_features} -> {self.out_features}, {self.fmt}{group}, {self.path}"


class QuantizedExperts(nn.Module):
    """Drop-in for `SmallThinkerExperts`: forward(hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K]).

    Same math as the eager reference (ascending experts, outputs accumulated in the activation dtype), computing
    only the experts that received a token: a decode step touches K experts, a prefill runs one GEMM per projection
    of each routed expert over all of its tokens. With the native kernels a decode step is one call per layer
    (`moe_decode`), bit-identical to the per-expert path.
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
        # One native call per token and layer (`moe_decode`) wants each projection's weights stacked over experts;
        # the per-expert matrices become views of the stacks, so nothing is held twice.
        self.fused: tuple[torch.Tensor, ...] | None = None
        if compute_dtype == torch.bfloat16 and all(m.path == "native" for m in (*self.gate_up, *self.down)):
            names = _BUFFERS[fmt]
            gate_up, down = (_stack_buffers(mats, names) for mats in (self.gate_up, self.down))
            empty = torch.empty(0)
            self.fused = (gate_up[0], gate_up[1] if len(names) > 1 else empty)
            self.fused += (down[0], down[1] if len(names) > 1 else empty)

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
        if self.fused is not None and x_1H.dtype == torch.bfloat16:
            return native.ops().moe_decode(x_1H, index_K, weights_K, *self.fused)
        out_1H = torch.zeros_like(x_1H)
        x_1H = x_1H.to(self.gate_up[0].compute_dtype)
        weights_K = weights_K.to(x_1H.dtype)
        experts = index_K.tolist()
        for k in sorted(range(len(experts)), key=experts.__getitem__):
            gate, up = self.gate_up[experts[k]].matmul(x_1H).chunk(2, dim=-1)
            y = self.down[experts[k]].matmul(F.relu(gate) * up) * weights_K[k]
            out_1H += y.to(out_1H.dtype)
        return out_1H


class DecodeRouter(SmallThinkerRouter):
    """The router in its own precision, with decode-sized inputs through the native bf16 kernel (oneDNN takes
    ~0.1 ms for this 32 x 1536 product, a few percent of a 4B step over 32 layers). Same class otherwise: hooks
    and output recording still find it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_TH = x.reshape(-1, x.shape[-1])
        if native_bf16_decode(x_TH, self.weight):
            return native.ops().gemv_bf16(x_TH, self.weight).reshape(*x.shape[:-1], self.out_features)
        return super().forward(x)


_BUFFERS = {"bf16": ("weight",), "int8": ("qweight", "scale"), "int4": ("qweight", "scales_zeros")}


def _stack_buffers(mats: nn.ModuleList, names: tuple[str, ...]) -> list[torch.Tensor]:
    """Stack the named buffers of `mats` over a new first dimension and make each module's buffer a view of its
    slice."""
    stacks = []
    for name in names:
        stacked = torch.stack([getattr(m, name) for m in mats])
        for i, m in enumerate(mats):
            setattr(m, name, stacked[i])
        stacks.append(stacked)
    return stacks


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
    native_decode: bool = True,
) -> SmallThinkerForCausalLM:
    """Convert the experts, the attention projections and the LM head of `model` to `fmt`, in place; the rest of
    the model (routers, norms, embedding table) is cast to `compute_dtype`, the dtype everything then runs in.
    With the native kernels (and `native_decode`), single-token generation steps then run in one native call
    (`decoder.NativeDecodeForCausalLM`).

    A tied LM head gets its own copy in `fmt`; the embedding lookup keeps the table. Experts already replaced by
    the offload engine are left to its store's format. Quantisation reads the weights in their original dtype.
    """
    check_format(fmt)
    for layer in model.model.layers:
        _replace_linears(
            layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj"), fmt, group_size, compute_dtype
        )
        moe = layer.block_sparse_moe
        if type(moe.primary_router) is SmallThinkerRouter:
            moe.primary_router.__class__ = DecodeRouter
        if isinstance(moe.experts, SmallThinkerExperts):
            moe.experts = QuantizedExperts(moe.experts, fmt, group_size, compute_dtype)
    model.lm_head = QuantizedMatrix(model.lm_head.weight.detach(), fmt, group_size, compute_dtype)
    model.to(compute_dtype)
    model.set_attn_implementation(attention.NAME)  # decode without the flash-attention setup per layer
    model.weight_format = fmt
    if native_decode:
        from smallthinker.inference.decoder import enable_native_decode

        enable_native_decode(model)
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
