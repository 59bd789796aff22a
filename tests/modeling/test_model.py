"""Behaviour of the SmallThinker model: experts paths, caches, masks, routing, losses, generation, loading."""

import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from smallthinker.modeling import SmallThinkerForCausalLM, load_model_config
from smallthinker.modeling.modeling_smallthinker import official_tensor_shapes, route

IMPLS = ["eager", "grouped_mm", "batched_mm"]


def tiny(preset: str = "tiny-4b-style", seed: int = 0, **overrides) -> SmallThinkerForCausalLM:
    torch.manual_seed(seed)
    config = load_model_config(preset, vocab_size=256, **overrides)
    model = SmallThinkerForCausalLM(config).eval()
    # Larger router weights than the init so that routing differs from token to token.
    for layer in model.model.layers:
        torch.nn.init.normal_(layer.block_sparse_moe.primary_router.weight, std=0.5)
    model.set_experts_implementation("eager")
    return model


def ids(batch: int = 2, length: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("preset", ["tiny-4b-style", "tiny-21b-style"])
def test_experts_implementations_agree_forward_and_backward(preset):
    model = tiny(preset, sliding_window_size=8).train()
    x = ids()
    grads, logits = {}, {}
    for impl in IMPLS:
        model.zero_grad()
        model.set_experts_implementation(impl)
        out = model(x, labels=x)
        out.loss.backward()
        logits[impl] = out.logits.detach()
        grads[impl] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for impl in IMPLS[1:]:
        torch.testing.assert_close(logits[impl], logits["eager"], atol=1e-5, rtol=0)
        for name, grad in grads["eager"].items():
            torch.testing.assert_close(grads[impl][name], grad, atol=1e-5, rtol=1e-4, msg=f"{impl} {name}")


@pytest.mark.parametrize("preset", ["tiny-4b-style", "tiny-21b-style"])
def test_cached_decode_equals_full_forward(preset):
    model = tiny(preset, sliding_window_size=6)
    x = ids(length=30)
    with torch.no_grad():
        full = model(x).logits
        out = model(x[:, :7], use_cache=True)
        steps = [out.logits]
        for t in range(7, 30):
            out = model(x[:, t : t + 1], cache=out.cache, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_sliding_window_layers_ignore_tokens_beyond_the_window():
    window, layers = 4, 2
    model = tiny(num_hidden_layers=layers, sliding_window_layout=[1] * layers, sliding_window_size=window)
    a = ids(batch=1, length=20)
    b = a.clone()
    b[0, 0] = (a[0, 0] + 1) % 256
    with torch.no_grad():
        la, lb = model(a).logits, model(b).logits
    # Each layer widens the receptive field by window - 1 positions.
    reach = layers * (window - 1)
    assert (la[0, : reach + 1] - lb[0, : reach + 1]).abs().amax() > 1e-3
    # Beyond the reach only rounding differs (tokens are batched differently per expert).
    torch.testing.assert_close(la[0, reach + 1 :], lb[0, reach + 1 :], atol=1e-6, rtol=0)


def test_full_attention_layers_see_the_whole_prefix():
    model = tiny(num_hidden_layers=2, sliding_window_layout=[0, 0], sliding_window_size=4)
    a = ids(batch=1, length=20)
    b = a.clone()
    b[0, 0] = (a[0, 0] + 1) % 256
    with torch.no_grad():
        assert not torch.allclose(model(a).logits[0, -1], model(b).logits[0, -1])


def test_nope_layers_are_position_free():
    model = tiny(num_hidden_layers=2, rope_layout=[0, 0])
    x = ids(batch=1, length=12)
    with torch.no_grad():
        base = model(x, position_ids=torch.arange(12)[None]).logits
        shifted = model(x, position_ids=torch.arange(12)[None] + 1000).logits
    torch.testing.assert_close(shifted, base, atol=0, rtol=0)
    rope_model = tiny(num_hidden_layers=2, rope_layout=[1, 1])
    with torch.no_grad():
        # Shift invariance of RoPE is only up to rounding, but different absolute positions must matter
        # less than a change of the tokens themselves; here we just check positions are used at all.
        a = rope_model(x, position_ids=torch.arange(12)[None]).logits
        b = rope_model(x, position_ids=torch.arange(12)[None].flip(-1)).logits
    assert not torch.allclose(a, b)


def test_router_hook_fires_before_attention_and_matches_in_block_routing():
    model = tiny("tiny-21b-style")
    layer = model.model.layers[1]
    events, seen = [], {}

    def on_router(module, args, output):
        events.append("router")
        seen["logits"] = output.detach().clone()

    def on_attention(module, args):
        events.append("attention")

    def on_experts(module, args):
        seen["routing"] = (args[1].clone(), args[2].clone())

    layer.block_sparse_moe.primary_router.register_forward_hook(on_router)
    layer.self_attn.register_forward_pre_hook(on_attention)
    layer.block_sparse_moe.experts.register_forward_pre_hook(on_experts)
    x = ids()
    with torch.no_grad():
        out = model(x, output_router_logits=True)
    assert events == ["router", "attention"]
    torch.testing.assert_close(seen["logits"].reshape(-1, 8), out.router_logits[1], atol=0, rtol=0)
    index, weights = route(seen["logits"].reshape(-1, 8), 2, apply_softmax=True)
    assert torch.equal(index, seen["routing"][0])
    torch.testing.assert_close(weights, seen["routing"][1], atol=0, rtol=0)


def test_routing_modes():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    idx, w = route(logits, 2, apply_softmax=False)
    assert idx.tolist() == [[3, 0]]
    s = torch.sigmoid(torch.tensor([3.0, 2.0]))
    torch.testing.assert_close(w[0], s / s.sum())
    _, w = route(logits, 2, apply_softmax=True)
    torch.testing.assert_close(w[0], torch.softmax(torch.tensor([3.0, 2.0]), -1))
    _, w16 = route(logits.bfloat16(), 2, apply_softmax=False)
    assert w16.dtype == torch.bfloat16  # sigmoid routing stays in the logits' dtype, as in the official model


def test_router_logits_and_losses():
    model = tiny("tiny-21b-style")
    x = ids()
    out = model(x, labels=x, output_router_logits=True)
    assert len(out.router_logits) == 4 and out.router_logits[0].shape == (2 * 24, 8)
    assert out.aux_loss.item() >= 1.0 - 1e-4  # E * sum f*p is minimised (1) by perfect balance
    assert out.z_loss.item() > 0
    manual = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, 256), x[:, 1:].reshape(-1), reduction="sum"
    )
    with torch.no_grad():
        summed = model(x, labels=x, num_items_in_batch=torch.tensor(1000)).loss
    torch.testing.assert_close(summed, manual.detach() / 1000, atol=1e-5, rtol=1e-5)


