"""Expert-utilisation figures from per-expert token counts (plain numbers for logs).

Legend: E experts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def utilisation(
    routed_E: Sequence[float],
    kept_E: Sequence[float],
    experts_per_token: Sequence[float],
    entropy_sum: float,
    num_tokens: float,
) -> dict[str, float | list[float]]:
    """Load and balance figures of one layer over a window of steps.

    routed / kept: assignments per expert before and after capacity dropping.
    load: share of kept assignments per expert. cv: coefficient of variation of the kept counts
    (0 = perfectly even). max_violation: max load / mean load - 1 (GShard's measure).
    drop_fraction: share of assignments that found no slot. dead_experts: experts that got no
    token in the window. router_entropy: mean entropy of the router distribution, in nats
    (ln E = undecided, 0 = one expert certain). experts_per_token: share of tokens that got
    0, 1, ..., E experts (expert choice varies; token choice is K unless dropped), and
    no_expert_fraction its first entry.
    """
    routed = [float(c) for c in routed_E]
    kept = [float(c) for c in kept_E]
    total_routed, total_kept = sum(routed), sum(kept)
    mean = total_kept / len(kept) if kept else 0.0
    variance = sum((c - mean) ** 2 for c in kept) / len(kept) if kept else 0.0
    histogram = [float(c) / num_tokens if num_tokens else 0.0 for c in experts_per_token]
    return {
        "routed": routed,
        "kept": kept,
        "load": [c / total_kept if total_kept else 0.0 for c in kept],
        "cv": math.sqrt(variance) / mean if mean else 0.0,
        "max_violation": max(kept) / mean - 1.0 if mean else 0.0,
        "drop_fraction": 1.0 - total_kept / total_routed if total_routed else 0.0,
        "dead_experts": float(sum(1 for c in kept if c == 0)),
        "router_entropy": entropy_sum / num_tokens if num_tokens else 0.0,
        "experts_per_token": histogram,
        "no_expert_fraction": histogram[0] if histogram else 0.0,
    }
