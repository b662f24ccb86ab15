"""Sort-based dispatch of tokens into per-expert capacity slots, and back.

Legend: T tokens, D model dim, E experts, e local experts, K top-k, C capacity.

Layout: a flat buffer of E*C rows, expert-major (rows e*C .. e*C+C-1 belong to expert e).
Each (token, choice) pair gets a slot index, or -1 when its expert is full. No
[T, E, C] one-hot tensor is ever built: a stable sort by expert gives every assignment its
position inside its expert, in O(T*K log(T*K)).

Priority when an expert overflows: all first choices before any second choice, and within
one choice earlier tokens first (GShard's policy), so a token's first choice survives
whenever it can.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from deepspeed.moe.sharded_moe import _AllToAll

from moe.counting import ceil_slots, count_per_bin


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float, min_capacity: int) -> int:
    """C = ceil(K * T * cf / E), at least `min_capacity`, at most T (an expert can take a token once)."""
    capacity = ceil_slots(top_k * num_tokens * capacity_factor / num_experts)
    return max(1, min(num_tokens, max(capacity, min_capacity)))


def slots_in_priority_order(expert_A: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """Slot of every assignment, -1 where its expert is already full. [A] int64.

    `expert_A` lists assignments from highest to lowest priority: each expert admits the first
    `capacity` assignments that name it. A stable sort by expert gives each assignment its
    position inside its expert without any [A, E] one-hot tensor.
    """
    order = torch.argsort(expert_A, stable=True)
    counts_E = count_per_bin(expert_A, num_experts)
    first_in_expert_E = torch.cumsum(counts_E, dim=0) - counts_E
    position_sorted = torch.arange(expert_A.numel(), device=expert_A.device) - first_in_expert_E[expert_A[order]]
    position_A = torch.empty_like(position_sorted)
    position_A[order] = position_sorted
    return torch.where(position_A < capacity, expert_A * capacity + position_A, -1)


def assign_slots(
    topk_idx_TK: torch.Tensor, num_experts: int, capacity: int, priority_weight_TK: torch.Tensor | None = None
) -> torch.Tensor:
    """Slot index in the [E*C] buffer for every (token, choice), -1 where dropped. [T, K] int64.

    Priority without weights: all first choices before any second choice, earlier tokens first
    (GShard). With `priority_weight_TK`: the highest router weights first, ties by position.
    """
    num_tokens, top_k = topk_idx_TK.shape
    position_order = topk_idx_TK.t().reshape(-1)  # index k*T + t
    if priority_weight_TK is None:
        slot_KT = slots_in_priority_order(position_order, num_experts, capacity)
        return slot_KT.view(top_k, num_tokens).t()
    weights_KT = priority_weight_TK.detach().t().reshape(-1)
    order = torch.argsort(-weights_KT, stable=True)
    slot_KT = torch.empty_like(position_order)
    slot_KT[order] = slots_in_priority_order(position_order[order], num_experts, capacity)
    return slot_KT.view(top_k, num_tokens).t()


def combine_rows(y_AD: torch.Tensor, token_A: torch.Tensor, weight_A: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """y_t = sum over the rows a of token t of w_a * y_a, for a variable number of experts per token
    (expert choice). Rows that must not count carry weight 0 (the per-token cap), which adds an exact
    zero: filtering them out by a boolean mask would wait for the device to say how many there are.
    index_add: deterministic on CPU; on GPU the order of three or more additions into one token may
    vary between runs. [T, D] in y's dtype, weighted in at least fp32 (the router's precision)."""
    accumulate = torch.promote_types(y_AD.dtype, weight_A.dtype)
    weight_A1 = weight_A.to(accumulate).unsqueeze(-1)
    # where, not just the product: a capped row that overflowed (Inf in bf16) must add 0, not 0 * Inf.
    contributions = torch.where(weight_A1 != 0, y_AD.to(accumulate) * weight_A1, 0)
    out = torch.zeros(num_tokens, y_AD.shape[-1], dtype=accumulate, device=y_AD.device)
    return out.index_add(0, token_A, contributions).to(y_AD.dtype)


def all_to_all_slots(buffer_SD: torch.Tensor, ep_group, ep_size: int) -> torch.Tensor:
    """Exchange capacity slots over the expert-parallel group (fixed shape, differentiable).

    Before: this rank's tokens for all E experts, [E*C, D]. Experts are split contiguously,
    rank r owning experts r*e .. r*e+e-1, so chunk r of the buffer goes to rank r.
    After: every rank's tokens for this rank's e experts, [ep, e*C, D] flattened to
    [ep*e*C, D], source rank major. The same call maps expert outputs back.
    """
    if ep_size == 1:
        return buffer_SD
    return _AllToAll.apply(ep_group, buffer_SD)


def exchange_counts(counts_E: torch.Tensor, group, ep_size: int) -> torch.Tensor:
    """[source rank, local expert]: how many rows every rank of the expert-parallel group sends to
    each of this rank's experts, from each rank's `counts_E` (its rows per global expert). One small
    all-to-all, on the device: nothing waits for it on the host. [ep, e] int64."""
    received = torch.empty_like(counts_E)
    dist.all_to_all_single(received, counts_E.contiguous(), group=group)
    return received.view(ep_size, counts_E.numel() // ep_size)


def filled_slots_first(counts_Re: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The received slot buffer of token choice's capacity mode, [ep, e, C] flattened (source rank
    major), holds `counts_Re[r, j]` filled slots at the front of each (rank r, local expert j) block
    of C and empty ones after them. Returns (order, destination, rows per local expert):

    - `order` [ep*e*C]: slot feeding each row of a layout with the filled slots first, grouped by
      local expert (then source rank, then slot), and every empty slot after all of them: the
      layout of `swiglu_grouped(..., padded=True)`, which skips the padding rows;
    - `destination` [ep*e*C]: its inverse, where each slot's row went;
    - `rows_e` [e]: filled slots per local expert (the grouped GEMM's group sizes).

    Everything stays on the device (no count is read to the host)."""
    num_ranks, local_experts = counts_Re.shape
    device = counts_Re.device
    slot_S = torch.arange(num_ranks * local_experts * capacity, device=device)
    rank_S = torch.div(slot_S, local_experts * capacity, rounding_mode="floor")
    expert_S = torch.div(slot_S, capacity, rounding_mode="floor") % local_experts
    position_S = slot_S % capacity
    filled_S = position_S < counts_Re[rank_S, expert_S]
    rows_e = counts_Re.sum(dim=0)
    expert_start_e = torch.cumsum(rows_e, dim=0) - rows_e
    # Within one expert, the rows of lower source ranks come first.
    rank_start_Re = torch.cumsum(counts_Re, dim=0) - counts_Re
    filled_row_S = expert_start_e[expert_S] + rank_start_Re[rank_S, expert_S] + position_S
    empty_row_S = rows_e.sum() + torch.cumsum(~filled_S, dim=0) - 1
    destination_S = torch.where(filled_S, filled_row_S, empty_row_S)
    order_S = torch.empty_like(destination_S).index_copy_(0, destination_S, slot_S)
    return order_S, destination_S, rows_e


