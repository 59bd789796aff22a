"""`sorted_mm`: a CPU-friendly experts implementation with a hand-written backward.

Registered in transformers' experts interface under the name "sorted_mm" when this module is imported; pick it with
`model.set_experts_implementation("sorted_mm")` or `config._experts_implementation = "sorted_mm"`.

It computes exactly the ReGLU experts of `SmallThinkerExperts` (the eager loop is the spec), but:
- the (token, expert) pairs are sorted by expert once, and each expert runs one `torch.mm` per projection straight
  into a slice of a preallocated buffer (experts without tokens cost nothing);
- the routing weight is applied to the F-wide activation instead of the H-wide output (half the elementwise work);
- the backward writes each expert's weight gradient straight into one preallocated [E, ...] tensor instead of
  letting autograd build a full-size zero gradient per `param[e]` slice, and recomputes the cheap elementwise
  parts (ReLU, products) from the saved [S, 2F] projection instead of saving them;
- the routing-weight gradient uses dot(dout @ down_e, h) over F instead of dot(dout, y) over H, so the [S, H]
  expert outputs are never saved.

Shape suffixes: T tokens, H hidden, F expert FFN width, E experts, K experts per token, S = T * K pairs.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

IMPLEMENTATION_NAME = "sorted_mm"


def sort_pairs_by_expert(
    top_k_index_TK: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Sort the T*K (token, expert) pairs by expert (stable, so ties keep token order, as the eager loop does).

    Returns the permutation into the flattened [T*K] pairs, the token of each sorted pair, and the per-expert
    pair counts as a Python list (one host sync for the whole layer).
    """
    expert_S = top_k_index_TK.reshape(-1)
    _, perm_S = torch.sort(expert_S, stable=True)
    token_S = perm_S // top_k_index_TK.shape[1]
    counts = torch.bincount(expert_S, minlength=num_experts).tolist()
    # Checked on the counts already on the host: a range check on the device tensor would sync once more.
    if len(counts) > num_experts:
        raise ValueError(
            f"top_k_index must lie in [0, {num_experts - 1}], got expert {len(counts) - 1}: the router and the "
            "experts disagree on the number of experts."
        )
    return perm_S, token_S, counts


def expert_slices(counts: list[int]) -> list[tuple[int, int, int]]:
    """(expert, start, end) of every expert that received at least one pair, in ascending expert order."""
    out, start = [], 0
    for expert, count in enumerate(counts):
        if count:
            out.append((expert, start, start + count))
        start += count
    return out


