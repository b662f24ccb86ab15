"""Router auxiliary losses, as pure functions.

Legend: T tokens, E experts, K top-k.
"""

from __future__ import annotations

import torch

from moe.counting import count_per_bin


def load_balancing_loss(probs_TE: torch.Tensor, topk_idx_TK: torch.Tensor) -> torch.Tensor:
    """Switch Transformer / GShard load-balancing loss.

    Fedus et al. 2021 (arXiv 2101.03961), eq. 4, generalised to top-k as Megatron-Core does:

        L = E * sum_e f_e * P_e

    f_e = fraction of the T*K routing assignments that chose expert e (no gradient: it is a
    count), P_e = mean over tokens of the router probability of e. L = 1 when routing is
    perfectly uniform and grows towards E as it collapses onto one expert; its gradient
    pushes probability away from over-used experts. (GShard and DeepSpeed's gates count f_e
    from first choices only; transformers' Mixtral counts the T*K choices but divides by T, so
    its loss is K times this one: see the export's `router_aux_loss_coef`.)
    """
    num_tokens, num_experts = probs_TE.shape
    counts_E = count_per_bin(topk_idx_TK, num_experts)
    fraction_E = counts_E.to(probs_TE.dtype) / max(1, topk_idx_TK.numel())
    mean_prob_E = probs_TE.mean(dim=0)
    return num_experts * torch.sum(fraction_E * mean_prob_E)


def load_balancing_loss_fixed_fraction(probs_TE: torch.Tensor, fraction_E: torch.Tensor) -> torch.Tensor:
    """The same loss, L = E * sum_e f_e * P_e, with f given rather than counted here.

    With f fixed for a whole optimizer step (the previous step's load over all micro-batches and
    ranks), L is linear in the router probabilities: the mean of L over equal-sized micro-batches
    and ranks equals L over the whole batch, in value and in gradient, however the batch is split.
    Counting f per micro-batch (the paper's form) makes L a product of two batch means, which is
    not split-invariant.
    """
    num_experts = probs_TE.shape[-1]
    return num_experts * torch.sum(fraction_E.to(probs_TE.dtype) * probs_TE.mean(dim=0))


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """Router z-loss of ST-MoE (Zoph et al. 2022, arXiv 2202.08906), eq. 5:

        L_z = 1/T * sum_t (log sum_e exp(x_te))^2

    It keeps router logits small, which keeps the softmax (and bf16 training) stable.
    """
    return torch.logsumexp(logits_TE, dim=-1).square().mean()
