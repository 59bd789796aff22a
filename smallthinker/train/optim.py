"""AdamW with decay-aware parameter groups and the learning-rate schedules of the report."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from smallthinker.train.config import OptimConfig, ScheduleConfig


def param_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool) -> list[dict]:
    """Split parameters into decayed (matrices) and non-decayed (norm weights, biases, embeddings).

    Embeddings are not decayed by default: a token's row only receives gradient when the token occurs,
    but decay shrinks every row every step, so rare tokens drift to zero (OLMo 2 drops embedding
    decay for this reason). With tied weights the lm_head is the same tensor and follows the embedding.
    """
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        is_embedding = id(p) in embedding_ids
        if p.ndim < 2 or (is_embedding and not decay_embeddings):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    groups = param_groups(model, cfg.weight_decay, cfg.decay_embeddings)
    # foreach=False keeps the update order-independent of how many tensors are grouped, so a
    # 1-process and a 2-process run with identical gradients produce identical weights.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, foreach=False)


def lr_multiplier(cfg: ScheduleConfig, max_steps: int) -> Callable[[int], float]:
    """LR as a fraction of peak for optimizer step `step` (0-based): linear warmup, then the decay."""
    warmup = cfg.warmup_steps
    floor = cfg.min_lr_ratio

    def cosine(step: int) -> float:
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def wsd(step: int) -> float:
        # warmup-stable-decay (MiniCPM, arXiv 2404.06395): hold the peak, then decay linearly to
        # the floor over the last `decay_fraction` of training.
        decay_steps = max(1, round(cfg.decay_fraction * max_steps))
        decay_start = max_steps - decay_steps
        if step < decay_start:
            return 1.0
        return 1.0 - (1.0 - floor) * min(1.0, (step - decay_start) / decay_steps)

    decay = {"cosine": cosine, "wsd": wsd, "constant": lambda step: 1.0}[cfg.kind]

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return decay(step)

    return multiplier


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, max_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg, max_steps))
