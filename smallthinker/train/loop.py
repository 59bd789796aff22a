"""The training loop shared by pre-training and SFT.

Loss normalisation (as torchtitan and the HF Trainer do it): before the step's forward passes, the
valid target tokens (label != -100 after the shift) of all micro-batches on all ranks are counted
and all-reduced; each micro-batch's loss is its token-loss *sum* divided by that global count, so the
step's gradient is that of the mean over every target token of the global batch, whatever the split
into micro-batches and ranks. DDP averages gradients over ranks, hence the `* world_size`.
The router losses and their scopes are `smallthinker.train.losses`.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from smallthinker.train import checkpoint as ckpt
from smallthinker.train import distributed
from smallthinker.train.build import (
    ShardedStream,
    apply_model_overrides,
    build_model,
    build_stream,
    check_seq_lens,
    data_config,
    load_tokenizer,
    regroup_stream_states,
    stage_seq_lens,
    tokenizer_source,
)
from smallthinker.train.config import (
    ConfigError,
    TrainConfig,
    from_dict,
    parse_yaml,
    save_train_config,
    to_dict,
)
from smallthinker.train.data import TOKEN_MASK
from smallthinker.train.interrupt import StopOnSignal
from smallthinker.train.losses import TrainingLosses
from smallthinker.train.metrics import (
    MetricsLogger,
    default_peak_flops,
    flops_per_token,
    load_summary,
    neuron_sparsity,
)
from smallthinker.train.optim import build_optimizer, build_scheduler

# Config fields that must not change when resuming: they decide which data each step sees and which
# model is trained. Everything else (max_steps, LR, logging, checkpointing) may change. The data shards
# and the global batch are checked by `distributed.check_resume_layout`, which lets another number of
# processes continue a run.
RESUME_FIXED = (
    "task",
    "micro_batch_size",
    "data",
    "model",
    "stage_model_overrides",
)


class TrainingDivergedError(RuntimeError):
    """The loss or the gradient norm is not finite."""


@dataclass
class TrainResult:
    step: int
    tokens_seen: int
    last_checkpoint: Path | None
    history: list[dict[str, Any]] = field(default_factory=list)
    """Metrics records logged by this process (all of them on the main process)."""
    start_step: int = 0
    """The step the run started (or resumed) at."""
    stopped_by: int | None = None
    """The signal (SIGINT, SIGTERM) that stopped the run early after checkpointing, None when it ran to the end."""


@dataclass
class Run:
    """Everything the step function needs."""

    cfg: TrainConfig
    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    stream: ShardedStream
    tokenizer: Any
    losses: TrainingLosses
    logger: MetricsLogger
    state: ckpt.TrainerState
    stage: str
    seq_lens: dict[str, int]
    last_checkpoint: Path | None = None
    counts_LE: torch.Tensor | None = None
    stop: StopOnSignal | None = None

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    cpu = cfg.cpu if cfg.cpu is not None else not torch.cuda.is_available()
    # cpu=True is also what makes accelerate build a gloo group for CPU processes started by torchrun.
    # Mixed precision is the loop's own autocast (`autocast`): accelerate keeps one precision per process and
    # refuses a second run in the same interpreter (tests, notebooks, benchmarks) that asks for another.
    return Accelerator(cpu=cpu)


def autocast(run: Run) -> contextlib.AbstractContextManager:
    """bf16 autocast around the forward passes when the run asks for bf16, else nothing."""
    if run.cfg.precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(run.accelerator.device.type, dtype=torch.bfloat16)


def check_resume_compatible(cfg: TrainConfig, path: Path, world_size: int) -> None:
    saved = from_dict(TrainConfig, parse_yaml((path / "train_config.yaml").read_text()))
    now, before = to_dict(cfg), to_dict(saved)
    for values in (now, before):  # other kernels / recomputation compute the same function: allowed
        values["model"].pop("experts_implementation")
        values["model"].pop("activation_checkpointing", None)
    changed = [k for k in RESUME_FIXED if now[k] != before[k]]
    if changed:
        detail = "; ".join(f"{k}: checkpoint {before[k]!r} vs now {now[k]!r}" for k in changed)
        raise ConfigError(
            f"cannot resume from {path}: incompatible config ({detail}). Resume with the checkpoint's "
            f"settings (see {path / 'train_config.yaml'}) or start a new run with --model.init_from={path}"
        )
    saved_world = ckpt.read_trainer_state(path).world_size
    distributed.check_resume_layout(saved, cfg, saved_world, world_size, path)


def refuse_to_overwrite(run_dir: Path) -> None:
    """A fresh run must not mix its checkpoints with (and prune) those of an earlier run."""
    found = ckpt.list_checkpoints(ckpt.checkpoint_root(run_dir))
    if found:
        raise ConfigError(
            f"{run_dir} already holds checkpoints (newest {found[-1].name}); continue that run with "
            "--resume latest, or give this run another --run_dir"
        )


def setup(cfg: TrainConfig, prepare_data: Callable[[TrainConfig], None] | None = None) -> Run:
    """Everything a run needs; `prepare_data` (e.g. generating a synthetic corpus) runs on the main process
    first, before any rank reads the data."""
    accelerator = make_accelerator(cfg)
    set_seed(cfg.seed)
    run_dir = Path(cfg.run_dir)
    resume_path = ckpt.resolve_resume(cfg.checkpoint.resume, run_dir) if cfg.checkpoint.resume else None
    if resume_path is not None:
        check_resume_compatible(cfg, resume_path, accelerator.num_processes)
    else:
        refuse_to_overwrite(run_dir)
    if prepare_data is not None:
        with accelerator.main_process_first():
            prepare_data(cfg)
    tokenizer = load_tokenizer(tokenizer_source(cfg, resume_path))
    data_cfg = data_config(cfg)
    model = build_model(cfg, tokenizer, resume_path)
    check_seq_lens(cfg, data_cfg, model.config)
    stream = build_stream(cfg, data_cfg, tokenizer, accelerator.process_index, accelerator.num_processes)
    model = distributed.shard_if_requested(model, cfg.precision, accelerator)  # before the optimizer
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.schedule, cfg.schedule.total_steps or cfg.max_steps)
    model, optimizer = distributed.prepare(accelerator, model, optimizer)
    losses = TrainingLosses(cfg.loss, accelerator.unwrap_model(model).config, accelerator.num_processes)
    run_dir.mkdir(parents=True, exist_ok=True)
    logger = MetricsLogger(run_dir, cfg.logging.tensorboard, accelerator.is_main_process)
    run = Run(
        cfg, accelerator, model, optimizer, scheduler, stream, tokenizer, losses, logger,
        ckpt.TrainerState(step=0, tokens_seen=0, world_size=accelerator.num_processes),
        stage=stream.current_stage, seq_lens=stage_seq_lens(data_cfg),
    )  # fmt: skip
    if resume_path is not None:
        restore(run, resume_path)
    else:
        apply_model_overrides(run.unwrapped, cfg.stage_model_overrides.get(run.stage, {}))
    if accelerator.is_main_process:
        save_train_config(cfg, run_dir / "config.yaml")
        logger.truncate_after(run.state.step)
    return run


def restore(run: Run, path: Path) -> None:
    """Optimizer, scheduler, step counters, this rank's RNG and data position; the weights too for a
    sharded checkpoint (a full one was loaded with the model)."""
    if distributed.has_sharded_state(path):
        distributed.load_sharded(run.model, run.optimizer, path)
    else:
        distributed.load_full_optimizer(run.model, run.optimizer, ckpt.load_optimizer(path))
    run.scheduler.load_state_dict(ckpt.load_scheduler(path))
    saved = ckpt.read_trainer_state(path)
    rank, world = run.accelerator.process_index, run.accelerator.num_processes
    if saved.world_size == world:
        run.stream.load_state_dict(ckpt.load_rank_files(path, rank))
    else:  # check_resume_layout made sure the shards regroup evenly
        run.stream.load_state_dict(
            regroup_stream_states(ckpt.load_all_rank_files(path, saved.world_size), rank, world)
        )
    run.state = ckpt.TrainerState(step=saved.step, tokens_seen=saved.tokens_seen, world_size=world)
    run.stage = run.stream.current_stage
    run.last_checkpoint = path


# ------------------------------------------------------------------------------------------------
# One optimizer step
# ------------------------------------------------------------------------------------------------
def next_micro_batches(run: Run) -> list[tuple[str, dict[str, torch.Tensor]]] | None:
    """The step's micro-batches with their data stage; None when the data (all stages) is used up."""
    out = []
    for _ in range(run.cfg.grad_accum_steps):
        try:
            batch = next(run.stream)
        except StopIteration:
            return None
        out.append((run.stream.current_stage, {k: v.to(run.accelerator.device) for k, v in batch.items()}))
    return out


