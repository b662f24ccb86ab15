"""The MoE FFN layer: router -> sort-based dispatch -> all-to-all -> experts -> combine.

Legend: T tokens, D model dim, E experts, e local experts, K top-k, C capacity, F expert hidden.

It is a `deepspeed.moe.layer.MoE` on purpose: the DeepSpeed engine finds MoE layers with
`isinstance(module, MoE)`, creates their expert-parallel groups through
`set_deepspeed_parallelism`, reduces expert gradients over the expert-data-parallel group
(expert parameters carry `allreduce=False`), and writes one checkpoint file per expert by
the parameter names `deepspeed_moe.experts.deepspeed_experts.<i>.*`. We keep all of that
and replace only the gate and the forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE
from deepspeed.utils import groups

from moe.config import MoEConfig
from moe.dispatch import (
    all_to_all_slots,
    assign_slots,
    expert_capacity,
    gather_from_slots,
    max_over_group,
    scatter_to_slots,
    tokens_per_expert,
)
from moe.experts import SwiGLUExpert, expert_generator
from moe.router import TokenChoiceRouter


@dataclass
class MoEAux:
    """What one MoE layer reports besides its output (per call, this rank's tokens)."""

    loss: torch.Tensor
    """aux_loss_coef * load balancing + z_loss_coef * z-loss: add it to the LM loss."""
    load_balancing_loss: torch.Tensor
    z_loss: torch.Tensor
    routed_E: torch.Tensor
    """Assignments per expert before dropping (int64, detached)."""
    kept_E: torch.Tensor
    """Assignments per expert that got a capacity slot (int64, detached)."""
    capacity: int


class MoELayer(MoE):
    """Token-choice top-k MoE FFN on DeepSpeed-MoE's expert-parallel machinery."""

    def __init__(
        self,
        hidden_size: int,
        expert_hidden: int,
        config: MoEConfig,
        *,
        layer_index: int = 0,
        seed: int = 0,
        init_std: float = 0.02,
        out_std: float = 0.02,
    ) -> None:
        super().__init__(
            hidden_size,
            expert=SwiGLUExpert(hidden_size, expert_hidden),
            num_experts=config.num_experts,
            ep_size=config.ep_size,
            k=1,  # DeepSpeed's own gate is replaced below; k here only has to be valid for it.
            capacity_factor=config.capacity_factor or 1.0,
            eval_capacity_factor=config.eval_capacity_factor or 1.0,
            min_capacity=config.min_capacity,
        )
        self.config = config
        self.deepspeed_moe.gate = TokenChoiceRouter(hidden_size, config.num_experts, config.top_k, config.normalize_topk)
        self.ep_rank = self._expected_ep_rank()
        for local_index, expert in enumerate(self.local_experts):
            global_expert = self.ep_rank * self.num_local_experts + local_index
            expert.init_weights(init_std, out_std, expert_generator(seed, layer_index, global_expert))

    @property
    def router(self) -> TokenChoiceRouter:
        return self.deepspeed_moe.gate

    @property
    def local_experts(self) -> torch.nn.ModuleList:
        return self.deepspeed_moe.experts.deepspeed_experts

    @property
    def ep_group(self):
        return self.deepspeed_moe.ep_group

    def _expected_ep_rank(self) -> int:
        # DeepSpeed groups consecutive ranks into expert-parallel groups ([0..ep-1], [ep..2ep-1], ...),
        # so the expert-parallel rank is known before the engine creates the groups; the weights
        # of global expert j are then drawn the same way at every expert-parallel size.
        if self.ep_size == 1 or not dist.is_initialized():
            return 0
        return dist.get_rank() % self.ep_size

    def _create_process_groups(self, use_data_before_expert_parallel_: bool = False) -> None:
        super()._create_process_groups(use_data_before_expert_parallel_=use_data_before_expert_parallel_)
        actual = groups._get_expert_parallel_rank(self.expert_group_name)
        if actual != self.ep_rank:
            raise RuntimeError(
                f"expert-parallel rank {actual} differs from the {self.ep_rank} assumed when initialising "
                "experts; use_data_before_expert_parallel_ is not supported"
            )

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, MoEAux]:  # type: ignore[override]
        shape = hidden_states.shape
        x_TD = hidden_states.reshape(-1, shape[-1])
        num_tokens = x_TD.shape[0]
        cfg = self.config

        decision = self.router(x_TD)
        routed_E = tokens_per_expert(decision.topk_idx_TK, cfg.num_experts)
        capacity_factor = cfg.capacity_factor if self.training else cfg.eval_capacity_factor
        if capacity_factor is None:
            capacity = max_over_group(max(1, int(routed_E.max())), self.ep_group, x_TD.device)
        else:
            capacity = expert_capacity(num_tokens, cfg.num_experts, cfg.top_k, capacity_factor, cfg.min_capacity)

        slot_TK = assign_slots(decision.topk_idx_TK, cfg.num_experts, capacity)
        buffer_SD = scatter_to_slots(x_TD, slot_TK, cfg.num_experts * capacity)
        received_SD = all_to_all_slots(buffer_SD, self.ep_group, self.ep_size)
        y_local_SD = self._run_local_experts(received_SD, capacity)
        y_SD = all_to_all_slots(y_local_SD, self.ep_group, self.ep_size)
        y_TD = gather_from_slots(y_SD, slot_TK, decision.topk_weight_TK)

        lb_loss, z_loss = self.router.losses(decision)
        kept = slot_TK >= 0
        aux = MoEAux(
            loss=cfg.aux_loss_coef * lb_loss + cfg.z_loss_coef * z_loss,
            load_balancing_loss=lb_loss.detach(),
            z_loss=z_loss.detach(),
            routed_E=routed_E.detach(),
            kept_E=torch.bincount(decision.topk_idx_TK[kept], minlength=cfg.num_experts).detach(),
            capacity=capacity,
        )
        return y_TD.view(shape), aux

    def _run_local_experts(self, received_SD: torch.Tensor, capacity: int) -> torch.Tensor:
        """[ep * e * C, D] (source-rank major) -> expert outputs in the same layout."""
        ep, e, dim = self.ep_size, self.num_local_experts, received_SD.shape[-1]
        per_expert_eND = received_SD.view(ep, e, capacity, dim).transpose(0, 1).reshape(e, ep * capacity, dim)
        outputs = [expert(per_expert_eND[i]) for i, expert in enumerate(self.local_experts)]
        out_eND = torch.stack(outputs)
        return out_eND.view(e, ep, capacity, dim).transpose(0, 1).reshape(ep * e * capacity, dim)
