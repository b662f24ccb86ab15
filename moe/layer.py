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

import contextlib
import io
from dataclasses import dataclass

import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE
from deepspeed.utils import groups

from moe.config import MoEConfig
from moe.counting import count_per_bin
from moe.dispatch import (
    VariableExchange,
    all_to_all_slots,
    assign_slots,
    combine_rows,
    exchange_counts,
    expert_capacity,
    filled_slots_first,
)
from moe.expert_choice import ExpertChoiceRouter, choice_group_size
from moe.expert_sharding import run_sharded, shard_swiglu_experts
from moe.expert_storage import pack_expert_weights
from moe.experts import SwiGLUExpert, expert_generator
from moe.grouped_experts import (
    ExpertWeights,
    padding_rows_cost_nothing,
    stack_expert_weights,
    swiglu_capacity,
    swiglu_grouped,
    warm_grouped_mm_probe,
)
from moe.permute import combine_from_slots, combine_in_token_order, permute_rows, rows_in_expert_order, rows_to_slots
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
    experts_per_token: torch.Tensor
    """Histogram [E+1]: how many tokens got 0, 1, ..., E experts (int64)."""
    entropy_sum: torch.Tensor
    """Sum over tokens of the router distribution's entropy, in nats (fp32, detached)."""
    capacity: int | None
    """Slots per expert; None when dropless (reading the busiest expert would cost a host sync)."""


@dataclass
class _Plan:
    """Every (token, expert) assignment of one forward, and which of them run."""

    token_A: torch.Tensor
    expert_A: torch.Tensor
    weight_A: torch.Tensor
    kept_A: torch.Tensor
    slot_A: torch.Tensor | None
    """Token choice with a capacity: slot in the fixed [E*C] layout (-1 = dropped); else None
    (expert choice's assignments are their own slots: assignment a is slot a)."""
    capacity: int | None
    """Slots per expert; None = dropless (no fixed layout)."""
    probs_TE: torch.Tensor
    balance_loss: torch.Tensor
    z_loss: torch.Tensor
    top_k: int | None = None
    """Set when every token has exactly top_k assignments in token-major order (token choice):
    the combine is then a deterministic gather + sum instead of an index_add."""

    def kept_per_expert(self, num_experts: int) -> torch.Tensor:
        """Kept assignments per expert [E] int64, counted once per forward: the grouped GEMM's
        group sizes and the statistics both need it."""
        if not hasattr(self, "_kept_E"):
            self._kept_E = count_per_bin(self.expert_A, num_experts, where=self.kept_A)
        return self._kept_E


