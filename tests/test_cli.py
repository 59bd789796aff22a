"""The `smallthinker` command as a user meets it: help with examples, one-line errors with status 2 (exact
text), tracebacks only on request, Ctrl-C / SIGTERM during training that keeps the work, resume notes."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from smallthinker.cli import main
from smallthinker.commands import COMMANDS
from smallthinker.inference.store import QUANT_MODES
from smallthinker.modeling import SmallThinkerForCausalLM, load_model_config
from tests.train.fixtures_data import chat_tokenizer

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random SmallThinker checkpoint with a chat tokenizer."""
    path = tmp_path_factory.mktemp("cli") / "ckpt"
    tok = chat_tokenizer()
    torch.manual_seed(0)
    cfg = load_model_config("tiny-4b-style", num_hidden_layers=2, vocab_size=len(tok), bos_token_id=None,
                            eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id)  # fmt: skip
    SmallThinkerForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "llama"
    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      vocab_size=32)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def error_of(argv: list[str], capsys) -> str:
    """The one stderr line of a failing command (asserting status 2 and no traceback)."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.rstrip("\n")


def test_every_command_has_help_with_an_example(capsys):
    names = [c.name for c in COMMANDS]
    assert names == [
        "pretrain",
        "sft",
        "merge",
        "chat",
        "evaluate",
        "convert-store",
        "plot",
        "kv-report",
        "demo",
    ]
    for name in names:
        with pytest.raises(SystemExit) as done:
            main([name, "--help"])
        assert done.value.code == 0
        out = capsys.readouterr().out
        assert f"smallthinker {name}" in out.split("example", 1)[1], name
        if name == "convert-store":  # its --quant choices are the store's formats
            assert "{" + ",".join(QUANT_MODES) + "}" in out


def test_bad_override_and_missing_or_empty_data(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert error_of(["pretrain", "--optim.lr=fast"], capsys) == (
        "smallthinker pretrain: error: config.optim.lr: expected float, got 'fast'"
    )
    assert error_of(["pretrain", "--optim.lrr=1"], capsys) == (
        "smallthinker pretrain: error: config.optim: unknown key(s) ['lrr']; valid keys: "
        "['betas', 'decay_embeddings', 'eps', 'grad_clip', 'lr', 'weight_decay']"
    )
    no_synthetic = "--synthetic_dir="
    assert error_of(["pretrain", no_synthetic, "--data.sources=[{path: nothere.jsonl}]"], capsys) == (
        "smallthinker pretrain: error: data source nothere.jsonl does not exist; fix --data.sources or the recipe"
    )
    (tmp_path / "empty.jsonl").write_text("\n\n")  # blank lines only: no document
    assert error_of(["pretrain", no_synthetic, "--data.sources=[{path: empty.jsonl}]"], capsys) == (
        "smallthinker pretrain: error: data source empty.jsonl is empty; give a file with at least one document"
    )
    assert error_of(["pretrain", "--config", "pretrain_huge"], capsys).startswith(
        "smallthinker pretrain: error: config file pretrain_huge does not exist; give a YAML file or one of the "
        "recipes ['pretrain_21b', 'pretrain_4b', 'pretrain_tiny'"
    )


def test_foreign_checkpoints_are_refused_by_name(llama, checkpoint, tmp_path, capsys):
    refusal = (
        f"{llama} is not a SmallThinker checkpoint (model_type='llama', architectures=['LlamaForCausalLM']); "
        "expected model_type 'smallthinker' or architectures ['SmallThinkerForCausalLM', 'SmallThinkerModel']"
    )
    assert (
        error_of(["chat", "--model", str(llama), "--prompt", "hi"], capsys)
        == f"smallthinker chat: error: {refusal}"
    )
    assert error_of(["convert-store", "--src", str(llama), "--dst", str(tmp_path / "s")], capsys) == (
        f"smallthinker convert-store: error: {refusal}"
    )
    merge = [
        "merge",
        "--inputs",
        str(checkpoint),
        str(llama),
        "--weights",
        "0.5",
        "0.5",
        "--out",
        str(tmp_path / "m"),
    ]
    assert error_of(merge, capsys) == f"smallthinker merge: error: {refusal}"
    sft = ["sft", f"--model.init_from={llama}", "--synthetic_dir=", f"--run_dir={tmp_path / 'sft'}",
           "--data.sources=[{path: " + str(REPO / "pyproject.toml") + "}]"]  # fmt: skip
    assert error_of(sft, capsys) == f"smallthinker sft: error: {refusal}"
    assert not (tmp_path / "s").exists() and not (tmp_path / "m").exists()


def test_missing_and_truncated_checkpoints(checkpoint, tmp_path, capsys):
    assert error_of(["chat", "--model", str(tmp_path / "nope"), "--prompt", "hi"], capsys) == (
        f"smallthinker chat: error: --model {tmp_path / 'nope'} does not exist"
    )
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for f in checkpoint.iterdir():
        (damaged / f.name).write_bytes(f.read_bytes())
    weights = damaged / "model.safetensors"
    size = weights.stat().st_size
    os.truncate(weights, size // 2)
    assert error_of(["chat", "--model", str(damaged), "--prompt", "hi"], capsys) == (
        f"smallthinker chat: error: {weights} is truncated: {size // 2} bytes, its header describes {size}"
    )
    merge = [
        "merge",
        "--inputs",
        str(checkpoint),
        str(damaged),
        "--weights",
        "0.5",
        "0.5",
        "--out",
        str(tmp_path / "m"),
    ]
    assert error_of(merge, capsys).endswith(
        f"{weights} is truncated: {size // 2} bytes, its header describes {size}"
    )


def test_store_errors_budget_and_overwrite(checkpoint, tmp_path, capsys):
    store = tmp_path / "store"
    assert main(["convert-store", "--src", str(checkpoint), "--dst", str(store)]) == 0
    capsys.readouterr()
    assert error_of(["convert-store", "--src", str(checkpoint), "--dst", str(store)], capsys) == (
        f"smallthinker convert-store: error: {store} is not empty: choose another --dst or pass --overwrite"
    )
    before = (store / "manifest.json").stat().st_mtime_ns
    assert (
        main(["convert-store", "--src", str(checkpoint), "--dst", str(store), "--overwrite", "--verify"]) == 0
    )
    assert (store / "manifest.json").stat().st_mtime_ns != before
    assert not list(tmp_path.glob(".store.*"))  # temporary folders are gone
    assert len({f.stat().st_mode & 0o777 for f in store.iterdir()}) == 1  # weights have the other files' mode
    merged = tmp_path / "merged"
    assert main(["merge", "--inputs", str(checkpoint), str(checkpoint), "--weights", "0.5", "0.5",
                 "--out", str(merged)]) == 0  # fmt: skip
    assert len({f.stat().st_mode & 0o777 for f in merged.iterdir()}) == 1
    capsys.readouterr()

    chat = ["chat", "--model", str(store), "--offload", "--prompt", "hi", "--max-new-tokens", "2"]
    budget_error = error_of([*chat, "--memory-budget", "10kB"], capsys)
    assert budget_error.startswith(
        "smallthinker chat: error: memory budget 0.0 MB is too small: the minimum is "
    )
    assert budget_error.endswith("Raise --memory-budget, lower --max-context, or use an int8 store.")
    with pytest.raises(SystemExit):  # the flags the hint names are chat's own
        main(["chat", "--help"])
    help_text = capsys.readouterr().out
    assert "--memory-budget" in help_text and "--max-context" in help_text
    minimum = int(budget_error.split("(")[1].split(" bytes")[0])
    assert main([*chat, "--memory-budget", str(minimum), "--temperature", "0"]) == 0
    assert "nan" not in capsys.readouterr().out

    experts = store / "experts.bin"
    data = bytearray(experts.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64 * [0x5A])  # a corrupted block inside one expert
    experts.write_bytes(bytes(data))
    corrupted = error_of(
        [*chat, "--memory-budget", "1GB", "--max-context", "64", "--temperature", "0"], capsys
    )
    assert corrupted.startswith("smallthinker chat: error: checksum mismatch for layer ")
    assert corrupted.endswith("the store is corrupted, re-run the conversion")
    os.truncate(experts, experts.stat().st_size // 2)
    assert "is truncated" in error_of([*chat, "--memory-budget", "1GB"], capsys)
    assert error_of(["chat", "--model", str(checkpoint), "--offload", "--prompt", "hi"], capsys) == (
        f"smallthinker chat: error: --offload needs an expert store, and {checkpoint} has no manifest.json; "
        f"convert it first: smallthinker convert-store --src {checkpoint} --dst STORE"
    )


def test_debug_shows_the_traceback(tmp_path):
    cmd = [sys.executable, "-m", "smallthinker", "chat", "--model", str(tmp_path), "--prompt", "hi"]
    quiet = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 2
    assert (
        quiet.stderr
        == f"python -m smallthinker chat: error: {tmp_path} has no config.json: not a checkpoint directory\n"
    )
    loud = subprocess.run([*cmd, "--debug"], env=ENV, capture_output=True, text=True, timeout=120)
    assert loud.returncode == 1 and "Traceback (most recent call last)" in loud.stderr
    before = subprocess.run(
        [*cmd[:3], "--debug", *cmd[3:]], env=ENV, capture_output=True, text=True, timeout=120
    )
    assert before.returncode == 1 and "Traceback (most recent call last)" in before.stderr
    by_env = subprocess.run(
        cmd, env={**ENV, "SMALLTHINKER_DEBUG": "1"}, capture_output=True, text=True, timeout=120
    )
    assert "Traceback (most recent call last)" in by_env.stderr


def tiny_run_args(tmp_path: Path, data: Path) -> list[str]:
    return [
        f"--run_dir={tmp_path / 'run'}",
        "--synthetic_dir=",
        f"--data.sources=[{{path: '{data}', text_field: text}}]",
        f"--tokenizer.path={data.parent / 'tok'}",
        "--data.seq_len=32",
        "--micro_batch_size=2",
        "--checkpoint.every=1000",
        "--logging.progress_bar=false",
        "--logging.tensorboard=false",
        "--model.overrides={num_hidden_layers: 1}",
    ]


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    chat_tokenizer().save_pretrained(root / "tok")
    lines = [
        json.dumps({"text": f"document {i}: the river {i % 7} flows to the sea {i % 5}."}) for i in range(400)
    ]
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    return root / "train.jsonl"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_finishes_the_step_checkpoints_and_prints_the_resume_command(sig, small_corpus, tmp_path):
    """A real training process gets the signal mid-run: exit 128+signal, a checkpoint at the last logged step,
    and the printed command resumes from it."""
    args = ["pretrain", "--max_steps=100000", *tiny_run_args(tmp_path, small_corpus)]
    proc = subprocess.Popen([sys.executable, "-m", "smallthinker", *args], cwd=tmp_path, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline and len(_lines(metrics)) < 3:
        time.sleep(0.1)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 128 + sig, err[-3000:]
    last_step = json.loads(_lines(metrics)[-1])["step"]
    saved = tmp_path / "run" / "checkpoints" / f"step_{last_step:08d}"
    assert (saved / "trainer_state.json").is_file() and not list(saved.parent.glob(".tmp-*"))
    assert f"stopped by {sig.name} after step {last_step}; checkpoint {saved}" in err
    resume = err.split("resume with:\n", 1)[1].strip().splitlines()[0]
    assert resume == shlex.join(["python", "-m", "smallthinker", *args, "--resume", "latest"])
    # The printed command, with a nearer end, continues from that step.
    again = shlex.split(resume)[3:] + [f"--max_steps={last_step + 2}"]
    done = subprocess.run([sys.executable, "-m", "smallthinker", *again], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=240)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from {saved} (step {last_step})" in done.stderr
    assert f"the LR schedule horizon changed from 100000 to {last_step + 2} steps" in done.stderr
    assert f"steps {last_step} -> {last_step + 2}" in done.stdout
    finished = subprocess.run([sys.executable, "-m", "smallthinker", *again], cwd=tmp_path, env=ENV,
                              capture_output=True, text=True, timeout=240)  # fmt: skip
    assert (
        finished.returncode == 0 and "is finished" in finished.stderr and "nothing to do" in finished.stderr
    )


def test_resume_latest_skips_a_damaged_checkpoint(small_corpus, tmp_path, capsys):
    args = ["pretrain", *tiny_run_args(tmp_path, small_corpus), "--checkpoint.every=2"]
    assert main([*args, "--max_steps=4"]) == 0
    newest = tmp_path / "run" / "checkpoints" / "step_00000004" / "model.safetensors"
    header_len = int.from_bytes(newest.read_bytes()[:8], "little")
    os.truncate(newest, 100)
    capsys.readouterr()
    assert error_of([*args, "--max_steps=6", "--resume", str(newest.parent)], capsys) == (
        f"smallthinker pretrain: error: cannot resume from {newest.parent}: {newest} is truncated: 100 bytes, "
        f"shorter than its {8 + header_len}-byte header; resume from another checkpoint of the run"
    )
    assert main([*args, "--max_steps=6", "--resume", "latest"]) == 0
    err = capsys.readouterr().err
    assert f"skipping the incomplete checkpoint {newest.parent}: {newest} is truncated" in err
    assert f"resuming from {newest.parent.parent / 'step_00000002'} (step 2)" in err
    # Weights are written with the same mode as every other file of the checkpoint.
    modes = {p.name: p.stat().st_mode & 0o777 for p in newest.parent.parent.glob("step_00000006/*")}
    assert len(set(modes.values())) == 1, modes


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line] if path.is_file() else []


def test_sigterm_stops_the_demo_after_its_stage_checkpoint(tmp_path):
    """The demo does not go on to its next stage when a training stage is stopped: exit 143, the checkpoint
    written, no later stage run."""
    args = ["demo", "--reduced", "--pretrain-steps", "100000", "--out", "demo", "--data", "data"]
    proc = subprocess.Popen([sys.executable, "-m", "smallthinker", *args], cwd=tmp_path, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    metrics = tmp_path / "demo" / "pretrain" / "metrics.jsonl"
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline and len(_lines(metrics)) < 3:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 143, err[-3000:]
    last_step = json.loads(_lines(metrics)[-1])["step"]
    saved = tmp_path / "demo" / "pretrain" / "checkpoints" / f"step_{last_step:08d}"
    assert err.rstrip().endswith(f"python -m smallthinker demo: interrupted: stopped by SIGTERM; the stage's "
                                 f"checkpoint is {saved.relative_to(tmp_path)}")  # fmt: skip
    assert "[quickstart] pre-training" not in out and not (tmp_path / "demo" / "sft").exists()
