"""Expert tensor parallelism: every expert's hidden units split over a tensor-parallel group.

Tensor-parallel ranks hold the same tokens. Rather than run every expert whole on each of them
(tp times the expert FLOPs), rank r keeps rows r of W1 and W3 and columns r of W2 (F/tp hidden
units) and computes a partial output; the partial outputs are summed over the group before the
combine, so routing weights multiply whole expert outputs and the router's gradient is whole too.

Legend: N rows (token-expert assignments), D model dim, F expert hidden.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class _CopyToGroup(torch.autograd.Function):
    """Identity forward; backward sums the input gradient over the group (each rank's shard
    contributed only its part of it)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromGroup(torch.autograd.Function):
    """Forward sums the partial outputs over the group; backward passes the (identical)
    gradient to every rank's partial output unchanged."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        x = x.contiguous()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def run_sharded(compute, rows_ND: torch.Tensor, group) -> torch.Tensor:
    """`compute(rows)` with this rank's expert shards, completed over `group` (None = not split)."""
    if group is None:
        return compute(rows_ND)
    return _ReduceFromGroup.apply(compute(_CopyToGroup.apply(rows_ND, group)), group)


def shard_swiglu_experts(experts: nn.ModuleList, rank: int, size: int) -> None:
    """Keep this rank's hidden units of every expert: rows of w1 and w3, columns of w2 (the
    contiguous chunk `rank` of `size`). Marked the way megatron-core marks split weights, so
    DeepSpeed counts each shard in the global gradient norm."""
    for expert in experts:
        for linear, dim in ((expert.w1, 0), (expert.w3, 0), (expert.w2, 1)):
            piece = linear.weight.detach().chunk(size, dim=dim)[rank].clone()
            # Same Parameter object, smaller data: DeepSpeed's marks on expert weights (allreduce=False,
            # group_name) stay.
            linear.weight.data = piece
            if dim == 0:
                linear.out_features = piece.shape[0]
            else:
                linear.in_features = piece.shape[1]
            linear.weight.tensor_model_parallel = True
            linear.weight.partition_dim = dim
            linear.weight.partition_stride = 1
