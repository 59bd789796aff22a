"""Building a run's parts from its config: tokenizer, model, data stream (sharded), stage switches."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from smallthinker.modeling import SmallThinkerConfig, SmallThinkerForCausalLM, load_model_config
from smallthinker.modeling.modeling_smallthinker import reset_rope
from smallthinker.train.config import ConfigError, TrainConfig

VOCAB_MULTIPLE = 64  # pad a fresh model's vocabulary to a GEMM-friendly size


# ------------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------------
def tokenizer_source(cfg: TrainConfig, resume_path: Path | None) -> Path:
    """Where the tokenizer comes from: the checkpoint being resumed, an explicit path, the model being
    fine-tuned, or the synthetic corpus."""
    if resume_path is not None:
        return resume_path
    if cfg.tokenizer.path:
        return Path(cfg.tokenizer.path)
    if cfg.model.init_from:
        return Path(cfg.model.init_from)
    if cfg.synthetic_dir:
        return Path(cfg.synthetic_dir) / "tokenizer"
    raise ConfigError("no tokenizer: set tokenizer.path, model.init_from or synthetic_dir")


def load_tokenizer(source: Path) -> PreTrainedTokenizerBase:
    if not source.exists():
        raise FileNotFoundError(f"tokenizer directory {source} does not exist")
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"the tokenizer at {source} has no EOS token; packing separates documents with EOS and "
            "generation stops on it: set `eos_token` in its tokenizer_config.json"
        )
    return tokenizer


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------
def build_model(
    cfg: TrainConfig, tokenizer: PreTrainedTokenizerBase, resume_path: Path | None
) -> SmallThinkerForCausalLM:
    """Weights from the resumed checkpoint, from `init_from`, or fresh from the preset (seeded)."""
    source = resume_path or (Path(cfg.model.init_from) if cfg.model.init_from else None)
    if source is not None:
        overrides = {} if resume_path else dict(cfg.model.overrides)
        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32, **overrides)
    else:
        model = SmallThinkerForCausalLM(fresh_model_config(cfg, tokenizer))
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
            f"{model.config.vocab_size}: use the tokenizer the model was trained with"
        )
    if cfg.model.experts_implementation:
        model.config._experts_implementation = cfg.model.experts_implementation
    if cfg.model.activation_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    # The trainer adds the router losses itself (with the configured balance scope): the model must
    # not add them to its loss as well.
    model.config.router_aux_loss_coef = 0.0
    model.config.router_z_loss_coef = 0.0
    # Training forwards pass use_cache=False per call (packed documents stay separate only without a cache);
    # the config keeps use_cache so saved checkpoints generate with a KV cache.
    return model


def fresh_model_config(cfg: TrainConfig, tokenizer: PreTrainedTokenizerBase) -> SmallThinkerConfig:
    """The preset with the tokenizer's vocabulary and special ids unless overridden explicitly."""
    overrides = dict(cfg.model.overrides)
    overrides.setdefault("vocab_size", -(-len(tokenizer) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE)
    overrides.setdefault("eos_token_id", tokenizer.eos_token_id)
    overrides.setdefault("bos_token_id", tokenizer.bos_token_id)
    overrides.setdefault("pad_token_id", tokenizer.pad_token_id)
    try:
        return load_model_config(cfg.model.preset, **overrides)
    except (TypeError, ValueError) as e:
        raise ConfigError(
            f"model preset {cfg.model.preset!r} with overrides {cfg.model.overrides}: {e}"
        ) from e


def apply_model_overrides(model: torch.nn.Module, overrides: dict[str, Any]) -> None:
    """Change config fields of a live model (stage switch); RoPE tables follow a new `rope_theta`."""
    for key, value in overrides.items():
        if not hasattr(model.config, key):
            raise ConfigError(f"stage_model_overrides: the model config has no field {key!r}")
        setattr(model.config, key, value)
    reset_rope(model)


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------
def data_config(cfg: TrainConfig) -> Any:
    """The typed data config of the task (pre-training or SFT) from the `data` mapping."""
    if cfg.task == "pretrain":
        from smallthinker.train.data import DataConfig as cls
    else:
        from smallthinker.train.sft_data import SFTDataConfig as cls
    try:
        return cls(**cfg.data)
    except TypeError as e:
        names = sorted(f.name for f in dataclasses.fields(cls))
        raise ConfigError(f"data: {e}; valid keys: {names}") from e


def stage_seq_lens(data_cfg: Any) -> dict[str, int]:
    """Sequence length per data stage name ("main" when there are no stages)."""
    base = int(getattr(data_cfg, "seq_len", 0) or getattr(data_cfg, "max_length", 0) or 0)
    stages = getattr(data_cfg, "stages", None) or []
    if not stages:
        return {"main": base}
    return {s.name: int(getattr(s, "seq_len", None) or base) for s in stages}


def check_seq_lens(cfg: TrainConfig, data_cfg: Any, model_config: Any) -> None:
    """Every stage's sequences must fit the model's positions (after that stage's overrides)."""
    for stage, seq_len in stage_seq_lens(data_cfg).items():
        limit = cfg.stage_model_overrides.get(stage, {}).get(
            "max_position_embeddings", model_config.max_position_embeddings
        )
        if seq_len > limit:
            raise ConfigError(
                f"data stage {stage!r}: seq_len {seq_len} exceeds the model's max_position_embeddings "
                f"{limit}; lower the seq_len or raise max_position_embeddings (e.g. in stage_model_overrides)"
            )
    unknown = set(cfg.stage_model_overrides) - set(stage_seq_lens(data_cfg))
    if unknown:
        raise ConfigError(
            f"stage_model_overrides names unknown data stages {sorted(unknown)}; "
            f"known: {sorted(stage_seq_lens(data_cfg))}"
        )


def build_shard_stream(
    task: str, data_cfg: Any, tokenizer: Any, micro_batch_size: int, shard: int, shards: int
):
    if task == "pretrain":
        from smallthinker.train.data import build_train_stream as build
    else:
        from smallthinker.train.sft_data import build_sft_stream as build
    return build(data_cfg, tokenizer, micro_batch_size=micro_batch_size, rank=shard, world_size=shards)


class ShardedStream:
    """This process's data shards, read round-robin one micro-batch at a time.

    With one shard per process this is just that shard's stream. With `shards_per_rank` > 1 one process
    sees exactly the micro-batches that `shards_per_rank` processes would, so a 2-process run and a
    1-process run with twice the accumulation train on the same global batches.
    """

    def __init__(self, streams: list[Any]) -> None:
        self.streams = streams
        self.turn = 0
        self.last_stage = streams[0].current_stage

    @property
    def current_stage(self) -> str:
        """The data stage of the micro-batch returned last."""
        return self.last_stage

    def __iter__(self) -> ShardedStream:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        stream = self.streams[self.turn]
        batch = next(stream)
        self.last_stage = stream.current_stage
        self.turn = (self.turn + 1) % len(self.streams)
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {
            "turn": self.turn,
            "last_stage": self.last_stage,
            "shards": [s.state_dict() for s in self.streams],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["shards"]) != len(self.streams):
            raise ValueError(
                f"data state holds {len(state['shards'])} shards for this process, the run has "
                f"{len(self.streams)}: resume with the same data_shards and number of processes"
            )
        self.turn, self.last_stage = int(state["turn"]), state["last_stage"]
        for stream, shard_state in zip(self.streams, state["shards"]):
            stream.load_state_dict(shard_state)


def regroup_stream_states(states: list[dict[str, Any]], rank: int, world_size: int) -> dict[str, Any]:
    """This rank's `ShardedStream` state when a run saved by `len(states)` processes resumes on
    `world_size`: the shards keep their global order (rank r holds a contiguous group of them) and are
    dealt out again in equal groups. Checkpoints are taken between optimizer steps, where every
    process has read the same number of micro-batches from each of its shards (`turn` is 0)."""
    shards = [shard for state in states for shard in state["shards"]]
    if any(state["turn"] != 0 for state in states) or len(shards) % world_size:
        raise ValueError(
            f"the checkpoint's {len(shards)} data shards cannot be regrouped over {world_size} processes: "
            "resume with the process count that wrote it"
        )
    per_rank = len(shards) // world_size
    mine = shards[rank * per_rank : (rank + 1) * per_rank]
    return {"turn": 0, "last_stage": states[0]["last_stage"], "shards": mine}


def build_stream(
    cfg: TrainConfig, data_cfg: Any, tokenizer: Any, rank: int, world_size: int
) -> ShardedStream:
    shards = cfg.data_shards or world_size
    if shards % world_size:
        raise ConfigError(f"data_shards={shards} must be a multiple of the {world_size} processes")
    per_rank = shards // world_size
    if cfg.grad_accum_steps % per_rank:
        raise ConfigError(
            f"grad_accum_steps={cfg.grad_accum_steps} must be a multiple of the {per_rank} data shards "
            "per process, so every shard gives the same number of micro-batches per step"
        )
    mine = range(rank * per_rank, (rank + 1) * per_rank)
    return ShardedStream(
        [build_shard_stream(cfg.task, data_cfg, tokenizer, cfg.micro_batch_size, s, shards) for s in mine]
    )
