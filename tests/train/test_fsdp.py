"""FSDP2 with real processes (`accelerate launch`, gloo, CPU) on the tiny model.

Two sharded processes reach the losses of one process on the same global batches; their checkpoints
are sharded (one DCP file per rank) plus a `save_pretrained` copy; they resume bit-exactly after a
rank is SIGKILLed mid-write, and onto another number of processes (2 -> 1, 1 -> 2) with the weights
and AdamW states restored exactly and the data stream continued; gradient accumulation x data
parallelism equals one large batch.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

from smallthinker.modeling import SmallThinkerForCausalLM, load_model_config
from smallthinker.train import checkpoint as ckpt
from smallthinker.train import distributed, loop
from smallthinker.train.config import ConfigError, TrainConfig, save_train_config
from smallthinker.train.loop import train
from tests.train.train_fixtures import tiny_config

REPO = Path(__file__).resolve().parents[2]
LAUNCH = {"fsdp2": "configs/accelerate/fsdp2_cpu.yaml", "ddp": "configs/accelerate/cpu_2proc.yaml"}
COMPARED = ("step", "loss", "aux_loss", "z_loss", "grad_norm", "lr", "target_tokens", "tokens_seen")
# 4 steps of an 8-step schedule, checkpoints at 2 and 4; 2 data shards: 2 processes x 1 micro-batch or
# 1 process x 2 micro-batches read the same rows. Per-micro-batch balance loss: the same terms either way.
COMMON = ("data_shards=2", "micro_batch_size=2", "max_steps=4", "schedule.total_steps=8",
          "checkpoint.every=2", "loss.balance_scope=micro_batch")  # fmt: skip
TWO, ONE = ("grad_accum_steps=1",), ("grad_accum_steps=2",)

# Slow: the tests here start interpreters through `accelerate launch`, or use runs that did.
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_cmd(kind: str, cfg: TrainConfig, config_file: Path, *module_args: str) -> list[str]:
    save_train_config(cfg, config_file)
    module = module_args or ("scripts.pretrain", "--config", str(config_file))
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / LAUNCH[kind]),
            "--main_process_port", str(free_port()), "-m", *module]  # fmt: skip


def run_launch(cmd: list[str]) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: json.loads(line)[k] for k in COMPARED} for line in lines]


def assert_close(a: list[dict], b: list[dict]) -> None:
    """fp32 tolerance: sharded reductions sum in another order than one process does."""
    assert len(a) == len(b) and a
    for x, y in zip(a, b):
        assert (x["step"], x["target_tokens"], x["tokens_seen"]) == (
            y["step"],
            y["target_tokens"],
            y["tokens_seen"],
        )
        for key in ("loss", "aux_loss", "z_loss"):
            assert x[key] == pytest.approx(y[key], abs=1e-5), key
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)


def assert_states_equal(a: dict, b: dict) -> None:
    """Weights or AdamW states (nested dicts of tensors keyed by parameter name), tensor by tensor."""
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            assert_states_equal(a[key], b[key])
        elif isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:  # param_groups: DCP's state-dict utilities hand tuples (AdamW betas) back as lists
            assert plain(a[key]) == plain(b[key]), key


def plain(value: object) -> object:
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """Holds the tokenizer and corpus every run here shares (resuming checks the data paths)."""
    return tmp_path_factory.mktemp("fsdp")


def config(base: Path, name: str, *overrides: str) -> TrainConfig:
    return tiny_config(base, f"run_dir={base / name}", *COMMON, *overrides)


@pytest.fixture(scope="module")
def sharded_run(base) -> Path:
    """2 processes, FSDP2 (activation checkpointing on, as fsdp2_cpu.yaml asks)."""
    run_launch(launch_cmd("fsdp2", config(base, "sharded", *TWO), base / "sharded.yaml"))
    return base / "sharded"


@pytest.fixture(scope="module")
def single_run(base) -> Path:
    """The same global batches on one process, 2 micro-batches per step."""
    train(config(base, "single", *ONE))
    return base / "single"


def test_two_sharded_processes_match_one_process(sharded_run, single_run):
    assert_close(records(sharded_run), records(single_run))
    step = sharded_run / "checkpoints" / "step_00000004"
    # Each rank wrote its own shard file; the optimizer lives there, not in a gathered optimizer.pt.
    assert sorted(p.name for p in (step / "dcp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not (step / "optimizer.pt").exists()
    assert {p.name for p in step.glob("*.py")} == {
        "configuration_smallthinker.py",
        "modeling_smallthinker.py",
    }
    # The save_pretrained copy: official tensor names on disk, loadable in one process.
    with safe_open(step / "model.safetensors", "pt") as f:
        assert "model.layers.0.block_sparse_moe.experts.3.gate.weight" in f.keys()
    sharded = AutoModelForCausalLM.from_pretrained(step).state_dict()
    single = AutoModelForCausalLM.from_pretrained(single_run / "checkpoints" / "step_00000004").state_dict()
    assert sharded.keys() == single.keys()
    for name in sharded:
        torch.testing.assert_close(sharded[name], single[name], rtol=0, atol=1e-6)


def test_resume_two_processes_onto_one(base, sharded_run, single_run):
    """The sharded step-2 checkpoint into one unsharded process: DCP reshards the weights and AdamW
    states exactly; the two data shards continue on this process; steps 3-4 match."""
    source = sharded_run / "checkpoints" / "step_00000002"
    cfg = config(base, "two_to_one", *ONE, f"checkpoint.resume={source}")
    run = loop.setup(cfg)
    dcp_to_torch_save(source / "dcp", base / "two_to_one.pt")  # DCP's own reader, as the reference
    saved = torch.load(base / "two_to_one.pt", weights_only=False)
    assert_states_equal(distributed.full_model_state(run.model), saved["model"])
    assert_states_equal(distributed.full_optimizer_state(run.model, run.optimizer), saved["optimizer"])
    run.logger.close()
    result = train(cfg)
    resumed = records(base / "two_to_one")
    assert [r["step"] for r in resumed] == [3, 4] and result.step == 4
    assert_close(resumed, records(sharded_run)[2:])
    # The data position after step 4: the same shard states as the 2-process run's ranks.
    one = torch.load(result.last_checkpoint / "data_rank0.pt", weights_only=False)["shards"]
    two = [torch.load(sharded_run / "checkpoints/step_00000004" / f"data_rank{r}.pt", weights_only=False)
           for r in (0, 1)]  # fmt: skip
    assert one == two[0]["shards"] + two[1]["shards"]
    assert ckpt.read_trainer_state(result.last_checkpoint).world_size == 1


def test_resume_onto_another_layout_refuses_what_differs(base, sharded_run):
    source = sharded_run / "checkpoints" / "step_00000002"
    resume = f"checkpoint.resume={source}"
    with pytest.raises(
        ConfigError, match=r"global batch is 2 x 1 x 2 = 4 sequences.*set --grad_accum_steps=2"
    ):
        train(config(base, "refused", *TWO, resume))
    with pytest.raises(
        ConfigError, match=r"split into 2 shards .*this run would split it into 1; set --data_shards=2"
    ):
        train(config(base, "refused", *ONE, resume, "data_shards=null"))
    assert not (base / "refused").exists()


def test_resume_one_process_onto_two(base, single_run, tmp_path):
    """The unsharded step-2 checkpoint into 2 FSDP2 processes: the gathered weights and AdamW states
    equal the one-process restore tensor by tensor; steps 3-4 match the one-process run."""
    source = single_run / "checkpoints" / "step_00000002"
    cfg = config(base, "one_to_two", *TWO, f"checkpoint.resume={source}")
    out = tmp_path / "restored.pt"
    config_file = tmp_path / "run.yaml"
    run_launch(launch_cmd("fsdp2", cfg, config_file, "tests.train.fsdp_worker", str(config_file), str(out)))
    restored = torch.load(out, weights_only=False)
    assert restored["sharded"] and restored["step"] == 2
    reference = loop.setup(config(base, "one_to_one", *ONE, f"checkpoint.resume={source}"))
    reference.logger.close()
    assert_states_equal(restored["model"], distributed.full_model_state(reference.model))
    assert_states_equal(
        restored["optimizer"], distributed.full_optimizer_state(reference.model, reference.optimizer)
    )
    assert_close(records(base / "one_to_two"), records(single_run)[2:])
    # After step 4 each rank holds one of the two shards, at the position the one-process run reached.
    step4 = "checkpoints/step_00000004"
    two = [torch.load(base / "one_to_two" / step4 / f"data_rank{r}.pt", weights_only=False) for r in (0, 1)]
    one = torch.load(single_run / step4 / "data_rank0.pt", weights_only=False)["shards"]
    assert two[0]["shards"] + two[1]["shards"] == one


def rank_process(launcher: psutil.Process, rank: int) -> psutil.Process | None:
    for child in launcher.children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "scripts.pretrain" in child.cmdline():
                return child
        except psutil.Error:
            continue
    return None


def test_sigkill_of_one_rank_mid_write_keeps_the_previous_checkpoint(base, sharded_run):
    """Rank 1 is killed as soon as its shard file of the step-4 checkpoint appears: step 2 stays the
    newest checkpoint, and resuming from it reproduces the uninterrupted run exactly."""
    cfg = config(base, "killed", *TWO)
    cmd = launch_cmd("fsdp2", cfg, base / "killed.yaml")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launcher = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    shard = base / "killed" / "checkpoints" / ".tmp-step_00000004" / "dcp" / "__1_0.distcp"
    deadline, victim = time.time() + 240, None
    while not shard.exists() and launcher.poll() is None and time.time() < deadline:
        victim = victim or rank_process(psutil.Process(launcher.pid), 1)
        time.sleep(0.002)
    assert victim is not None and shard.exists(), launcher.stderr.read().decode()[-3000:]
    os.kill(victim.pid, signal.SIGKILL)
    launcher.communicate(timeout=120)
    assert launcher.returncode != 0
    root = base / "killed" / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_00000002"]
    run_launch(
        launch_cmd("fsdp2", config(base, "killed", *TWO, "checkpoint.resume=latest"), base / "resume.yaml")
    )
    assert records(base / "killed") == records(sharded_run)  # same world size, fp32: bit-exact
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_00000002", "step_00000004"]


@pytest.mark.parametrize("kind", ["fsdp2", "ddp"])
def test_accumulation_times_data_parallel_is_one_large_batch(base, kind, tmp_path):
    """2 processes x 2 micro-batches of 1 row == one process, one micro-batch of those 4 rows, router
    losses included: the global_batch balance scope counts experts over the whole step, and packed rows
    hold equally many real tokens, so the z-loss means agree too."""
    layout = ("data_shards=4", "micro_batch_size=1", "max_steps=3", "checkpoint.every=0",
              "loss.balance_scope=global_batch", "loss.balance_coef=0.5")  # fmt: skip
    run_launch(
        launch_cmd(kind, config(base, f"gaxdp_{kind}", *layout, "grad_accum_steps=2"), tmp_path / "run.yaml")
    )
    # One process holding all 4 shards; each step's 4 one-row micro-batches stacked into one batch.
    run = loop.setup(config(base, f"large_{kind}", *layout, "grad_accum_steps=4"))
    large = []
    for _ in range(3):
        rows = [next(run.stream) for _ in range(4)]
        batch = {key: torch.cat([row[key] for row in rows]) for key in rows[0]}
        large.append(loop.train_step(run, [(run.stream.current_stage, batch)]))
    run.logger.close()
    for got, want in zip(records(base / f"gaxdp_{kind}"), large, strict=True):
        assert got["target_tokens"] == want["target_tokens"]
        for key in ("loss", "aux_loss", "z_loss"):
            assert got[key] == pytest.approx(want[key], abs=1e-5), key
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)


def test_bf16_policy_computes_in_bf16_on_fp32_master_weights(tmp_path):
    """The GPU recipe's policy, on a one-process gloo group: layers see bf16 inputs and weights, the
    sharded parameters and their gradients stay fp32, and checkpointing recomputes each layer."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = SmallThinkerForCausalLM(load_model_config("tiny-4b-style", vocab_size=256))
        settings = distributed.FSDPSettings("SmallThinkerDecoderLayer", True, activation_checkpointing=True)
        distributed.shard_model(model, settings, "bf16", torch.device("cpu"))
        seen = []
        q_proj = model.model.layers[0].self_attn.q_proj
        q_proj.register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, m.weight.dtype)))
        ids = torch.randint(0, 256, (2, 16))
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        assert seen == [(torch.bfloat16, torch.bfloat16)] * 2  # forward, then the recomputation
        for name, p in model.named_parameters():
            assert isinstance(p, DTensor) and p.dtype == torch.float32, name
            assert p.grad is not None and p.grad.dtype == torch.float32, name
    finally:
        dist.destroy_process_group()
