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

Both are bitwise deterministic on any device. Their oracle is plain indexing with autograd
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
        grad_TD = grad_AD.view(num_tokens, top_k, -1).sum(dim=1) if top_k > 1 else grad_AD
        return grad_TD, None, None


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
    accumulate = torch.promote_types(y_ND.dtype, weight_TK.dtype)
    y_TKD = y_AD.view(num_tokens, top_k, -1).to(accumulate)
    weighted = y_TKD * weight_TK.to(accumulate).unsqueeze(-1)
    combined = weighted.sum(dim=1) if top_k > 1 else weighted.squeeze(1)
    return combined.to(y_ND.dtype)
