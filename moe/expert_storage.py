"""The e experts' weights as one [e, ...] tensor without copying them, when their storage allows.

Legend: e local experts, F expert hidden, D model dim.

The experts stay separate `SwiGLUExpert` modules with their own parameters: DeepSpeed finds expert
parameters by module, reduces their gradients over the expert-data-parallel group and writes one
checkpoint file per expert. A grouped GEMM wants one stacked tensor per projection instead, and
`torch.stack` copies every expert's weights on every forward (and its backward hands each expert its
slice): 200 MB per layer and direction for E=8, d=1024, f=4096 in bf16.

No copy is needed when the e parameters already sit in one storage at a constant distance from each
other: then the stack is a strided view of that storage. That is the case

- inside the DeepSpeed engine with ZeRO-1/2: ZeRO re-points every parameter into one flat buffer per
  parameter group, in module order (expert 0's w1, w3, w2, then expert 1's, ...), so each
  projection's e matrices are 3 * F * D elements apart;
- after `pack_expert_weights`, which lays a layer's experts out the same way (for use without the
  engine: inference, benchmarks).

`stacked_parameters` checks the layout and returns such a view through a small autograd function
whose backward gives each parameter its slice of the gradient (views, no copy); anything else falls
back to `torch.stack`. Both give identical values and gradients (tests/unit/test_expert_storage.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def stacked_parameters(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """[e, *shape] holding params[i] at index i; differentiable back to every param.

    A view of their shared storage when they are evenly spaced in it (see `evenly_spaced`), else a copy.
    """
    spacing = evenly_spaced(params)
    if spacing is None:
        return torch.stack(list(params))
    first = params[0]
    return _StackedView.apply((len(params), *first.shape), (spacing, *first.stride()), *params)


def evenly_spaced(params: Sequence[torch.Tensor]) -> int | None:
    """The distance in elements between consecutive params when they are same-shaped, same-strided
    views of one storage at a constant, non-overlapping spacing; None otherwise."""
    if len(params) < 2:
        return None
    first = params[0]
    if not all(p.is_contiguous() for p in params):
        return None
    try:
        storage = first.untyped_storage().data_ptr()
        if any(p.untyped_storage().data_ptr() != storage for p in params):
            return None
    except (RuntimeError, NotImplementedError):  # tensors without a plain storage
        return None
    if any(p.shape != first.shape or p.stride() != first.stride() or p.dtype != first.dtype for p in params):
        return None
    offsets = [p.storage_offset() for p in params]
    spacing = offsets[1] - offsets[0]
    if spacing < first.numel():  # overlapping, or in reverse order
        return None
    if any(b - a != spacing for a, b in zip(offsets, offsets[1:])):
        return None
    return spacing


class _StackedView(torch.autograd.Function):
    @staticmethod
    def forward(ctx, size, stride, *params):
        return params[0].as_strided(size, stride)

    @staticmethod
    def backward(ctx, grad):
        return (None, None, *grad.unbind(0))


def pack_expert_weights(experts: Sequence[nn.Module], names: Sequence[str] = ("w1", "w3", "w2")) -> None:
    """Move the experts' weights into one buffer, expert-major and in `names` order within an expert
    (the order of DeepSpeed's ZeRO flat buffer), so that `stacked_parameters` needs no copy. Values,
    parameter objects and names stay the same; only their storage changes."""
    weights = [getattr(expert, name).weight for expert in experts for name in names]
    if not weights:
        return
    first = weights[0]
    buffer = torch.empty(sum(w.numel() for w in weights), dtype=first.dtype, device=first.device)
    offset = 0
    with torch.no_grad():
        for weight in weights:
            view = buffer[offset : offset + weight.numel()].view(weight.shape)
            view.copy_(weight)
            weight.data = view
            offset += weight.numel()
