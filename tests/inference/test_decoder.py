"""The native decode step (`decoder.NativeDecoder`, kernels/decoder.cpp) against the per-op model it replaces.

Reference: the same converted model on its per-op path (`quantize_model(..., native_decode=False)`, a
`DynamicCache`), which tests/inference/test_formats.py holds to the eager model. The native step rounds to bf16
where the model does, so the two differ only by fp32 summation order inside norms, softmax and dot products.
Tolerance: logits within 2 % of their scale at every step (a bf16 rounding flipped by summation order moves a
logit by one bf16 step, < 1 %), the same greedy tokens. Every SIMD branch (this CPU's, AVX2, plain C++) is built
and checked; layouts: all-RoPE full attention with sigmoid routing (4B) and NoPE + sliding-window layers with
softmax routing, the window crossed during decode (21B).
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

from smallthinker.inference import native
from smallthinker.inference.decoder import (
    NativeDecodeForCausalLM,
    NativeDecoder,
    NativeKVCache,
    native_decode_supported,
)
from smallthinker.inference.formats import FORMATS, quantize_model
from smallthinker.modeling import SmallThinkerForCausalLM, load_model_config

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels unavailable here")

BRANCHES = ("native", "x86-64-v3", "x86-64")
PRESETS = ("tiny-4b-style", "tiny-21b-style")
PROMPT, STEPS = 5, 12


def tiny(preset: str) -> SmallThinkerForCausalLM:
    torch.manual_seed(0)
    config = load_model_config(
        preset, vocab_size=256, hidden_size=64, head_dim=32, moe_ffn_hidden_size=64, sliding_window_size=8
    )
    model = SmallThinkerForCausalLM(config).eval()
    with torch.no_grad():  # routers far from uniform, as in trained models (and far from ties)
        for layer in model.model.layers:
            layer.block_sparse_moe.primary_router.weight.mul_(30)
    return model


def assert_close(got: torch.Tensor, ref: torch.Tensor) -> None:
    scale = ref.float().abs().max().item()
    err = (got.float() - ref.float()).abs().max().item()
    assert err <= 0.02 * scale, (err, scale)
    assert torch.equal(got.float().argmax(-1), ref.float().argmax(-1))


@torch.no_grad()
def compare(reference, step, prompt: torch.Tensor) -> None:
    """Prefill the reference, decode greedily: `step(token, cache_len)` -> logits must follow it."""
    cache = DynamicCache(config=reference.config)
    logits = reference(prompt, past_key_values=cache, use_cache=True).logits[:, -1:]
    for _ in range(STEPS):
        token = logits[0, -1].argmax()
        logits = reference(token.reshape(1, 1), past_key_values=cache, use_cache=True).logits
        assert_close(step(int(token)), logits)


@pytest.mark.parametrize("branch", BRANCHES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("preset", PRESETS)
def test_native_step_follows_the_per_op_model(preset, fmt, branch):
    base = tiny(preset)
    reference = quantize_model(copy.deepcopy(base), fmt, native_decode=False)
    fast = quantize_model(copy.deepcopy(base), fmt, native_decode=False)
    namespace = "smallthinker_test_" + branch.replace("-", "_")
    native.load(branch, namespace)
    decoder = NativeDecoder(fast, namespace)
    prompt = torch.randint(0, 256, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    cache = NativeKVCache(fast.config, capacity=4)  # grows twice during the test
    with torch.no_grad():
        fast(prompt, past_key_values=cache, use_cache=True)  # the prompt on the per-op path, into the buffers
    compare(reference, lambda token: decoder.step(token, cache), prompt)
    assert cache.get_seq_length() == PROMPT + STEPS and cache.layers[0].capacity == 32


@pytest.mark.parametrize("fmt", FORMATS)
def test_generate_takes_the_native_step_and_gives_the_same_tokens(fmt, monkeypatch):
    base = tiny("tiny-21b-style")
    reference = quantize_model(copy.deepcopy(base), fmt, native_decode=False)
    fast = quantize_model(copy.deepcopy(base), fmt)
    assert isinstance(fast, NativeDecodeForCausalLM) and type(reference) is SmallThinkerForCausalLM
    steps = []
    original = NativeDecoder.step
    monkeypatch.setattr(NativeDecoder, "step", lambda self, *a: steps.append(1) or original(self, *a))
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    kwargs = dict(max_new_tokens=12, do_sample=False)
    with torch.no_grad():
        got, want = fast.generate(prompt, **kwargs), reference.generate(prompt, **kwargs)
    assert torch.equal(got, want)
    assert len(steps) == 11  # every token after the first comes from the native step


def test_everything_else_takes_the_per_op_path(monkeypatch):
    """Batches, padding, requested hidden states, gradients, a DynamicCache: the model's own forward."""
    fast = quantize_model(tiny("tiny-4b-style"), "int8")
    reference = quantize_model(tiny("tiny-4b-style"), "int8", native_decode=False)
    monkeypatch.setattr(NativeDecoder, "step", lambda *a: pytest.fail("native step taken"))
    with torch.no_grad():
        batch = torch.tensor([[1, 2, 3], [4, 5, 6]])
        assert torch.equal(
            fast.generate(batch, max_new_tokens=4, do_sample=False),
            reference.generate(batch, max_new_tokens=4, do_sample=False),
        )
        cache = NativeKVCache(fast.config)
        fast(torch.tensor([[1, 2]]), past_key_values=cache, use_cache=True)
        out = fast(torch.tensor([[3]]), past_key_values=cache, use_cache=True, output_hidden_states=True)
        assert out.hidden_states is not None
        padded = fast(
            torch.tensor([[4]]), attention_mask=torch.tensor([[0, 1, 1, 1, 1]]), past_key_values=cache
        )
        assert padded.logits.shape == (1, 1, 256)
        fast(torch.tensor([[5]]), past_key_values=DynamicCache(config=fast.config))
    fast(torch.tensor([[5]]), past_key_values=NativeKVCache(fast.config))  # grad mode on


