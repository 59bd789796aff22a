"""The SmallThinker model. Importing this package registers it with transformers' Auto classes."""

from . import experts  # noqa: F401  (registers the "sorted_mm" experts implementation)
from .configuration_smallthinker import SmallThinkerConfig
from .modeling_smallthinker import (
    SmallThinkerForCausalLM,
    SmallThinkerModel,
    SmallThinkerPreTrainedModel,
    load_balancing_loss,
    router_z_loss,
)
from .presets import PRESETS_DIR, list_presets, load_model_config
from .registration import register

register()

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
