"""The lm-eval model class for SmallThinker checkpoints and in-memory SmallThinker models.

`SmallThinkerLM` is lm-eval's `HFLM` (its log-likelihood batching, prefix caching and generate_until)
with three differences: it refuses checkpoints that are not SmallThinker before loading any weight,
it defaults to the CPU when no GPU is present, and it reports model info without network look-ups.
Because `HFLM` accepts `pretrained=<PreTrainedModel>`, a model just trained or one running through the
offload engine is evaluated by exactly the same code as a checkpoint on disk.

Importing this module registers it with lm-eval as `--model smallthinker`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import transformers
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from transformers.configuration_utils import PreTrainedConfig

from smallthinker.eval.data import EvalError
from smallthinker.modeling import SmallThinkerConfig, SmallThinkerForCausalLM
from smallthinker.modeling.configuration_smallthinker import (
    SMALLTHINKER_ARCHITECTURES,
    is_smallthinker_config,
)

log = logging.getLogger(__name__)


class NotSmallThinkerError(EvalError):
    """The model or checkpoint given is not a SmallThinker model."""


def check_smallthinker_config(config: dict[str, Any] | PreTrainedConfig, where: str) -> None:
    """Raise NotSmallThinkerError unless `config` (a config dict or object) describes a SmallThinker model."""
    values = config if isinstance(config, dict) else config.to_dict()
    model_type = values.get("model_type")
    architectures = values.get("architectures") or []
    if is_smallthinker_config(values):
        return
    raise NotSmallThinkerError(
        f"{where} is not a SmallThinker checkpoint (config model_type={model_type!r}, "
        f"architectures={architectures}); expected model_type 'smallthinker' or architectures "
        f"{list(SMALLTHINKER_ARCHITECTURES)}. For another model family, pass an lm-eval `HFLM` to "
        f"smallthinker.eval.evaluate_suite, or use lm-eval's `hf` model."
    )


def check_smallthinker_checkpoint(pretrained: str, revision: str = "main") -> None:
    """Read only `config.json` of a local directory or hub id and check that it is a SmallThinker."""
    path = Path(pretrained)
    if path.exists() and not (path / "config.json").is_file():
        raise NotSmallThinkerError(
            f"{pretrained} has no config.json: not a Hugging Face checkpoint directory"
        )
    try:
        config_dict, _ = PreTrainedConfig.get_config_dict(pretrained, revision=revision)
    except (OSError, ValueError) as err:
        raise NotSmallThinkerError(f"cannot read the config of {pretrained!r}: {err}") from err
    check_smallthinker_config(config_dict, pretrained)


@register_model("smallthinker")
class SmallThinkerLM(HFLM):
    """lm-eval model: `lm_eval --model smallthinker --model_args pretrained=DIR[,batch_size=8,dtype=bfloat16]`."""

    # Our classes instead of the Auto ones: they also read the published 21B config.json, which has no model_type.
    AUTO_MODEL_CLASS = SmallThinkerForCausalLM

    def __init__(
        self,
        pretrained: str | transformers.PreTrainedModel,
        device: str | None = None,
        batch_size: int | str = 8,
        **kwargs: Any,
    ) -> None:
        if isinstance(pretrained, str):
            check_smallthinker_checkpoint(pretrained, revision=str(kwargs.get("revision") or "main"))
            # HFLM's default device is "cuda" even where there is none.
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        else:
            check_smallthinker_config(pretrained.config, f"the model object {type(pretrained).__name__}")
        kwargs.setdefault("backend", "causal")
        # The report evaluates in "non-thinking mode": chat templates with a thinking switch read
        # `enable_thinking`, templates without one ignore the variable.
        kwargs.setdefault("enable_thinking", False)
        super().__init__(pretrained=pretrained, device=device, batch_size=batch_size, **kwargs)

    def _get_config(
        self, pretrained: str, *, revision: str = "main", subfolder: str = "", **kwargs: Any
    ) -> None:
        self._config = SmallThinkerConfig.from_pretrained(pretrained, revision=revision, subfolder=subfolder)

    def get_model_info(self) -> dict[str, Any]:
        """Parameter count, dtype and architecture, read locally (HFLM's version queries the hub for a sha)."""
        config = self.model.config
        info = {
            "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
            "model_dtype": str(self.model.dtype),
            "model_class": type(self.model).__name__,
            "model_name_or_path": str(
                self.pretrained if isinstance(self.pretrained, str) else config.name_or_path
            ),
        }
        keys = (
            "hidden_size",
            "num_hidden_layers",
            "moe_num_primary_experts",
            "moe_num_active_primary_experts",
        )
        info.update({k: getattr(config, k, None) for k in keys})
        return info
