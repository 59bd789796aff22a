"""LR schedules (values at known steps) and AdamW parameter groups."""

import math

import pytest
import torch

from smallthinker.modeling import SmallThinkerForCausalLM, load_model_config
from smallthinker.train.config import OptimConfig, ScheduleConfig
from smallthinker.train.optim import build_optimizer, build_scheduler, lr_multiplier


def test_cosine_warmup_to_ten_percent():
    f = lr_multiplier(ScheduleConfig(kind="cosine", warmup_steps=10, min_lr_ratio=0.1), max_steps=110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)


def test_warmup_stable_decay():
    f = lr_multiplier(ScheduleConfig(kind="wsd", warmup_steps=5, min_lr_ratio=0.1, decay_fraction=0.2), 100)
    assert f(4) == pytest.approx(1.0)
    assert all(f(s) == 1.0 for s in range(5, 80))
    assert f(90) == pytest.approx(1.0 - 0.9 * 0.5)
    assert f(100) == pytest.approx(0.1)


def test_scheduler_drives_optimizer_lr():
    p = torch.nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.AdamW([p], lr=1e-3)
    sched = build_scheduler(opt, ScheduleConfig(kind="cosine", warmup_steps=2, min_lr_ratio=0.1), 10)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(5e-4) and lrs[1] == pytest.approx(1e-3)
    assert lrs[-1] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))


@pytest.mark.parametrize("decay_embeddings", [False, True])
def test_no_decay_on_norms_and_embeddings(decay_embeddings):
    config = load_model_config("tiny-4b-style", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               head_dim=16, vocab_size=64, tie_word_embeddings=False)  # fmt: skip
    model = SmallThinkerForCausalLM(config)
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1, decay_embeddings=decay_embeddings))
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0
    assert not any("norm" in n for n in names)
    assert ("model.embed_tokens.weight" in names) == decay_embeddings
    assert {"lm_head.weight", "model.layers.0.block_sparse_moe.experts.gate_up_proj"} <= names
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    assert math.isclose(opt.defaults["betas"][1], 0.95)
