"""Training memory per GPU for the 4B and 21B presets under FSDP2, at their recipe's micro-batch and
sequence length: sharded fp32 weights, fp32 gradients and AdamW states, plus activations with and
without activation checkpointing.

    python -m scripts.memory_estimate                       # both recipes, 1 / 8 / 64 GPUs
    python -m scripts.memory_estimate --recipes configs/train/pretrain_4b.yaml --gpus 1 2 --seq_len 8192

Weights, gradients and optimizer states are counted exactly from the model (FSDP2 divides each by the
number of GPUs). Activations are measured, not modelled: one forward pass of the preset's real layers
(two of them, of each attention kind the preset mixes) plus embedding, final norm, LM head and loss, in
bf16 on CPU, at three short lengths; the bytes autograd saves for backward are summed per part and
fitted as a + b*T + c*T^2, then evaluated at the recipe's length and multiplied by its micro-batch.
On GPU the attention kernel may save less than the CPU one (flash attention keeps no T x T scores).
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from smallthinker.modeling import SmallThinkerForCausalLM, load_model_config
from smallthinker.train.build import data_config, stage_seq_lens
from smallthinker.train.config import load_train_config

RECIPES = ["configs/train/pretrain_4b.yaml", "configs/train/pretrain_21b.yaml"]
LAYOUT_FIELDS = ("rope_layout", "sliding_window_layout")
GIB = 2**30


@dataclass
class Recipe:
    name: str
    preset: str
    overrides: dict
    experts_implementation: str | None
    micro_batch_size: int
    seq_len: int


def read_recipe(path: str, seq_len: int | None) -> Recipe:
    cfg = load_train_config(path)
    main_stage_len = next(iter(stage_seq_lens(data_config(cfg)).values()))
    return Recipe(Path(path).stem, cfg.model.preset, dict(cfg.model.overrides),
                  cfg.model.experts_implementation, cfg.micro_batch_size, seq_len or main_stage_len)  # fmt: skip


def layer_kinds(config) -> list[tuple]:
    """Per layer, the settings that change what a layer saves (attention window, RoPE on/off)."""
    layouts = [getattr(config, f, None) or [0] * config.num_hidden_layers for f in LAYOUT_FIELDS]
    return list(zip(*layouts))


def param_count(preset: str, overrides: dict) -> tuple[int, int]:
    """(all parameters, parameters of the largest decoder layer), counted on the meta device."""
    with torch.device("meta"):
        model = SmallThinkerForCausalLM(load_model_config(preset, **overrides))
    layer = max(sum(p.numel() for p in m.parameters()) for m in model.model.layers)
    return sum(p.numel() for p in model.parameters()), layer


@contextlib.contextmanager
def saved_bytes_by_part(model: nn.Module, totals: dict[str, int]) -> Iterator[None]:
    """Sum the bytes autograd saves for backward, per decoder layer ("layer{i}") and for the rest
    ("outside"); parameters are not activations and a storage saved twice counts once."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    part = ["outside"]

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params and ptr not in seen and t.device.type != "meta":
            seen.add(ptr)
            totals[part[0]] = totals.get(part[0], 0) + storage.nbytes()
        return t

    def enter(i: int):
        return lambda *_: part.__setitem__(0, f"layer{i}")

    def leave(*_):
        part[0] = "outside"

    hooks = []
    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.register_forward_pre_hook(enter(i)))
        hooks.append(layer.register_forward_hook(leave))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
    finally:
        for h in hooks:
            h.remove()


def measure(recipe: Recipe, lengths: list[int], checkpointing: bool) -> dict[str, list[int]]:
    """Saved bytes per part for a 2-layer model of the preset (its first layer of each kind) at each
    length (batch 1); "layer0"/"layer1" are the two kinds, "outside" the embedding, head and loss."""
    full = load_model_config(recipe.preset, **recipe.overrides)
    kinds = layer_kinds(full)
    picked = [0] + [i for i, k in enumerate(kinds) if k != kinds[0]][:1]
    overrides = dict(recipe.overrides, num_hidden_layers=len(picked))
    for field in LAYOUT_FIELDS:
        if getattr(full, field, None):
            overrides[field] = [getattr(full, field)[i] for i in picked]
    torch.manual_seed(0)
    model = SmallThinkerForCausalLM(load_model_config(recipe.preset, **overrides)).to(torch.bfloat16)
    if recipe.experts_implementation:
        model.config._experts_implementation = recipe.experts_implementation
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    out: dict[str, list[int]] = {}
    for length in lengths:
        totals: dict[str, int] = {}
        ids = torch.randint(0, model.config.vocab_size, (1, length))
        with saved_bytes_by_part(model, totals):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        del loss
        for key, value in totals.items():
            out.setdefault(key, []).append(value)
    return out


