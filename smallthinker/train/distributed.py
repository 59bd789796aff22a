"""FSDP2 (`fully_shard`) for the training loop, with the same code on CPU (gloo) and GPU (NCCL).

`accelerate launch` with `distributed_type: FSDP` and `fsdp_version: 2` (configs/accelerate/fsdp2*.yaml)
starts the processes and exports the FSDP settings; the loop then shards the model itself: one
`fully_shard` unit per decoder layer plus the root (embeddings, final norm, LM head). The loop does it
rather than accelerate's plugin because accelerate turns FSDP off on CPU, and one code path that runs on
both is one code path that is tested.

Precision: `precision: bf16` keeps fp32 master weights sharded, all-gathers and computes in bf16 and
reduce-scatters gradients in fp32 (`MixedPrecisionPolicy`; the loop's bf16 autocast still runs around the
forward passes); `fp32` computes in fp32 (the CPU default).

Checkpoints of a sharded model go through `torch.distributed.checkpoint` (DCP): every rank writes its own
shards of the weights and AdamW states into `dcp/`; DCP reshards on load, so a checkpoint written by N
processes loads into M processes, or into one unsharded process. A full-weight `save_pretrained` copy is
written next to it by rank 0 for inference and `from_pretrained`.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from smallthinker.train.config import ConfigError

DCP_DIR = "dcp"  # inside a checkpoint directory: the sharded model + optimizer state


# accelerate fsdp_config keys whose `true` the trainer cannot honour: refused rather than ignored.
UNSUPPORTED = ("offload_params", "cpu_ram_efficient_loading")


@dataclass(frozen=True)
class FSDPSettings:
    """What the launch config asks of FSDP2 (exported by `accelerate launch` as FSDP_* variables)."""

    layer_cls: str
    reshard_after_forward: bool
    activation_checkpointing: bool


def requested_fsdp2() -> FSDPSettings | None:
    """The FSDP2 settings of the launcher, or None when it did not ask for FSDP."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise ConfigError(
            f"the launch config asks for FSDP version {version}; this trainer shards with FSDP2: set "
            "fsdp_version: 2 in the accelerate config (see configs/accelerate/fsdp2.yaml)"
        )
    unsupported = [
        name for name in UNSUPPORTED if os.environ.get(f"FSDP_{name.upper()}", "false").lower() == "true"
    ]
    if unsupported:
        raise ConfigError(
            f"the launch config sets {', '.join(f'fsdp_{n}: true' for n in unsupported)}, which this trainer does "
            "not implement (every rank builds the model, weights stay on the accelerator); set it to false"
        )
    return FSDPSettings(
        layer_cls=os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "SmallThinkerDecoderLayer").split(",")[0],
        reshard_after_forward=os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() != "false",
        activation_checkpointing=os.environ.get("FSDP_ACTIVATION_CHECKPOINTING", "false").lower() == "true",
    )


def mixed_precision_policy(precision: str) -> Any:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()  # everything in the parameters' fp32


def shard_model(model: nn.Module, settings: FSDPSettings, precision: str, device: torch.device) -> nn.Module:
    """`fully_shard` every decoder layer, then the root, over all processes (in place; returns the model).

    Must run before the optimizer is built: sharding replaces the parameters by DTensor shards.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    layers = [m for m in model.modules() if type(m).__name__ == settings.layer_cls]
    if not layers:
        raise ConfigError(
            f"fsdp_transformer_layer_cls_to_wrap={settings.layer_cls!r} matches no module of "
            f"{type(model).__name__}; use SmallThinkerDecoderLayer"
        )
    if settings.activation_checkpointing:
        # Before sharding: the checkpointed call then wraps FSDP's all-gather hooks, so the
        # recomputation in the backward pass gathers the layer's weights again.
        enable_activation_checkpointing(model)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = mixed_precision_policy(precision)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=settings.reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=settings.reshard_after_forward)
    return model


def enable_activation_checkpointing(model: nn.Module) -> None:
    if not getattr(model, "is_activation_checkpointing", False):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def shard_if_requested(model: nn.Module, precision: str, accelerator: Any) -> nn.Module:
    """Shard the model when the launcher asked for FSDP2 and there are several processes (one process
    trains the plain model: there is nothing to shard over, but checkpointing still applies)."""
    settings = requested_fsdp2()
    if settings is None:
        return model
    if accelerator.num_processes == 1:
        if settings.activation_checkpointing:
            enable_activation_checkpointing(model)
        return model
    return shard_model(model, settings, precision, accelerator.device)


def prepare(accelerator: Any, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, Any]:
    """accelerate's wrapping (DDP for several processes, device placement) for a plain model. A sharded
    model and its optimizer stay as they are: fully_shard already placed them, and accelerate's own FSDP2
    preparation would shard again (on GPU it refuses an optimizer whose model it did not prepare).

    Gradient accumulation then reduce-scatters after every micro-batch (accelerate's `no_sync` finds no
    `no_sync` on an FSDP2 module): sharded gradients are what keeps gradient memory at 1/N."""
    if is_sharded(model):
        return model, optimizer
    return accelerator.prepare(model, optimizer)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def inner_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer under accelerate's wrapper (state-dict helpers need the real one)."""
    return getattr(optimizer, "optimizer", optimizer)