def enter_stage(run: Run, stage: str, quiet: bool = False) -> None:
    if stage == run.stage:
        return
    overrides = run.cfg.stage_model_overrides.get(stage, {})
    apply_model_overrides(run.unwrapped, overrides)
    if not quiet:
        run.accelerator.print(
            f"step {run.state.step}: data stage {stage!r} begins; model overrides {overrides}"
        )
    run.stage = stage


def reduce_sum(run: Run, value: torch.Tensor) -> torch.Tensor:
    if run.accelerator.num_processes == 1:
        return value
    return run.accelerator.reduce(value.clone(), reduction="sum")


def split_masks(micro: list[tuple[str, dict[str, torch.Tensor]]]) -> list[torch.Tensor | None]:
    """Take each micro-batch's real-token mask out of it: the stream's padding mask (SFT rows and tails, not a
    model input: a 2-D mask would disable packed-sequence attention), else the attention mask."""
    masks = []
    for _, batch in micro:
        mask = batch.pop(TOKEN_MASK, None)
        masks.append(mask if mask is not None else batch.get("attention_mask"))
    return masks


def step_load(run: Run, micro: list[tuple[str, dict[str, torch.Tensor]]], masks: list) -> Any:
    """The step's expert load for balance scopes that span micro-batches (None otherwise): each micro-batch is
    routed in its own data stage's model state, then the model is put back in the first one's."""
    if not run.losses.spans_micro_batches or len(micro) == 1:
        return None
    stage, config = run.stage, run.unwrapped.config
    keys = {k for s, _ in micro for k in run.cfg.stage_model_overrides.get(s, {})}
    before = {k: getattr(config, k) for k in keys}
    loads = []
    for (stage_i, batch), mask in zip(micro, masks):
        enter_stage(run, stage_i, quiet=True)
        with autocast(run):
            loads.append(run.losses.routing_load(run.model, batch, mask))
    apply_model_overrides(run.unwrapped, before)
    run.stage = stage
    return run.losses.span_load(loads)


