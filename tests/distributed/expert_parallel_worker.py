"""One rank of the expert-parallel oracle check (run by test_expert_parallel.py, 2 processes, every
case in one launch).

    expert_parallel_worker.py CASE...      CASE: CAPACITY_FACTOR:TOP_K:ROUTER:DTYPE, e.g. none:2:token_choice:float64

The ep_size=2 layer, whose all-to-all exchanges capacity slots over gloo, must equal an
ep_size=1 layer holding all experts: outputs, input gradients, expert gradients (each rank's
local experts receive the gradient of both ranks' tokens) and the router gradient summed
over ranks.
"""

from __future__ import annotations

import sys

import deepspeed
import deepspeed.ops
import torch
import torch.distributed as dist

from moe import MoEConfig, MoELayer
from train.distributed import close_world

HIDDEN, EXPERT_HIDDEN, EXPERTS = 16, 24, 4


def check(capacity_factor: float | None, top_k: int, router: str, dtype: torch.dtype) -> None:
    """One case, on fresh layers. float64 compares to 1e-6 whatever the summation order; float32 takes
    torch._grouped_mm on the CPU where float64 takes the per-expert loop."""
    rank = dist.get_rank()
    common = dict(num_experts=EXPERTS, top_k=top_k, capacity_factor=capacity_factor, min_capacity=0)
    causal = router == "expert_choice_causal"
    if router.startswith("expert_choice"):
        common.update(router="expert_choice", eval_capacity_factor=None)
    torch.manual_seed(0)
    parallel = MoELayer(HIDDEN, EXPERT_HIDDEN, MoEConfig(ep_size=2, **common), seed=7).to(dtype)
    parallel.set_deepspeed_parallelism()
    whole = MoELayer(HIDDEN, EXPERT_HIDDEN, MoEConfig(ep_size=1, **common), seed=7).to(dtype)
    whole.router.weight.data.copy_(parallel.router.weight.data)
    if causal:
        # Causal expert choice runs in eval mode, dropless through the all-to-all-v.
        for layer in (parallel, whole):
            layer.router.threshold.copy_(torch.tensor([0.3, 0.25, 0.2, 0.28]))
            layer.router.threshold_ready.fill_(1.0)
            layer.eval()

    inputs = [torch.randn(2, 9, HIDDEN, dtype=dtype, generator=torch.Generator().manual_seed(r)) for r in (0, 1)]
    grads = [torch.randn(2, 9, HIDDEN, dtype=dtype, generator=torch.Generator().manual_seed(10 + r)) for r in (0, 1)]
    rtol = 1e-6 if dtype == torch.float64 else 1e-5

    def assert_close(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
        # Relative to the norm: the values are of order 1e-4 at this init, below any useful absolute tolerance.
        error = (got - want).norm() / want.norm().clamp_min(1e-30)
        assert error <= rtol, f"rank {rank}, {name}: relative error {error:.2e}"

    x = inputs[rank].clone().requires_grad_(True)
    y, aux = parallel(x)
    (y * grads[rank]).sum().backward()

    x_refs = [t.clone().requires_grad_(True) for t in inputs]
    y_refs = [whole(t)[0] for t in x_refs]
    sum((yr * g).sum() for yr, g in zip(y_refs, grads, strict=False)).backward()

    # Summed before any check, so that a failing check cannot leave the other rank in a collective.
    router_grad = parallel.router.weight.grad.clone()
    dist.all_reduce(router_grad)
    assert_close(y, y_refs[rank], "y")
    assert_close(x.grad, x_refs[rank].grad, "gradient of x")
    local = parallel.num_local_experts
    assert local == EXPERTS // 2
    for i, expert in enumerate(parallel.local_experts):
        reference = whole.local_experts[rank * local + i]
        for name, param in expert.named_parameters():
            ref_param = dict(reference.named_parameters())[name]
            assert torch.equal(param.data, ref_param.data), f"global expert {rank * local + i} initialised differently"
            assert_close(param.grad, ref_param.grad, f"gradient of expert {rank * local + i} {name}")
    assert_close(router_grad, whole.router.weight.grad, "gradient of the router")
    if capacity_factor is None or causal:
        assert torch.equal(aux.kept_E, aux.routed_E)


def main(cases: list[str]) -> None:
    """Every case in one world (one start-up for all): CASE is CAPACITY_FACTOR:TOP_K:ROUTER:DTYPE."""
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    rank = dist.get_rank()
    for case in cases:
        capacity_factor, top_k, router, dtype = case.split(":")
        check(None if capacity_factor == "none" else float(capacity_factor), int(top_k), router, getattr(torch, dtype))
        dist.barrier()
        print(f"rank {rank}: ok {case}", flush=True)
    close_world()


if __name__ == "__main__":
    main(sys.argv[1:])
