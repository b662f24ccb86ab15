"""Slow, obviously-correct MoE forwards: Python loops over tokens and experts.

The oracles for every fast path: tests compare outputs and all gradients against them.
Legend: T tokens, D model dim, E experts, K top-k, C capacity.
"""

from __future__ import annotations

import torch


def reference_token_choice(
    x_TD: torch.Tensor,
    router_weight_ED: torch.Tensor,
    experts: list[torch.nn.Module],
    top_k: int,
    capacity: int | None,
    normalize_topk: bool,
    score_func: str = "softmax",
    selection_bias_E: torch.Tensor | None = None,
    drop_policy: str = "position",
) -> tuple[torch.Tensor, list[list[bool]]]:
    """Returns (output [T, D], kept[t][k]).

    Each token scores every expert in fp32 (softmax, or sigmoid), adds the selection bias for
    choosing only, takes the K best. When an expert is full a choice is dropped; choices are
    admitted round by round (all first choices in token order, then all second choices, ...)
    or, for drop_policy="probability", by descending weight. `capacity=None` admits everything.
    """
    num_tokens = x_TD.shape[0]
    num_experts = router_weight_ED.shape[0]
    chosen: list[list[tuple[int, torch.Tensor]]] = []
    for t in range(num_tokens):
        logits = x_TD[t].float() @ router_weight_ED.float().t()
        scores = torch.softmax(logits, dim=-1) if score_func == "softmax" else torch.sigmoid(logits)
        ranking = scores.detach() + (selection_bias_E if selection_bias_E is not None else 0.0)
        indices = sorted(range(num_experts), key=lambda e: (-float(ranking[e]), e))[:top_k]
        values = torch.stack([scores[e] for e in indices])
        if normalize_topk and top_k > 1:  # one renormalised weight would be 1, with no gradient
            values = values / values.sum()
        chosen.append([(indices[k], values[k]) for k in range(top_k)])

    if drop_policy == "position":
        order = [(t, k) for k in range(top_k) for t in range(num_tokens)]
    else:
        order = sorted(((t, k) for t in range(num_tokens) for k in range(top_k)),
                       key=lambda tk: (-float(chosen[tk[0]][tk[1]][1]), tk[1] * num_tokens + tk[0]))
    load = [0] * num_experts
    kept = [[False] * top_k for _ in range(num_tokens)]
    for t, k in order:
        expert = chosen[t][k][0]
        if capacity is None or load[expert] < capacity:
            load[expert] += 1
            kept[t][k] = True

    rows = []
    for t in range(num_tokens):
        y = torch.zeros(x_TD.shape[-1], dtype=torch.float32, device=x_TD.device)
        for k in range(top_k):
            if kept[t][k]:
                expert, weight = chosen[t][k]
                y = y + weight * experts[expert](x_TD[t : t + 1])[0].float()
        rows.append(y.to(x_TD.dtype))
    return torch.stack(rows), kept


def reference_expert_choice(
    x_TD: torch.Tensor,
    router_weight_ED: torch.Tensor,
    experts: list[torch.nn.Module],
    group_size: int,
    capacity: int,
    max_experts_per_token: int | None = None,
) -> tuple[torch.Tensor, list[list[int]]]:
    """Returns (output [T, D], experts chosen for each token).

    For each group of `group_size` consecutive tokens and each expert: rank the group's tokens
    by the softmax score of that expert, take the first `capacity` (ties: earlier token).
    A per-token cap then keeps each token's highest-scoring experts.
    """
    num_tokens, num_experts = x_TD.shape[0], router_weight_ED.shape[0]
    probs = [torch.softmax(x_TD[t].float() @ router_weight_ED.float().t(), dim=-1) for t in range(num_tokens)]
    picks: list[list[int]] = [[] for _ in range(num_tokens)]
    for start in range(0, num_tokens, group_size):
        tokens = range(start, start + group_size)
        for e in range(num_experts):
            ranked = sorted(tokens, key=lambda t: (-float(probs[t][e]), t))
            for t in ranked[:capacity]:
                picks[t].append(e)
    if max_experts_per_token is not None:
        picks = [sorted(p, key=lambda e, t=t: (-float(probs[t][e]), e))[:max_experts_per_token] for t, p in enumerate(picks)]
    rows = []
    for t in range(num_tokens):
        y = torch.zeros(x_TD.shape[-1], dtype=torch.float32, device=x_TD.device)
        for e in picks[t]:
            y = y + probs[t][e] * experts[e](x_TD[t : t + 1])[0].float()
        rows.append(y.to(x_TD.dtype))
    return torch.stack(rows), [sorted(p) for p in picks]


def reference_threshold_routing(
    x_TD: torch.Tensor, router_weight_ED: torch.Tensor, experts: list[torch.nn.Module], threshold_E: torch.Tensor
) -> torch.Tensor:
    """Expert choice's causal mode: token t uses every expert whose score clears its threshold."""
    rows = []
    for t in range(x_TD.shape[0]):
        probs = torch.softmax(x_TD[t].float() @ router_weight_ED.float().t(), dim=-1)
        y = torch.zeros(x_TD.shape[-1], dtype=torch.float32, device=x_TD.device)
        for e in range(router_weight_ED.shape[0]):
            if probs[e] >= threshold_E[e]:
                y = y + probs[e] * experts[e](x_TD[t : t + 1])[0].float()
        rows.append(y.to(x_TD.dtype))
    return torch.stack(rows)
