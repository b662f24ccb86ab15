"""Expert-choice router (Zhou et al. 2022, arXiv 2202.09368): each expert picks its top-C tokens.

Legend: T tokens, D model dim, E experts, G groups, S tokens per group, C capacity, A assignments.

Every expert gets exactly C = ceil(S * cf / E) tokens of its group, so load is balanced by
construction and nothing needs an auxiliary loss; a token may get 0 to E experts. The price:
which tokens an expert takes depends on every token of the group, later ones included, so in a
decoder it is not causal. For evaluation and generation the router has a causal mode: each
expert keeps a score threshold, the running mean of the C-th largest score it saw in training,
and a token goes to every expert whose score clears that expert's threshold — a decision that
looks at the token alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe.config import MoEConfig
from moe.counting import ceil_slots, count_per_bin
from moe.losses import router_z_loss
from moe.router import router_logits
from moe.router_state import StepStatefulRouter


@dataclass
class Assignments:
    """A variable number of (token, expert, weight) triples, A of them."""

    token_A: torch.Tensor
    expert_A: torch.Tensor
    weight_A: torch.Tensor
    """fp32, differentiable; 0 where an assignment was removed by the per-token cap."""
    kept_A: torch.Tensor
    """False for assignments removed by the per-token cap."""
    probs_TE: torch.Tensor
    logits_TE: torch.Tensor
    capacity: int | None
    """Slots per expert when every expert has exactly that many (batch mode), else None."""


def choice_group_size(ec_group: str, num_tokens: int, sequence_length: int) -> int:
    """S, the tokens each expert chooses from (moe.ec_group): all `num_tokens` of a rank's batch, or one sequence."""
    return num_tokens if ec_group == "batch" else sequence_length


def group_capacity(group_size: int, num_experts: int, capacity_factor: float, min_capacity: int) -> int:
    """C = ceil(S * cf / E) tokens per expert and group, at least min_capacity, at most S."""
    return max(1, min(group_size, max(ceil_slots(group_size * capacity_factor / num_experts), min_capacity)))


def cap_experts_per_token(token_A: torch.Tensor, weight_A: torch.Tensor, num_tokens: int, cap: int) -> torch.Tensor:
    """Mask keeping, for every token, only its `cap` highest-weight assignments. [A] bool."""
    by_weight = torch.argsort(-weight_A.detach(), stable=True)
    order = by_weight[torch.argsort(token_A[by_weight], stable=True)]  # by token, then weight descending
    token_sorted = token_A[order]
    counts_T = count_per_bin(token_sorted, num_tokens)
    first_T = torch.cumsum(counts_T, dim=0) - counts_T
    rank_sorted = torch.arange(token_A.numel(), device=token_A.device) - first_T[token_sorted]
    keep = torch.empty_like(token_A, dtype=torch.bool)
    keep[order] = rank_sorted < cap
    return keep


