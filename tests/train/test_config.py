"""YAML presets load into typed dataclasses; dotted overrides; clear errors on bad values."""

import re
from pathlib import Path

import pytest

from smallthinker.train.config import ConfigError, TrainConfig, load_train_config, save_train_config, to_dict

PRESETS = Path(__file__).resolve().parents[2] / "configs" / "train"


@pytest.mark.parametrize("name", ["pretrain_tiny", "pretrain_4b", "pretrain_21b", "sft_tiny", "sft_4b"])
def test_presets_load(name):
    cfg = load_train_config(PRESETS / f"{name}.yaml")
    assert isinstance(cfg, TrainConfig)
    assert cfg.task == name.split("_")[0]
    assert cfg.optim.betas == (0.9, 0.95)


def test_report_hyper_parameters():
    cfg4 = load_train_config(PRESETS / "pretrain_4b.yaml")
    cfg21 = load_train_config(PRESETS / "pretrain_21b.yaml")
    assert (cfg4.optim.lr, cfg21.optim.lr) == (3e-4, 4.2e-4)
    assert cfg4.schedule.kind == cfg21.schedule.kind == "cosine"
    assert cfg4.schedule.min_lr_ratio == cfg21.schedule.min_lr_ratio == 0.1
    assert cfg4.data["seq_len"] == cfg21.data["seq_len"] == 4096
    # Global batch in sequences = micro batch x accumulation x the ranks the preset is written for.
    assert cfg4.micro_batch_size * cfg4.grad_accum_steps * 64 == 1536
    assert cfg21.micro_batch_size * cfg21.grad_accum_steps * 128 == 4352
    for cfg, long_len in ((cfg4, 32768), (cfg21, 16384)):
        stages = cfg.data["stages"]
        assert len(stages) == 4 and stages[-1]["seq_len"] == long_len
        assert cfg.model.overrides["rope_theta"] == 1e5
        assert cfg.stage_model_overrides[stages[-1]["name"]]["rope_theta"] == 1.5e6


def test_dotted_overrides_and_types(tmp_path):
    cfg = load_train_config(
        PRESETS / "pretrain_tiny.yaml",
        ["--optim.lr=3e-4", "--loss.balance_scope=dp_group", "--loss.dp_group_size=2", "max_steps=7",
         "--model.overrides={rope_theta: 1.0e6}", "--checkpoint.resume=latest"],
    )  # fmt: skip
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)  # "3e-4" is a string to YAML
    assert cfg.loss.balance_scope == "dp_group" and cfg.loss.dp_group_size == 2
    assert cfg.max_steps == 7 and cfg.model.overrides == {"rope_theta": 1e6}
    save_train_config(cfg, tmp_path / "c.yaml")
    assert to_dict(load_train_config(tmp_path / "c.yaml")) == to_dict(cfg)


@pytest.mark.parametrize(
    "override, message",
    [
        ("--optim.lrr=1", "unknown key(s) ['lrr']"),
        ("--loss.balance_scope=everywhere", "is not one of"),
        ("--max_steps=many", "expected int"),
        ("--max_steps=0", "must be positive"),
        ("--optim.betas=[0.9]", "expected 2 values"),
        ("max_steps", "expected --section.field=value"),
    ],
)
def test_bad_values_are_named(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_train_config(PRESETS / "pretrain_tiny.yaml", [override])


def test_missing_preset_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_train_config("configs/train/nope.yaml")
