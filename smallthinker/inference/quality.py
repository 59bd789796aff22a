"""How much quantised experts change a model: logit error and perplexity on held-out text."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from transformers import AutoTokenizer

from smallthinker.inference.engine import load_offloaded
from smallthinker.inference.store import MANIFEST, convert_checkpoint
from smallthinker.modeling import SmallThinkerForCausalLM


def load_token_sequences(
    checkpoint: str | os.PathLike, jsonl: str | os.PathLike, limit: int
) -> list[torch.Tensor]:
    """The first ``limit`` ``{"text": ...}`` records of a JSON-lines file, tokenised with the checkpoint's tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    with open(jsonl) as f:
        texts = [json.loads(line)["text"] for line, _ in zip(f, range(limit))]
    return [torch.tensor([tokenizer(t)["input_ids"]]) for t in texts]


@torch.no_grad()
def _logits(model, sequences: list[torch.Tensor]) -> list[torch.Tensor]:
    return [model(ids).logits.float()[0] for ids in sequences]


def _perplexity(logits: list[torch.Tensor], sequences: list[torch.Tensor]) -> float:
    nll, count = 0.0, 0
    for lg, ids in zip(logits, sequences):
        nll += torch.nn.functional.cross_entropy(lg[:-1], ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    return math.exp(nll / count)


def compare_quantisation(
    checkpoint: str | os.PathLike, workdir: str | os.PathLike, sequences: list[torch.Tensor]
) -> list[dict[str, float]]:
    """bf16 experts (reference) vs int8 experts from the same bf16 checkpoint, both through the offload engine."""
    workdir = Path(workdir)
    bf16_ckpt = workdir / "checkpoint-bf16"
    if not bf16_ckpt.exists():
        SmallThinkerForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16).save_pretrained(bf16_ckpt)
    rows, reference = [], None
    for quant in ("none", "int8"):
        store = workdir / f"store-{quant}"
        if not (store / MANIFEST).exists():
            convert_checkpoint(bf16_ckpt, store, quant=quant)
        model = load_offloaded(store, memory_budget="100GB", max_context=4096, sparse=False)
        logits = _logits(model, sequences)
        model.offload_engine.close()
        row = {"experts": "bf16" if quant == "none" else "int8", "perplexity": _perplexity(logits, sequences)}
        if reference is None:
            reference = logits
        all_ref, all_new = torch.cat(reference), torch.cat(logits)
        row["max_abs_logit_err"] = (all_new - all_ref).abs().max().item()
        row["rel_logit_err"] = ((all_new - all_ref).norm() / all_ref.norm()).item()
        row["top1_agreement"] = (all_new.argmax(-1) == all_ref.argmax(-1)).float().mean().item()
        rows.append(row)
    return rows
