"""Registration with transformers' Auto classes.

Only `model_type: "smallthinker"` is registered; nothing of transformers itself is patched. A `config.json`
without `model_type` (the published 21B file) is not recognisable by `AutoConfig`: load such a checkpoint with
`SmallThinkerForCausalLM.from_pretrained(path)`, which reads any SmallThinker config, or add the key to the file.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_smallthinker import SmallThinkerConfig
from .modeling_smallthinker import SmallThinkerForCausalLM, SmallThinkerModel


def register() -> None:
    AutoConfig.register("smallthinker", SmallThinkerConfig, exist_ok=True)
    AutoModel.register(SmallThinkerConfig, SmallThinkerModel, exist_ok=True)
    AutoModelForCausalLM.register(SmallThinkerConfig, SmallThinkerForCausalLM, exist_ok=True)
    # `save_pretrained` then writes `auto_map` and copies the two model files next to the weights, so
    # checkpoints load with `trust_remote_code=True` where this package is not installed.
    SmallThinkerConfig.register_for_auto_class()
    SmallThinkerModel.register_for_auto_class("AutoModel")
    SmallThinkerForCausalLM.register_for_auto_class("AutoModelForCausalLM")