def train_step(run: Run, micro: list[tuple[str, dict[str, torch.Tensor]]]) -> dict[str, Any]:
    acc, cfg, world = run.accelerator, run.cfg, run.accelerator.num_processes
    # Target tokens after the model's shift (labels[:, 1:]), of all micro-batches, then of all ranks.
    local_items = torch.stack([(b["labels"][:, 1:] != -100).sum() for _, b in micro]).sum().float()
    global_items = reduce_sum(run, local_items).clamp_min(1.0)
    masks = split_masks(micro)
    load = step_load(run, micro, masks)
    loss_fn, vocab_size = run.unwrapped.loss_function, run.unwrapped.config.vocab_size
    # The step's losses: [CE, balance, z, balance per layer, z per layer], each the sum of the micro-batches' shares.
    sums = None
    for i, ((stage, batch), mask) in enumerate(zip(micro, masks)):
        enter_stage(run, stage)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        sync = i == len(micro) - 1  # all-reduce gradients only after the last micro-batch
        with contextlib.nullcontext() if sync else acc.no_sync(run.model):
            with autocast(run):
                out = run.model(**inputs, output_router_logits=True, use_cache=False)
            ce = loss_fn(out.logits, batch["labels"], vocab_size, num_items_in_batch=global_items)
            terms = run.losses.micro_batch(out, ce, mask, len(micro), load)
            acc.backward(terms.objective(cfg.loss.balance_coef, cfg.loss.z_coef, world))
        shares = torch.cat([
            terms.ce.detach().reshape(1),
            terms.balance_share(terms.balance.detach()).reshape(1),
            terms.z_share(terms.z.detach()).reshape(1),
            terms.balance_share(terms.balance_L.detach()),
            terms.z_share(terms.z_L.detach()),
        ])  # fmt: skip
        sums = shares if sums is None else sums + shares
        if run.counts_LE is not None:
            run.counts_LE += terms.counts_LE
    max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
    grad_norm = acc.clip_grad_norm_(run.model.parameters(), max_norm)
    # One all-reduce for every reported statistic; router losses are averaged over ranks, the CE shares summed.
    sums[1:] = sums[1:] / world
    # This rank's stop request (SIGINT / SIGTERM) rides along, so all ranks agree without a collective of its own.
    stopping = run.stop is not None and run.stop.signum is not None
    stats = reduce_sum(run, torch.cat([sums, sums.new_tensor([float(stopping)])]))
    stop_requested, stats = bool(stats[-1] > 0), stats[:-1]
    num_layers = terms.balance_L.shape[0]
    loss, aux_loss, z_loss = stats[:3].tolist()
    layer_aux, layer_z = stats[3 : 3 + num_layers], stats[3 + num_layers :]
    if not all(math.isfinite(v) for v in (loss, aux_loss, z_loss, float(grad_norm))):
        run.optimizer.zero_grad(set_to_none=True)
        raise TrainingDivergedError(
            f"step {run.state.step + 1}: loss {loss}, balance loss {aux_loss}, z-loss {z_loss}, gradient norm "
            f"{float(grad_norm)} "
            f"is not finite; no update was applied. The last good checkpoint is {run.last_checkpoint}; "
            "lower optim.lr or raise schedule.warmup_steps and resume from it"
        )
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    tokens = sum(b["input_ids"].numel() for _, b in micro) * world
    layer_losses = {}
    every = cfg.logging.moe_metrics_every
    if every and (run.state.step + 1) % every == 0:
        layer_losses = {"layer_aux_loss": layer_aux.tolist(), "layer_z_loss": layer_z.tolist()}
    return {"loss": loss, "aux_loss": aux_loss, "z_loss": z_loss, "grad_norm": float(grad_norm), "lr": lr,
            "tokens": tokens, "target_tokens": int(global_items), "layer_losses": layer_losses,
            "stop_requested": stop_requested}  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Metrics and checkpoints
