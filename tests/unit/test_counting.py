"""moe/counting.py against torch.bincount (the oracle)."""

from __future__ import annotations

import pytest
import torch

from moe.counting import count_per_bin


@pytest.mark.parametrize("num_bins", [1, 7, 64])
@pytest.mark.parametrize("shape", [(0,), (50,), (13, 4)])
def test_counts_equal_bincount(num_bins, shape):
    generator = torch.Generator().manual_seed(num_bins)
    index = torch.randint(0, num_bins, shape, generator=generator)
    counts = count_per_bin(index, num_bins)
    assert counts.dtype == torch.int64 and counts.shape == (num_bins,)
    assert torch.equal(counts, torch.bincount(index.reshape(-1), minlength=num_bins))
    where = torch.rand(shape, generator=generator) < 0.5
    masked = count_per_bin(index, num_bins, where=where)
    assert torch.equal(masked, torch.bincount(index[where], minlength=num_bins))
