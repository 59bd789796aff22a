"""Command-line entry shared by `scripts.pretrain` and `scripts.sft`: a preset plus dotted overrides."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from smallthinker.train.config import ConfigError, TrainConfig, load_train_config
from smallthinker.train.loop import TrainResult, train


def parse_args(argv: list[str] | None, task: str, doc: str | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Any config field can be overridden as --section.field=value (YAML value), "
        "e.g. --optim.lr=3e-4 --max_steps=100 --loss.balance_scope=dp_group.",
    )
    parser.add_argument("--config", required=True, help=f"YAML preset, e.g. configs/train/{task}_tiny.yaml")
    parser.add_argument("--resume", default=None, help="checkpoint directory or 'latest' (same run_dir)")
    args, rest = parser.parse_known_args(argv)
    bad = [item for item in rest if not item.startswith("--") or "=" not in item]
    if bad:
        parser.error(f"unrecognised arguments {bad}: overrides look like --section.field=value")
    return args, rest


def main(
    argv: list[str] | None,
    task: str,
    doc: str | None = None,
    prepare_data: Callable[[TrainConfig], None] | None = None,
) -> TrainResult:
    """Parse, check the task, train; `prepare_data(cfg)` writes generated data the config names (main rank first)."""
    args, overrides = parse_args(argv, task, doc)
    if args.resume:
        overrides.append(f"--checkpoint.resume={args.resume}")
    cfg = load_train_config(args.config, overrides)
    if cfg.task != task:
        raise ConfigError(f"{args.config} is a {cfg.task!r} config; this entry point runs {task!r}")
    return train(cfg, prepare_data)
