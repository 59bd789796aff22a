"""Tiny SmallThinker checkpoints on disk and their expert stores, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from smallthinker.inference.store import convert_checkpoint
from smallthinker.modeling import SmallThinkerForCausalLM, load_model_config

LAYOUTS = ("tiny-4b-style", "tiny-21b-style")


def build_checkpoint(
    preset: str, root: Path, seed: int = 0, **overrides
) -> tuple[SmallThinkerForCausalLM, Path]:
    """A random fp32 model saved with `save_pretrained` (official per-expert names on disk)."""
    torch.manual_seed(seed)
    model = SmallThinkerForCausalLM(load_model_config(preset, vocab_size=512, **overrides)).eval()
    # Spread the router logits so top-k choices are far from ties (a tie could flip under reordering).
    for layer in model.model.layers:
        layer.block_sparse_moe.primary_router.weight.data.mul_(20)
    ckpt = root / "ckpt"
    model.save_pretrained(ckpt)
    return model, ckpt


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny matrices gain nothing from a second thread, and on a shared 2-core machine OpenMP spin-waiting
    against other processes makes them several times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """preset -> (resident reference model, checkpoint dir, store dir, int8 store dir)."""
    built = {}
    for preset in LAYOUTS:
        root = tmp_path_factory.mktemp(preset)
        model, ckpt = build_checkpoint(preset, root)
        store = convert_checkpoint(ckpt, root / "store")
        store_int8 = convert_checkpoint(ckpt, root / "store-int8", quant="int8")
        built[preset] = (model, ckpt, store, store_int8)
    return built


@pytest.fixture(scope="session")
def bf16_checkpoint(tmp_path_factory):
    """(root dir, a bf16 tiny-21b-style checkpoint in it): what the weight formats and stores are made from."""
    root = tmp_path_factory.mktemp("bf16")
    model, _ = build_checkpoint("tiny-21b-style", root)
    ckpt = root / "ckpt-bf16"
    model.to(torch.bfloat16).save_pretrained(ckpt)
    return root, ckpt
