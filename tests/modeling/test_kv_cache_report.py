"""One KV-cache size formula (`smallthinker.modeling.sizes`), checked against real caches."""

import torch

from scripts.kv_cache_report import report
from smallthinker.modeling import SmallThinkerForCausalLM, load_model_config
from smallthinker.modeling.sizes import kv_cache_bytes


def held_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def test_kv_cache_bytes_match_a_real_cache():
    config = load_model_config("tiny-21b-style", vocab_size=64, sliding_window_size=8)
    model = SmallThinkerForCausalLM(config).eval()
    with torch.no_grad():
        out = model(torch.randint(0, 64, (2, 50)), use_cache=True)
    assert held_bytes(out.cache) == kv_cache_bytes(config, tokens=50, batch=2, bytes_per_value=4)


def test_kv_cache_bytes_match_the_cache_after_a_long_generation():
    """Token by token past the window: sliding layers stay bounded, full layers grow, and the formula follows."""
    config = load_model_config("tiny-21b-style", vocab_size=64, sliding_window_size=8)
    model = SmallThinkerForCausalLM(config).eval().to(torch.bfloat16)
    prompt = torch.randint(0, 64, (1, 5))
    with torch.no_grad():
        out = model.generate(
            prompt, max_new_tokens=60, min_new_tokens=60, do_sample=False, return_dict_in_generate=True
        )
    cache = out.past_key_values
    # The last generated token is returned, never fed back: the cache holds all tokens but that one.
    processed = out.sequences.shape[1] - 1
    assert processed == 64
    assert held_bytes(cache) == kv_cache_bytes(config, tokens=processed, bytes_per_value=2)
    lengths = {layer.keys.shape[2] for layer in cache.layers}
    assert lengths == {processed, config.sliding_window_size - 1}


def test_engine_budget_uses_the_same_formula():
    from smallthinker.inference import engine

    assert engine.kv_cache_bytes is kv_cache_bytes


def test_hybrid_21b_layout_at_16k_saves_over_half_the_cache():
    text = report("smallthinker-21b", 16384)
    assert "1.625 GiB" in text  # 52 layers x 16384 tokens x 4 kv heads x 128 x 2 (k, v) x 2 bytes
    hybrid = kv_cache_bytes(load_model_config("smallthinker-21b"), 16384)
    assert hybrid == (13 * 16384 + 39 * 4095) * 2 * 4 * 128 * 2
