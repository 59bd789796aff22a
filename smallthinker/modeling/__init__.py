"""The SmallThinker model and every rule about it. Importing this package registers it with transformers' Auto
classes (and nothing else of transformers is changed).

Everything outside `modeling/` that needs a model rule imports it from here: routing (`top_k_experts`, `route`),
router statistics and losses (`router_probabilities`, `expert_counts`, `load_balancing_loss`, `router_z_loss`,
`token_mask`), checkpoint names (`official_tensor_shapes`, `expert_tensor_name`, `is_expert_tensor`), RoPE tables
(`reset_rope`), and sizes (`smallthinker.modeling.sizes`).
"""

from . import experts  # noqa: F401  (registers the "sorted_mm" experts implementation)
from .configuration_smallthinker import SmallThinkerConfig, is_smallthinker_config
from .modeling_smallthinker import (
    SmallThinkerForCausalLM,
    SmallThinkerModel,
    SmallThinkerPreTrainedModel,
    expert_counts,
    expert_tensor_name,
    is_expert_tensor,
    load_balancing_loss,
    official_tensor_shapes,
    reset_rope,
    route,
    router_probabilities,
    router_z_loss,
    token_mask,
    top_k_experts,
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
    "expert_counts",
    "expert_tensor_name",
    "is_expert_tensor",
    "is_smallthinker_config",
    "list_presets",
    "load_balancing_loss",
    "load_model_config",
    "official_tensor_shapes",
    "reset_rope",
    "route",
    "router_probabilities",
    "router_z_loss",
    "token_mask",
    "top_k_experts",
]
