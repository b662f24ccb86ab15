"""Expert-utilisation figures from per-expert token counts (plain numbers for logs).

Legend: E experts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def utilisation(routed_E: Sequence[int], kept_E: Sequence[int]) -> dict[str, float | list[float]]:
    """Load and balance figures of one layer over a window of steps.

    load: share of kept assignments per expert; cv: coefficient of variation of the kept
    counts (0 = perfectly even); max_violation: max load / mean load - 1; drop_fraction:
    share of assignments that found no capacity; dead_experts: experts that got nothing.
    """
    routed = [float(c) for c in routed_E]
    kept = [float(c) for c in kept_E]
    total_routed, total_kept = sum(routed), sum(kept)
    mean = total_kept / len(kept) if kept else 0.0
    variance = sum((c - mean) ** 2 for c in kept) / len(kept) if kept else 0.0
    return {
        "load": [c / total_kept if total_kept else 0.0 for c in kept],
        "cv": math.sqrt(variance) / mean if mean else 0.0,
        "max_violation": max(kept) / mean - 1.0 if mean else 0.0,
        "drop_fraction": 1.0 - total_kept / total_routed if total_routed else 0.0,
        "dead_experts": float(sum(1 for c in kept if c == 0)),
    }
