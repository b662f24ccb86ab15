"""Token-choice rows in expert order and back, without scatter-adds.

Legend: T tokens, K top-k, A = T*K assignments (token-major: assignment a is choice a % K of token
a // K), N kept assignments sorted by expert, D model dim.

Token choice gives every token exactly K assignments, so the two directions of the permutation
need no atomic or accumulating scatter, forward or backward:

- `rows_in_expert_order` gathers x[a // K] for each kept assignment a. Plain indexing would
  differentiate into `index_put_(accumulate=True)`, which on the CPU runs serially (3 ms for
  4096 x 256 fp32 rows here, 5% of the whole layer) and on the GPU with atomics. Here the backward
  puts each row's gradient back at its own assignment (each assignment appears at most once:
  a copy, not an add) and sums the K choices of every token in a fixed order.
- `combine_in_token_order` puts expert outputs back at their assignments (dropped ones stay zero)
  and takes each token's weighted sum over its K choices: a reshape, not a gather through an
  index, so its backward is a gather too.

The same two directions exist for the fixed capacity layout used with expert parallelism, where
every kept assignment owns one of E*C slots (`rows_to_slots`, `combine_from_slots`): each slot
holds at most one assignment, so again nothing is ever added into a row twice.

All of them are bitwise deterministic on any device. Their oracle is plain indexing with autograd
(tests/unit/test_permute.py).
"""

from __future__ import annotations

import torch


class _RowsInExpertOrder(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, order_N: torch.Tensor, top_k: int) -> torch.Tensor:
        ctx.save_for_backward(order_N)
        ctx.top_k, ctx.num_tokens = top_k, x_TD.shape[0]
        return x_TD.index_select(0, torch.div(order_N, top_k, rounding_mode="floor"))

    @staticmethod
    def backward(ctx, grad_ND: torch.Tensor):
        (order_N,) = ctx.saved_tensors
        num_tokens, top_k = ctx.num_tokens, ctx.top_k
        grad_AD = grad_ND.new_zeros(num_tokens * top_k, grad_ND.shape[-1]).index_copy_(0, order_N, grad_ND)
        return _sum_over_choices(grad_AD, num_tokens, top_k), None, None


def rows_in_expert_order(x_TD: torch.Tensor, order_N: torch.Tensor, top_k: int) -> torch.Tensor:
    """x[order_N // top_k]: the token of every kept assignment, in the order given. [N, D].

    `order_N` holds distinct assignment indices in [0, T*top_k) (kept assignments sorted by expert).
    """
    if x_TD.dim() != 2:
        raise ValueError(f"x_TD must be 2-D [T, D], got shape {tuple(x_TD.shape)}")
    return _RowsInExpertOrder.apply(x_TD, order_N, top_k)


def combine_in_token_order(y_ND: torch.Tensor, order_N: torch.Tensor, weight_TK: torch.Tensor) -> torch.Tensor:
    """y_t = sum_k w_tk * y[row of assignment (t, k)], a dropped assignment (absent from order_N)
    contributing zero. [T, D] in y's dtype; the weighting in at least fp32 (the router's precision).
    """
    num_tokens, top_k = weight_TK.shape
    y_AD = y_ND.new_zeros(num_tokens * top_k, y_ND.shape[-1]).index_copy(0, order_N, y_ND)
    return _weighted_sum_over_choices(y_AD, weight_TK)


class _RowsToSlots(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, slot_A: torch.Tensor, top_k: int, num_slots: int) -> torch.Tensor:
        num_tokens = x_TD.shape[0]
        # Dropped assignments (slot -1) go to one spare slot past the end, cut off below.
        index_A = torch.where(slot_A >= 0, slot_A, num_slots)
        ctx.save_for_backward(index_A)
        ctx.top_k, ctx.num_tokens = top_k, num_tokens
        # Which token fills each slot (an empty slot names a zero row appended to x), then one
        # gather: the [S, D] rows are written once, not copied per assignment first and zero-filled.
        token_A = torch.div(torch.arange(slot_A.numel(), device=slot_A.device), top_k, rounding_mode="floor")
        token_S = torch.full((num_slots + 1,), num_tokens, dtype=torch.long, device=slot_A.device)
        token_S.index_copy_(0, index_A, token_A)
        x_padded = torch.cat([x_TD, x_TD.new_zeros(1, x_TD.shape[-1])])
        return x_padded.index_select(0, token_S[:num_slots])

    @staticmethod
    def backward(ctx, grad_SD: torch.Tensor):
        (index_A,) = ctx.saved_tensors
        padded = torch.cat([grad_SD, grad_SD.new_zeros(1, grad_SD.shape[-1])])
        grad_AD = padded.index_select(0, index_A)
        return _sum_over_choices(grad_AD, ctx.num_tokens, ctx.top_k), None, None, None


