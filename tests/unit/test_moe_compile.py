"""`MoELayer.compile_forward`: the compiled layer against the eager one (outputs, every gradient, the
routers' step statistics), and one graph without host syncs in bf16, the GPU's training dtype.

Inductor compiles on the CPU too, so these run everywhere; each compile takes seconds, hence `slow`.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_by_norm

from moe import MoEConfig, MoELayer
from moe.grouped_experts import grouped_mm_available

HIDDEN, EXPERT_HIDDEN, EXPERTS = 32, 64, 8  # 8 experts or more: where inductor miscompiled expert choice

MODES = {
    "dropless": {"top_k": 2, "capacity_factor": None},
    "capacity": {"top_k": 2, "capacity_factor": 1.0},  # with drops
    "capacity-probability-bias": {"top_k": 2, "capacity_factor": 1.0, "drop_policy": "probability", "bias_update_rate": 0.01},
    "expert-choice": {"router": "expert_choice", "capacity_factor": 2.0, "ec_group": "batch"},
    "expert-choice-sequence-capped": {"router": "expert_choice", "capacity_factor": 2.0, "ec_group": "sequence",
                                      "ec_max_experts_per_token": 2},
}  # fmt: skip


def _layer(dtype: torch.dtype, device: str = "cpu", **overrides) -> MoELayer:
    cfg = MoEConfig(**{"num_experts": EXPERTS, "min_capacity": 0, **overrides})
    torch.manual_seed(0)  # the router's weight; the experts draw from `seed`
    layer = MoELayer(HIDDEN, EXPERT_HIDDEN, cfg, seed=3).to(device, dtype).train()
    layer.pack_expert_weights()
    return layer


def _step(layer: MoELayer, x: torch.Tensor, grad_out: torch.Tensor, forward=None):
    """Output, aux loss, counts, every gradient and the router's pending statistics after one
    forward (`layer(x)`, or `forward(x)` calling it) and backward."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    grad_out = grad_out.to(x.device)
    y, aux = (forward or layer)(x)
    ((y.float() * grad_out).sum() + aux.loss).backward()
    grads = {name: p.grad.detach().clone() for name, p in layer.named_parameters()}
    statistics = layer.router.pending_statistics().clone()
    return y.detach(), aux.loss.detach(), aux.kept_E.clone(), x.grad.detach().clone(), grads, statistics


def _assert_matches(eager, compiled, rtol: float) -> None:
    """Compared relative to each tensor's norm, with no absolute floor: the outputs are small (of order
    1e-3 at this init), so an absolute tolerance would pass a compiled layer that gave zeros; and bf16
    rounds single elements of a sum differently once fused."""
    y_e, loss_e, kept_e, dx_e, grads_e, stats_e = eager
    y_c, loss_c, kept_c, dx_c, grads_c, stats_c = compiled
    assert torch.equal(kept_c, kept_e), "the compiled router kept other assignments"
    torch.testing.assert_close(stats_c, stats_e, rtol=1e-6, atol=1e-9)
    for name, want, got in [("y", y_e, y_c), ("aux loss", loss_e, loss_c), ("gradient of x", dx_e, dx_c),
                            *((f"gradient of {name}", grads_e[name], grads_c[name]) for name in grads_e)]:
        assert_close_by_norm(got, want, rtol, name)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_compiled_layer_equals_eager_in_fp32(mode):
    """fp32 on the CPU: the grouped GEMM is left to eager here (torch traces it for bf16 only),
    everything else compiles; the result equals eager's to rounding."""
    torch._dynamo.reset()
    eager, compiled = _layer(torch.float32, **MODES[mode]), _layer(torch.float32, **MODES[mode])
    compiled.compile_forward()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 32, HIDDEN, generator=generator)
    grad_out = torch.randn(2, 32, HIDDEN, generator=generator)
    for _ in range(2):  # the second call runs the cached graphs
        _assert_matches(_step(eager, x, grad_out), _step(compiled, x, grad_out), rtol=1e-5)
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("mode", ["dropless", "capacity", "expert-choice"])
def test_bf16_layer_compiles_to_one_graph_and_equals_eager(mode, device):
    """bf16 (the GPU's training dtype): `fullgraph=True` fails on any graph break, so a training
    forward of the layer is one graph with no value read to the host; and it equals eager's. On a
    GPU (`make bench-gpu`) inductor generates Triton kernels and may lower the grouped GEMM itself."""
    if not grouped_mm_available(device, torch.bfloat16):
        pytest.skip(f"this torch has no bf16 torch._grouped_mm on {device}")
    torch._dynamo.reset()
    eager, compiled = _layer(torch.bfloat16, device, **MODES[mode]), _layer(torch.bfloat16, device, **MODES[mode])
    compiled.compile_forward(fullgraph=True)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 32, HIDDEN, generator=generator).to(device, torch.bfloat16)
    grad_out = torch.randn(2, 32, HIDDEN, generator=generator)
    _assert_matches(_step(eager, x, grad_out), _step(compiled, x, grad_out), rtol=2e-2)
    torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_expert_choice_causal_evaluation_equals_eager():
    """Expert choice's causal mode routes a variable number of assignments (a host read, so a
    graph break): compiled, it still gives eager's outputs."""
    torch._dynamo.reset()
    config = {**MODES["expert-choice"], "ec_eval_mode": "causal"}
    eager, compiled = _layer(torch.float32, **config), _layer(torch.float32, **config)
    thresholds = torch.full((EXPERTS,), 0.25)
    for layer in (eager, compiled):
        layer.router.threshold.copy_(thresholds)
        layer.router.threshold_ready.fill_(1.0)
        layer.eval()
    compiled.compile_forward()
    x = torch.randn(2, 32, HIDDEN, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y_eager, aux_eager = eager(x)
        y_compiled, aux_compiled = compiled(x)
    assert torch.equal(aux_compiled.kept_E, aux_eager.kept_E)
    assert_close_by_norm(y_compiled, y_eager, 1e-5, "y")
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["capacity-probability-bias", "expert-choice"])
def test_compiled_layer_under_activation_checkpointing_counts_statistics_once(mode):
    """A checkpointed block runs the compiled layer again in the backward pass, inside
    `recomputing()`: dynamo guards on that flag (a second graph for the recomputation), so the router's
    step statistics are counted once, as by the eager layer without checkpointing, and the gradients
    are the eager ones. Both modes keep step statistics (bias balancing; expert choice's thresholds)."""
    from moe.router_state import is_recomputing
    from train.activation_checkpointing import checkpointed_block

    torch._dynamo.reset()
    eager, compiled = _layer(torch.float32, **MODES[mode]), _layer(torch.float32, **MODES[mode])
    compiled.compile_forward()
    passes: list[bool] = []  # one entry per forward of the compiled layer: recomputing or not
    compiled.register_forward_pre_hook(lambda module, args: passes.append(is_recomputing()))
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(2, 32, HIDDEN, generator=generator)
    grad_out = torch.randn(2, 32, HIDDEN, generator=generator)
    for _ in range(2):  # the statistics accumulate: a double count would show on either pass
        checkpointed = _step(compiled, x, grad_out, forward=lambda x: checkpointed_block(compiled, x))
        _assert_matches(_step(eager, x, grad_out), checkpointed, rtol=1e-5)
    # The comparison is not vacuous: the backward really ran the compiled layer again, flagged.
    assert passes == [False, True, False, True]
    torch._dynamo.reset()
