"""SmallThinkerConfig: official keys and defaults, round trips, presets and clear errors."""

import json

import pytest

from smallthinker.modeling import SmallThinkerConfig, list_presets, load_model_config

OFFICIAL_4B_KEYS = {
    "architectures", "attention_dropout", "auto_map", "bos_token_id", "eos_token_id", "head_dim", "hidden_size",
    "initializer_range", "max_length", "max_position_embeddings", "model_name", "model_type",
    "moe_ffn_hidden_size", "moe_num_active_primary_experts", "moe_num_primary_experts", "norm_topk_prob",
    "num_attention_heads", "num_hidden_layers", "num_key_value_heads", "output_router_logits",
    "repetition_penalty", "rms_norm_eps", "rope_layout", "rope_scaling", "rope_theta", "sliding_window_size",
    "sliding_window_layout", "temperature", "tie_word_embeddings", "tokenizer_class", "top_p", "torch_dtype",
    "transformers_version", "use_cache", "vocab_size",
}  # fmt: skip


def test_official_defaults():
    c = SmallThinkerConfig()
    assert (c.num_hidden_layers, c.hidden_size, c.vocab_size, c.head_dim) == (32, 1536, 151936, 128)
    assert (c.num_attention_heads, c.num_key_value_heads) == (12, 2)
    assert c.bos_token_id == 151643 and c.eos_token_id == [151643, 151645]
    assert c.rope_layout == [1] * 32 and c.sliding_window_layout == [0] * 32
    assert (c.rope_theta, c.max_position_embeddings, c.sliding_window_size) == (1e6, 131072, 4096)
    assert (c.moe_num_primary_experts, c.moe_num_active_primary_experts, c.moe_ffn_hidden_size) == (
        32,
        4,
        768,
    )
    assert c.moe_primary_router_apply_softmax is False and c.tie_word_embeddings is True
    assert c.router_aux_loss_coef == 0.0 and c.router_z_loss_coef == 0.0


def test_4b_preset_saves_exactly_the_official_keys(tmp_path):
    from smallthinker.modeling import SmallThinkerForCausalLM  # noqa: F401  (registers auto_map)

    config = load_model_config("smallthinker-4b")
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert set(saved) - {"auto_map"} == OFFICIAL_4B_KEYS - {"auto_map"}
    assert saved["norm_topk_prob"] is True and saved["model_name"] == "smallthinker_4b_instruct"
    assert saved["torch_dtype"] == "bfloat16" and saved["rope_theta"] == 1.5e6


def test_round_trip_keeps_unknown_and_generation_keys(tmp_path):
    config = SmallThinkerConfig(
        num_hidden_layers=2,
        rope_layout=[0, 1],
        sliding_window_layout=[0, 1],
        norm_topk_prob=True,
        some_future_key={"a": 1},
        temperature=0.6,
        top_p=0.95,
        max_length=128,
        repetition_penalty=1.1,
    )
    config.save_pretrained(tmp_path)
    again = SmallThinkerConfig.from_pretrained(tmp_path)
    for key in (
        "norm_topk_prob",
        "some_future_key",
        "temperature",
        "top_p",
        "max_length",
        "repetition_penalty",
    ):
        assert getattr(again, key) == getattr(config, key), key
    assert again.to_diff_dict() == config.to_diff_dict()


def test_extension_keys_written_only_when_set(tmp_path):
    SmallThinkerConfig(router_aux_loss_coef=0.01).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["router_aux_loss_coef"] == 0.01 and "router_z_loss_coef" not in saved


def test_derived_layer_types_follow_the_layouts():
    c = load_model_config("smallthinker-21b")
    assert c.layer_types[:4] == [
        "full_attention",
        "sliding_attention",
        "sliding_attention",
        "sliding_attention",
    ]
    assert c.layer_types.count("full_attention") == 13 and c.sliding_window == 4096
    assert load_model_config("smallthinker-4b").sliding_window is None


