"""Router state that changes once per optimizer step, not by gradient.

Aux-loss-free bias balancing, the lagged expert fractions of the global load-balancing loss,
and expert choice's causal thresholds all follow one pattern: statistics accumulate over every
micro-batch of a step, are summed over all data-parallel ranks, and update a buffer once per
optimizer step. Doing it per step (not per micro-batch) is what keeps gradient accumulation
right, and summing over ranks keeps every replica of the router identical.
"""

from __future__ import annotations

import threading

import torch
import torch.distributed as dist
from torch import nn

from moe.config import MoEConfig

# Per thread: autograd may run a checkpointed block's recomputation on its own device thread.
_recompute_state = threading.local()


class recomputing:  # noqa: N801 - used like a function: `with recomputing():`
    """Mark the forward passes inside as recomputations (activation checkpointing runs a block's
    forward a second time during backward): routers then leave their step statistics alone, which
    the first pass already counted. One object may be entered again after it exits (torch's
    checkpoint re-enters its recomputation context when a graph is backwarded more than once)."""

    def __enter__(self) -> None:
        _recompute_state.depth = getattr(_recompute_state, "depth", 0) + 1

    def __exit__(self, *exc_info) -> None:
        _recompute_state.depth -= 1


def is_recomputing() -> bool:
    return getattr(_recompute_state, "depth", 0) > 0


class StepStatefulRouter(nn.Module):
    """What every router shares: the [E, D] scoring weight, fp32 buffers updated once per
    optimizer step, and the gate interface DeepSpeed's MoE expects.

    Subclasses list their step-updated buffers in `FP32_BUFFERS`; those stay fp32 when the
    model is cast to bf16 (DeepSpeed casts every floating buffer along with the weights, and a
    bias nudged by 1e-3 disappears in bf16's 8-bit mantissa). No buffer name may contain
    "expert": DeepSpeed's checkpointing treats such keys inside an MoE layer as expert weights.
    """

    FP32_BUFFERS: tuple[str, ...] = ()

    def __init__(self, hidden_size: int, config: MoEConfig, init_std: float = 0.02) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.num_experts, hidden_size))
        nn.init.normal_(self.weight, std=init_std)
        self.config = config
        self.ep_group = None

    def _set_ep_group(self, ep_group) -> None:
        """Called by `deepspeed.moe.layer.MoE` on its gate when the engine creates the groups."""
        self.ep_group = ep_group

    def _apply(self, fn, recurse: bool = True):
        # Keep fp32 copies from before `fn`: casting back after a bf16 round trip would not
        # restore the values (1/6 is not a bf16 number), only the dtype.
        saved = {name: getattr(self, name).detach().clone() for name in self.FP32_BUFFERS}
        super()._apply(fn, recurse)
        for name, value in saved.items():
            setattr(self, name, value.to(device=getattr(self, name).device, dtype=torch.float32))
        return self

    @property
    def gathers_statistics(self) -> bool:
        """Whether this forward pass counts towards the step's statistics: training, and not a
        recomputation of a pass that was already counted (`recomputing`)."""
        return self.training and not is_recomputing()

    def pending_statistics(self) -> torch.Tensor:
        """This rank's statistics since the last step, flat fp64 (summed over ranks by the caller)."""
        raise NotImplementedError

    def apply_statistics(self, summed: torch.Tensor) -> None:
        """Update the buffers from statistics summed over all ranks, and reset the accumulators."""
        raise NotImplementedError


def update_routing_state(model: nn.Module, group=None) -> None:
    """Call once per optimizer step, on every rank (it all-reduces one small tensor)."""
    routers = [m for m in model.modules() if isinstance(m, StepStatefulRouter)]
    if not routers:
        return
    pending = [r.pending_statistics() for r in routers]
    flat = torch.cat(pending)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(flat, group=group)
    for router, chunk in zip(routers, torch.split(flat, [p.numel() for p in pending])):
        router.apply_statistics(chunk)
