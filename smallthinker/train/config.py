"""Typed training configuration: YAML presets, dotted CLI overrides, and the saved resolved config.

A run is described by one `TrainConfig`. Presets live in `configs/train/*.yaml`; any field can be
overridden on the command line with `--section.field=value` (values are parsed as YAML, so
`--optim.lr=3e-4`, `--loss.balance_scope=dp_group`, `--model.overrides={rope_theta: 1.0e6}` all work).
The resolved config is written to `RUN_DIR/config.yaml` and into every checkpoint.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

Precision = Literal["fp32", "bf16"]
BalanceScope = Literal["micro_batch", "global_batch", "dp_group"]
ScheduleKind = Literal["cosine", "wsd", "constant"]
Task = Literal["pretrain", "sft"]


@dataclass
class ModelSection:
    """Which model to train."""

    preset: str = "tiny-4b-style"
    """Model preset name (`configs/model/NAME.json`) or a json path; used when `init_from` is empty."""
    init_from: str | None = None
    """A checkpoint directory (ours or an official one) to start from instead of random weights."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Model config fields to override (e.g. `rope_theta`, `max_position_embeddings`)."""
    experts_implementation: str | None = None
    """`eager`, `grouped_mm`, `batched_mm` or a registered name; None keeps the model's default."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer in the backward pass: less activation memory (long-context stages)
    for about a third more compute."""


@dataclass
class TokenizerSection:
    """Where the tokenizer comes from."""

    path: str | None = None
    """A tokenizer directory; None uses `model.init_from`'s tokenizer, else the synthetic one."""


@dataclass
class OptimConfig:
    """AdamW hyper-parameters (report: beta1 0.9, beta2 0.95, weight decay 0.1)."""

    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_embeddings: bool = False
    """Whether embeddings (and a tied lm_head) are weight-decayed; off by default, see optim.py."""
    grad_clip: float = 1.0
    """Max global gradient norm; 0 disables clipping."""


@dataclass
class ScheduleConfig:
    """Learning-rate schedule: linear warmup, then cosine / warmup-stable-decay / constant."""

    kind: ScheduleKind = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    """Final LR as a fraction of peak (report: cosine to 10 %)."""
    decay_fraction: float = 0.2
    """WSD only: fraction of the schedule spent in the final linear decay."""
    total_steps: int | None = None
    """Schedule horizon; None = `max_steps`. Set it to stop a run early (max_steps) without changing
    its LR curve, e.g. to train a long schedule in several jobs."""


@dataclass
class LossConfig:
    """Router auxiliary losses; the trainer computes them, the model's own coefficients are zeroed."""

    balance_coef: float = 1e-2
    balance_scope: BalanceScope = "global_batch"
    """`micro_batch`: counts per micro-batch; `global_batch`: counts all-reduced over all data-parallel
    ranks; `dp_group`: counts all-reduced over groups of `dp_group_size` ranks (the report's variant)."""
    dp_group_size: int = 1
    z_coef: float = 1e-3


@dataclass
class CheckpointConfig:
    every: int = 500
    """Save every N optimizer steps (and always at the end); 0 saves only at the end."""
    keep_last: int = 3
    resume: str | None = None
    """A checkpoint directory or `latest` (the newest complete checkpoint of `run_dir`)."""


@dataclass
class LoggingConfig:
    every: int = 1
    """Log metrics every N optimizer steps."""
    tensorboard: bool = True
    progress_bar: bool = True
    moe_metrics_every: int = 10
    """Per-layer expert load metrics every N steps (counted from the training forward, no extra pass)."""
    neuron_sparsity_every: int = 50
    """ReGLU zero-neuron fraction every N steps (one extra no-grad forward on one micro-batch); 0 = off."""
    peak_flops: float | None = None
    """Peak FLOP/s of one device for MFU; None picks a default for the device type and precision."""


@dataclass
class TrainConfig:
    """Everything one training run needs; pre-training and SFT differ only in `task` and `data`."""

    task: Task = "pretrain"
    run_dir: str = "runs/pretrain_tiny"
    seed: int = 0
    synthetic_dir: str | None = None
    """The offline synthetic corpus + tokenizer directory: the tokenizer's default source. The entry points
    (`scripts.pretrain`, `scripts.sft`, the quickstart) generate it there first when missing."""
    precision: Precision = "fp32"
    cpu: bool | None = None
    """Train on CPU; None = on CPU exactly when no CUDA device is present. Several CPU processes
    (torchrun / accelerate launch) then form a gloo process group."""
    max_steps: int = 1000
    micro_batch_size: int = 4
    grad_accum_steps: int = 1
    """Global batch = micro_batch_size * grad_accum_steps * data-parallel ranks (sequences)."""
    model: ModelSection = field(default_factory=ModelSection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    data: dict[str, Any] = field(default_factory=dict)
    """Fields of `DataConfig` (pretrain) or the SFT data config; validated when the run starts."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    data_shards: int | None = None
    """Data shards the global data order is split into; None = one per process. Set it to a multiple
    of the process count to reproduce a run of that many processes on fewer: each process then reads
    its shards round-robin, one micro-batch each (grad_accum_steps must be a multiple of shards/process)."""
    stage_model_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Data stage name -> model config fields set when that stage starts (long-context extension:
    `rope_theta`, `max_position_embeddings`); the data stages themselves (token budget, mixture,
    seq_len) are `data.stages`."""


class _Loader(yaml.SafeLoader):
    """YAML 1.2 floats: PyYAML (YAML 1.1) reads `3e-4` and `1.0e5` as strings, which is a trap in
    configs full of learning rates and RoPE bases."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: no arbitrary objects


class ConfigError(ValueError):
    """A configuration value is missing, unknown or has the wrong type."""


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Convert a YAML value to the annotated type (nested dataclasses, lists, tuples, literals)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(annotation, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(value, non_none[0], where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        try:
            return float(value)  # PyYAML reads "3e-4" (no dot) as a string
        except ValueError:
            pass
    if annotation in (int, float, str, bool) and not isinstance(value, annotation):
        raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}")
    return value


def from_dict(cls: type, values: dict[str, Any], where: str = "config") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys with the list of valid ones."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in values.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML-serialisable dict (tuples become lists)."""
    return parse_yaml(yaml.safe_dump(_plain(dataclasses.asdict(cfg))))


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.field=value` (or `--section.field=value`) strings to a nested dict in place."""
    for item in overrides:
        key, sep, raw = item.removeprefix("--").partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected --section.field=value")
        node = values
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[leaf] = parse_yaml(raw) if raw != "" else None
    return values


def load_train_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML preset (or start from defaults when `path` is None) and apply dotted overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; presets are in configs/train/")
        values = parse_yaml(path.read_text()) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    apply_overrides(values, overrides or [])
    cfg = from_dict(TrainConfig, values)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Checks that need several fields at once."""
    if cfg.max_steps <= 0 or cfg.micro_batch_size <= 0 or cfg.grad_accum_steps <= 0:
        raise ConfigError("max_steps, micro_batch_size and grad_accum_steps must be positive")
    if cfg.loss.balance_scope == "dp_group" and cfg.loss.dp_group_size <= 0:
        raise ConfigError("loss.dp_group_size must be positive for balance_scope=dp_group")
    if cfg.schedule.warmup_steps < 0 or not 0.0 <= cfg.schedule.min_lr_ratio <= 1.0:
        raise ConfigError("schedule.warmup_steps must be >= 0 and schedule.min_lr_ratio in [0, 1]")
    if cfg.data_shards is not None and cfg.data_shards <= 0:
        raise ConfigError("data_shards must be positive (or null for one shard per process)")


def save_train_config(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
