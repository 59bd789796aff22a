"""What the trainer reads from an FSDP launch config (the FSDP_* variables `accelerate launch` exports)."""

from __future__ import annotations

import pytest

from smallthinker.train.config import ConfigError
from smallthinker.train.distributed import FSDPSettings, requested_fsdp2

LAUNCH = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2",
          "FSDP_TRANSFORMER_CLS_TO_WRAP": "SmallThinkerDecoderLayer", "FSDP_RESHARD_AFTER_FORWARD": "false",
          "FSDP_ACTIVATION_CHECKPOINTING": "true"}  # fmt: skip


@pytest.fixture
def launched(monkeypatch):
    for key, value in LAUNCH.items():
        monkeypatch.setenv(key, value)
    return monkeypatch


def test_without_fsdp_nothing_is_sharded(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert requested_fsdp2() is None


def test_settings_follow_the_launch_config(launched):
    assert requested_fsdp2() == FSDPSettings("SmallThinkerDecoderLayer", False, True)


def test_fsdp1_and_unimplemented_options_are_refused(launched):
    launched.setenv("FSDP_VERSION", "1")
    with pytest.raises(ConfigError, match="FSDP version 1; .* set fsdp_version: 2"):
        requested_fsdp2()
    launched.setenv("FSDP_VERSION", "2")
    launched.setenv("FSDP_OFFLOAD_PARAMS", "true")
    with pytest.raises(ConfigError, match="fsdp_offload_params: true, which this trainer does not implement"):
        requested_fsdp2()