def fit(lengths: list[int], values: list[int], at: int) -> float:
    """a + b*T + c*T^2 through the measured points, evaluated at T = `at` (never below 0)."""
    coeffs = np.polyfit(np.array(lengths, dtype=float), np.array(values, dtype=float), deg=len(lengths) - 1)
    return max(0.0, float(np.polyval(coeffs, at)))


def activations(recipe: Recipe, lengths: list[int], checkpointing: bool) -> tuple[float, float, float]:
    """(bytes outside the layers, bytes of all decoder layers, bytes of the largest layer) saved for
    backward by one micro-batch."""
    full = load_model_config(recipe.preset, **recipe.overrides)
    kinds = layer_kinds(full)
    measured = measure(recipe, lengths, checkpointing)
    at = recipe.seq_len
    per_kind = [fit(lengths, measured.get(f"layer{i}", [0] * len(lengths)), at) for i in range(2)]
    first = kinds[0]
    layers = sum(per_kind[0] if k == first else per_kind[1] for k in kinds)
    outside = fit(lengths, measured["outside"], at)
    b = recipe.micro_batch_size
    return outside * b, layers * b, max(per_kind) * b


def report(recipe: Recipe, gpus: list[int], lengths: list[int]) -> str:
    total, layer_params = param_count(recipe.preset, recipe.overrides)
    outside, layers, largest_layer = activations(recipe, lengths, checkpointing=False)
    outside_ac, layers_ac, _ = activations(recipe, lengths, checkpointing=True)
    full = load_model_config(recipe.preset, **recipe.overrides)
    # With checkpointing the backward pass recomputes one layer at a time: its full activations are
    # alive on top of the saved layer inputs.
    act_plain = outside + layers
    act_ckpt = outside_ac + layers_ac + largest_layer
    # FSDP2 keeps the current and the prefetched layer unsharded in bf16, and one layer's gradients in
    # fp32 before they are reduce-scattered.
    buffers = layer_params * (2 * 2 + 4)
    lines = [
        f"### {recipe.name}: {recipe.preset}, {total / 1e9:.2f} B parameters, micro-batch "
        f"{recipe.micro_batch_size} x {recipe.seq_len} tokens, experts {recipe.experts_implementation}",
        "",
        "| GPUs | weights fp32 | grads fp32 | AdamW | FSDP2 layer buffers | activations | activations, "
        "checkpointed | total | total, checkpointed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n in gpus:
        states = [4 * total / n, 4 * total / n, 8 * total / n]
        cells = [*states, buffers if n > 1 else 0, act_plain, act_ckpt]
        sums = (sum(cells[:4]) + act_plain, sum(cells[:4]) + act_ckpt)
        lines.append(f"| {n} | " + " | ".join(f"{v / GIB:.1f} GiB" for v in (*cells, *sums)) + " |")
    lines += [
        "",
        f"Activations per micro-batch: decoder layers {layers / GIB:.2f} GiB "
        f"({layers / full.num_hidden_layers / GIB:.3f} GiB per layer), embedding + head + loss "
        f"{outside / GIB:.2f} GiB; checkpointed: layer inputs {layers_ac / GIB:.2f} GiB, head "
        f"{outside_ac / GIB:.2f} GiB, one recomputed layer {largest_layer / GIB:.3f} GiB.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipes", nargs="+", default=RECIPES)
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--seq_len", type=int, default=None, help="default: the recipe's first data stage")
    parser.add_argument("--lengths", type=int, nargs=3, default=[128, 256, 512], help="measured lengths")
    args = parser.parse_args(argv)
    for path in args.recipes:
        print(report(read_recipe(path, args.seq_len), args.gpus, args.lengths))
        print()


if __name__ == "__main__":
    main()