class SortedExpertsFunction(torch.autograd.Function):
    """ReGLU experts over expert-sorted pairs; forward and backward as explicit per-expert GEMMs."""

    @staticmethod
    def forward(
        ctx,
        hidden_TH: torch.Tensor,
        weights_S: torch.Tensor,
        gate_up_E2FH: torch.Tensor,
        down_EHF: torch.Tensor,
        token_S: torch.Tensor,
        slices: list[tuple[int, int, int]],
    ) -> torch.Tensor:
        # `weights_S` is already in sorted pair order; `token_S` maps each sorted pair to its token.
        num_pairs, f = token_S.shape[0], down_EHF.shape[2]
        x_SH = hidden_TH.index_select(0, token_S)
        gate_up_S2F = hidden_TH.new_empty(num_pairs, 2 * f)
        for expert, a, b in slices:
            torch.mm(x_SH[a:b], gate_up_E2FH[expert].t(), out=gate_up_S2F[a:b])
        gate_SF, up_SF = gate_up_S2F[:, :f], gate_up_S2F[:, f:]
        # h * w: the routing weight scales the F-wide activation, the down projection is linear.
        hw_SF = torch.relu(gate_SF).mul_(up_SF).mul_(weights_S[:, None])
        y_SH = hidden_TH.new_empty(num_pairs, hidden_TH.shape[1])
        for expert, a, b in slices:
            torch.mm(hw_SF[a:b], down_EHF[expert].t(), out=y_SH[a:b])
        # Pairs are in ascending expert order, so the sum over a token's experts runs in the eager loop's order.
        out_TH = torch.zeros_like(hidden_TH).index_add_(0, token_S, y_SH)
        ctx.save_for_backward(hidden_TH, weights_S, gate_up_E2FH, down_EHF, token_S, gate_up_S2F)
        ctx.slices = slices
        return out_TH

    @staticmethod
    def backward(ctx, grad_out_TH: torch.Tensor):
        hidden_TH, weights_S, gate_up_E2FH, down_EHF, token_S, gate_up_S2F = ctx.saved_tensors
        need_x, need_w, need_gate_up, need_down = ctx.needs_input_grad[:4]
        slices = ctx.slices
        num_pairs, f = gate_up_S2F.shape[0], down_EHF.shape[2]
        grad_out_TH = grad_out_TH.contiguous()
        dy_SH = grad_out_TH.index_select(0, token_S)
        gate_SF, up_SF = gate_up_S2F[:, :f], gate_up_S2F[:, f:]
        h_SF = torch.relu(gate_SF).mul_(up_SF)  # recomputed: cheaper than keeping it alive

        # dL/dh (before the routing weight): dy @ down_e, [n, H] x [H, F].
        dh_SF = gate_up_S2F.new_empty(num_pairs, f)
        for expert, a, b in slices:
            torch.mm(dy_SH[a:b], down_EHF[expert], out=dh_SF[a:b])

        grad_w_S = None
        if need_w:
            # dL/dw = dot(dy, down_e @ h) = dot(dy @ down_e, h): an F-wide dot instead of keeping [S, H] outputs.
            grad_w_S = (dh_SF.float() * h_SF.float()).sum(-1).to(weights_S.dtype)

        grad_down = None
        if need_down:
            hw_SF = h_SF.mul_(weights_S[:, None])  # h is not needed after this
            grad_down = down_EHF.new_empty(down_EHF.shape)
            for expert, a, b in slices:
                torch.mm(dy_SH[a:b].t(), hw_SF[a:b], out=grad_down[expert])
            _zero_unhit(grad_down, slices)
        del dy_SH

        grad_x = grad_gate_up = None
        if need_x or need_gate_up:
            dh_SF.mul_(weights_S[:, None])
            grad_gu_S2F = gate_up_S2F.new_empty(num_pairs, 2 * f)
            active_SF = gate_SF > 0
            # d gate = dh * up * 1[gate > 0]; d up = dh * relu(gate)
            torch.mul(dh_SF, up_SF, out=grad_gu_S2F[:, :f]).mul_(active_SF)
            torch.mul(dh_SF, gate_SF, out=grad_gu_S2F[:, f:]).mul_(active_SF)
            del dh_SF, active_SF
            if need_gate_up:
                x_SH = hidden_TH.index_select(0, token_S)
                grad_gate_up = gate_up_E2FH.new_empty(gate_up_E2FH.shape)
                for expert, a, b in slices:
                    torch.mm(grad_gu_S2F[a:b].t(), x_SH[a:b], out=grad_gate_up[expert])
                _zero_unhit(grad_gate_up, slices)
                del x_SH
            if need_x:
                dx_SH = hidden_TH.new_empty(num_pairs, hidden_TH.shape[1])
                for expert, a, b in slices:
                    torch.mm(grad_gu_S2F[a:b], gate_up_E2FH[expert], out=dx_SH[a:b])
                grad_x = torch.zeros_like(hidden_TH).index_add_(0, token_S, dx_SH)
        return grad_x, grad_w_S, grad_gate_up, grad_down, None, None


def _zero_unhit(grad_E: torch.Tensor, slices: list[tuple[int, int, int]]) -> None:
    """Zero the gradient of every expert that received no pair (its slot was allocated uninitialised)."""
    hit = {expert for expert, _, _ in slices}
    for expert in range(grad_E.shape[0]):
        if expert not in hit:
            grad_E[expert].zero_()


def sorted_mm_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """Experts forward for `SmallThinkerExperts` (gate_up_proj [E, 2F, H], gate rows first; down_proj [E, H, F]).

    hidden_states [T, H], top_k_index / top_k_weights [T, K] -> [T, H].
    """
    if getattr(self, "_is_expert_parallel", False):
        raise NotImplementedError(
            "sorted_mm does not support expert parallelism; use experts implementation 'grouped_mm' instead."
        )
    gate_up, down = self.gate_up_proj, self.down_proj
    num_tokens, top_k = top_k_index.shape
    if num_tokens == 0:
        return torch.zeros_like(hidden_states)
    perm_S, token_S, counts = sort_pairs_by_expert(top_k_index, gate_up.shape[0])
    # Under autocast the activations may arrive in another dtype than the weights: compute in the weights' dtype.
    x_TH = hidden_states.to(gate_up.dtype).contiguous()
    weights_S = top_k_weights.reshape(-1).to(gate_up.dtype)[perm_S]
    out_TH = SortedExpertsFunction.apply(x_TH, weights_S, gate_up, down, token_S, expert_slices(counts))
    return out_TH.to(hidden_states.dtype)


ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION_NAME, sorted_mm_experts_forward)
