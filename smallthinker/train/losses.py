"""Router auxiliary losses in the three load-balancing scopes.

The model's `load_balancing_loss(..., count_reducer=...)` computes the Switch-style loss
E * sum_e f_e * P_e per layer; f (expert assignment frequency) comes from top-k counts, which the
reducer may sum over other ranks before f is formed. P (mean router probability) stays local, so the
gradient each rank back-propagates is its own; only the statistics it is weighted by are shared.

- micro_batch: f from the micro-batch alone (the usual MoE recipe).
- global_batch: f from all data-parallel ranks' micro-batches (Qiu et al. 2025, arXiv 2501.11873).
- dp_group: f from groups of `dp_group_size` ranks: the report's "DP-groups global load balance",
  between the two: groups may specialise experts, the whole run need not balance per micro-batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from smallthinker.modeling.modeling_smallthinker import load_balancing_loss, router_z_loss
from smallthinker.train.config import LossConfig

CountReducer = Callable[[torch.Tensor], torch.Tensor]


def all_reduce_sum(group: dist.ProcessGroup | None) -> CountReducer:
    """A reducer summing a statistics tensor over `group` (None = all ranks); no autograd through it."""

    def reduce(tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    return reduce


def dp_groups(world_size: int, group_size: int) -> list[list[int]]:
    """Consecutive rank groups: [[0..g-1], [g..2g-1], ...]."""
    if world_size % group_size:
        raise ValueError(
            f"loss.dp_group_size={group_size} does not divide the {world_size} data-parallel ranks; "
            "pick a divisor of the number of processes"
        )
    return [list(range(start, start + group_size)) for start in range(0, world_size, group_size)]


def build_count_reducer(cfg: LossConfig) -> CountReducer | None:
    """The count reducer for the configured scope; None when counts stay local.

    Must be called on every rank in the same order: `new_group` is a collective.
    """
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    if cfg.balance_scope == "micro_batch":
        return None
    if cfg.balance_scope == "global_batch":
        return all_reduce_sum(None)
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = None
    for ranks in dp_groups(world, cfg.dp_group_size):
        group = dist.new_group(ranks)  # every rank creates every group, as new_group requires
        if rank in ranks:
            mine = group
    return all_reduce_sum(mine)


class RouterLosses:
    """Balance and z losses for one micro-batch, from the model's per-layer router logits."""

    def __init__(self, cfg: LossConfig, num_experts: int, top_k: int, apply_softmax: bool) -> None:
        self.cfg = cfg
        self.num_experts = num_experts
        self.top_k = top_k
        self.apply_softmax = apply_softmax
        self.count_reducer = build_count_reducer(cfg)

    def __call__(
        self, outputs: Any, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(balance loss, z loss) of a model output, each averaged over layers as the model defines them."""
        if self.count_reducer is None:  # local counts: the model already computed exactly these
            return outputs.aux_loss, outputs.z_loss
        aux = load_balancing_loss(
            outputs.router_logits,
            self.num_experts,
            self.top_k,
            self.apply_softmax,
            attention_mask=attention_mask,
            count_reducer=self.count_reducer,
        )
        return aux, outputs.z_loss

    @torch.no_grad()
    def per_layer(
        self, router_logits: tuple[torch.Tensor, ...], attention_mask: torch.Tensor | None
    ) -> dict[str, list[float]]:
        """Balance and z loss of each layer on this micro-batch alone (a diagnostic, not reduced)."""
        aux = [
            load_balancing_loss((r,), self.num_experts, self.top_k, self.apply_softmax, attention_mask).item()
            for r in router_logits
        ]
        z = [router_z_loss((r,), attention_mask).item() for r in router_logits]
        return {"layer_aux_loss": aux, "layer_z_loss": z}
