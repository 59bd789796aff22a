"""The training loop on a tiny model: exact resume, loss normalisation under accumulation, bad input."""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from smallthinker.train import checkpoint as ckpt
from smallthinker.train import loop
from smallthinker.train.config import ConfigError, save_train_config
from smallthinker.train.loop import TrainingDivergedError, train
from tests.train.train_fixtures import save_word_tokenizer, tiny_config, write_corpus

REPO = Path(__file__).resolve().parents[2]
COMPARED = ("step", "loss", "aux_loss", "z_loss", "grad_norm", "lr", "target_tokens", "tokens_seen")
# The reference run: 6 of a 12-step schedule, a checkpoint every 3 steps.
REFERENCE = ("max_steps=6", "schedule.total_steps=12", "checkpoint.every=3")


def losses(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: json.loads(line)[k] for k in COMPARED} for line in lines]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run; returns its run directory."""
    tmp = tmp_path_factory.mktemp("reference")
    train(tiny_config(tmp, *REFERENCE))
    return tmp / "run"


def test_reference_run_learns_and_logs(reference):
    records = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[-1]["loss"] < records[0]["loss"]
    assert all(math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 for r in records)
    # MoE metrics every 2 steps, neuron sparsity every 3, one value per layer.
    assert [r["step"] for r in records if "load_max" in r] == [2, 4, 6]
    assert [r["step"] for r in records if "zero_neuron_fraction" in r] == [3, 6]
    r = records[1]
    assert len(r["load_max"]) == 2 and len(r["expert_share"][0]) == 4
    assert len(r["layer_aux_loss"]) == len(r["layer_z_loss"]) == 2 and min(r["layer_aux_loss"]) > 0
    assert all(abs(sum(share) - 1) < 1e-6 for share in r["expert_share"])
    assert all(0 < f < 1 for f in records[2]["zero_neuron_fraction"])
    assert (reference / "tensorboard").exists() is False  # disabled in the tiny config
    assert sorted(p.name for p in (reference / "checkpoints").iterdir()) == ["step_00000003", "step_00000006"]


def test_checkpoint_is_a_pretrained_directory(reference):
    path = reference / "checkpoints" / "step_00000006"
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == "smallthinker"
    state = json.loads((path / "trainer_state.json").read_text())
    assert state == {"step": 6, "tokens_seen": 6 * 2 * 2 * 32, "world_size": 1}
    for name in ("optimizer.pt", "scheduler.pt", "rng_rank0.pt", "data_rank0.pt", "train_config.yaml",
                 "tokenizer.json"):  # fmt: skip
        assert (path / name).is_file(), name
    # On disk the official per-expert names are kept.
    from safetensors import safe_open

    with safe_open(path / "model.safetensors", "pt") as f:
        assert "model.layers.0.block_sparse_moe.experts.3.gate.weight" in f.keys()


def test_stop_and_resume_is_bit_exact(reference, tmp_path):
    train(tiny_config(tmp_path, "max_steps=3", "schedule.total_steps=12", "checkpoint.every=3"))
    result = train(tiny_config(tmp_path, *REFERENCE, "checkpoint.resume=latest"))
    assert result.step == 6
    assert losses(tmp_path / "run") == losses(reference)  # exact equality, fp32 on CPU


@pytest.mark.slow  # two fresh interpreters importing transformers: ~30-60 s on a loaded 2-core machine
def test_sigkill_after_checkpoint_then_resume_is_bit_exact(reference, tmp_path):
    """A real process killed with SIGKILL once its step-3 checkpoint exists; the resumed run matches."""
    config_file = tmp_path / "run.yaml"
    save_train_config(tiny_config(tmp_path, "max_steps=12", "schedule.total_steps=12", "checkpoint.every=3"),
                      config_file)  # fmt: skip
    cmd = [sys.executable, "-m", "scripts.pretrain", "--config", str(config_file)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = tmp_path / "run" / "checkpoints" / "step_00000003"
    deadline = time.time() + 120
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert first.exists(), proc.stderr.read().decode()[-2000:]
    assert proc.returncode == -signal.SIGKILL
    subprocess.run(cmd + ["--resume", "latest", *[f"--{o}" for o in REFERENCE]], cwd=REPO, check=True,
                   capture_output=True)  # fmt: skip
    assert losses(tmp_path / "run") == losses(reference)


def test_loss_normalised_over_the_whole_step(tmp_path):
    """2 micro-batches x 2 rows == 1 micro-batch x 4 rows: the same rows, the same loss and gradient.

    Rows hold different numbers of target tokens (document masking), so averaging per micro-batch
    would weight tokens unequally and not match.
    """
    no_router = ("loss.balance_coef=0", "loss.z_coef=0", "max_steps=3")
    accumulated = train(tiny_config(tmp_path / "a", *no_router, "micro_batch_size=2", "grad_accum_steps=2"))
    single = train(tiny_config(tmp_path / "b", *no_router, "micro_batch_size=4", "grad_accum_steps=1"))
    for a, b in zip(accumulated.history, single.history, strict=True):
        assert a["target_tokens"] == b["target_tokens"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


# ------------------------------------------------------------------------------------------------
# Bad input: a clear error, nothing lost
# ------------------------------------------------------------------------------------------------
def test_missing_data(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train(
            tiny_config(tmp_path, f"data={{sources: [{{path: '{tmp_path / 'nope.jsonl'}'}}], seq_len: 32}}")
        )


def test_empty_data(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        train(tiny_config(tmp_path, f"data={{sources: [{{path: '{empty}'}}], seq_len: 32}}"))


def test_tokenizer_without_eos(tmp_path):
    no_eos = save_word_tokenizer(tmp_path / "no_eos", eos=None)
    with pytest.raises(ValueError, match="no EOS token"):
        train(tiny_config(tmp_path, f"tokenizer.path={no_eos}"))


def test_seq_len_over_max_positions(tmp_path):
    corpus = write_corpus(tmp_path / "c.jsonl")
    with pytest.raises(ConfigError, match="seq_len 64 exceeds the model's max_position_embeddings 32"):
        train(tiny_config(tmp_path, f"data={{sources: [{{path: '{corpus}'}}], seq_len: 64}}",
                          "model.overrides={max_position_embeddings: 32}"))  # fmt: skip


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    """The loss turns NaN from the 5th training forward (step 3, 2 micro-batches a step): stop, keep step 2."""
    real_build = loop.build_model

    def build_model_that_diverges(*args, **kwargs):
        model = real_build(*args, **kwargs)
        calls = {"n": 0}

        def poison(module, inputs, output):
            training = torch.is_grad_enabled()  # not the gradient-free metric forwards
            calls["n"] += training
            if calls["n"] >= 5 and training:
                output.logits = output.logits * float("nan")
            return output

        model.register_forward_hook(poison)
        return model

    monkeypatch.setattr(loop, "build_model", build_model_that_diverges)
    with pytest.raises(
        TrainingDivergedError, match=r"step 3: loss nan, .*The last good checkpoint is .*step_00000002"
    ):
        train(tiny_config(tmp_path, "checkpoint.every=2", "logging.neuron_sparsity_every=0"))
    found = ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in found] == ["step_00000002"]
    model = AutoModelForCausalLM.from_pretrained(found[0])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_disk_full_while_checkpointing_keeps_previous(tmp_path, monkeypatch):
    """The optimizer file of the step-4 checkpoint hits ENOSPC half-way: step 2 stays intact."""
    real_save = torch.save

    def save_until_full(obj, f, *args, **kwargs):
        if str(f).endswith("optimizer.pt") and ".tmp-step_00000004" in str(f):
            Path(f).write_bytes(b"\0" * 1000)  # part of the file made it to disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", save_until_full)
    with pytest.raises(
        ckpt.CheckpointError, match=r"step 4 .*No space left on device.*newest is .*step_00000002"
    ):
        train(tiny_config(tmp_path, "checkpoint.every=2"))
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002"]  # no half-written directory
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    # The survivor is complete: the run resumes from it and finishes.
    result = train(tiny_config(tmp_path, "checkpoint.every=2", "checkpoint.resume=latest"))
    assert result.step == 6 and [p.name for p in ckpt.list_checkpoints(root)][-1] == "step_00000006"


def test_resume_with_incompatible_config(reference, tmp_path):
    ckpt_dir = reference / "checkpoints" / "step_00000003"
    # Same data and model as the reference (its folder), a new run directory, another micro-batch size.
    changed = tiny_config(reference.parent, f"run_dir={tmp_path / 'run'}", "micro_batch_size=4",
                          f"checkpoint.resume={ckpt_dir}")  # fmt: skip
    with pytest.raises(ConfigError, match=r"incompatible config \(micro_batch_size: checkpoint 2 vs now 4\)"):
        train(changed)
    assert not (tmp_path / "run").exists()  # refused before anything was written
    with pytest.raises(
        ConfigError, match="already holds checkpoints .newest step_00000006.; continue that run"
    ):
        train(tiny_config(reference.parent, "max_steps=2"))  # a fresh run into the reference's folder
    assert len(losses(reference)) == 6  # untouched
    with pytest.raises(ckpt.CheckpointError, match="no complete checkpoint"):
        train(tiny_config(tmp_path, "checkpoint.resume=latest"))
    with pytest.raises(ckpt.CheckpointError, match="not a training checkpoint"):
        train(tiny_config(tmp_path, f"checkpoint.resume={tmp_path}"))


def test_bf16_autocast_tracks_fp32(tmp_path):
    fp32 = train(tiny_config(tmp_path / "fp32", "max_steps=2"))
    bf16 = train(tiny_config(tmp_path / "bf16", "max_steps=2", "precision=bf16"))
    for a, b in zip(fp32.history, bf16.history, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=2e-2)
        assert b["loss"] != a["loss"]  # autocast really ran in bf16


STAGES = (
    "data.stages=[{name: short, tokens: 256}, {name: long, tokens: 100000, seq_len: 64}]",
    "stage_model_overrides={long: {rope_theta: 50000.0}}",
    "schedule.total_steps=4",
    "checkpoint.every=2",
)


def test_stage_switch_changes_seq_len_and_rope_and_resumes_exactly(tmp_path):
    """Stage `short` (2 steps of 128 tokens) then `long`: 64-token rows and RoPE base 5e4."""
    full = train(tiny_config(tmp_path / "full", *STAGES, "max_steps=4"))
    assert [r["stage"] for r in full.history] == ["short", "short", "long", "long"]
    assert [r["tokens_seen"] for r in full.history] == [128, 256, 512, 768]
    model = AutoModelForCausalLM.from_pretrained(full.last_checkpoint)
    assert model.config.rope_theta == 50000.0
    inv_freq = model.model.rotary_emb.inv_freq
    assert torch.allclose(inv_freq, 1.0 / 50000.0 ** (torch.arange(0, 16, 2).float() / 16))
    first = AutoModelForCausalLM.from_pretrained(tmp_path / "full/run/checkpoints/step_00000002")
    assert first.config.rope_theta == 10000.0
    # Stopped at the stage boundary and resumed: the same numbers.
    train(tiny_config(tmp_path / "split", *STAGES, "max_steps=2"))
    train(tiny_config(tmp_path / "split", *STAGES, "max_steps=4", "checkpoint.resume=latest"))
    assert losses(tmp_path / "split/run") == losses(tmp_path / "full/run")


def test_router_losses_enter_once(tmp_path):
    """A router coefficient in the model config does not reach the loss: the trainer owns those terms."""
    plain = train(tiny_config(tmp_path / "a", "max_steps=2", "loss.balance_coef=0", "loss.z_coef=0"))
    leaky = train(
        tiny_config(
            tmp_path / "b",
            "max_steps=2",
            "loss.balance_coef=0",
            "loss.z_coef=0",
            "model.overrides.router_aux_loss_coef=0.5",
            "model.overrides.router_z_loss_coef=0.5",
        )
    )
    assert [r["loss"] for r in leaky.history] == [r["loss"] for r in plain.history]
    assert [r["grad_norm"] for r in leaky.history] == [r["grad_norm"] for r in plain.history]
    weighted = train(tiny_config(tmp_path / "c", "max_steps=2", "loss.balance_coef=0.5", "loss.z_coef=0"))
    assert weighted.history[0]["grad_norm"] != plain.history[0]["grad_norm"]  # the trainer's term does


def test_activation_checkpointing_gives_the_same_step(tmp_path):
    plain = train(tiny_config(tmp_path / "a", "max_steps=2"))
    recomputed = train(tiny_config(tmp_path / "b", "max_steps=2", "model.activation_checkpointing=true"))
    for a, b in zip(plain.history, recomputed.history, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
