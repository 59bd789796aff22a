"""The `sorted_mm` experts implementation equals the eager loop, forward and backward."""

import pytest
import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from smallthinker.modeling import SmallThinkerForCausalLM, load_model_config
from smallthinker.modeling.experts import sorted_mm_experts_forward
from smallthinker.modeling.modeling_smallthinker import SmallThinkerExperts

H, F, E = 16, 12, 6


def experts(dtype: torch.dtype = torch.float32, seed: int = 0) -> SmallThinkerExperts:
    torch.manual_seed(seed)
    config = load_model_config(
        "tiny-4b-style", hidden_size=H, moe_ffn_hidden_size=F, moe_num_primary_experts=E
    )
    module = SmallThinkerExperts(config)
    torch.nn.init.normal_(module.gate_up_proj, std=0.5)
    torch.nn.init.normal_(module.down_proj, std=0.5)
    return module.to(dtype)


def routing(
    tokens: int, top_k: int, experts_used: list[int], seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct experts per token drawn from `experts_used`, and positive weights summing to 1 per token."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.tensor(experts_used)
    index = torch.stack([pool[torch.randperm(len(pool), generator=g)[:top_k]] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, top_k, generator=g), dim=-1)
    return index, weights


def run(module, impl, x, index, weights, grad_out):
    """Output and gradients (input, routing weights, gate_up_proj, down_proj) of one experts implementation."""
    module.config._experts_implementation = impl
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    weights = weights.clone().requires_grad_()
    out = module(x, index, weights)
    out.backward(grad_out)
    return out.detach(), x.grad, weights.grad, module.gate_up_proj.grad, module.down_proj.grad


CASES = {
    "all experts": (10, 2, list(range(E))),
    "experts without tokens": (9, 2, [0, 2, 5]),
    "top-1": (7, 1, list(range(E))),
    "single token": (1, 3, list(range(E))),
}


@pytest.mark.parametrize("case", CASES)
def test_sorted_mm_equals_eager_fp32(case):
    tokens, top_k, used = CASES[case]
    module = experts()
    index, weights = routing(tokens, top_k, used)
    g = torch.Generator().manual_seed(2)
    x, grad_out = torch.randn(tokens, H, generator=g), torch.randn(tokens, H, generator=g)
    eager = run(module, "eager", x, index, weights, grad_out)
    fast = run(module, "sorted_mm", x, index, weights, grad_out)
    for name, ref, got in zip(["out", "x", "weights", "gate_up_proj", "down_proj"], eager, fast):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5, msg=f"{case}: {name}")
    unused = sorted(set(range(E)) - set(used))
    if unused:  # uninitialised gradient slots of experts without tokens must come back as zeros
        assert fast[3][unused].abs().max() == 0 and fast[4][unused].abs().max() == 0


def test_sorted_mm_equals_eager_bf16():
    module = experts(torch.bfloat16)
    index, weights = routing(32, 2, list(range(E)))
    g = torch.Generator().manual_seed(3)
    x, grad_out = torch.randn(32, H, generator=g), torch.randn(32, H, generator=g)
    eager = run(module, "eager", x.bfloat16(), index, weights.bfloat16(), grad_out.bfloat16())
    fast = run(module, "sorted_mm", x.bfloat16(), index, weights.bfloat16(), grad_out.bfloat16())
    for name, ref, got in zip(["out", "x", "weights", "gate_up_proj", "down_proj"], eager, fast):
        assert got.dtype == torch.bfloat16, name
        scale = ref.float().abs().max()
        err = (got.float() - ref.float()).abs().max()
        assert err <= 0.02 * scale, f"{name}: max error {err:.4f} vs max magnitude {scale:.4f}"


def test_frozen_experts_get_no_gradient_and_input_still_does():
    module = experts()
    module.requires_grad_(False)
    module.config._experts_implementation = "sorted_mm"
    index, weights = routing(5, 2, list(range(E)))
    x = torch.randn(5, H, requires_grad=True)
    module(x, index, weights).sum().backward()
    assert module.gate_up_proj.grad is None and module.down_proj.grad is None
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_out_of_range_expert_index_is_a_clear_error():
    module = experts()
    module.config._experts_implementation = "sorted_mm"
    index = torch.tensor([[0, E]])
    with pytest.raises(ValueError, match="top_k_index must lie in"):
        module(torch.randn(1, H), index, torch.full((1, 2), 0.5))


def test_registered_under_its_name():
    assert ALL_EXPERTS_FUNCTIONS["sorted_mm"] is sorted_mm_experts_forward


def test_causal_lm_loss_and_gradients_equal_eager():
    torch.manual_seed(0)
    config = load_model_config("tiny-4b-style", vocab_size=256, num_hidden_layers=2)
    model = SmallThinkerForCausalLM(config).train()
    for layer in model.model.layers:  # routing that differs from token to token
        torch.nn.init.normal_(layer.block_sparse_moe.primary_router.weight, std=0.5)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    results = {}
    for impl in ["eager", "sorted_mm"]:
        model.zero_grad(set_to_none=True)
        model.set_experts_implementation(impl)
        loss = model(ids, labels=ids).loss
        loss.backward()
        results[impl] = (
            loss.detach(),
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        )
    (ref_loss, ref_grads), (loss, grads) = results["eager"], results["sorted_mm"]
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=0)
    assert grads.keys() == ref_grads.keys()
    assert any("gate_up_proj" in n for n in grads) and any("primary_router" in n for n in grads)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
