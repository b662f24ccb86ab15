"""Token-choice top-k router: each token picks its K highest-scoring experts.

Legend: T tokens, D model dim, E experts, K top-k.

The router only decides; it never calls the experts. Its math runs in fp32 even in a bf16
model, because softmax over small logit differences and top-k ties are where reduced
precision changes the routing itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moe.losses import load_balancing_loss, router_z_loss


@dataclass
class RoutingDecision:
    """What the router decided for T tokens."""

    topk_idx_TK: torch.Tensor
    """Chosen experts per token, highest score first (int64)."""
    topk_weight_TK: torch.Tensor
    """Combine weight of each choice (fp32, differentiable)."""
    probs_TE: torch.Tensor
    """Router softmax over all experts (fp32)."""
    logits_TE: torch.Tensor
    """Raw router logits (fp32)."""


class TokenChoiceRouter(nn.Module):
    """Linear scores, softmax over experts, top-k selection.

    It also stands in for DeepSpeed's gate inside `deepspeed.moe.layer.MoE`, which calls
    `_set_ep_group` on its gate when the engine creates the expert-parallel groups.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, normalize_topk: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        nn.init.normal_(self.weight, std=0.02)
        self.num_experts = num_experts
        self.top_k = top_k
        self.normalize_topk = normalize_topk
        self.ep_group = None

    def _set_ep_group(self, ep_group) -> None:
        self.ep_group = ep_group

    def forward(self, x_TD: torch.Tensor) -> RoutingDecision:
        logits_TE = torch.nn.functional.linear(x_TD.float(), self.weight.float())
        probs_TE = torch.softmax(logits_TE, dim=-1)
        # torch.topk breaks ties by lowest index on CPU and GPU alike, so eval is deterministic.
        topk_prob_TK, topk_idx_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        if self.normalize_topk and self.top_k > 1:
            topk_prob_TK = topk_prob_TK / topk_prob_TK.sum(dim=-1, keepdim=True)
        return RoutingDecision(topk_idx_TK, topk_prob_TK, probs_TE, logits_TE)

    @staticmethod
    def losses(decision: RoutingDecision) -> tuple[torch.Tensor, torch.Tensor]:
        """(load-balancing loss, z-loss) of one routing decision."""
        return (
            load_balancing_loss(decision.probs_TE, decision.topk_idx_TK),
            router_z_loss(decision.logits_TE),
        )
