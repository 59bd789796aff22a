"""The trainer's losses: padding never counts, every balance scope is what it says, and the model's own
`labels=` loss agrees with the trainer's on the same batch."""

from __future__ import annotations

import pytest
import torch

from smallthinker.modeling.modeling_smallthinker import load_balancing_loss, router_z_loss
from smallthinker.train.data import TOKEN_MASK
from smallthinker.train.loop import setup, train, train_step
from tests.train.train_fixtures import tiny_config

PAD = 1  # the fixture tokenizer's <pad>
SCOPES = ["micro_batch", "global_batch", "dp_group"]


def conversation_rows(num_rows: int, length: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 60, (length - 2 * r,), generator=gen) for r in range(num_rows)]


def sft_batch(rows: list[torch.Tensor], seq_len: int, extra_pad_rows: int = 0) -> dict[str, torch.Tensor]:
    """Rows padded at their tails to `seq_len` (plus whole padding rows), as the SFT stream builds them:
    labels only on the second half of each row (the "assistant" tokens), a real-token mask beside them."""
    n = len(rows) + extra_pad_rows
    ids = torch.full((n, seq_len), PAD)
    labels = torch.full((n, seq_len), -100)
    real = torch.zeros((n, seq_len), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        labels[i, len(row) // 2 : len(row)] = row[len(row) // 2 :]
        real[i, : len(row)] = 1
    positions = torch.arange(seq_len).expand(n, -1).clone()
    return {"input_ids": ids, "labels": labels, "position_ids": positions, TOKEN_MASK: real}


def step_stats(
    tmp_path, scope: str, micro: list[dict[str, torch.Tensor]], accum: int
) -> tuple[dict, torch.Tensor]:
    run = setup(
        tiny_config(
            tmp_path, f"loss.balance_scope={scope}", f"grad_accum_steps={accum}", "loss.balance_coef=0.5",
            "loss.z_coef=0.1", "logging.moe_metrics_every=1",
        )
    )  # fmt: skip
    run.counts_LE = torch.zeros(2, 4)
    stats = train_step(run, [("main", {k: v.clone() for k, v in b.items()}) for b in micro])
    return stats, run.counts_LE


@pytest.mark.parametrize("scope", SCOPES)
def test_padding_rows_and_tails_change_nothing(tmp_path, scope):
    rows = conversation_rows(4, 14, seed=0)
    plain = [sft_batch(rows[:2], 14), sft_batch(rows[2:], 14)]
    padded = [sft_batch(rows[:2], 23, extra_pad_rows=2), sft_batch(rows[2:], 19, extra_pad_rows=1)]
    a, counts_a = step_stats(tmp_path / "plain", scope, plain, accum=2)
    b, counts_b = step_stats(tmp_path / "padded", scope, padded, accum=2)
    assert torch.equal(counts_a, counts_b)
    assert counts_a.sum() == 2 * 2 * sum(
        len(r) for r in rows
    )  # top-2 of every real token in each of 2 layers
    for key in ("loss", "aux_loss", "z_loss", "grad_norm"):
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
    for key in ("layer_aux_loss", "layer_z_loss"):
        assert b["layer_losses"][key] == pytest.approx(a["layer_losses"][key], rel=1e-5), key


def test_per_layer_losses_cover_every_micro_batch(tmp_path):
    """The per-layer diagnostics of an accumulated step average all its micro-batches, not the last one."""
    rows = conversation_rows(4, 14, seed=1)
    stats, _ = step_stats(
        tmp_path, "micro_batch", [sft_batch(rows[:2], 14), sft_batch(rows[2:], 14)], accum=2
    )
    layers = stats["layer_losses"]
    assert sum(layers["layer_aux_loss"]) / 2 == pytest.approx(stats["aux_loss"], rel=1e-6)
    assert sum(layers["layer_z_loss"]) / 2 == pytest.approx(stats["z_loss"], rel=1e-6)


def test_global_batch_scope_is_the_whole_batch_at_once(tmp_path):
    """2 micro-batches of 2 rows with the global scope == 1 micro-batch of the same 4 rows: the same balance
    loss and the same gradient. The micro-batch scope differs, so the test can tell them apart."""
    common = ("loss.balance_coef=1.0", "loss.z_coef=0", "max_steps=3", "logging.every=1")
    split = train(tiny_config(tmp_path / "split", *common, "micro_batch_size=2", "grad_accum_steps=2",
                              "loss.balance_scope=global_batch"))  # fmt: skip
    whole = train(tiny_config(tmp_path / "whole", *common, "micro_batch_size=4", "grad_accum_steps=1",
                              "loss.balance_scope=global_batch"))  # fmt: skip
    local = train(tiny_config(tmp_path / "local", *common, "micro_batch_size=2", "grad_accum_steps=2",
                              "loss.balance_scope=micro_batch"))  # fmt: skip
    for s, w, m in zip(split.history, whole.history, local.history, strict=True):
        assert s["tokens_seen"] == w["tokens_seen"]
        assert s["loss"] == pytest.approx(w["loss"], rel=1e-6)
        assert s["aux_loss"] == pytest.approx(w["aux_loss"], rel=1e-6)
        assert s["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-5)
        assert abs(m["aux_loss"] - w["aux_loss"]) > 1e-6


def test_model_loss_agrees_with_the_trainer(tmp_path):
    """`model(labels=..., attention_mask=...)` with router coefficients gives the trainer's objective."""
    rows = conversation_rows(2, 14, seed=2)
    batch = sft_batch(rows, 17, extra_pad_rows=1)
    stats, _ = step_stats(tmp_path / "trainer", "micro_batch", [batch], accum=1)
    run = setup(tiny_config(tmp_path / "model"))  # same seed: the weights the trainer's step started from
    model = run.unwrapped.eval()
    model.config.router_aux_loss_coef, model.config.router_z_loss_coef = 0.5, 0.1
    mask = batch[TOKEN_MASK]
    with torch.no_grad():
        out = model(batch["input_ids"], attention_mask=mask, labels=batch["labels"])
        plain = model(batch["input_ids"], labels=batch["labels"], output_router_logits=True)
    ce = stats["loss"]
    assert out.aux_loss.item() == pytest.approx(stats["aux_loss"], rel=1e-5)
    assert out.z_loss.item() == pytest.approx(stats["z_loss"], rel=1e-5)
    assert out.loss.item() == pytest.approx(ce + 0.5 * stats["aux_loss"] + 0.1 * stats["z_loss"], rel=1e-5)
    # The same functions, without the mask, would count the padding: what the trainer must not do.
    unmasked = load_balancing_loss(plain.router_logits, 4, 2, False)
    assert unmasked.item() != pytest.approx(stats["aux_loss"], rel=1e-4)
    assert router_z_loss(plain.router_logits).item() != pytest.approx(stats["z_loss"], rel=1e-4)