class MoELayer(MoE):
    """Token-choice or expert-choice MoE FFN on DeepSpeed-MoE's expert-parallel machinery.

    Input [..., D] with at least one token. Under expert parallelism every rank of an expert-parallel
    group calls the layer together; in the capacity modes (token choice with a capacity factor,
    expert choice) each with the same number of tokens, as training's equal micro-batches give,
    because the fixed-size all-to-all's slots per expert come from the rank's own count. Dropless
    token choice exchanges counts first (all-to-all-v) and takes any.
    """

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
        tensor_parallel_size: int = 1,
    ) -> None:
        """`tensor_parallel_size`: ranks that will split every expert's hidden units
        (`shard_experts_for_tensor_parallel`); it decides which experts this rank holds."""
        super().__init__(
            hidden_size,
            expert=SwiGLUExpert(hidden_size, expert_hidden),
            num_experts=config.num_experts,
            ep_size=config.ep_size,
            k=1,  # DeepSpeed's own gate is replaced below; k here only has to be valid for it.
            capacity_factor=config.capacity_factor or 1.0,
            eval_capacity_factor=config.eval_capacity_factor or 1.0,
            min_capacity=config.min_capacity,
            # With a tensor-parallel unit (mpu), build expert-parallel groups among ranks of the same
            # tensor-parallel rank: those hold different tokens, so no token reaches an expert twice.
            # Under tensor parallelism each expert's hidden units are then split too
            # (`shard_experts_for_tensor_parallel`).
            enable_expert_tensor_parallelism=True,
        )
        self.config = config
        self._init = (seed, layer_index, init_std, out_std)
        router_class = ExpertChoiceRouter if config.router == "expert_choice" else TokenChoiceRouter
        self.deepspeed_moe.gate = router_class(hidden_size, config, init_std)
        self.ec_eval_mode = config.ec_eval_mode
        """Expert choice at eval: causal or batch; an attribute so an evaluation can measure both."""
        self.tensor_parallel_group = None
        """Set by `shard_experts_for_tensor_parallel`: the group over which experts' hidden units are split."""
        self.tensor_parallel_size = tensor_parallel_size
        self._forward_compiled = False
        """Set by `compile_forward`."""
        self.ep_rank = self._expected_ep_rank()
        self._init_experts()
        # Named without "expert": DeepSpeed's checkpointing treats such keys as routed experts.
        self.shared_mlp = None
        if config.shared_expert_hidden:
            self.shared_mlp = SwiGLUExpert(hidden_size, config.shared_expert_hidden)
            self.shared_mlp.init_weights(init_std, out_std)

    @property
    def router(self) -> TokenChoiceRouter | ExpertChoiceRouter:
        return self.deepspeed_moe.gate

    @property
    def local_experts(self) -> torch.nn.ModuleList:
        return self.deepspeed_moe.experts.deepspeed_experts

    @property
    def ep_group(self):
        return self.deepspeed_moe.ep_group

    def _init_experts(self) -> None:
        """Global expert j is drawn from (seed, layer, j) alone: the same weights at every layout."""
        seed, layer_index, init_std, out_std = self._init
        for local_index, expert in enumerate(self.local_experts):
            global_expert = self.ep_rank * self.num_local_experts + local_index
            expert.init_weights(init_std, out_std, expert_generator(seed, layer_index, global_expert))

    def pack_expert_weights(self) -> None:
        """Lay this layer's experts out in one buffer, as DeepSpeed's ZeRO flat buffer does, so that
        every forward stacks them as a view instead of copying them (moe/expert_storage.py). For use
        outside the engine (inference, benchmarks); the parameters stay the same objects, trainable,
        and any later in-place change to them is seen by the next forward. Call after moving the
        layer to its device: `.to()` gives every parameter its own storage again."""
        pack_expert_weights(self.local_experts)

    def _expert_weights(self) -> ExpertWeights:
        return stack_expert_weights(self.local_experts)

    def shard_experts_for_tensor_parallel(self, group, rank: int, size: int) -> None:
        """Expert tensor parallelism (moe/expert_sharding.py): keep hidden units chunk `rank` of
        `size` of every local expert, and complete expert outputs over `group`. Call after
        construction, before the engine is built."""
        if self.config.implementation != "ours":
            raise ValueError("expert tensor parallelism needs moe.implementation=ours")
        if size != self.tensor_parallel_size:
            raise ValueError(f"the layer was built for tensor_parallel_size={self.tensor_parallel_size}, "
                             f"sharding asks for {size}: the experts drawn at construction would be the wrong ones")
        if (self.local_experts[0].w1.out_features) % size:
            raise ValueError(f"the expert hidden size {self.local_experts[0].w1.out_features} must be divisible by {size}")
        # The whole experts of this rank's global ids were drawn at construction; keep the shard.
        shard_swiglu_experts(self.local_experts, rank, size)
        self.tensor_parallel_group = group

    def _expected_ep_rank(self) -> int:
        # DeepSpeed groups consecutive ranks into expert-parallel groups ([0..ep-1], [ep..2ep-1], ...),
        # so the expert-parallel rank is known before the engine creates the groups; the weights
        # of global expert j are then drawn the same way at every expert-parallel size. With a
        # tensor-parallel unit (mpu) the groups are formed among ranks of one tensor-parallel rank
        # ([0, tp, 2tp, ...] for ep ranks 0, 1, 2, ...), hence the division by tp.
        # `_create_process_groups` checks the assumption against the groups DeepSpeed made.
        if self.ep_size == 1 or not dist.is_initialized():
            return 0
        return (dist.get_rank() // self.tensor_parallel_size) % self.ep_size

    def _create_process_groups(self, use_data_before_expert_parallel_: bool = False) -> None:
        # DeepSpeed prints "No existing process group found, creating a new group ..." for the first
        # layer on every rank: expected here, not a problem to report.
        with contextlib.redirect_stdout(io.StringIO()):
            super()._create_process_groups(use_data_before_expert_parallel_=use_data_before_expert_parallel_)
        actual = groups._get_expert_parallel_rank(self.expert_group_name)
        if actual != self.ep_rank:
            raise RuntimeError(
                f"expert-parallel rank {actual} differs from the {self.ep_rank} assumed when initialising "
                "experts; use_data_before_expert_parallel_ is not supported"
            )

    # ------------------------------------------------------------------ forward
    def compile_forward(self, **compile_options) -> None:
        """torch.compile this layer's forward after the expert weights are stacked: router, slot
        assignment, sort, expert GEMMs, combine and statistics, which inductor fuses (softmax, top-k
        and the losses; SiLU x gate between the grouped GEMMs; the weighted combine). At one
        expert-parallel rank on a GPU that is one graph, as nothing in it waits for the device
        (tests/unit/test_moe_compile.py checks fullgraph=True in bf16). Across ranks dynamo breaks the
        graph at each collective and at the host-sized all-to-all-v and runs those eagerly; on a CPU in
        fp32 at the grouped GEMM, which torch traces for bf16 only. Parameters, names and checkpoints
        are unchanged."""
        self._route_and_compute = torch.compile(self._route_and_compute, **compile_options)
        self._forward_compiled = True

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, MoEAux]:  # type: ignore[override]
        # Stacked in eager mode: whether the stack can be a view depends on where ZeRO put the weights
        # (data pointers), which a compiled graph cannot look at. The same goes for the one-off probe of
        # torch._grouped_mm (it runs a backward): a compiled graph only reads its answer. (Uncompiled,
        # the expert compute probes on its first call.)
        weights = self._expert_weights()
        if self._forward_compiled:
            warm_grouped_mm_probe(hidden_states.device, (hidden_states.dtype, weights[0].dtype))
        return self._route_and_compute(hidden_states, weights)

    def _route_and_compute(self, hidden_states: torch.Tensor, weights: ExpertWeights) -> tuple[torch.Tensor, MoEAux]:
        shape = hidden_states.shape
        x_TD = hidden_states.reshape(-1, shape[-1])
        num_tokens = x_TD.shape[0]
        if num_tokens == 0:
            raise ValueError(f"MoELayer: the input {tuple(shape)} holds no tokens (at least one is needed)")
        if self.config.router == "token_choice":
            plan = self._plan_token_choice(x_TD)
        else:
            plan = self._plan_expert_choice(x_TD, sequence_length=shape[-2] if len(shape) > 2 else num_tokens)

        if plan.capacity is not None and (self.ep_size > 1 or plan.top_k is None):
            # Expert choice already comes in the fixed layout (C per expert), and capacity mode
            # across ranks exchanges fixed-size slot buffers.
            y_TD = self._experts_fixed_layout(x_TD, plan, weights)
        else:
            order_N, counts_E = self._sorted_by_expert(plan)
            if plan.top_k is not None:
                rows_ND = rows_in_expert_order(x_TD, order_N, plan.top_k)
            else:
                rows_ND = x_TD[plan.token_A[order_N]]
            if self.ep_size == 1:
                # With a capacity, order_N also lists the dropped assignments, after the kept ones.
                padded = plan.capacity is not None
                y_rows_ND = run_sharded(
                    lambda rows: swiglu_grouped(rows, counts_E, *weights, padded=padded),
                    rows_ND, self.tensor_parallel_group,
                )
            else:
                y_rows_ND = self._experts_variable_all_to_all(rows_ND, counts_E, weights)
            y_TD = self._combine_sorted(plan, order_N, y_rows_ND, num_tokens)
        if self.shared_mlp is not None:
            y_TD = y_TD + self.shared_mlp(x_TD)
        return y_TD.view(shape), self._aux(plan, num_tokens)

    def _plan_token_choice(self, x_TD: torch.Tensor) -> _Plan:
        cfg = self.config
        decision = self.router(x_TD)
        num_tokens = x_TD.shape[0]
        capacity_factor = cfg.capacity_factor if self.training else cfg.eval_capacity_factor
        # Token-major [T*K]: 0,0,1,1,... (an expand, not repeat_interleave, which may size its output on the host).
        token_A = torch.arange(num_tokens, device=x_TD.device).unsqueeze(1).expand(num_tokens, cfg.top_k).reshape(-1)
        slot_A, capacity = None, None
        if capacity_factor is None:
            kept_A = torch.ones_like(token_A, dtype=torch.bool)
        else:
            capacity = expert_capacity(num_tokens, cfg.num_experts, cfg.top_k, capacity_factor, cfg.min_capacity)
            priority = decision.topk_weight_TK if cfg.drop_policy == "probability" else None
            slot_A = assign_slots(decision.topk_idx_TK, cfg.num_experts, capacity, priority).reshape(-1)
            kept_A = slot_A >= 0
        balance_loss, z_loss = self.router.losses(decision)
        return _Plan(
            token_A=token_A,
            expert_A=decision.topk_idx_TK.reshape(-1),
            weight_A=decision.topk_weight_TK.reshape(-1),
            kept_A=kept_A,
            slot_A=slot_A,
            capacity=capacity,
            probs_TE=decision.probs_TE,
            balance_loss=balance_loss,
            z_loss=z_loss,
            top_k=cfg.top_k,
        )

    def _plan_expert_choice(self, x_TD: torch.Tensor, sequence_length: int) -> _Plan:
        cfg = self.config
        router: ExpertChoiceRouter = self.router
        if not self.training and self.ec_eval_mode == "causal":
            # Causal mode: a variable number of tokens per expert, routed dropless.
            assignments = router.causal(x_TD)
            capacity = None
        else:
            group_size = choice_group_size(cfg.ec_group, x_TD.shape[0], sequence_length)
            capacity_factor = cfg.capacity_factor if self.training else (cfg.eval_capacity_factor or cfg.capacity_factor)
            assignments = router(x_TD, group_size, capacity_factor)
            # Expert-major, exactly `capacity` per expert: the fixed layout already (no slots to assign).
            capacity = assignments.capacity
        balance_loss, z_loss = router.losses(assignments)
        return _Plan(
            token_A=assignments.token_A,
            expert_A=assignments.expert_A,
            weight_A=assignments.weight_A,
            kept_A=assignments.kept_A,
            slot_A=None,
            capacity=capacity,
            probs_TE=assignments.probs_TE,
            balance_loss=balance_loss,
            z_loss=z_loss,
        )

    # ------------------------------------------------------------------ expert compute
    def _sorted_by_expert(self, plan: _Plan) -> tuple[torch.Tensor, torch.Tensor]:
        """Kept assignments ordered by global expert (stable: ties keep token order), and the
        number kept per expert: the layout of a grouped GEMM. ([N], [E])

        Token choice with a capacity at one rank lists its dropped assignments too, after every
        kept one (padding rows for `swiglu_grouped(..., padded=True)`): the number kept then never
        has to reach the host. Nothing here waits for the device, except expert choice's causal
        mode (a variable number of assignments)."""
        num_experts = self.config.num_experts
        if plan.top_k is not None:
            # Dropped assignments get the key E, one past the last expert, so they sort last.
            key_A = plan.expert_A if plan.capacity is None else torch.where(plan.kept_A, plan.expert_A, num_experts)
            order_N = torch.argsort(key_A, stable=True)
            return order_N, plan.kept_per_expert(num_experts)
        # A variable number of assignments: how many there are is read to the host (nonzero).
        kept_N = torch.nonzero(plan.kept_A, as_tuple=True)[0]
        order_N = kept_N[torch.argsort(plan.expert_A[kept_N], stable=True)]
        return order_N, plan.kept_per_expert(num_experts)

    def _combine_sorted(self, plan: _Plan, order_N: torch.Tensor, y_rows_ND: torch.Tensor, num_tokens: int) -> torch.Tensor:
        if plan.top_k is not None:
            # Back into [T, K] (dropped choices stay zero), then a fixed-order weighted sum over K:
            # bitwise deterministic on any device (moe/permute.py).
            return combine_in_token_order(y_rows_ND, order_N, plan.weight_A.view(num_tokens, plan.top_k))
        return combine_rows(y_rows_ND, plan.token_A[order_N], plan.weight_A[order_N], num_tokens)

    def _experts_fixed_layout(self, x_TD: torch.Tensor, plan: _Plan, weights: ExpertWeights) -> torch.Tensor:
        """Equal-sized [E*C] slot buffers, one fixed-shape all-to-all each way across ranks (none at
        one rank); expert choice's full slots through batched GEMMs on [e, ep*C, D], token choice's
        filled slots through the grouped GEMM (`_filled_slots_only`) where it runs, else through the
        batched GEMMs too. No host sync on a GPU."""
        num_experts, capacity = self.config.num_experts, plan.capacity
        assert capacity is not None
        if plan.top_k is not None:
            assert plan.slot_A is not None
            buffer_SD = rows_to_slots(x_TD, plan.slot_A, plan.top_k, num_experts * capacity)
        else:
            # Expert choice: assignment a is slot a (expert-major, C per expert). A row removed by
            # the per-token cap still runs, with weight 0: no mask, so no sync and one copy.
            buffer_SD = x_TD.index_select(0, plan.token_A)
        received_SD = all_to_all_slots(buffer_SD, self.ep_group, self.ep_size)
        if plan.top_k is not None and padding_rows_cost_nothing(received_SD, weights[0], weights[2]):
            y_local_SD = self._filled_slots_only(received_SD, plan, weights)
        else:
            # Expert choice fills every slot (C per expert); and where the grouped GEMM cannot skip
            # empty slots without a host sync, computing them is cheaper: one batched GEMM per projection.
            ep, e, dim = self.ep_size, self.num_local_experts, x_TD.shape[-1]
            per_expert_eND = received_SD.view(ep, e, capacity, dim).transpose(0, 1).reshape(e, ep * capacity, dim)
            out_eND = run_sharded(
                lambda rows: swiglu_capacity(rows, *weights),
                per_expert_eND, self.tensor_parallel_group,
            )
            y_local_SD = out_eND.view(e, ep, capacity, dim).transpose(0, 1).reshape(ep * e * capacity, dim)
        y_SD = all_to_all_slots(y_local_SD, self.ep_group, self.ep_size)
        num_tokens = x_TD.shape[0]
        if plan.top_k is not None:
            slot_TK = plan.slot_A.view(num_tokens, plan.top_k)
            return combine_from_slots(y_SD, slot_TK, plan.weight_A.view(num_tokens, plan.top_k))
        return combine_rows(y_SD, plan.token_A, plan.weight_A, num_tokens)

    def _filled_slots_only(self, received_SD: torch.Tensor, plan: _Plan, weights: ExpertWeights) -> torch.Tensor:
        """Token choice's received slots through the experts, the empty ones skipped: at a capacity
        factor of 1.25 at least a fifth of the slots are empty, and with drops more (a third on the
        smoke model), which a batched GEMM over every slot would compute for nothing. The filled
        slots go first, grouped by local expert, and the empty ones become padding rows the grouped
        GEMM skips; the counts that say which are which come in one small all-to-all beside the
        slots, on the device. Returns outputs in the received slot order (empty slots zero)."""
        counts_Re = exchange_counts(plan.kept_per_expert(self.config.num_experts), self.ep_group, self.ep_size)
        order_S, destination_S, rows_e = filled_slots_first(counts_Re, plan.capacity)
        out_SD = run_sharded(
            lambda rows: swiglu_grouped(rows, rows_e, *weights, padded=True),
            permute_rows(received_SD, order_S), self.tensor_parallel_group,
        )
        return permute_rows(out_SD, destination_S)

    def _experts_variable_all_to_all(self, rows_ND: torch.Tensor, counts_E: torch.Tensor, weights: ExpertWeights) -> torch.Tensor:
        """Dropless across ranks: all-to-all-v sends each rank exactly its experts' rows."""
        exchange = VariableExchange(counts_E, self.ep_group, self.ep_size)
        received_MD = exchange.send(rows_ND)
        local_order_M, local_counts_e = exchange.received_by_local_expert()
        y_sorted_MD = run_sharded(
            lambda rows: swiglu_grouped(rows, local_counts_e, *weights),
            received_MD[local_order_M], self.tensor_parallel_group,
        )
        y_received_MD = torch.empty_like(y_sorted_MD).index_copy(0, local_order_M, y_sorted_MD)
        return exchange.send_back(y_received_MD)

    def _aux(self, plan: _Plan, num_tokens: int) -> MoEAux:
        cfg = self.config
        with torch.no_grad():
            routed_E = count_per_bin(plan.expert_A, cfg.num_experts)
            if isinstance(self.router, TokenChoiceRouter) and self.router.gathers_statistics:
                self.router.record_routed(routed_E)
            kept_E = plan.kept_per_expert(cfg.num_experts)
            per_token = count_per_bin(plan.token_A, num_tokens, where=plan.kept_A)
            histogram = count_per_bin(per_token, cfg.num_experts + 1)  # a token has at most E experts
            probs = plan.probs_TE.clamp_min(1e-20)
            entropy_sum = -(probs * probs.log()).sum()
        return MoEAux(
            loss=cfg.aux_loss_coef * plan.balance_loss + cfg.z_loss_coef * plan.z_loss,
            load_balancing_loss=plan.balance_loss.detach(),
            z_loss=plan.z_loss.detach(),
            routed_E=routed_E,
            kept_E=kept_E,
            experts_per_token=histogram,
            entropy_sum=entropy_sum,
            capacity=plan.capacity,
        )
