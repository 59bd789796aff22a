"""Registration with transformers' Auto classes.

Also lets `AutoConfig` / `AutoModelForCausalLM` recognise SmallThinker files whose `config.json` has no
`model_type` key (the published 21B file is one): such a file is identified by its `architectures` entry.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
from transformers.configuration_utils import PreTrainedConfig

from .configuration_smallthinker import SmallThinkerConfig
from .modeling_smallthinker import SmallThinkerForCausalLM, SmallThinkerModel

_ARCHITECTURES = {"SmallThinkerForCausalLM", "SmallThinkerModel"}


def _with_model_type(config_dict: dict[str, Any]) -> dict[str, Any]:
    if "model_type" not in config_dict and _ARCHITECTURES & set(config_dict.get("architectures") or []):
        config_dict["model_type"] = SmallThinkerConfig.model_type
    return config_dict


def _install_model_type_fallback() -> None:
    original = PreTrainedConfig.get_config_dict.__func__
    if getattr(original, "_smallthinker_fallback", False):
        return

    def get_config_dict(cls, *args, **kwargs):
        config_dict, unused = original(cls, *args, **kwargs)
        return _with_model_type(config_dict), unused

    get_config_dict._smallthinker_fallback = True
    PreTrainedConfig.get_config_dict = classmethod(get_config_dict)


def register() -> None:
    AutoConfig.register("smallthinker", SmallThinkerConfig, exist_ok=True)
    AutoModel.register(SmallThinkerConfig, SmallThinkerModel, exist_ok=True)
    AutoModelForCausalLM.register(SmallThinkerConfig, SmallThinkerForCausalLM, exist_ok=True)
    # `save_pretrained` then writes `auto_map` and copies the two model files next to the weights, so
    # checkpoints load with `trust_remote_code=True` where this package is not installed.
    SmallThinkerConfig.register_for_auto_class()
    SmallThinkerModel.register_for_auto_class("AutoModel")
    SmallThinkerForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    _install_model_type_fallback()
