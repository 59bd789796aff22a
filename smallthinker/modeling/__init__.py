"""The SmallThinker model. Importing this package registers it with transformers' Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_smallthinker import SmallThinkerConfig
from .modeling_smallthinker import (
    SmallThinkerForCausalLM,
    SmallThinkerModel,
    SmallThinkerPreTrainedModel,
    load_balancing_loss,
    router_z_loss,
)
from .presets import PRESETS_DIR, list_presets, load_model_config

AutoConfig.register("smallthinker", SmallThinkerConfig, exist_ok=True)
AutoModel.register(SmallThinkerConfig, SmallThinkerModel, exist_ok=True)
AutoModelForCausalLM.register(SmallThinkerConfig, SmallThinkerForCausalLM, exist_ok=True)
# `save_pretrained` then writes `auto_map` and copies the two model files next to the weights, so checkpoints
# load with `trust_remote_code=True` where this package is not installed.
SmallThinkerConfig.register_for_auto_class()
SmallThinkerModel.register_for_auto_class("AutoModel")
SmallThinkerForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "PRESETS_DIR",
    "SmallThinkerConfig",
    "SmallThinkerForCausalLM",
    "SmallThinkerModel",
    "SmallThinkerPreTrainedModel",
    "list_presets",
    "load_balancing_loss",
    "load_model_config",
    "router_z_loss",
]
