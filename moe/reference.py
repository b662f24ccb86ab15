"""Slow, obviously-correct MoE forward: a Python loop over tokens.

The oracle for every fast path: tests compare outputs and all gradients against it.
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
) -> tuple[torch.Tensor, list[list[bool]]]:
    """Returns (output [T, D], kept[t][k]).

    Routing: softmax over experts in fp32, the K best; when an expert is full, a choice is
    dropped. Choices are admitted round by round (all first choices in token order, then all
    second choices, ...). `capacity=None` admits everything.
    """
    num_tokens = x_TD.shape[0]
    num_experts = router_weight_ED.shape[0]
    load = [0] * num_experts
    chosen: list[list[tuple[int, torch.Tensor]]] = []
    for t in range(num_tokens):
        probs = torch.softmax(x_TD[t].float() @ router_weight_ED.float().t(), dim=-1)
        values, indices = torch.topk(probs, top_k)
        if normalize_topk and top_k > 1:
            values = values / values.sum()
        chosen.append([(int(indices[k]), values[k]) for k in range(top_k)])

    kept = [[False] * top_k for _ in range(num_tokens)]
    for k in range(top_k):
        for t in range(num_tokens):
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
