"""Arguments of one MoE layer, as a plain dataclass (no Hydra here).

The training package reuses this dataclass as the schema of the `moe` config group, so
every field below is also a config key (`moe.<field>`). Validation happens in
`__post_init__` and names the field, so a user mistake surfaces as one readable line.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class MoEConfig:
    """Routing and expert settings shared by every MoE layer of a model."""

    num_experts: int = 8
    """Experts per MoE layer (E), across all expert-parallel ranks."""
    top_k: int = 2
    """Experts each token is sent to (K), 1 <= K <= E."""
    every: int = 1
    """Put an MoE FFN in every `every`-th block (1 = all blocks, 2 = blocks 1, 3, 5, ...);
    0 makes the model dense (no MoE layer at all)."""
    expert_hidden: int | None = None
    """Hidden size of one SwiGLU expert (F); None takes the model's dense FFN hidden size."""
    capacity_factor: float | None = 1.25
    """Training capacity factor: C = ceil(K * T * cf / E) slots per expert for T local tokens.
    None means dropless (capacity grows to the busiest expert's load)."""
    eval_capacity_factor: float | None = 2.0
    """Capacity factor in eval mode (None = dropless at eval)."""
    min_capacity: int = 4
    """Lower bound on C, so tiny batches still route something to every expert."""
    normalize_topk: bool = True
    """Renormalise the K selected softmax probabilities to sum to one (Mixtral, GShard top-2)."""
    aux_loss_coef: float = 0.01
    """Weight of the Switch/GShard load-balancing loss added to the LM loss."""
    z_loss_coef: float = 0.0
    """Weight of the router z-loss (ST-MoE, mean squared log-sum-exp of the router logits)."""
    ep_size: int = 1
    """Expert-parallel degree: experts are split over this many ranks (DeepSpeed's group)."""

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"moe.num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"moe.top_k must be between 1 and moe.num_experts={self.num_experts}, got {self.top_k}"
            )
        if self.every < 0:
            raise ValueError(f"moe.every must be >= 0 (0 = dense model), got {self.every}")
        if self.expert_hidden is not None and self.expert_hidden < 1:
            raise ValueError(f"moe.expert_hidden must be a positive integer or null, got {self.expert_hidden}")
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"moe.{name} must be > 0 (or null for dropless), got {value}")
        if self.min_capacity < 0:
            raise ValueError(f"moe.min_capacity must be >= 0, got {self.min_capacity}")
        for name in ("aux_loss_coef", "z_loss_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"moe.{name} must be >= 0, got {getattr(self, name)}")
        if self.ep_size < 1:
            raise ValueError(f"moe.ep_size must be >= 1, got {self.ep_size}")
        if self.num_experts % self.ep_size != 0:
            raise ValueError(
                f"moe.num_experts={self.num_experts} must be divisible by moe.ep_size={self.ep_size}"
            )