# ------------------------------------------------------------------------------------------------
# State dicts
# ------------------------------------------------------------------------------------------------
def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded weights on CPU (collective for a sharded model: every rank must call it; rank 0
    receives the tensors, the other ranks an empty dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The AdamW state keyed by parameter name, unsharded on CPU (collective like `full_model_state`)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, inner_optimizer(optimizer), options=options)


def model_for_saving(model: nn.Module) -> nn.Module:
    """What `save_pretrained` is called on. For a sharded model: a weightless (meta-device) instance of
    the model's own class, given the gathered weights as `state_dict`; the FSDP subclass itself would
    make transformers copy FSDP's source files as the checkpoint's remote code."""
    if not is_sharded(model):
        return model
    from torch.distributed.fsdp import FSDPModule

    cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    with torch.device("meta"):
        shell = cls(model.config)
    shell.generation_config = model.generation_config
    return shell


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, checkpoint_dir: Path) -> None:
    """Every rank writes its shards of weights and optimizer state to `checkpoint_dir/dcp` (collective).

    Failures on any rank surface on every rank as OSError, so the caller's all-ranks-agree error
    handling applies.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, inner_optimizer(optimizer))
    try:
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=checkpoint_dir / DCP_DIR)
    except CheckpointException as e:  # a BaseException: turn it into the error the loop handles
        raise OSError(f"sharded checkpoint write failed: {e}") from None


def has_sharded_state(checkpoint_dir: Path) -> bool:
    return (checkpoint_dir / DCP_DIR / ".metadata").is_file()


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, checkpoint_dir: Path) -> None:
    """Weights and optimizer state from `checkpoint_dir/dcp`, resharded to this run's layout (sharded
    over any number of processes, or one unsharded process)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    optim = inner_optimizer(optimizer)
    # get_state_dict creates the AdamW state (a zero-LR step on zero gradients: weights unchanged), so
    # DCP has tensors of the right layout to load into.
    model_state, optimizer_state = get_state_dict(model, optim)
    state = {"model": model_state, "optimizer": optimizer_state}
    # One process without a process group (a sharded run resumed unsharded) reads every shard itself;
    # DCP warns that it assumes exactly that, which is intended here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load(state, checkpoint_id=checkpoint_dir / DCP_DIR, no_dist=not dist.is_initialized())
    set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def load_full_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """An `optimizer.pt` of an unsharded run (parameters numbered in optimizer order) into this run's
    optimizer, sharded or not."""
    optim = inner_optimizer(optimizer)
    if not is_sharded(model):
        optim.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in optim.param_groups for p in group["params"]]
    by_name = {
        "state": {order[i]: s for i, s in state["state"].items()},
        "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]],
    }
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
    set_optimizer_state_dict(model, optim, by_name, options=options)


# ------------------------------------------------------------------------------------------------
# Resuming onto another number of processes
# ------------------------------------------------------------------------------------------------
def check_resume_layout(before: Any, now: Any, saved_world: int, world: int, path: Path) -> None:
    """A checkpoint continues on `world` processes when the data keeps its shards and the global batch
    its size; otherwise a ConfigError says what differs and what to set.

    `before` / `now` are the checkpoint's and this run's TrainConfig. The data order is a function of
    the shard count (`data_shards`, default one per process), so the shard count must not change; each
    process then takes an equal, contiguous group of the shards.
    """
    saved_shards = before.data_shards or saved_world
    shards = now.data_shards or world
    where = f"cannot resume from {path} on {world} process(es)"
    if shards != saved_shards:
        hint = (
            f"set --data_shards={saved_shards}"
            if saved_shards % world == 0
            else f"use a process count that divides {saved_shards}"
        )
        raise ConfigError(
            f"{where}: its data stream is split into {saved_shards} shards ({saved_world} process(es) wrote "
            f"it), this run would split it into {shards}; {hint} to continue the same stream"
        )
    saved_batch = before.micro_batch_size * before.grad_accum_steps * saved_world
    batch = now.micro_batch_size * now.grad_accum_steps * world
    if batch != saved_batch:
        per_step = now.micro_batch_size * world
        hint = (
            f"set --grad_accum_steps={saved_batch // per_step}"
            if saved_batch % per_step == 0
            else f"no grad_accum_steps gives {saved_batch} with micro_batch_size {now.micro_batch_size}"
        )
        raise ConfigError(
            f"{where}: its global batch is {before.micro_batch_size} x {before.grad_accum_steps} x "
            f"{saved_world} = {saved_batch} sequences, this run's micro_batch_size x grad_accum_steps x "
            f"processes = {now.micro_batch_size} x {now.grad_accum_steps} x {world} = {batch}; {hint}"
        )
