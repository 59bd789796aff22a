"""Weight formats: every kernel path against its portable reference and against the eager model.

Tolerances: the bf16 format is the bf16 eager model bit for bit (a prompt up to bf16 rounding on CPUs without
native bf16, where its GEMMs run in fp32); int8 and int4 kernels match the dequantised
matrix to bf16 rounding and, for the native decode kernels, int8 activation rounding (relative error < 1 %); the
quantisation error itself is bounded per format. tests/inference/test_native.py holds the native kernels to
their exact reference.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from smallthinker.inference import native
from smallthinker.inference.formats import (
    FORMATS,
    QuantizedExperts,
    QuantizedMatrix,
    native_bf16,
    quantize_int4_groups,
    quantize_model,
    weight_bytes_per_token,
)
from smallthinker.modeling import SmallThinkerForCausalLM, load_model_config
from smallthinker.modeling.modeling_smallthinker import SmallThinkerRouter


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def tiny_model(preset: str = "tiny-21b-style") -> SmallThinkerForCausalLM:
    torch.manual_seed(0)
    config = load_model_config(preset, vocab_size=128, hidden_size=64, head_dim=16, moe_ffn_hidden_size=32)
    model = SmallThinkerForCausalLM(config).eval()
    with torch.no_grad():  # routers far from uniform, as in trained models
        for layer in model.model.layers:
            layer.block_sparse_moe.primary_router.weight.mul_(50)
    return model


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("shape", [(48, 64), (32, 96), (8, 64)])  # 8 rows: int4 takes the portable path
def test_kernels_match_the_dequantised_matrix(fmt, shape):
    torch.manual_seed(1)
    w = torch.randn(*shape) * 0.02
    m = QuantizedMatrix(w, fmt)
    x = torch.randn(5, shape[1]).bfloat16()
    expected = x.float() @ m.dequantize().t()
    assert rel_err(m(x), expected) < 1e-2
    # The quantisation error itself: int8 per-channel is fine, int4 group-wise coarser.
    assert rel_err(m.dequantize(), w) < (0.01 if fmt == "int8" else 0.12)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_portable_path_equals_the_kernel(fmt, monkeypatch):
    torch.manual_seed(2)
    w = torch.randn(64, 128) * 0.02
    kernel = QuantizedMatrix(w, fmt)
    monkeypatch.setenv("SMALLTHINKER_PORTABLE_KERNELS", "1")
    portable = QuantizedMatrix(w, fmt)
    assert kernel.kernel and not portable.kernel
    torch.testing.assert_close(portable.dequantize(), kernel.dequantize(), atol=1e-6, rtol=0)
    x = torch.randn(3, 128).bfloat16()
    assert rel_err(portable(x), kernel(x)) < 1e-2


def test_int4_groups_reconstruct_within_half_a_step():
    torch.manual_seed(3)
    w = torch.randn(16, 64)
    codes, sz = quantize_int4_groups(w, 32)
    scale, zero = sz.transpose(0, 1).unbind(-1)  # [N, K/g]
    deq = ((codes.reshape(16, 2, 32).float() - 8) * scale[..., None] + zero[..., None]).reshape(16, 64)
    step = scale.repeat_interleave(32, dim=1)
    assert ((deq - w).abs() <= step / 2 + 1e-6).all()
    with pytest.raises(ValueError, match="multiple of the group size 32"):
        quantize_int4_groups(torch.randn(16, 48), 32)


def test_bf16_format_is_the_bf16_eager_model():
    reference = tiny_model().to(torch.bfloat16)
    reference.set_experts_implementation("eager")
    converted = quantize_model(tiny_model(), "bf16")
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        got, want = converted(ids).logits, reference(ids).logits
        if native_bf16():
            assert torch.equal(got, want)
        else:  # a prompt's GEMMs run in fp32 here (FP32_PREFILL_MIN_ROWS): the same up to bf16 rounding
            torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-3)
            assert torch.equal(got.argmax(-1), want.argmax(-1))
        assert torch.equal(converted(ids[:1, :1]).logits, reference(ids[:1, :1]).logits)  # the decode path


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantised_models_track_the_reference(fmt):
    reference = tiny_model()
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        expected = reference(ids).logits
        got = quantize_model(tiny_model(), fmt)(ids).logits
    # Random weights: every matrix's error compounds through 4 layers (each int4 matrix is ~10 % off).
    assert rel_err(got, expected) < (0.03 if fmt == "int8" else 0.25)
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > (0.8 if fmt == "int8" else 0.5)


def test_what_is_converted_and_what_is_not():
    model = quantize_model(tiny_model(), "int8")
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, QuantizedMatrix) and isinstance(model.lm_head, QuantizedMatrix)
    assert isinstance(layer.block_sparse_moe.experts, QuantizedExperts)
    router = layer.block_sparse_moe.primary_router
    assert isinstance(router, SmallThinkerRouter) and router.weight.dtype == torch.bfloat16
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown weight format 'int3'"):
        quantize_model(tiny_model(), "int3")


def test_decode_touches_only_the_routed_experts(monkeypatch):
    """One token, top-k experts per layer: exactly 2 * k expert matrix products per layer, none for the others."""
    model = quantize_model(tiny_model(), "int8")
    for layer in model.model.layers:  # the per-expert path (the fused native call is tested against it below)
        layer.block_sparse_moe.experts.fused = None
    expert_matrices = {
        id(m) for layer in model.model.layers for m in layer.block_sparse_moe.experts.modules()
        if isinstance(m, QuantizedMatrix)
    }  # fmt: skip
    calls = []
    original = QuantizedMatrix.matmul

    def counting(self, x):
        calls.append(id(self) in expert_matrices)
        return original(self, x)

    monkeypatch.setattr(QuantizedMatrix, "matmul", counting)
    with torch.no_grad():
        model(torch.tensor([[5]]))
    config = model.config
    assert sum(calls) == 2 * config.moe_num_active_primary_experts * config.num_hidden_layers


@pytest.mark.parametrize("fmt", FORMATS)
def test_fused_expert_decode_is_the_per_expert_path_bit_for_bit(fmt):
    """`moe_decode` (one native call per layer and token) against the per-expert kernel calls it replaces: the
    same logits bit for bit over a greedy generation, and the per-expert matrices are views of its stacks."""
    if not native.available():
        pytest.skip("native kernels unavailable here")
    fused = quantize_model(tiny_model(), fmt, native_decode=False)
    split = quantize_model(tiny_model(), fmt, native_decode=False)
    experts = fused.model.layers[0].block_sparse_moe.experts
    assert experts.fused is not None
    assert experts.down[1].dequantize().data_ptr() != 0 and experts.down[1].weight_bytes() > 0
    assert experts.fused[2][1].data_ptr() == next(experts.down[1].buffers()).data_ptr()
    for layer in split.model.layers:
        layer.block_sparse_moe.experts.fused = None
    kwargs = dict(max_new_tokens=10, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        a = fused.generate(torch.tensor([[1, 2, 3]]), **kwargs)
        b = split.generate(torch.tensor([[1, 2, 3]]), **kwargs)
    assert torch.equal(a.sequences, b.sequences)
    assert torch.equal(torch.stack(a.logits), torch.stack(b.logits))


@pytest.mark.parametrize("fmt", FORMATS)
def test_greedy_generation_runs_in_every_format(fmt):
    model = quantize_model(tiny_model(), fmt)
    with torch.no_grad():
        out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=8, do_sample=False)
    assert out.shape == (1, 11)


def test_bytes_per_token_shrink_with_the_format():
    sizes = {fmt: weight_bytes_per_token(quantize_model(tiny_model(), fmt)) for fmt in FORMATS}
    assert sizes["int8"] < 0.6 * sizes["bf16"]
    assert sizes["int4"] < 0.7 * sizes["int8"]


AVX2_PROBE = """
import torch
from smallthinker.inference import native
from smallthinker.inference.formats import QuantizedMatrix, quantize_activations_q8
assert torch.backends.cpu.get_cpu_capability() in ("AVX2", "DEFAULT"), torch.backends.cpu.get_cpu_capability()
assert native.describe() == "bf16=avx2-fma int8/int4=avx2", native.describe()
torch.manual_seed(0)
w = torch.randn(64, 128) * 0.02
for rows in (1, 2, 16):  # decode (native), and prefill (GEMMs; bf16 in fp32 without native bf16)
    x = torch.randn(rows, 128).bfloat16()
    for fmt in ("bf16", "int8", "int4"):
        m = QuantizedMatrix(w, fmt)
        assert m.path == "native", (fmt, m.path)
        xq = quantize_activations_q8(x) if fmt != "bf16" and (rows <= 2 or fmt == "int4") else x.float()
        ref = xq @ m.dequantize().t()
        err = ((m(x).float() - ref).norm() / ref.norm()).item()
        assert err < 1e-2, (fmt, rows, err)
    assert QuantizedMatrix(w, "bf16").upcast_prefill
