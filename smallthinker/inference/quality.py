"""How much each weight format changes a model: perplexity, logit error and top-1 agreement on held-out text."""

from __future__ import annotations

import json
import math
import os

import torch
from transformers import AutoTokenizer

from smallthinker.inference.formats import FORMATS, quantize_model
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


def compare_formats(
    checkpoint: str | os.PathLike, sequences: list[torch.Tensor], formats: tuple[str, ...] = FORMATS
) -> list[dict[str, float | str]]:
    """Each weight format of the checkpoint against the bf16 model (the first row): perplexity, logit errors and
    top-1 agreement on `sequences`. The offloaded model of a format is the same model (tested), so this is its
    quality too."""
    rows: list[dict[str, float | str]] = []
    reference = None
    for fmt in formats:
        model = quantize_model(SmallThinkerForCausalLM.from_pretrained(checkpoint).eval(), fmt)
        logits = _logits(model, sequences)
        del model
        reference = logits if reference is None else reference
        all_ref, all_new = torch.cat(reference), torch.cat(logits)
        rows.append(
            {
                "format": fmt,
                "perplexity": _perplexity(logits, sequences),
                "max_abs_logit_err": (all_new - all_ref).abs().max().item(),
                "rel_logit_err": ((all_new - all_ref).norm() / all_ref.norm()).item(),
                "top1_agreement": (all_new.argmax(-1) == all_ref.argmax(-1)).float().mean().item(),
            }
        )
    base = rows[0]["perplexity"]
    for row in rows:
        row["perplexity_vs_bf16"] = row["perplexity"] / base - 1
    return rows


def format_quality_table(rows: list[dict[str, float | str]]) -> str:
    lines = [
        "| format | perplexity | vs bf16 | max abs logit err | rel logit err (L2) | top-1 agreement |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['format']} | {r['perplexity']:.4f} | {r['perplexity_vs_bf16']:+.2%} | "
            f"{r['max_abs_logit_err']:.4f} | {r['rel_logit_err']:.4f} | {r['top1_agreement']:.4f} |"
        )
    return "\n".join(lines)