def rows_to_slots(x_TD: torch.Tensor, slot_A: torch.Tensor, top_k: int, num_slots: int) -> torch.Tensor:
    """The [num_slots, D] buffer holding x[a // top_k] at slot_A[a] for every kept assignment a
    (token-major, slot -1 = dropped); empty slots are zero. Distinct kept slots required."""
    if x_TD.dim() != 2:
        raise ValueError(f"x_TD must be 2-D [T, D], got shape {tuple(x_TD.shape)}")
    return _RowsToSlots.apply(x_TD, slot_A, top_k, num_slots)


class _PickSlots(torch.autograd.Function):
    """rows[a] = y[slot a] (zero where dropped); backward copies each gradient to its own slot."""

    @staticmethod
    def forward(ctx, y_SD: torch.Tensor, slot_A: torch.Tensor) -> torch.Tensor:
        num_slots = y_SD.shape[0]
        index_A = torch.where(slot_A >= 0, slot_A, num_slots)
        ctx.save_for_backward(index_A)
        ctx.num_slots = num_slots
        return torch.cat([y_SD, y_SD.new_zeros(1, y_SD.shape[-1])]).index_select(0, index_A)

    @staticmethod
    def backward(ctx, grad_AD: torch.Tensor):
        (index_A,) = ctx.saved_tensors
        # Several dropped assignments share the spare row; whichever copy lands there is cut off.
        grad_SD = grad_AD.new_zeros(ctx.num_slots + 1, grad_AD.shape[-1]).index_copy_(0, index_A, grad_AD)
        return grad_SD[: ctx.num_slots], None


def combine_from_slots(y_SD: torch.Tensor, slot_TK: torch.Tensor, weight_TK: torch.Tensor) -> torch.Tensor:
    """y_t = sum_k w_tk * y[slot_tk], a dropped choice (slot -1) contributing zero. [T, D] in y's dtype."""
    return _weighted_sum_over_choices(_PickSlots.apply(y_SD, slot_TK.reshape(-1)), weight_TK)


class _PermuteRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND: torch.Tensor, permutation_N: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(permutation_N)
        return x_ND.index_select(0, permutation_N)

    @staticmethod
    def backward(ctx, grad_ND: torch.Tensor):
        (permutation_N,) = ctx.saved_tensors
        # Every row is written exactly once: a copy, so new_empty needs no zero fill.
        return grad_ND.new_empty(grad_ND.shape).index_copy_(0, permutation_N, grad_ND), None


def permute_rows(x_ND: torch.Tensor, permutation_N: torch.Tensor) -> torch.Tensor:
    """x[permutation_N] for a permutation of the rows (every index once): differentiates into a
    copy back to each row's place instead of an accumulating scatter. [N, D]."""
    if x_ND.dim() != 2 or permutation_N.shape != x_ND.shape[:1]:
        raise ValueError(f"permute_rows needs x [N, D] and a permutation [N], got {tuple(x_ND.shape)} and "
                         f"{tuple(permutation_N.shape)}")
    return _PermuteRows.apply(x_ND, permutation_N)


def _sum_over_choices(rows_AD: torch.Tensor, num_tokens: int, top_k: int) -> torch.Tensor:
    """[T*K, D] token-major -> [T, D]: each token's K rows added in a fixed order."""
    return rows_AD.view(num_tokens, top_k, -1).sum(dim=1) if top_k > 1 else rows_AD


def _weighted_sum_over_choices(rows_AD: torch.Tensor, weight_TK: torch.Tensor) -> torch.Tensor:
    """y_t = sum_k w_tk * rows[t*K + k], weighted in at least fp32 (the router's precision); [T, D]
    in the rows' dtype."""
    num_tokens, top_k = weight_TK.shape
    accumulate = torch.promote_types(rows_AD.dtype, weight_TK.dtype)
    weighted = rows_AD.view(num_tokens, top_k, -1).to(accumulate) * weight_TK.to(accumulate).unsqueeze(-1)
    return _sum_over_choices(weighted.view(num_tokens * top_k, -1), num_tokens, top_k).to(rows_AD.dtype)
