"""The KV-cache size report agrees with the bytes a real DynamicCache holds."""

import torch

from scripts.kv_cache_report import kv_cache_bytes, report
from smallthinker.modeling import SmallThinkerForCausalLM, load_model_config


def test_kv_cache_bytes_match_a_real_cache():
    config = load_model_config("tiny-21b-style", vocab_size=64, sliding_window_size=8)
    model = SmallThinkerForCausalLM(config).eval()
    with torch.no_grad():
        out = model(torch.randint(0, 64, (2, 50)), use_cache=True)
    held = sum(t.numel() * t.element_size() for layer in out.cache.layers for t in (layer.keys, layer.values))
    assert held == kv_cache_bytes(config, tokens=50, batch=2, bytes_per_value=4)


def test_hybrid_21b_layout_at_16k_saves_over_half_the_cache():
    text = report("smallthinker-21b", 16384)
    assert "1.625 GiB" in text  # 52 layers x 16384 tokens x 4 kv heads x 128 x 2 (k, v) x 2 bytes
    hybrid = kv_cache_bytes(load_model_config("smallthinker-21b"), 16384)
    assert hybrid == (13 * 16384 + 39 * 4095) * 2 * 4 * 128 * 2