def test_router_losses_enter_the_loss_with_their_coefficients():
    x = ids()
    base = tiny("tiny-21b-style")
    weighted = tiny("tiny-21b-style", router_aux_loss_coef=0.1, router_z_loss_coef=0.01)
    with torch.no_grad():
        b, w = base(x, labels=x), weighted(x, labels=x)
    assert b.aux_loss is None
    torch.testing.assert_close(w.loss, b.loss + 0.1 * w.aux_loss + 0.01 * w.z_loss)


def test_aux_loss_ignores_padding():
    model = tiny("tiny-21b-style")
    x = ids(batch=1, length=16)
    pad = torch.zeros(1, 5, dtype=torch.long)
    with torch.no_grad():
        alone = model(x, output_router_logits=True)
        padded = model(
            torch.cat([x, pad], 1),
            attention_mask=torch.cat([torch.ones(1, 16), torch.zeros(1, 5)], 1).long(),
            output_router_logits=True,
        )
    torch.testing.assert_close(padded.aux_loss, alone.aux_loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(padded.z_loss, alone.z_loss, atol=1e-6, rtol=0)


def test_gradient_checkpointing_gives_the_same_gradients():
    x = ids()
    grads = []
    for checkpointing in (False, True):
        model = tiny().train()
        if checkpointing:
            model.activation_checkpointing_enable()
        model(x, labels=x).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_attention_implementations_agree(attn):
    model = tiny("tiny-21b-style", sliding_window_size=5)
    x = ids()
    with torch.no_grad():
        model.set_attn_implementation("eager")
        ref = model(x).logits
        model.set_attn_implementation(attn)
        torch.testing.assert_close(model(x).logits, ref, atol=1e-5, rtol=0)


def test_loss_falls_on_a_fixed_batch():
    model = tiny("tiny-21b-style", router_aux_loss_coef=0.01, router_z_loss_coef=0.001).train()
    model.set_experts_implementation("grouped_mm")
    x = ids(batch=4, length=32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses[::8]


def test_greedy_generation_equals_argmax_of_full_recomputation():
    model = tiny("tiny-21b-style", sliding_window_size=6)
    prompt = ids(batch=1, length=5)
    generated = model.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0)
    seq = prompt
    with torch.no_grad():
        for _ in range(20):
            seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, seq)