class ExpertChoiceRouter(StepStatefulRouter):
    """Scores are the softmax over experts; selection is top-C over tokens, per expert and group."""

    FP32_BUFFERS = ("threshold", "threshold_ready", "pending_threshold")

    def __init__(self, hidden_size: int, config: MoEConfig, init_std: float = 0.02) -> None:
        super().__init__(hidden_size, config, init_std)
        num_experts = config.num_experts
        self.register_buffer("threshold", torch.zeros(num_experts))
        self.register_buffer("threshold_ready", torch.zeros(()))
        # Sum over groups of each expert's C-th largest score, and the number of groups.
        self.register_buffer("pending_threshold", torch.zeros(num_experts + 1), persistent=False)

    def scores(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits_TE = router_logits(x_TD, self.weight, self.config.jitter_eps, self.training)
        return torch.softmax(logits_TE, dim=-1), logits_TE

    def forward(self, x_TD: torch.Tensor, group_size: int, capacity_factor: float) -> Assignments:
        """Batch mode: every expert takes its top-C tokens of each group of `group_size` tokens."""
        cfg = self.config
        probs_TE, logits_TE = self.scores(x_TD)
        num_tokens, num_experts = probs_TE.shape
        if num_tokens % group_size != 0:
            raise ValueError(f"{num_tokens} tokens do not split into groups of {group_size}")
        groups = num_tokens // group_size
        capacity = group_capacity(group_size, num_experts, capacity_factor, cfg.min_capacity)
        # Top-C over the tokens of each group, taken along dim 1 of [G, S, E] rather than along the
        # last dim of its transposed view: the same values, but torch 2.13's inductor differentiates
        # softmax -> transposed top-k wrongly (20% off in the router's gradient with 8 experts), and
        # this layout is the one it gets right (tests/unit/test_moe_compile.py).
        weight_GCE, local_GCE = torch.topk(probs_TE.view(groups, group_size, num_experts), capacity, dim=1)
        weight_GEC, local_GEC = weight_GCE.transpose(1, 2), local_GCE.transpose(1, 2)
        offsets_G = torch.arange(groups, device=x_TD.device).view(groups, 1, 1) * group_size
        token_EGC = (local_GEC + offsets_G).transpose(0, 1)
        token_A = token_EGC.reshape(-1)  # expert-major: slot a belongs to expert a // (G*C)
        weight_A = weight_GEC.transpose(0, 1).reshape(-1)
        expert_A = torch.arange(num_experts, device=x_TD.device).repeat_interleave(groups * capacity)
        kept_A = torch.ones_like(token_A, dtype=torch.bool)
        if cfg.ec_max_experts_per_token is not None:
            kept_A = cap_experts_per_token(token_A, weight_A, num_tokens, cfg.ec_max_experts_per_token)
            weight_A = weight_A * kept_A
        if self.gathers_statistics:
            with torch.no_grad():
                cth_largest_GE = weight_GEC[..., -1]
                if cfg.jitter_eps > 0:
                    # Causal routing scores without jitter, so its thresholds are learned from scores
                    # without it: jittered ones would set them off (by up to the jitter's spread).
                    clean_TE = torch.softmax(router_logits(x_TD, self.weight, 0.0, training=False), dim=-1)
                    cth_largest_GE = torch.topk(clean_TE.view(groups, group_size, num_experts), capacity, dim=1).values[:, -1]
                self.pending_threshold[:num_experts] += cth_largest_GE.sum(dim=0)
                self.pending_threshold[num_experts] += groups
        return Assignments(token_A, expert_A, weight_A, kept_A, probs_TE, logits_TE, groups * capacity)

    def causal(self, x_TD: torch.Tensor) -> Assignments:
        """Causal mode: token t goes to every expert e with score(t, e) >= threshold_e."""
        if float(self.threshold_ready) == 0.0:
            raise RuntimeError(
                "expert-choice causal routing needs thresholds learned in training; "
                "train first (or load a trained checkpoint), or use moe.ec_eval_mode=batch"
            )
        probs_TE, logits_TE = self.scores(x_TD)
        token_A, expert_A = torch.nonzero(probs_TE >= self.threshold, as_tuple=True)
        weight_A = probs_TE[token_A, expert_A]
        kept_A = torch.ones_like(token_A, dtype=torch.bool)
        if self.config.ec_max_experts_per_token is not None:
            kept_A = cap_experts_per_token(token_A, weight_A, probs_TE.shape[0], self.config.ec_max_experts_per_token)
            weight_A = weight_A * kept_A
        return Assignments(token_A, expert_A, weight_A, kept_A, probs_TE, logits_TE, None)

    @staticmethod
    def losses(assignments: Assignments) -> tuple[torch.Tensor, torch.Tensor]:
        """(load-balancing loss, z-loss): balanced by construction, so only the z-loss is real."""
        return assignments.logits_TE.new_zeros(()), router_z_loss(assignments.logits_TE)

    # ---------------------------------------------------------------- once per optimizer step
    def pending_statistics(self) -> torch.Tensor:
        return self.pending_threshold.double()

    def apply_statistics(self, summed: torch.Tensor) -> None:
        # Decided on the device (torch.where), not with `if` on a device value: no wait for the GPU
        # once per layer and step. A step with no groups keeps the threshold as it was.
        groups = summed[-1]
        observed_E = (summed[:-1] / groups.clamp_min(1)).float()
        first = self.threshold_ready == 0.0  # the first observation is taken as it is
        updated_E = torch.where(first, observed_E, torch.lerp(self.threshold, observed_E, self.config.ec_threshold_momentum))
        seen = groups > 0
        self.threshold.copy_(torch.where(seen, updated_E, self.threshold))
        self.threshold_ready.copy_(torch.where(seen, torch.ones_like(self.threshold_ready), self.threshold_ready))
        self.pending_threshold.zero_()
