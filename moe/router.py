"""Token-choice top-k router: each token picks its K highest-scoring experts.

Legend: T tokens, D model dim, E experts, K top-k.

The router only decides; it never calls the experts. Its math runs in fp32 even in a bf16
model, because softmax over small logit differences and top-k ties are where reduced
precision changes the routing itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe.config import MoEConfig
from moe.losses import load_balancing_loss, load_balancing_loss_fixed_fraction, router_z_loss
from moe.router_state import StepStatefulRouter


@dataclass
class RoutingDecision:
    """What a token-choice router decided for T tokens."""

    topk_idx_TK: torch.Tensor
    """Chosen experts per token, best first (int64)."""
    topk_weight_TK: torch.Tensor
    """Combine weight of each choice (fp32, differentiable)."""
    probs_TE: torch.Tensor
    """Router distribution over all experts (fp32): softmax, or normalised sigmoid scores."""
    logits_TE: torch.Tensor
    """Raw router logits (fp32)."""


def router_logits(x_TD: torch.Tensor, weight_ED: torch.Tensor, jitter_eps: float, training: bool) -> torch.Tensor:
    # In fp32 under autocast too, which would run the linear in bf16: logits 3e-3 off moved 107 of
    # 4096 tokens' top-2 choices, and expert choice's top-C picks and thresholds the same way.
    with torch.autocast(x_TD.device.type, enabled=False):
        x_fp32 = x_TD.float()
        if training and jitter_eps > 0:
            # Switch Transformer's multiplicative jitter: explores routings the router would not try.
            x_fp32 = x_fp32 * torch.empty_like(x_fp32).uniform_(1.0 - jitter_eps, 1.0 + jitter_eps)
        return torch.nn.functional.linear(x_fp32, weight_ED.float())


class TokenChoiceRouter(StepStatefulRouter):
    """Linear scores (softmax or sigmoid), optional selection bias, top-k selection."""

    FP32_BUFFERS = ("selection_bias", "balance_fraction", "pending_routed")

    def __init__(self, hidden_size: int, config: MoEConfig, init_std: float = 0.02) -> None:
        super().__init__(hidden_size, config, init_std)
        num_experts = config.num_experts
        # Aux-loss-free balancing: added to the scores for selection only (DeepSeek-V3, eq. 16).
        self.register_buffer("selection_bias", torch.zeros(num_experts))
        # f_e of the global load-balancing loss: the previous step's load fraction (uniform at start).
        self.register_buffer("balance_fraction", torch.full((num_experts,), 1.0 / num_experts))
        self.register_buffer("pending_routed", torch.zeros(num_experts), persistent=False)

    def forward(self, x_TD: torch.Tensor) -> RoutingDecision:
        cfg = self.config
        logits_TE = router_logits(x_TD, self.weight, cfg.jitter_eps, self.training)
        if cfg.score_func == "softmax":
            scores_TE = torch.softmax(logits_TE, dim=-1)
            probs_TE = scores_TE
        else:
            scores_TE = torch.sigmoid(logits_TE)
            probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)
        # The bias decides which experts are chosen; the weights stay the unbiased scores, so balancing
        # never distorts what the experts' outputs are multiplied by. Applied whatever the update rate:
        # a run resumed or evaluated with moe.bias_update_rate=0 (the bias frozen) routes as it learned
        # to. Zero (no bias balancing), it changes nothing: scores + 0 are the scores, bit for bit.
        # Among exact ties torch.topk's pick is fixed for a given input and device (not always the
        # lowest index): eval is deterministic, and the references avoid ties in their inputs.
        topk_idx_TK = torch.topk(scores_TE.detach() + self.selection_bias, cfg.top_k, dim=-1).indices
        topk_weight_TK = scores_TE.gather(1, topk_idx_TK)
        # Not at K = 1: one renormalised weight is always 1, and the router would get no gradient
        # from the language-model loss (only from the auxiliary losses).
        if cfg.normalize_topk and cfg.top_k > 1:
            topk_weight_TK = topk_weight_TK / topk_weight_TK.sum(dim=-1, keepdim=True)
        return RoutingDecision(topk_idx_TK, topk_weight_TK, probs_TE, logits_TE)

    def losses(self, decision: RoutingDecision) -> tuple[torch.Tensor, torch.Tensor]:
        """(load-balancing loss, z-loss) of one routing decision."""
        if self.config.aux_loss_scope == "global":
            balance = load_balancing_loss_fixed_fraction(decision.probs_TE, self.balance_fraction)
        else:
            balance = load_balancing_loss(decision.probs_TE, decision.topk_idx_TK)
        return balance, router_z_loss(decision.logits_TE)

    # ---------------------------------------------------------------- once per optimizer step
    def record_routed(self, routed_E: torch.Tensor) -> None:
        """Assignments per expert of one training micro-batch (the layer counts them anyway)."""
        self.pending_routed += routed_E

    def pending_statistics(self) -> torch.Tensor:
        return self.pending_routed.double()

    def apply_statistics(self, summed: torch.Tensor) -> None:
        # No `if total > 0` on a device tensor: that would wait for the GPU once per layer and step.
        routed = summed.float()
        total = routed.sum()
        # A step that routed nothing keeps the previous fractions.
        self.balance_fraction.copy_(torch.where(total > 0, routed / total.clamp_min(1), self.balance_fraction))
        if self.config.bias_update_rate > 0:
            # DeepSeek-V3: b_e += u * sign(mean load - load_e): underloaded experts rise. (All loads
            # zero: every sign is zero, the bias stays.)
            self.selection_bias += self.config.bias_update_rate * torch.sign(routed.mean() - routed)
        self.pending_routed.zero_()
