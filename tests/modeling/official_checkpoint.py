"""Tiny checkpoints in the OFFICIAL SmallThinker file layout, for parity and remote-code tests.

The config dicts copy the official ``config.json`` keys (SMALLTHINKER.md section 1) with tiny sizes; the
weights use the official per-expert tensor names. Nothing here imports ``smallthinker``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.modeling.reference_forward import StateDict

# Official 4B config.json (verbatim keys and values), the sizes shrunk to a tiny model.
OFFICIAL_4B_STYLE: dict = {
    "architectures": ["SmallThinkerForCausalLM"],
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_smallthinker.SmallThinkerConfig",
        "AutoModel": "modeling_smallthinker.SmallThinkerForCausalLM",
        "AutoModelForCausalLM": "modeling_smallthinker.SmallThinkerForCausalLM",
    },
    "bos_token_id": 1,
    "eos_token_id": [1, 2],
    "head_dim": 32,  # 4 heads x 32 = 128 != hidden 64: head_dim must be read, not derived
    "hidden_size": 64,
    "initializer_range": 0.02,
    "max_length": None,
    "max_position_embeddings": 256,
    "model_name": "smallthinker_4b_instruct",
    "model_type": "smallthinker",
    "moe_ffn_hidden_size": 32,
    "moe_num_active_primary_experts": 2,
    "moe_num_primary_experts": 8,
    "norm_topk_prob": True,
    "num_attention_heads": 4,
    "num_hidden_layers": 4,
    "num_key_value_heads": 2,
    "output_router_logits": False,
    "repetition_penalty": None,
    "rms_norm_eps": 1e-06,
    "rope_layout": [1, 1, 1, 1],
    "rope_scaling": None,
    "rope_theta": 1.5e6,
    "sliding_window_size": 4096,
    "sliding_window_layout": [0, 0, 0, 0],
    "temperature": None,
    "tie_word_embeddings": True,
    "tokenizer_class": "Qwen2Tokenizer",
    "top_p": None,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.53.3",
    "use_cache": False,
    "vocab_size": 128,
}

# Official 21B config.json differs from the 4B one in these keys; the only published copy has no model_type.
OFFICIAL_21B_STYLE: dict = {
    **{k: v for k, v in OFFICIAL_4B_STYLE.items() if k != "model_type"},
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 6,  # q_proj 64 -> 96
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 128,
    "model_name": "smallthinker_21b_instruct",
    "moe_num_primary_experts": 8,
    "moe_num_active_primary_experts": 3,
    "moe_primary_router_apply_softmax": True,
    "tie_word_embeddings": False,
    "use_cache": True,
    "rope_layout": [0, 1, 1, 1],  # NoPE + full attention on layer i % 4 == 0, RoPE + sliding window elsewhere
    "sliding_window_layout": [0, 1, 1, 1],
    "sliding_window_size": 8,  # tests use sequences longer than this
    "rope_theta": 1e4,  # a small base so positions actually rotate within a short sequence
}

LAYOUTS: dict[str, dict] = {"4b_style": OFFICIAL_4B_STYLE, "21b_style": OFFICIAL_21B_STYLE}
ROUTER_STD = 3.0  # large enough that routing is far from uniform (and top-k gaps exceed rounding noise)


def official_state_dict(cfg: dict, seed: int = 0, with_tied_head: bool = True) -> StateDict:
    """Random fp32 weights N(0, 0.02) under the official tensor names; routers larger, norms around 1."""
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float = 0.02) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    hidden, ffn, head_dim = cfg["hidden_size"], cfg["moe_ffn_hidden_size"], cfg["head_dim"]
    q_dim, kv_dim = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
    sd: StateDict = {"model.embed_tokens.weight": normal(cfg["vocab_size"], hidden)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        sd[f"{p}.input_layernorm.weight"] = 1.0 + normal(hidden, std=0.1)
        sd[f"{p}.self_attn.q_proj.weight"] = normal(q_dim, hidden)
        sd[f"{p}.self_attn.k_proj.weight"] = normal(kv_dim, hidden)
        sd[f"{p}.self_attn.v_proj.weight"] = normal(kv_dim, hidden)
        sd[f"{p}.self_attn.o_proj.weight"] = normal(hidden, q_dim)
        sd[f"{p}.post_attention_layernorm.weight"] = 1.0 + normal(hidden, std=0.1)
        sd[f"{p}.block_sparse_moe.primary_router.weight"] = normal(
            cfg["moe_num_primary_experts"], hidden, std=ROUTER_STD
        )
        for j in range(cfg["moe_num_primary_experts"]):
            e = f"{p}.block_sparse_moe.experts.{j}"
            sd[f"{e}.gate.weight"] = normal(ffn, hidden)
            sd[f"{e}.up.weight"] = normal(ffn, hidden)
            sd[f"{e}.down.weight"] = normal(hidden, ffn)
    sd["model.norm.weight"] = 1.0 + normal(hidden, std=0.1)
    if not cfg["tie_word_embeddings"]:
        sd["lm_head.weight"] = normal(cfg["vocab_size"], hidden)
    elif with_tied_head:  # the official 4B files probably store the tied head as well
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    return sd


def write_official_checkpoint(directory: Path, cfg: dict, sd: StateDict) -> Path:
    """Write config.json + model.safetensors as the official repositories lay them out."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file(
        {k: v.contiguous() for k, v in sd.items()},
        str(directory / "model.safetensors"),
        metadata={"format": "pt"},
    )
    return directory
