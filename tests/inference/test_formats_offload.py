"""Each weight format offloaded is the same model as resident: greedy tokens identical, logits equal to
kernel rounding; int4 stores refuse a kernel layout they were not packed for."""

from __future__ import annotations

import json

import pytest
import torch

from smallthinker.inference import load_offloaded
from smallthinker.inference.formats import FORMATS, quantize_model
from smallthinker.inference.store import MANIFEST, ExpertStore, StoreError, convert_checkpoint
from smallthinker.modeling import SmallThinkerForCausalLM

PROMPT = torch.tensor([[3, 14, 15, 92, 65, 35]])


@pytest.mark.parametrize("fmt", FORMATS)
def test_offloaded_equals_resident_in_every_format(bf16_checkpoint, fmt):
    root, ckpt = bf16_checkpoint
    store = convert_checkpoint(ckpt, root / f"store-{fmt}", quant="none" if fmt == "bf16" else fmt)
    resident = quantize_model(SmallThinkerForCausalLM.from_pretrained(ckpt).eval(), fmt)
    offloaded = load_offloaded(store, memory_budget="1GB", max_context=64, weight_format=fmt, sparse=False)
    try:
        with torch.no_grad():
            torch.testing.assert_close(offloaded(PROMPT).logits, resident(PROMPT).logits, atol=2e-2, rtol=0)
            kwargs = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False)
            assert torch.equal(offloaded.generate(PROMPT, **kwargs), resident.generate(PROMPT, **kwargs))
    finally:
        offloaded.offload_engine.close()


def test_weight_format_must_match_the_store(bf16_checkpoint):
    root, ckpt = bf16_checkpoint
    store = convert_checkpoint(ckpt, root / "store-mismatch", quant="int8")
    with pytest.raises(ValueError, match=r"weight_format=.int4. does not match the store .* \(int8 experts"):
        load_offloaded(store, memory_budget="1GB", max_context=64, weight_format="int4")


def test_int4_store_refuses_an_earlier_packing(bf16_checkpoint):
    """Stores whose int4 codes are in a torch kernel's machine-dependent packing (no `int4_layout`) are refused
    with the command that converts them again."""
    root, ckpt = bf16_checkpoint
    store = convert_checkpoint(ckpt, root / "store-layout", quant="int4")
    manifest = json.loads((store / MANIFEST).read_text())
    assert manifest["int4_layout"] == "nibbles"
    del manifest["int4_layout"]
    manifest["int4_layouts"] = {"64x96": 123}
    (store / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="earlier packing .* convert-store --quant int4"):
        ExpertStore(store)
