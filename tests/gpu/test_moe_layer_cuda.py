"""The MoE layer on a CUDA device against the per-token reference (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_by_norm

from moe import MoEConfig, MoELayer
from moe.dispatch import expert_capacity
from moe.expert_choice import group_capacity
from moe.reference import reference_expert_choice, reference_threshold_routing, reference_token_choice
from moe.router_state import update_routing_state

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _full_fp32_matmuls():
    """The comparisons below are tight: fp32 matmuls in full precision, never TF32, whatever set it."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


def _parameter_grads(layer: MoELayer) -> dict[str, torch.Tensor]:
    """Every parameter's gradient; zeros for one that got none (an expert no token reached may get no
    gradient on one path and zeros on the other)."""
    return {name: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for name, p in layer.named_parameters()}


def _assert_equals_reference(layer: MoELayer, x: torch.Tensor, reference_fn) -> None:
    """Output, input gradient and every parameter gradient of layer(x) against reference_fn(x [T, D])
    on the same device, each relative to its norm: the outputs are of order 1e-3 at this init, so an
    absolute tolerance would pass nearly anything."""
    y, _ = layer(x)
    grad = torch.randn_like(y)
    (y * grad).sum().backward()
    fast = {"x": x.grad.clone(), **_parameter_grads(layer)}
    x.grad = None
    layer.zero_grad(set_to_none=True)
    y_ref = reference_fn(x.reshape(-1, x.shape[-1])).view_as(y)
    (y_ref * grad).sum().backward()
    reference = {"x": x.grad, **_parameter_grads(layer)}
    for part in ("gate", "experts"):  # the comparison is of gradients that exist
        assert any(part in name and g.norm() > 0 for name, g in reference.items()), part
    for name, want, got in [("y", y_ref, y), *((f"gradient of {name}", reference[name], fast[name]) for name in reference)]:
        assert_close_by_norm(got, want, 1e-4, name)


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_cuda_layer_equals_reference_fp32(capacity_factor):
    torch.manual_seed(0)
    layer = MoELayer(64, 96, MoEConfig(num_experts=8, top_k=2, capacity_factor=capacity_factor, min_capacity=0)).cuda()
    x = torch.randn(4, 32, 64, device="cuda", requires_grad=True)
    capacity = None if capacity_factor is None else expert_capacity(128, 8, 2, capacity_factor, 0)
    _assert_equals_reference(layer, x, lambda x_TD: reference_token_choice(
        x_TD, layer.router.weight, list(layer.local_experts), 2, capacity, True)[0])


@pytest.mark.parametrize("group, cap", [("batch", None), ("sequence", 1)])
def test_cuda_expert_choice_equals_reference_fp32(group, cap):
    """Expert choice's fixed layout on the GPU (top-C per expert, torch.bmm, index_add combine)."""
    torch.manual_seed(0)
    config = MoEConfig(num_experts=8, router="expert_choice", capacity_factor=2.0, ec_group=group,
                       ec_max_experts_per_token=cap, min_capacity=0)
    layer = MoELayer(64, 96, config).cuda()
    x = torch.randn(4, 32, 64, device="cuda", requires_grad=True)
    group_size = 128 if group == "batch" else 32
    capacity = group_capacity(group_size, 8, 2.0, 0)
    _assert_equals_reference(layer, x, lambda x_TD: reference_expert_choice(
        x_TD, layer.router.weight, list(layer.local_experts), group_size, capacity, cap)[0])


def test_cuda_expert_choice_causal_mode_equals_threshold_reference():
    """Generation's routing: per-expert thresholds learnt in training, a variable number of rows per
    expert through the grouped GEMM (dropless)."""
    torch.manual_seed(0)
    config = MoEConfig(num_experts=8, router="expert_choice", capacity_factor=2.0, ec_eval_mode="causal", min_capacity=0)
    layer = MoELayer(64, 96, config).cuda().train()
    for seed in range(3):
        layer(torch.randn(4, 32, 64, device="cuda", generator=torch.Generator("cuda").manual_seed(seed)))
        update_routing_state(layer)
    layer.eval()
    x = torch.randn(2, 16, 64, device="cuda", requires_grad=True)
    _assert_equals_reference(layer, x, lambda x_TD: reference_threshold_routing(
        x_TD, layer.router.weight, list(layer.local_experts), layer.router.threshold))


def test_cuda_bf16_layer_runs_with_fp32_router():
    layer = MoELayer(64, 96, MoEConfig(num_experts=8, top_k=2)).cuda().bfloat16()
    x = torch.randn(2, 16, 64, device="cuda", dtype=torch.bfloat16)
    y, aux = layer(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    assert aux.load_balancing_loss.dtype == torch.float32


SYNC_FREE_MODES = {
    "dropless": dict(top_k=2, capacity_factor=None),
    "capacity": dict(top_k=2, capacity_factor=1.0),
    "expert-choice": dict(router="expert_choice", capacity_factor=2.0),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("mode", SYNC_FREE_MODES.values(), ids=SYNC_FREE_MODES.keys())
def test_cuda_training_step_never_waits_for_the_gpu(mode, dtype):
    """Token choice (dropless and with a capacity) and expert choice at ep=1: forward, statistics
    and backward without one device-to-host sync (moe/counting.py replaces bincount, dropped
    assignments are padding rows the grouped GEMM skips, expert choice runs in its fixed layout).
    The first call is outside the check: it probes once whether torch._grouped_mm runs here."""
    from moe.grouped_experts import grouped_mm_available

    if mode.get("router") != "expert_choice" and dtype != torch.bfloat16:
        # The grouped GEMM's fast kernel (sm90) takes bf16; for fp32 torch falls back to a loop that
        # reads the group offsets to the host. Training runs in bf16 on a GPU.
        pytest.skip("torch._grouped_mm's fp32 fallback on CUDA reads its offsets to the host")
    layer = MoELayer(64, 96, MoEConfig(num_experts=8, min_capacity=0, **mode)).cuda().to(dtype).train()
    x = torch.randn(4, 32, 64, device="cuda", dtype=dtype, requires_grad=True)
    grad = torch.randn(4, 32, 64, device="cuda", dtype=dtype)
    y_first, _ = layer(x)
    y_first.backward(grad)
    torch.cuda.synchronize()
    if mode.get("router") != "expert_choice" and not grouped_mm_available("cuda", dtype):
        pytest.skip(f"torch._grouped_mm does not run {dtype} on this GPU: the per-expert loop sizes its chunks on the host")
    torch.cuda.set_sync_debug_mode("error")
    try:
        y, aux = layer(x)
        (y.float() * grad.float()).sum().add(aux.loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    # The same inputs again: the same outputs (expert choice's index_add may order its sums differently).
    torch.testing.assert_close(y, y_first, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)
    assert torch.isfinite(x.grad.float()).all()
    if mode.get("capacity_factor", 0) is None:
        assert int(aux.kept_E.sum()) == int(aux.routed_E.sum()) == 4 * 32 * 2
    else:
        assert 0 < int(aux.kept_E.sum()) <= int(aux.routed_E.sum())