print("ok")
"""


def test_kernels_are_correct_on_avx2_only_dispatch():
    """What a CPU without AVX-512 runs, forced here: PyTorch's and oneDNN's AVX2 kernels and the native kernels'
    AVX2 branch (built for x86-64-v3); every format matches its dequantised matrix, decode and prefill."""
    env = {
        **os.environ,
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "SMALLTHINKER_KERNEL_MARCH": "x86-64-v3",
    }
    done = subprocess.run(
        [sys.executable, "-c", AVX2_PROBE], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok"


def test_quality_report_per_format(tmp_path):
    from smallthinker.inference.quality import compare_formats, format_quality_table

    tiny_model().save_pretrained(tmp_path / "ckpt")
    sequences = [torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    rows = compare_formats(tmp_path / "ckpt", sequences)
    assert [r["format"] for r in rows] == list(FORMATS)
    assert rows[0]["max_abs_logit_err"] == 0 and rows[0]["top1_agreement"] == 1
    assert rows[1]["rel_logit_err"] < rows[2]["rel_logit_err"] < 0.25  # int8 closer than int4
    assert "| int4 |" in format_quality_table(rows)


def test_decode_attention_matches_sdpa_past_the_window():
    """The one-token attention of quantised models against sdpa, past the 8-token sliding window of the
    21B-style layout, with a padded batch (an explicit attention mask)."""
    from smallthinker.inference.attention import NAME

    reference = tiny_model("tiny-21b-style").to(torch.bfloat16)
    fast = tiny_model("tiny-21b-style").to(torch.bfloat16)
    fast.set_attn_implementation(NAME)
    ids = torch.randint(0, 128, (2, 5))
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])  # left padding in the first row
    kwargs = dict(attention_mask=mask, max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = reference.generate(ids, output_logits=True, return_dict_in_generate=True, **kwargs)
        got = fast.generate(ids, output_logits=True, return_dict_in_generate=True, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), atol=2e-2, rtol=0)