# ------------------------------------------------------------------------------------------------
def step_record(run: Run, stats: dict[str, Any], seconds: float) -> dict[str, Any]:
    acc = run.accelerator
    seq_len = run.seq_lens.get(run.stage, next(iter(run.seq_lens.values())))
    tokens_per_s = stats["tokens"] / max(seconds, 1e-9)
    peak = run.cfg.logging.peak_flops or default_peak_flops(acc.device.type, run.cfg.precision)
    mfu = flops_per_token(run.unwrapped.config, seq_len) * tokens_per_s / (peak * acc.num_processes)
    record = {"step": run.state.step, "stage": run.stage, "tokens_seen": run.state.tokens_seen}
    record.update({k: stats[k] for k in ("loss", "aux_loss", "z_loss", "grad_norm", "lr", "target_tokens")})
    record.update({"tokens_per_s": tokens_per_s, "mfu": mfu, "step_time_s": seconds})
    return record


def moe_record(run: Run, first_batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Per-layer load (window since the last report, all ranks) and, when due, neuron sparsity."""
    record: dict[str, Any] = {}
    step, log = run.state.step, run.cfg.logging
    if run.counts_LE is not None and log.moe_metrics_every and step % log.moe_metrics_every == 0:
        record.update(load_summary(reduce_sum(run, run.counts_LE)))
        run.counts_LE.zero_()
    if log.neuron_sparsity_every and step % log.neuron_sparsity_every == 0:
        record["zero_neuron_fraction"] = neuron_sparsity(run.unwrapped, first_batch)
    return record


def agreed_error(run: Run, action: Callable[[], object]) -> OSError | None:
    """Run a disk action on this rank; every rank learns whether any rank failed, so none waits
    forever at the next barrier for a rank that gave up."""
    error = None
    try:
        action()
    except OSError as e:
        error = e
    failed = reduce_sum(run, torch.tensor(float(error is not None), device=run.accelerator.device))
    if error is None and failed.item() > 0:
        error = OSError(
            f"another rank could not write its part of the checkpoint (ranks failed: {failed.item():.0f})"
        )
    return error


def save(run: Run) -> Path:
    """Write a checkpoint on every rank; raises CheckpointError (previous checkpoints intact) on OSError."""
    acc, root, step = run.accelerator, ckpt.checkpoint_root(run.cfg.run_dir), run.state.step
    tmp = ckpt.temp_dir_for(root, step)
    main = acc.is_main_process
    # Collectives first (gathers under FSDP), then disk I/O whose failures all ranks agree on.
    sharded = distributed.is_sharded(run.model)
    model_state = distributed.full_model_state(run.model) if sharded else acc.get_state_dict(run.model)
    optimizer_state = None if sharded else run.optimizer.state_dict()  # sharded: written to dcp/

    def write_parts() -> None:
        ckpt.write_rank_files(tmp, acc.process_index, run.stream.state_dict())
        if main:
            config_yaml = yaml.safe_dump(to_dict(run.cfg), sort_keys=False)
            to_save = distributed.model_for_saving(run.unwrapped)
            ckpt.write_main_files(tmp, to_save, model_state, run.tokenizer, optimizer_state,
                                  run.scheduler.state_dict(), config_yaml)  # fmt: skip

    error = agreed_error(run, lambda: ckpt.prepare_temp_dir(root, step) if main else None)
    if sharded:
        error = error or agreed_error(run, lambda: distributed.save_sharded(run.model, run.optimizer, tmp))
    error = error or agreed_error(run, write_parts)
    error = error or agreed_error(
        run, lambda: ckpt.publish(tmp, run.state, run.cfg.checkpoint.keep_last) if main else None
    )
    if error is not None:
        if main:
            ckpt.discard_temp(root, step)
        raise ckpt.CheckpointError(
            f"writing the checkpoint of step {step} under {root} failed ({error}); earlier checkpoints are "
            f"intact, the newest is {run.last_checkpoint}. Free disk space and resume with "
            "--checkpoint.resume=latest"
        ) from error
    run.last_checkpoint = root / ckpt.step_dir_name(step)
    return run.last_checkpoint


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------
def train(cfg: TrainConfig, prepare_data: Callable[[TrainConfig], None] | None = None) -> TrainResult:
    """Train until `max_steps` (or the end of the data stages), checkpointing along the way.

    `prepare_data(cfg)` runs once on the main process before the data is read (e.g. writing a generated corpus).
    """
    run = setup(cfg, prepare_data)
    acc, log = run.accelerator, cfg.logging
    acc.print(f"{cfg.task}: resolved config in {Path(cfg.run_dir) / 'config.yaml'}")
    if log.moe_metrics_every:
        num_layers, num_experts = run.unwrapped.config.num_hidden_layers, run.losses.num_experts
        run.counts_LE = torch.zeros(num_layers, num_experts, device=acc.device)
    history: list[dict[str, Any]] = []
    bar = tqdm(total=cfg.max_steps, initial=run.state.step, disable=not (log.progress_bar and acc.is_main_process),
               desc=cfg.task, dynamic_ncols=True)  # fmt: skip
    start_step = run.state.step
    with StopOnSignal() as stop:
        run.stop = stop
        try:
            while run.state.step < cfg.max_steps:
                started = time.perf_counter()
                micro = next_micro_batches(run)
                if micro is None:
                    acc.print(f"step {run.state.step}: the data stages are used up; stopping")
                    break
                stats = train_step(run, micro)
                run.state.step += 1
                run.state.tokens_seen += stats["tokens"]
                record = step_record(run, stats, time.perf_counter() - started)
                record.update(stats["layer_losses"])
                record.update(moe_record(run, micro[0][1]))
                if run.state.step % log.every == 0 or run.state.step == cfg.max_steps:
                    run.logger.log(record)
                    history.append(record)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                tok_s=f"{record['tokens_per_s']:.0f}")  # fmt: skip
                if cfg.checkpoint.every and run.state.step % cfg.checkpoint.every == 0:
                    save(run)
                if stats["stop_requested"]:
                    if stop.signum is None:
                        stop.signum = signal.SIGTERM  # another rank's scheduler stopped the job
                    break
            if run.last_checkpoint != ckpt.checkpoint_root(cfg.run_dir) / ckpt.step_dir_name(run.state.step):
                save(run)  # the final state, unless the last periodic save (or the resume point) is it
        finally:
            run.stop = None
            bar.close()
            run.logger.close()
    return TrainResult(run.state.step, run.state.tokens_seen, run.last_checkpoint, history, start_step,
                       stop.signum)  # fmt: skip