class VariableExchange:
    """All-to-all-v over the expert-parallel group for rows sorted by global expert (dropless).

    Rows for experts r*e .. r*e+e-1 go to rank r, exactly as many as there are: no capacity, no
    padding, and no all-reduce of a capacity every step (DeepSpeed's dropless mode). The counts
    are exchanged first (one small all-to-all), because every rank must know how many rows it
    will receive; the split sizes then go to the host, as the collective needs them as lists.
    """

    def __init__(self, counts_E: torch.Tensor, group, ep_size: int) -> None:
        self.group, self.ep_size = group, ep_size
        self.local_experts = counts_E.numel() // ep_size
        # [source rank, local expert]: how many rows each rank sends to each of this rank's experts.
        self.received_counts_Re = exchange_counts(counts_E, group, ep_size)
        self.send_splits = counts_E.view(ep_size, self.local_experts).sum(dim=1).tolist()
        self.receive_splits = self.received_counts_Re.sum(dim=1).tolist()

    def send(self, rows_ND: torch.Tensor) -> torch.Tensor:
        """This rank's rows to their experts' ranks; returns rows ordered (source rank, local expert)."""
        out = rows_ND.new_empty(sum(self.receive_splits), rows_ND.shape[-1])
        return differentiable_all_to_all(out, rows_ND.contiguous(), self.receive_splits, self.send_splits, self.group)

    def received_by_local_expert(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Permutation putting received rows in local-expert order (stable over source ranks),
        and the rows per local expert: the grouped GEMM's layout."""
        device = self.received_counts_Re.device
        expert_of_row = torch.arange(self.local_experts, device=device).repeat(self.ep_size)
        expert_of_row = expert_of_row.repeat_interleave(self.received_counts_Re.reshape(-1))
        return torch.argsort(expert_of_row, stable=True), self.received_counts_Re.sum(dim=0)

    def send_back(self, rows_MD: torch.Tensor) -> torch.Tensor:
        """Expert outputs back to the ranks their tokens came from, in the order they were sent."""
        out = rows_MD.new_empty(sum(self.send_splits), rows_MD.shape[-1])
        return differentiable_all_to_all(out, rows_MD.contiguous(), self.send_splits, self.receive_splits, self.group)


def differentiable_all_to_all(out, rows, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    # torch's autograd-aware all_to_all_single: its backward is the exchange with the splits swapped.
    from torch.distributed.nn.functional import all_to_all_single

    return all_to_all_single(out, rows, output_splits, input_splits, group=group)