def test_batched_generation_with_left_padding():
    model = tiny("tiny-21b-style", sliding_window_size=6)
    short, long = ids(batch=1, length=4, seed=2), ids(batch=1, length=9, seed=3)
    batch = torch.cat([torch.cat([torch.zeros(1, 5, dtype=torch.long), short], 1), long])
    mask = torch.cat([torch.cat([torch.zeros(1, 5), torch.ones(1, 4)], 1), torch.ones(1, 9)]).long()
    out = model.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    alone_short = model.generate(short, max_new_tokens=8, do_sample=False, pad_token_id=0)
    alone_long = model.generate(long, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(out[0, 9:], alone_short[0, 4:])
    assert torch.equal(out[1, 9:], alone_long[0, 9:])


def test_sliding_window_cache_keeps_only_the_window():
    model = tiny("tiny-21b-style", sliding_window_size=8)
    with torch.no_grad():
        out = model(ids(batch=1, length=40), use_cache=True)
    lengths = [layer.keys.shape[-2] for layer in out.cache.layers]
    assert lengths == [40, 7, 7, 7]  # full layer keeps all; window layers keep window - 1 past keys


def test_save_and_reload_is_bit_identical(tmp_path):
    model = tiny("tiny-21b-style")
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(again) is SmallThinkerForCausalLM
    ours, theirs = model.state_dict(), again.state_dict()
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name
    again.set_experts_implementation("eager")
    x = ids()
    with torch.no_grad():
        assert torch.equal(model(x).logits, again(x).logits)


def test_saved_files_use_official_expert_names(tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path)
    names = load_file(tmp_path / "model.safetensors").keys()
    assert "model.layers.0.block_sparse_moe.experts.7.down.weight" in names
    assert not any("gate_up_proj" in n or n.endswith("down_proj") for n in names)
    gate = load_file(tmp_path / "model.safetensors")["model.layers.2.block_sparse_moe.experts.5.gate.weight"]
    torch.testing.assert_close(gate, model.model.layers[2].block_sparse_moe.experts.gate_up_proj[5, :128])


def test_out_of_vocabulary_ids_are_a_clear_error_when_checks_are_on(monkeypatch):
    # Off by default: the range check makes the host wait for the device on every decode step.
    monkeypatch.setenv("SMALLTHINKER_CHECK_INPUTS", "1")
    with pytest.raises(ValueError, match="vocab_size"):
        tiny()(torch.tensor([[1, 256]]))


@pytest.mark.parametrize("checks", ["0", "1"])
def test_forward_reads_token_ids_on_the_host_only_when_asked(monkeypatch, checks):
    """Without the debug flag the forward never converts the ids to Python numbers (a device sync on GPUs)."""
    monkeypatch.setenv("SMALLTHINKER_CHECK_INPUTS", checks)
    model = tiny()
    ids = torch.tensor([[1, 2, 3]])
    seen = []
    original = torch.Tensor.__int__

    def spy(tensor):
        seen.append(tensor.data_ptr() == ids.data_ptr() or tensor.dtype == ids.dtype)
        return original(tensor)

    monkeypatch.setattr(torch.Tensor, "__int__", spy)
    model.model.embed_tokens(ids)  # warm: the spy only watches the model's own forward below
    seen.clear()
    model.set_experts_implementation("grouped_mm")
    model(ids)
    assert any(seen) == (checks == "1")


def test_missing_and_misshaped_tensors_are_named(tmp_path):
    tiny().save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    broken = dict(tensors)
    del broken["model.layers.1.block_sparse_moe.experts.3.up.weight"]
    save_file(broken, path, metadata={"format": "pt"})
    with pytest.raises(
        ValueError, match=r"missing model\.layers\.1\.block_sparse_moe\.experts\.3\.up\.weight"
    ):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    broken = dict(tensors)
    broken["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(10, 128)
    save_file(broken, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"q_proj\.weight: file \(10, 128\)"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("preset", "total", "active"),
    [("smallthinker-4b", 4.035, 0.631), ("smallthinker-21b", 21.51, 2.94)],
)
def test_official_shapes_give_the_published_parameter_counts(preset, total, active):
    """Totals count each stored embedding matrix; active = everything but embeddings and the unused experts."""
    config = load_model_config(preset)
    shapes = official_tensor_shapes(config)
    n_total = sum(math.prod(s) for s in shapes.values())
    n_body = n_total - sum(math.prod(s) for n, s in shapes.items() if "embed" in n or "lm_head" in n)
    per_expert = 3 * config.hidden_size * config.moe_ffn_hidden_size
    inactive = config.num_hidden_layers * (
        config.moe_num_primary_experts - config.moe_num_active_primary_experts
    )
    assert round(n_total / 1e9, 3 if total < 10 else 2) == total
    assert round((n_body - inactive * per_expert) / 1e9, 3 if active < 1 else 2) == active
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (
        config.num_key_value_heads * 128,
        config.hidden_size,
    )
    assert ("lm_head.weight" in shapes) is not config.tie_word_embeddings


def test_saved_files_hold_exactly_the_official_tensors(tmp_path):
    for preset in ("tiny-4b-style", "tiny-21b-style"):
        model = tiny(preset)
        model.save_pretrained(tmp_path / preset)
        saved = {n: tuple(t.shape) for n, t in load_file(tmp_path / preset / "model.safetensors").items()}
        assert saved == official_tensor_shapes(model.config)
