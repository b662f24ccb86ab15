"""Stock `deepspeed.moe.layer.MoE`, adapted to our layer's interface: the baseline we measure against.

Legend: T tokens, D model dim, E experts.

Selected with `moe.implementation=deepspeed`. DeepSpeed's own gate (top-1, top-2, or its top-k
path), its capacity layout and its expert loop run unchanged; only the experts are
re-initialised independently (DeepSpeed deep-copies one module) so both implementations start
from comparable weights. DeepSpeed reports only tokens per expert before dropping, so `kept_E`
repeats them and the experts-per-token histogram and router entropy stay zero; its capacity is
worked out from the gate's formula (DeepSpeed does not return it).
"""

from __future__ import annotations

import torch
from deepspeed.moe.layer import MoE

from moe.config import MoEConfig
from moe.experts import SwiGLUExpert, expert_generator
from moe.layer import MoEAux


class StockDeepSpeedMoE(MoE):
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
        if config.router != "token_choice":
            raise ValueError("moe.implementation=deepspeed supports only moe.router=token_choice")
        super().__init__(
            hidden_size,
            expert=SwiGLUExpert(hidden_size, expert_hidden),
            num_experts=config.num_experts,
            ep_size=config.ep_size,
            k=config.top_k,
            capacity_factor=config.capacity_factor or 1.0,
            eval_capacity_factor=config.eval_capacity_factor or 1.0,
            # Dropless, a capacity floor means nothing, and DeepSpeed's top-1 gate would still refuse
            # fewer tokens than it (generation with a KV cache routes one token at a time).
            min_capacity=config.min_capacity if config.capacity_factor is not None else 0,
            drop_tokens=config.capacity_factor is not None,
            use_rts=False,
            top2_2nd_expert_sampling=False,  # otherwise the 2nd expert is Gumbel-sampled, even in eval
        )
        self.config = config
        ep_rank = torch.distributed.get_rank() % self.ep_size if torch.distributed.is_initialized() else 0
        for local_index, expert in enumerate(self.deepspeed_moe.experts.deepspeed_experts):
            generator = expert_generator(seed, layer_index, ep_rank * self.num_local_experts + local_index)
            expert.init_weights(init_std, out_std, generator)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, MoEAux]:  # type: ignore[override]
        output, l_aux, exp_counts = super().forward(hidden_states)
        counts = exp_counts.to(hidden_states.device).long().reshape(-1)
        zero = l_aux.new_zeros(())
        aux = MoEAux(
            loss=self.config.aux_loss_coef * l_aux.float(),
            load_balancing_loss=l_aux.detach().float(),
            z_loss=zero.detach().float(),
            routed_E=counts,
            kept_E=counts,
            experts_per_token=torch.zeros(self.num_experts + 1, dtype=torch.long, device=counts.device),
            entropy_sum=zero.detach().float(),
            capacity=self._gate_capacity(hidden_states.numel() // hidden_states.shape[-1]),
        )
        return output, aux

    def _gate_capacity(self, num_tokens: int) -> int | None:
        """The slots per expert DeepSpeed's gate used (None when dropless), worked out as its
        `_capacity` does, float32 product included, so the two agree at every rounding edge:
        ceil(T / E * cf * k), at least min_capacity, cf the training or eval factor."""
        if self.config.capacity_factor is None:
            return None
        factor = self.config.capacity_factor if self.training else (self.config.eval_capacity_factor or 1.0)
        capacity = torch.ceil((num_tokens / self.num_experts) * torch.tensor(factor * self.config.top_k))
        return max(int(capacity), self.config.min_capacity)
