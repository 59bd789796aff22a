"""SmallThinker configuration.

Every key and default of the official configuration class is kept, so the published `config.json` files load
unchanged and save back with the same keys. This file imports nothing from the `smallthinker` package: it is
copied next to saved checkpoints for `trust_remote_code=True` loading.
"""

from __future__ import annotations

from typing import Any

from transformers.configuration_utils import PreTrainedConfig

# Keys this implementation adds for training; left out of the saved file while they hold their default, so a
# checkpoint of an official configuration keeps exactly the official keys.
_EXTENSION_DEFAULTS: dict[str, Any] = {"router_aux_loss_coef": 0.0, "router_z_loss_coef": 0.0}
EXTENSION_KEYS = tuple(_EXTENSION_DEFAULTS)
# Official keys written only when they differ from the official default (the 4B file has no such key).
_OMIT_WHEN_DEFAULT: dict[str, Any] = {"moe_primary_router_apply_softmax": False, "pad_token_id": None}
# The official class also stores copies of the window settings under the names vLLM reads, so every
# `config.json` its `save_pretrained` writes has them; the published files do not. They are accepted when they
# agree with the official keys, and written back only when the loaded file had them.
_VLLM_WINDOW_KEYS = {
    "sliding_window": "sliding_window_size",
    "sliding_window_pattern": "sliding_window_layout",
}
# `architectures` entries that identify a SmallThinker checkpoint (the published 21B file has no `model_type`).
SMALLTHINKER_ARCHITECTURES = ("SmallThinkerForCausalLM", "SmallThinkerModel")


def is_smallthinker_config(config_dict: dict[str, Any]) -> bool:
    """Whether a `config.json` dict describes a SmallThinker model, by `model_type` or by `architectures`."""
    if config_dict.get("model_type") == "smallthinker":
        return True
    return bool(set(config_dict.get("architectures") or []) & set(SMALLTHINKER_ARCHITECTURES))


class SmallThinkerConfig(PreTrainedConfig):
    r"""Configuration of a SmallThinker mixture-of-experts model.

    Per-layer attention is described by two 0/1 lists with one entry per layer: `rope_layout[i] == 1` applies
    RoPE in layer i (0 = NoPE), `sliding_window_layout[i] == 1` restricts it to the last `sliding_window_size`
    keys (0 = full causal attention). Routing is sigmoid-renormalised top-k unless
    `moe_primary_router_apply_softmax` selects softmax over the top-k logits.

    `router_aux_loss_coef` and `router_z_loss_coef` (defaults 0) weight the load-balancing and router z-losses
    added to the language-modelling loss during training.
    """

    model_type = "smallthinker"
    keys_to_ignore_at_inference = ["past_key_values"]

    model_name: str | None = None
    num_hidden_layers: int = 32
    hidden_size: int = 1536
    pad_token_id: int | None = None
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = None
    vocab_size: int = 151936
    rms_norm_eps: float = 1e-6
    num_attention_heads: int = 12
    num_key_value_heads: int = 2
    head_dim: int = 128
    use_cache: bool = True
    rope_layout: list[int] | None = None
    rope_theta: float = 1e6
    rope_scaling: dict | None = None
    max_position_embeddings: int = 131072
    sliding_window_layout: list[int] | None = None
    sliding_window_size: int = 4096
    moe_num_primary_experts: int = 32
    moe_ffn_hidden_size: int = 768
    moe_primary_router_apply_softmax: bool = False
    moe_num_active_primary_experts: int = 4
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    attention_dropout: float = 0.0
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.0
    router_z_loss_coef: float = 0.0
    # Generation settings stored in the official files; declared so they survive a load/save round trip.
    max_length: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        vllm_keys = {key: kwargs.pop(key) for key in _VLLM_WINDOW_KEYS if key in kwargs}
        if self.eos_token_id is None:
            self.eos_token_id = [151643, 151645]
        if self.rope_layout is None:
            self.rope_layout = [1] * self.num_hidden_layers
        if self.sliding_window_layout is None:
            self.sliding_window_layout = [0] * self.num_hidden_layers
        self.rope_layout = [int(v) for v in self.rope_layout]
        self.sliding_window_layout = [int(v) for v in self.sliding_window_layout]
        super().__post_init__(**kwargs)
        self._check()
        self._check_vllm_keys(vllm_keys)
        # Remembered (not serialised as such) so that saving writes the vLLM keys back exactly when they were read.
        self._vllm_window_keys = bool(vllm_keys)

    def _check(self) -> None:
        """Raise a `ValueError` naming the offending field (the official class asserts instead)."""
        for name in (
            "num_hidden_layers",
            "hidden_size",
            "vocab_size",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "moe_num_primary_experts",
            "moe_num_active_primary_experts",
            "moe_ffn_hidden_size",
            "sliding_window_size",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"SmallThinkerConfig.{name} must be a positive integer, got {value!r}.")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"SmallThinkerConfig.num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})."
            )
        if self.moe_num_active_primary_experts > self.moe_num_primary_experts:
            raise ValueError(
                f"SmallThinkerConfig.moe_num_active_primary_experts ({self.moe_num_active_primary_experts}) "
                f"must not exceed moe_num_primary_experts ({self.moe_num_primary_experts})."
            )
        for name in ("rope_layout", "sliding_window_layout"):
            layout = getattr(self, name)
            if len(layout) != self.num_hidden_layers:
                raise ValueError(
                    f"SmallThinkerConfig.{name} has {len(layout)} entries but num_hidden_layers is "
                    f"{self.num_hidden_layers}: give one 0/1 entry per layer."
                )
            if any(v not in (0, 1) for v in layout):
                raise ValueError(f"SmallThinkerConfig.{name} entries must be 0 or 1, got {layout}.")
        if self.rope_scaling not in (None, {}) and self.rope_scaling.get("rope_type", "default") != "default":
            raise ValueError(
                f"SmallThinkerConfig.rope_scaling={self.rope_scaling!r} is not supported: SmallThinker uses plain "
                "RoPE; extend the context by raising rope_theta instead."
            )

    def _check_vllm_keys(self, values: dict[str, Any]) -> None:
        for key, value in values.items():
            official = _VLLM_WINDOW_KEYS[key]
            expected = getattr(self, official)
            given = [int(v) for v in value] if isinstance(value, (list, tuple)) else value
            if given != expected:
                raise ValueError(
                    f"SmallThinkerConfig: {key}={value!r} disagrees with {official}={expected!r}; the official "
                    f"files keep {key} as a copy of {official}: make the two equal (or drop {key})."
                )

    # transformers' cache and masking utilities read these two attributes; they are derived from the official
    # layout keys instead of being stored, so saved files keep the official key set.
    @property
    def layer_types(self) -> list[str]:
        return ["sliding_attention" if s else "full_attention" for s in self.sliding_window_layout]

    @property
    def sliding_window(self) -> int | None:
        return self.sliding_window_size if any(self.sliding_window_layout) else None

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if out.pop("_vllm_window_keys", False):
            out |= {key: out[official] for key, official in _VLLM_WINDOW_KEYS.items()}
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        out = super().to_diff_dict()
        for key, default in {**_EXTENSION_DEFAULTS, **_OMIT_WHEN_DEFAULT}.items():
            if key in out and out[key] == default:
                del out[key]
        # The official files (transformers 4.53) spell it `torch_dtype`; transformers 5 still reads that key.
        if out.get("dtype") is not None:
            out["torch_dtype"] = out.pop("dtype")
        return out


__all__ = ["EXTENSION_KEYS", "SMALLTHINKER_ARCHITECTURES", "SmallThinkerConfig", "is_smallthinker_config"]
