"""Counts per bin without a device-to-host sync.

`torch.bincount` on CUDA first reads the largest value to the host to size its output, which stalls
the CPU until the GPU has caught up, once per call; the MoE layer counts several times per forward
(assignments per expert for the grouped GEMM and the balancing loss, kept assignments and experts per
token for the statistics). Every count here has a bin count known in advance, so a fixed-size
`scatter_add_` does the same without the sync. Integer addition is exact, so the result does not
depend on the order of the atomic adds: deterministic on every device.
"""

from __future__ import annotations

import math

import torch


def count_per_bin(index: torch.Tensor, num_bins: int, where: torch.Tensor | None = None) -> torch.Tensor:
    """counts[b] = number of positions i with index[i] == b (and where[i], when given). [num_bins] int64.

    Every index must lie in [0, num_bins); unlike `torch.bincount` nothing checks that (the check
    would be the sync this avoids), and an out-of-range index raises or corrupts memory.
    """
    index = index.reshape(-1)
    ones = torch.ones_like(index, dtype=torch.int64) if where is None else where.reshape(-1).to(torch.int64)
    return torch.zeros(num_bins, dtype=torch.int64, device=index.device).scatter_add_(0, index.to(torch.int64), ones)


def ceil_slots(slots: float) -> int:
    """ceil of a slot count computed in floating point, where a whole number can come out a hair
    above itself (1 x 100 x 1.1 / 11 = 10.000000000000002): rounded to 9 decimals first, so the
    capacity is the one the capacity factor as written gives (10, not 11)."""
    return math.ceil(round(slots, 9))
