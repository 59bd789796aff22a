"""FLOPs / MFU accounting, expert-load statistics, ReGLU neuron sparsity, run plots."""

from __future__ import annotations

import json

import pytest
import torch

from smallthinker.modeling import SmallThinkerForCausalLM, load_model_config
from smallthinker.modeling.modeling_smallthinker import expert_counts
from smallthinker.modeling.sizes import active_params
from smallthinker.train.metrics import (
    MetricsLogger,
    flops_per_token,
    load_summary,
    neuron_sparsity,
    read_metrics,
)
from smallthinker.train.plots import plot_run


def test_active_params_match_the_report():
    """SMALLTHINKER.md: 0.631 B (4B) and 2.94 B (21B) active parameters without embeddings."""
    for name, expected in (("smallthinker-4b", 0.631e9), ("smallthinker-21b", 2.94e9)):
        config = load_model_config(name)
        assert active_params(config) == pytest.approx(expected, rel=1e-3), name
        head = config.hidden_size * config.vocab_size
        assert active_params(config, include_head=True) == active_params(config) + head


def test_flops_per_token_attention_term():
    config = load_model_config("smallthinker-21b")
    base = 6 * active_params(config, include_head=True)
    # 13 full-attention layers see the whole sequence, 39 sliding-window layers at most 4096 keys.
    per_key = 12 * config.num_attention_heads * config.head_dim
    assert flops_per_token(config, 4096) == base + 52 * per_key * 4096
    assert flops_per_token(config, 16384) == base + (13 * 16384 + 39 * 4096) * per_key


def test_expert_counts_and_load_summary():
    # 2 layers, 3 tokens, 4 experts, top-2; the last token is padding.
    logits = (
        torch.tensor([[4.0, 3, 0, 0], [4, 0, 3, 0], [0, 0, 3, 4]]),
        torch.tensor([[0.0, 0, 3, 4], [0, 0, 4, 3], [4, 3, 0, 0]]),
    )
    counts = expert_counts(logits, 2, torch.tensor([[1, 1, 0]]))
    assert counts.tolist() == [[2, 1, 1, 0], [0, 0, 2, 2]]
    s = load_summary(counts)
    assert s["load_max"] == [2.0, 2.0] and s["load_min"] == [0.0, 0.0]
    assert s["dead_experts"] == [1, 2]
    assert s["expert_share"][1] == [0.0, 0.0, 0.5, 0.5]
    assert s["load_entropy"][1] == pytest.approx(0.5)  # log 2 / log 4
    assert load_summary(torch.ones(1, 8))["load_entropy"][0] == pytest.approx(1.0)


def test_neuron_sparsity_matches_a_direct_count():
    torch.manual_seed(0)
    config = load_model_config("tiny-21b-style", num_hidden_layers=2, vocab_size=64)
    model = SmallThinkerForCausalLM(config).eval()
    batch = {"input_ids": torch.randint(0, 64, (2, 12))}
    captured = []
    hooks = [layer.post_attention_layernorm.register_forward_hook(lambda m, i, o: captured.append(o))
             for layer in model.model.layers]  # fmt: skip
    with torch.no_grad():
        out = model(**batch, output_router_logits=True)
    for h in hooks:
        h.remove()
    f = config.moe_ffn_hidden_size
    expected = []
    for layer, h2_BSH, logits_TE in zip(model.model.layers, captured, out.router_logits):
        h2_TH = h2_BSH.reshape(-1, config.hidden_size)
        top_TK = logits_TE.topk(config.moe_num_active_primary_experts, dim=-1).indices
        gates = [h2_TH[t] @ layer.block_sparse_moe.experts.gate_up_proj[e, :f].T
                 for t in range(h2_TH.shape[0]) for e in top_TK[t].tolist()]  # fmt: skip
        expected.append(float((torch.stack(gates) <= 0).float().mean()))
    measured = neuron_sparsity(model, batch)
    assert measured == pytest.approx(expected, abs=1e-6)
    assert all(0.3 < v < 0.7 for v in measured)  # random init: about half the gates are negative


def test_logger_jsonl_tensorboard_and_plots(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=True, enabled=True)
    for step in range(1, 21):
        record = {"step": step, "loss": 5 - 0.1 * step, "aux_loss": 1.01, "lr": 1e-3, "stage": "main"}
        if step % 5 == 0:
            record |= load_summary(torch.rand(3, 8) * step) | {"zero_neuron_fraction": [0.5, 0.6, 0.7]}
        logger.log(record)
    logger.close()
    records = read_metrics(tmp_path)
    assert len(records) == 20 and records[4]["zero_neuron_fraction"] == [0.5, 0.6, 0.7]
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tensorboard").iterdir())
    logger = MetricsLogger(tmp_path, tensorboard=False, enabled=True)
    logger.truncate_after(10)  # a resume from step 10 drops what was logged after it
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, 11))
    paths = plot_run(tmp_path)
    assert sorted(p.name for p in paths) == ["expert_load.png", "load_balance.png", "loss.png",
                                             "neuron_sparsity.png"]  # fmt: skip
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    json.dumps(records)  # the records stay plain JSON


def test_plot_run_needs_metrics(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl not found"):
        plot_run(tmp_path)
