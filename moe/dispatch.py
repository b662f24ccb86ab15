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

import math

import torch
import torch.distributed as dist
from deepspeed.moe.sharded_moe import _AllToAll


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float, min_capacity: int) -> int:
    """C = ceil(K * T * cf / E), at least `min_capacity`, at most T (an expert can take a token once)."""
    capacity = math.ceil(top_k * num_tokens * capacity_factor / num_experts)
    return max(1, min(num_tokens, max(capacity, min_capacity)))


def tokens_per_expert(topk_idx_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Assignments per expert before any dropping, int64 [E]."""
    return torch.bincount(topk_idx_TK.reshape(-1), minlength=num_experts)


def assign_slots(topk_idx_TK: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """Slot index in the [E*C] buffer for every (token, choice), -1 where dropped. [T, K] int64."""
    num_tokens, top_k = topk_idx_TK.shape
    # k-major order: index k*T + t, so every first choice comes before every second choice.
    expert_KT = topk_idx_TK.t().reshape(-1)
    order = torch.argsort(expert_KT, stable=True)
    counts_E = torch.bincount(expert_KT, minlength=num_experts)
    first_in_expert_E = torch.cumsum(counts_E, dim=0) - counts_E
    position_sorted = torch.arange(expert_KT.numel(), device=expert_KT.device) - first_in_expert_E[expert_KT[order]]
    position_KT = torch.empty_like(position_sorted)
    position_KT[order] = position_sorted
    slot_KT = torch.where(position_KT < capacity, expert_KT * capacity + position_KT, -1)
    return slot_KT.view(top_k, num_tokens).t()


def scatter_to_slots(x_TD: torch.Tensor, slot_TK: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Copy each kept (token, choice) into its slot; empty slots stay zero. [E*C, D]."""
    kept = slot_TK >= 0
    token_idx = torch.nonzero(kept, as_tuple=True)[0]
    buffer = x_TD.new_zeros(num_slots, x_TD.shape[-1])
    return buffer.index_copy(0, slot_TK[kept], x_TD[token_idx])


def gather_from_slots(y_SD: torch.Tensor, slot_TK: torch.Tensor, weight_TK: torch.Tensor) -> torch.Tensor:
    """y_t = sum_k w_tk * y[slot_tk]; a dropped choice contributes zero. [T, D] in y's dtype.

    A gather plus a sum over K rather than an atomic index_add, so the result is bitwise
    deterministic on GPU too.
    """
    zero_row = y_SD.new_zeros(1, y_SD.shape[-1])
    padded = torch.cat([y_SD, zero_row])
    index_TK = torch.where(slot_TK >= 0, slot_TK, y_SD.shape[0])
    picked_TKD = padded[index_TK]
    # Weighting in at least fp32 (the router's precision), in fp64 when the model is fp64.
    accumulate = torch.promote_types(y_SD.dtype, weight_TK.dtype)
    combined = (picked_TKD.to(accumulate) * weight_TK.to(accumulate).unsqueeze(-1)).sum(dim=1)
    return combined.to(y_SD.dtype)


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


def max_over_group(value: int, group, device) -> int:
    """Largest `value` over the expert-parallel group: dropless capacity must agree on all
    ranks because the all-to-all exchanges equal-sized chunks."""
    if group is None or dist.get_world_size(group) == 1:
        return value
    tensor = torch.tensor([value], device=device, dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return int(tensor.item())
