"""Arguments of one MoE layer, as a plain dataclass (no Hydra here).

The training package reuses this dataclass as the schema of the `moe` config group, so
every field below is also a config key (`moe.<field>`). Validation happens in
`__post_init__` and names the field, so a user mistake surfaces as one readable line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields


@dataclass
class MoEConfig:
    """Routing and expert settings shared by every MoE layer of a model."""

    implementation: str = "ours"
    """ours (sorted grouped-GEMM dispatch, every router here) or deepspeed (stock
    deepspeed.moe.layer.MoE with its own gate: the baseline for comparisons; token choice only)."""
    router: str = "token_choice"
    """token_choice: each token picks its top-k experts. expert_choice: each expert picks its
    top-C tokens (Zhou et al. 2022); not causal, see ec_eval_mode."""
    num_experts: int = 8
    """Experts per MoE layer (E), across all expert-parallel ranks."""
    top_k: int = 2
    """Token choice: experts each token is sent to (K), 1 <= K <= E. Expert choice does not read it
    (a token gets capacity_factor experts on average, and FLOPs are counted from that)."""
    every: int = 1
    """Put an MoE FFN in every `every`-th block (1 = all blocks, 2 = blocks 1, 3, 5, ...);
    0 makes the model dense (no MoE layer at all)."""
    expert_hidden: int | None = None
    """Hidden size of one SwiGLU expert (F); None takes the model's dense FFN hidden size."""
    capacity_factor: float | None = 1.25
    """Training capacity factor. Token choice: C = ceil(K * T * cf / E) slots per expert for T
    local tokens; None = dropless (capacity grows to the busiest expert's load). Expert choice:
    C = ceil(T * cf / E) tokens per expert (the paper's c, typically 2); must be set."""
    eval_capacity_factor: float | None = None
    """Capacity factor in eval mode (None = dropless at eval; expert choice: None = training's, and used
    by ec_eval_mode=batch only: the causal mode's thresholds were learned at the training factor).
    Dropless by default: with a capacity, whether a token keeps its expert depends on the other
    tokens of the batch (later ones included), so a decoder's eval and generation would not be causal."""
    min_capacity: int = 4
    """Lower bound on C, so tiny batches still route something to every expert."""
    score_func: str = "softmax"
    """Router scores: softmax over experts (Switch, Mixtral) or per-expert sigmoid (DeepSeek-V3)."""
    normalize_topk: bool = True
    """Token choice: renormalise the K selected scores to sum to one (Mixtral, GShard top-2). Not at
    K = 1, where the weight stays the router's score (softmax or sigmoid): renormalised it would be
    1, and the router would learn nothing from the language-model loss."""
    drop_policy: str = "position"
    """Token choice, when an expert is full: position (all first choices before second choices,
    earlier tokens first; GShard) or probability (highest router weight first)."""
    jitter_eps: float = 0.0
    """Multiplicative jitter on the router input in training only, x * U(1-eps, 1+eps) (Switch)."""
    aux_loss_coef: float = 0.01
    """Token choice: weight of the Switch/GShard load-balancing loss added to the LM loss. Expert
    choice has none (every expert takes C tokens: balanced by construction): 0 or the default there."""
    aux_loss_scope: str = "micro_batch"
    """micro_batch: f (each expert's share of the assignments) counted on this micro-batch on this
    rank, the paper's form. global: f from the previous optimizer step's whole batch (all
    micro-batches, all ranks), so the loss's value and gradient do not depend on how a batch is
    split into micro-batches or ranks; its one-step lag balanced worse in bench/RESULTS.md."""
    z_loss_coef: float = 0.0
    """Weight of the router z-loss (ST-MoE, mean squared log-sum-exp of the router logits)."""
    bias_update_rate: float = 0.0
    """Auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias added to the scores for
    selection only, moved by this much per optimizer step toward the mean load. 0 disables."""
    shared_expert_hidden: int | None = None
    """Hidden size of a dense SwiGLU applied to every token and added to the routed output
    (DeepSeek-MoE's shared expert); None = no shared expert."""
    ec_group: str = "batch"
    """Expert choice: the tokens an expert chooses from, batch (this rank's micro-batch) or sequence."""
    ec_max_experts_per_token: int | None = None
    """Expert choice: keep at most this many experts per token (its highest scores); None = no cap."""
    ec_eval_mode: str = "causal"
    """Expert choice at eval and generation: causal (a token goes to every expert whose score clears
    that expert's threshold, learned in training from the C-th largest score) or batch (as trained;
    peeks at later tokens)."""
    ec_threshold_momentum: float = 0.05
    """Expert choice: EMA rate of the per-expert thresholds, once per optimizer step."""
    ep_size: int = 1
    """Expert-parallel degree: experts are split over this many ranks (DeepSpeed's group)."""

    def __post_init__(self) -> None:
        choices = {
            "implementation": ("ours", "deepspeed"),
            "router": ("token_choice", "expert_choice"),
            "score_func": ("softmax", "sigmoid"),
            "drop_policy": ("position", "probability"),
            "aux_loss_scope": ("global", "micro_batch"),
            "ec_group": ("batch", "sequence"),
            "ec_eval_mode": ("causal", "batch"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"moe.{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if self.router == "expert_choice" and self.capacity_factor is None:
            raise ValueError("moe.capacity_factor must be set for expert choice (C = T * cf / E; 2 is typical)")
        if self.router == "expert_choice" and self.score_func != "softmax":
            raise ValueError("moe.score_func must be softmax for expert choice (weights are the softmax over experts)")
        if self.implementation == "deepspeed":
            unsupported = stock_gate_lacks(self)
            if unsupported:
                raise ValueError(f"moe.implementation=deepspeed (DeepSpeed's own gate) has no {'; no '.join(unsupported)}: "
                                 "use moe.implementation=ours")
        # A setting of the other router would be silently ignored: refused, when set off its default.
        other_router = TOKEN_CHOICE_ONLY if self.router == "expert_choice" else EXPERT_CHOICE_ONLY
        defaults = {f.name: f.default for f in fields(self)}
        for name in other_router:
            if name == "aux_loss_coef" and self.aux_loss_coef == 0:
                continue  # "no balancing loss" is what expert choice has (its preset says so)
            if getattr(self, name) != (default := defaults[name]):
                raise ValueError(f"moe.{name}={getattr(self, name)!r} applies to "
                                 f"{'token' if self.router == 'expert_choice' else 'expert'} choice only; "
                                 f"this is moe.router={self.router} (leave it at {default!r})")
        if not 0 <= self.jitter_eps < 1:
            raise ValueError(f"moe.jitter_eps must be in [0, 1), got {self.jitter_eps}")
        # NaN passes every comparison (`nan < 0` is false): a non-finite weight would reach the loss.
        for name in ("aux_loss_coef", "z_loss_coef", "bias_update_rate"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"moe.{name} must be a finite number >= 0, got {value}")
        if self.shared_expert_hidden is not None and self.shared_expert_hidden < 1:
            raise ValueError(f"moe.shared_expert_hidden must be a positive integer or null, got {self.shared_expert_hidden}")
        cap = self.ec_max_experts_per_token
        if cap is not None and not 1 <= cap <= self.num_experts:
            raise ValueError(
                f"moe.ec_max_experts_per_token must be between 1 and moe.num_experts={self.num_experts} or null, got {cap}"
            )
        if not 0 < self.ec_threshold_momentum <= 1:
            raise ValueError(f"moe.ec_threshold_momentum must be in (0, 1], got {self.ec_threshold_momentum}")
        if self.num_experts < 1:
            raise ValueError(f"moe.num_experts must be >= 1, got {self.num_experts}")
        if self.router == "token_choice" and not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"moe.top_k must be between 1 and moe.num_experts={self.num_experts}, got {self.top_k}"
            )
        if self.every < 0:
            raise ValueError(f"moe.every must be >= 0 (0 = dense model), got {self.every}")
        if self.expert_hidden is not None and self.expert_hidden < 1:
            raise ValueError(f"moe.expert_hidden must be a positive integer or null, got {self.expert_hidden}")
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"moe.{name} must be > 0 (or null for dropless), got {value}")
        if self.min_capacity < 0:
            raise ValueError(f"moe.min_capacity must be >= 0, got {self.min_capacity}")
        if self.ep_size < 1:
            raise ValueError(f"moe.ep_size must be >= 1, got {self.ep_size}")
        if self.num_experts % self.ep_size != 0:
            raise ValueError(
                f"moe.num_experts={self.num_experts} must be divisible by moe.ep_size={self.ep_size}"
            )