def test_presets_have_official_values():
    assert {"smallthinker-4b", "smallthinker-21b", "tiny-4b-style", "tiny-21b-style"} <= set(list_presets())
    big = load_model_config("smallthinker-21b")
    assert (big.hidden_size, big.num_hidden_layers, big.num_attention_heads, big.num_key_value_heads) == (
        2560,
        52,
        28,
        4,
    )
    assert big.moe_num_primary_experts == 64 and big.moe_num_active_primary_experts == 6
    assert big.moe_primary_router_apply_softmax and not big.tie_word_embeddings
    assert big.rope_layout == [0, 1, 1, 1] * 13 == big.sliding_window_layout
    tiny = load_model_config("tiny-21b-style", num_hidden_layers=8)
    assert tiny.rope_layout == [0, 1, 1, 1] * 2  # the layout pattern follows a changed depth


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"rope_layout": [1] * 3}, "rope_layout"),
        ({"sliding_window_layout": [0] * 31}, "sliding_window_layout"),
        ({"rope_layout": [2] * 32}, "rope_layout"),
        ({"num_attention_heads": 12, "num_key_value_heads": 5}, "num_attention_heads"),
        ({"moe_num_active_primary_experts": 33}, "moe_num_active_primary_experts"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"moe_ffn_hidden_size": -1}, "moe_ffn_hidden_size"),
        ({"head_dim": 0}, "head_dim"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SmallThinkerConfig(**kwargs)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(FileNotFoundError, match="tiny-4b-style"):
        load_model_config("no-such-preset")


def official_save_pretrained_dict(cfg: dict) -> dict:
    """config.json as the official class's `save_pretrained` writes it: it stores copies of the window settings
    for vLLM (`sliding_window`, `sliding_window_pattern`) beside the official keys."""
    return {
        **cfg,
        "sliding_window": cfg["sliding_window_size"],
        "sliding_window_pattern": cfg["sliding_window_layout"],
    }


@pytest.mark.parametrize("layout", ["4b_style", "21b_style"])
def test_configs_saved_by_the_official_code_load_and_round_trip(tmp_path, layout):
    from transformers import AutoConfig, AutoModelForCausalLM

    from smallthinker.modeling import SmallThinkerForCausalLM
    from tests.modeling.official_checkpoint import LAYOUTS, official_state_dict, write_official_checkpoint

    cfg = official_save_pretrained_dict(LAYOUTS[layout])
    official = write_official_checkpoint(tmp_path / "official", cfg, official_state_dict(LAYOUTS[layout]))
    config = SmallThinkerConfig.from_pretrained(official)
    assert config.sliding_window_layout == cfg["sliding_window_layout"]
    model = SmallThinkerForCausalLM.from_pretrained(official)
    if "model_type" in cfg:  # the Auto classes need it (the published 21B file has none)
        assert isinstance(AutoConfig.from_pretrained(official), SmallThinkerConfig)
        assert type(AutoModelForCausalLM.from_pretrained(official)) is SmallThinkerForCausalLM
    model.save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    # official code -> ours -> a file the official code reads with the same keys (ours adds model_type when the
    # file had none: the official class writes it too).
    assert set(saved) - {"model_type"} == set(cfg) - {"model_type"}
    assert saved["sliding_window"] == cfg["sliding_window"]
    assert saved["sliding_window_pattern"] == cfg["sliding_window_pattern"]


def test_published_files_gain_no_vllm_keys(tmp_path):
    from tests.modeling.official_checkpoint import OFFICIAL_4B_STYLE

    (tmp_path / "config.json").write_text(json.dumps(OFFICIAL_4B_STYLE))
    SmallThinkerConfig.from_pretrained(tmp_path).save_pretrained(tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "config.json").read_text())
    assert "sliding_window" not in saved and "sliding_window_pattern" not in saved


@pytest.mark.parametrize(
    ("key", "value", "official"),
    [
        ("sliding_window", 2048, "sliding_window_size"),
        ("sliding_window_pattern", [1, 0, 0, 0], "sliding_window_layout"),
    ],
)
def test_disagreeing_vllm_keys_are_a_clear_error(key, value, official):
    with pytest.raises(ValueError, match=f"{key}=.* disagrees with {official}="):
        SmallThinkerConfig(num_hidden_layers=4, **{key: value})