def test_no_native_step_without_native_kernels(monkeypatch):
    monkeypatch.setenv("SMALLTHINKER_NATIVE_KERNELS", "0")
    model = quantize_model(tiny("tiny-4b-style"), "int4")
    assert type(model) is SmallThinkerForCausalLM and not native_decode_supported(model)
    with pytest.raises(ValueError, match="native decode needs a model converted"):
        NativeDecoder(model)


def test_bad_input_is_a_clear_error():
    fast = quantize_model(tiny("tiny-4b-style"), "bf16")
    cache = NativeKVCache(fast.config)
    with pytest.raises(RuntimeError, match="token 999 out of range for 256"):
        fast.native_decoder.step(999, cache)
    with pytest.raises(ValueError, match="NativeKVCache holds one sequence"):
        cache.layers[0].update(torch.zeros(2, 2, 1, 32), torch.zeros(2, 2, 1, 32))


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("fmt", FORMATS)
def test_offloaded_native_step_follows_the_per_op_offload(bf16_checkpoint, fmt, sparse):
    """The engine feeds the native step each layer's experts from its cache (a budget of a few experts, so they
    are read from disk during the test); neuron-sparse (every expert, threshold 1) or dense."""
    from smallthinker.inference import load_offloaded
    from smallthinker.inference.engine import minimum_budget
    from smallthinker.inference.store import ExpertStore, convert_checkpoint

    root, ckpt = bf16_checkpoint
    store = root / f"native-store-{fmt}"
    if not store.exists():
        convert_checkpoint(ckpt, store, quant="none" if fmt == "bf16" else fmt)
    record = ExpertStore(store, direct=False).record_bytes
    budget = minimum_budget(store, max_context=64) + 6 * record  # slots for top-k + 6 of the 4 x 16 experts
    kwargs = dict(memory_budget=budget, max_context=64, weight_format=fmt, sparse=sparse)
    if sparse:
        kwargs["sparse_threshold"] = 1.0
    fast = load_offloaded(store, **kwargs)
    reference = load_offloaded(store, native_decode=False, **kwargs)
    try:
        assert isinstance(fast, NativeDecodeForCausalLM) and type(reference) is SmallThinkerForCausalLM
        prompt = torch.tensor([[3, 14, 15, 92, 65]])
        cache = NativeKVCache(fast.config)
        with torch.no_grad():
            fast(prompt, past_key_values=cache, use_cache=True)
        compare(reference, lambda token: fast.native_decoder.step(token, cache), prompt)
        stats = fast.offload_engine.stats()
        assert stats["tokens"] >= STEPS and stats["loads"] > 0 and stats["bytes_read"] > 0
        assert 0 < stats["hit_rate"] < 1
        # generate() takes the native step and gives the per-op offloaded model's tokens.
        gen = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False)
        with torch.no_grad():
            assert torch.equal(fast.generate(prompt, **gen), reference.generate(prompt, **gen))
    finally:
        fast.offload_engine.close()
        reference.offload_engine.close()


def test_a_replayed_routing_trace_drives_the_native_step():
    """`routing.replay_trace` forces the trace's experts in the native step as in the per-op model."""
    from smallthinker.inference.routing import replay_trace, synthetic_trace

    base = tiny("tiny-4b-style")
    config = base.config
    trace = synthetic_trace(
        40,
        config.num_hidden_layers,
        config.moe_num_primary_experts,
        config.moe_num_active_primary_experts,
        1.0,
        0.3,
    )
    fast = quantize_model(copy.deepcopy(base), "int8")
    reference = quantize_model(copy.deepcopy(base), "int8", native_decode=False)
    kwargs = dict(max_new_tokens=10, do_sample=False, output_logits=True, return_dict_in_generate=True)
    prompt = torch.tensor([[7, 8, 9]])
    with torch.no_grad():
        with replay_trace(fast, trace):
            got = fast.generate(prompt, **kwargs)
        with replay_trace(reference, trace):
            want = reference.generate(prompt, **kwargs)
        free = fast.generate(prompt, **kwargs)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits):
        assert_close(a, b)
    assert not torch.equal(
        torch.stack(got.logits), torch.stack(free.logits)
    )  # the trace did change the routing
    assert "step" not in vars(fast.native_decoder)  # the context restored the decoder
