"""The training losses: cross-entropy, router load balance and router z-loss, one path for all of them.

The formulas live in `smallthinker.modeling` (the model's own `labels=` loss uses the same functions); this module
decides what each micro-batch contributes so that the optimizer step's gradient is the gradient of the configured
loss over the whole global batch, whatever its split into micro-batches and data-parallel ranks. DDP and FSDP
average gradients over ranks, so every contribution is scaled by what undoes that average.

Balance-loss scopes (the Switch-style loss E * sum_e f_e * P_e per layer; f = share of top-k assignments, P = mean
router probability, both over real tokens only):
- micro_batch: f and P of each micro-batch alone; the step's loss is their mean (the usual MoE recipe).
- global_batch: f from every micro-batch of the optimizer step on every rank (Qiu et al. 2025, arXiv 2501.11873);
  the step's loss is exactly that of one process seeing the global batch at once.
- dp_group: as global_batch within groups of `dp_group_size` consecutive ranks, averaged over the groups: the
  report's "DP-groups global load balance", between the two.
With more than one micro-batch per step, the global_batch and dp_group scopes need every micro-batch's routing
before the first backward: a gradient-free routing pass over the step's micro-batches counts them first (one extra
forward per micro-batch; none when `grad_accum_steps` is 1, where the counts are reduced inside the forward).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from smallthinker.modeling.modeling_smallthinker import (
    expert_counts,
    load_balancing_loss,
    router_z_loss,
    token_mask,
)
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


def _distributed_world() -> int:
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size()


def build_count_reducer(cfg: LossConfig) -> CountReducer | None:
    """The count reducer over the ranks of the configured scope; None when counts stay on this rank.

    Must be called on every rank in the same order: `new_group` is a collective.
    """
    world = _distributed_world()
    if world == 1 or cfg.balance_scope == "micro_batch":
        return None
    if cfg.balance_scope == "global_batch":
        return all_reduce_sum(None)
    rank = dist.get_rank()
    mine = None
    for ranks in dp_groups(world, cfg.dp_group_size):
        group = dist.new_group(ranks)  # every rank creates every group, as new_group requires
        if rank in ranks:
            mine = group
    return all_reduce_sum(mine)


@dataclass
class MicroBatchLosses:
    """One micro-batch's losses and how they enter its optimizer step.

    `ce` is already this micro-batch's share of the step's CE (normalised by the step's target tokens on all
    ranks); `balance` / `z` are its router losses averaged over layers (`balance_L` / `z_L` per layer) before the
    scope's scaling; `counts_LE` its expert assignments. `share` turns any of the router values into what it adds
    to the step: summed over the step's micro-batches and averaged over ranks, the shares are the step's losses.
    """

    ce: torch.Tensor
    balance: torch.Tensor
    z: torch.Tensor
    balance_L: torch.Tensor
    z_L: torch.Tensor
    counts_LE: torch.Tensor
    num_micro: int
    balance_scale: float | None
    """None: the micro-batch scope, a plain mean over micro-batches; else the factor of a span scope."""

    def balance_share(self, value: torch.Tensor) -> torch.Tensor:
        return value / self.num_micro if self.balance_scale is None else value * self.balance_scale

    def z_share(self, value: torch.Tensor) -> torch.Tensor:
        return value / self.num_micro

    def objective(self, balance_coef: float, z_coef: float, world_size: int) -> torch.Tensor:
        """What to back-propagate: DDP/FSDP average gradients over ranks, the CE is a share of a global sum."""
        if self.balance_scale is None:
            router = (balance_coef * self.balance + z_coef * self.z) / self.num_micro
        else:
            router = balance_coef * self.balance * self.balance_scale + z_coef * self.z / self.num_micro
        return self.ce * world_size + router


class TrainingLosses:
    """CE, balance and z losses of micro-batches, scaled for their step and the configured balance scope."""

    def __init__(self, cfg: LossConfig, model_config: Any, world_size: int) -> None:
        self.cfg = cfg
        self.num_experts = model_config.moe_num_primary_experts
        self.top_k = model_config.moe_num_active_primary_experts
        self.apply_softmax = model_config.moe_primary_router_apply_softmax
        self.world_size = world_size
        if cfg.balance_scope == "dp_group" and world_size > 1:
            dp_groups(world_size, cfg.dp_group_size)  # a bad group size fails before training starts
        self.count_reducer = build_count_reducer(cfg)

    @property
    def spans_micro_batches(self) -> bool:
        """Whether f is formed over more than one micro-batch (global_batch / dp_group scopes)."""
        return self.cfg.balance_scope != "micro_batch"

    def balance_scale(self) -> float | None:
        """Factor of a micro-batch's balance loss in a span scope so that, after the ranks' gradients are averaged,
        the step optimises the sum of the span's shares (global_batch: the whole world; dp_group: the mean over
        groups); None for the micro-batch scope, a plain mean."""
        if self.cfg.balance_scope == "micro_batch":
            return None
        if self.cfg.balance_scope == "dp_group":
            return float(min(self.cfg.dp_group_size, self.world_size))
        return float(self.world_size)

    @torch.no_grad()
    def routing_load(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert assignment counts [L, E] and real-token count of one micro-batch, from a gradient-free forward."""
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        # logits_to_keep=1: only the routing is wanted, not the LM head over every position.
        out = model(**inputs, output_router_logits=True, use_cache=False, logits_to_keep=1)
        return self._load(out.router_logits, mask)

    def _load(
        self, router_logits: Sequence[torch.Tensor], mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        counts_LE = expert_counts(router_logits, self.top_k, mask)
        tokens = token_mask(mask, router_logits[0].shape[0], counts_LE.device).sum().reshape(1)
        return counts_LE, tokens

    def span_load(
        self, loads: Sequence[tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's expert load: the micro-batches' `routing_load`s summed, then over the scope's ranks."""
        counts_LE = torch.stack([c for c, _ in loads]).sum(0)
        tokens = torch.stack([t for _, t in loads]).sum(0)
        if self.count_reducer is not None:
            counts_LE, tokens = self.count_reducer(counts_LE), self.count_reducer(tokens)
        return counts_LE, tokens

    def micro_batch(
        self,
        outputs: Any,
        ce: torch.Tensor,
        mask: torch.Tensor | None,
        num_micro: int,
        step_load: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> MicroBatchLosses:
        """The contributions of one micro-batch, from its model output (router logits) and its CE.

        `ce` is already normalised by the step's target tokens on all ranks; `mask` marks real tokens (padding rows
        and tails count in neither f nor P nor the z-loss nor the expert counts).
        """
        router_logits = outputs.router_logits
        counts_LE, tokens = self._load(router_logits, mask)
        args = (router_logits, self.num_experts, self.top_k, self.apply_softmax, mask)
        if not self.spans_micro_batches:
            balance_L = load_balancing_loss(*args, per_layer=True)
        elif step_load is not None:
            balance_L = load_balancing_loss(*args, expert_load=step_load, per_layer=True)
        else:  # one micro-batch per rank: the span's counts are this batch's, reduced over the scope's ranks
            balance_L = load_balancing_loss(
                *args, expert_load=self.span_load([(counts_LE, tokens)]), per_layer=True
            )
        z_L = router_z_loss(router_logits, mask, per_layer=True)
        return MicroBatchLosses(
            ce, balance_L.mean(), z_L.mean(), balance_L, z_L, counts_LE, num_micro, self.balance_scale()
        )