TOKEN_CHOICE_ONLY = ("top_k", "drop_policy", "normalize_topk", "bias_update_rate", "aux_loss_coef", "aux_loss_scope")
"""Settings only token choice reads."""
EXPERT_CHOICE_ONLY = ("ec_group", "ec_max_experts_per_token", "ec_eval_mode", "ec_threshold_momentum")
"""Settings only expert choice reads."""


def stock_gate_lacks(config: MoEConfig) -> list[str]:
    """Settings that change the model which DeepSpeed's gate cannot follow, named with their values
    (it would run without them). Its z-loss (none: reported as 0) and its dropping at eval when
    eval_capacity_factor is null (capacity factor 1.0 then) are accepted, so that a preset's model
    can be measured on both implementations."""
    problems = []
    if config.router != "token_choice":
        problems.append(f"moe.router={config.router} (token choice only)")
    if config.score_func != "softmax":
        problems.append(f"moe.score_func={config.score_func} (softmax only)")
    if config.bias_update_rate > 0:
        problems.append(f"moe.bias_update_rate={config.bias_update_rate:g} (selection bias)")
    if config.shared_expert_hidden is not None:
        problems.append(f"moe.shared_expert_hidden={config.shared_expert_hidden} (shared expert)")
    if config.drop_policy != "position":
        problems.append(f"moe.drop_policy={config.drop_policy}")
    if config.jitter_eps > 0:
        problems.append(f"moe.jitter_eps={config.jitter_eps:g} (router jitter)")
    if not config.normalize_topk and config.top_k > 1:
        problems.append("moe.normalize_topk=false (unnormalised top-k weights)")
    if config.aux_loss_scope != "micro_batch":
        problems.append(f"moe.aux_loss_scope={config.aux_loss_scope} (its balancing loss is per micro-batch)")
    if config.capacity_factor is None and config.eval_capacity_factor is not None:
        # Its gate drops at both or neither: dropless training makes it dropless at eval too.
        problems.append(f"moe.eval_capacity_factor={config.eval_capacity_factor:g} with dropless training "
                        "(its gate drops in both or in neither)")
    if config.top_k > 2 and config.capacity_factor is not None:
        # DeepSpeed's top-k gate (k > 2) keeps each expert's most probable tokens by raw router
        # probability; ours rank by position, or by the renormalised weight.
        problems.append(f"moe.top_k={config.top_k} with a capacity (above top-2 it drops by router probability, "
                        "which no moe.drop_policy matches)")
    return problems
