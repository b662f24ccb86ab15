"""The MoE layer against the slow per-token reference: outputs and every gradient."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_by_norm

from moe import MoEConfig, MoELayer, SwiGLUExpert
from moe.dispatch import assign_slots, expert_capacity
from moe.reference import reference_token_choice

HIDDEN, EXPERT_HIDDEN = 16, 24


def _layer(num_experts=4, top_k=2, capacity_factor=1.25, eval_capacity_factor=None, seed=0, **kw) -> MoELayer:
    cfg = MoEConfig(num_experts=num_experts, top_k=top_k, capacity_factor=capacity_factor,
                    eval_capacity_factor=eval_capacity_factor, min_capacity=0, **kw)
    return MoELayer(HIDDEN, EXPERT_HIDDEN, cfg, layer_index=0, seed=seed).double()


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("capacity_factor", [None, 0.5, 1.0, 2.0])
def test_layer_equals_per_token_reference(top_k, capacity_factor):
    torch.manual_seed(top_k)
    layer = _layer(top_k=top_k, capacity_factor=capacity_factor)
    x = torch.randn(3, 11, HIDDEN, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(3, 11, HIDDEN, dtype=torch.float64)

    y, aux = layer(x)
    (y * grad_out).sum().backward()
    fast_dx, fast_grads = x.grad.clone(), _grads(layer)
    x.grad = None
    layer.zero_grad()

    tokens = 33
    capacity = None if capacity_factor is None else expert_capacity(tokens, 4, top_k, capacity_factor, 0)
    y_ref, kept = reference_token_choice(
        x.reshape(-1, HIDDEN), layer.router.weight, list(layer.local_experts), top_k, capacity, normalize_topk=True
    )
    (y_ref.view_as(y) * grad_out).sum().backward()

    # The router runs in fp32 by design, so agreement is to fp32 precision, not fp64.
    assert_close_by_norm(y, y_ref.view_as(y), 1e-6, "y")
    assert_close_by_norm(fast_dx, x.grad, 1e-6, "gradient of x")
    ref_grads = _grads(layer)
    assert fast_grads.keys() == ref_grads.keys()
    assert any("gate" in name for name in fast_grads) and any("experts" in name for name in fast_grads)
    for name in ref_grads:
        assert_close_by_norm(fast_grads[name], ref_grads[name], 1e-6, f"gradient of {name}")
    assert int(aux.kept_E.sum()) == sum(sum(row) for row in kept)
    if capacity_factor is None:
        assert torch.equal(aux.kept_E, aux.routed_E)


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0])
def test_fp32_capacity_layer_on_the_grouped_gemm_equals_reference(capacity_factor):
    """fp32 takes torch._grouped_mm where this torch has it (fp64 above takes the loop): dropped
    assignments then ride along as padding rows past the last offset, which the GEMM leaves
    uninitialised, so their zero output and zero gradient are checked through the whole layer."""
    from moe.grouped_experts import grouped_mm_available, stack_expert_weights, uses_grouped_mm

    if not grouped_mm_available("cpu", torch.float32):
        pytest.skip("this torch has no CPU torch._grouped_mm")
    torch.manual_seed(3)
    layer = _layer(top_k=2, capacity_factor=capacity_factor).float()
    x = torch.randn(3, 11, HIDDEN, requires_grad=True)
    w1, _, w2 = stack_expert_weights(layer.local_experts)
    assert uses_grouped_mm(torch.empty(33 * 2, HIDDEN), w1, w2), "this test is about the grouped-GEMM path"
    grad_out = torch.randn(3, 11, HIDDEN)
    y, aux = layer(x)
    (y * grad_out).sum().backward()
    fast_dx, fast_grads = x.grad.clone(), _grads(layer)
    x.grad = None
    layer.zero_grad()
    assert int(aux.kept_E.sum()) < int(aux.routed_E.sum()), "the capacity should drop some assignments"

    capacity = expert_capacity(33, 4, 2, capacity_factor, 0)
    y_ref, _ = reference_token_choice(x.reshape(-1, HIDDEN), layer.router.weight, list(layer.local_experts), 2,
                                      capacity, normalize_topk=True)
    (y_ref.view_as(y) * grad_out).sum().backward()
    assert_close_by_norm(y, y_ref.view_as(y), 1e-5, "y")
    assert_close_by_norm(fast_dx, x.grad, 1e-5, "gradient of x")
    ref_grads = _grads(layer)
    assert fast_grads.keys() == ref_grads.keys() and len(ref_grads) > 1
    for name, ref in ref_grads.items():
        assert_close_by_norm(fast_grads[name], ref, 1e-5, f"gradient of {name}")


def test_one_expert_top1_equals_dense_ffn():
    layer = _layer(num_experts=1, top_k=1, capacity_factor=None)
    dense = SwiGLUExpert(HIDDEN, EXPERT_HIDDEN).double()
    dense.load_state_dict(layer.local_experts[0].state_dict())
    x = torch.randn(2, 7, HIDDEN, dtype=torch.float64, requires_grad=True)
    y, _ = layer(x)
    grad = torch.randn_like(y)
    (y * grad).sum().backward()
    dx = x.grad.clone()
    x.grad = None
    y_dense = dense(x)
    (y_dense * grad).sum().backward()
    torch.testing.assert_close(y, y_dense, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dx, x.grad, rtol=1e-12, atol=1e-12)
    for name, param in dense.named_parameters():
        expert_param = dict(layer.local_experts[0].named_parameters())[name]
        torch.testing.assert_close(expert_param.grad, param.grad, rtol=1e-12, atol=1e-12)


def test_experts_start_different_and_layout_independent():
    layer = _layer(num_experts=4, seed=3)
    weights = [e.w1.weight for e in layer.local_experts]
    for i in range(len(weights)):
        for j in range(i + 1, len(weights)):
            assert not torch.equal(weights[i], weights[j])
    again = _layer(num_experts=4, seed=3)
    for a, b in zip(layer.local_experts, again.local_experts, strict=False):
        assert torch.equal(a.w2.weight, b.w2.weight)
    assert not torch.equal(_layer(num_experts=4, seed=4).local_experts[0].w1.weight, weights[0])


def test_expert_parameters_are_marked_for_deepspeed():
    layer = _layer()
    for name, param in layer.named_parameters():
        is_expert = "deepspeed_experts" in name
        assert getattr(param, "allreduce", True) is (not is_expert), name
        if is_expert:
            assert param.group_name == "ep_size_1"


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_slots_never_exceed_capacity_and_keep_first_choices_first(top_k):
    torch.manual_seed(0)
    num_experts, tokens, capacity = 4, 50, 7
    idx = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(tokens)])
    slots = assign_slots(idx, num_experts, capacity)
    kept = slots[slots >= 0]
    assert kept.unique().numel() == kept.numel(), "two choices share a slot"
    per_expert = torch.bincount(kept // capacity, minlength=num_experts)
    assert (per_expert <= capacity).all()
    assert torch.equal(kept // capacity, idx[slots >= 0]), "a choice landed in another expert's slots"
    # An expert that dropped anything is full, and never took a later-round choice before an earlier one.
    for e in range(num_experts):
        dropped = (idx == e) & (slots < 0)
        if dropped.any():
            assert per_expert[e] == capacity
            worst_kept_round = max(int(k) for k in torch.nonzero((idx == e) & (slots >= 0))[:, 1])
            best_dropped_round = min(int(k) for k in torch.nonzero(dropped)[:, 1])
            assert worst_kept_round <= best_dropped_round


def test_dropless_drops_nothing_and_eval_is_deterministic():
    layer = _layer(capacity_factor=0.25, eval_capacity_factor=None)
    x = torch.randn(4, 9, HIDDEN, dtype=torch.float64)
    layer.train()
    _, aux_train = layer(x)
    assert aux_train.kept_E.sum() < aux_train.routed_E.sum(), "cf 0.25 should drop in training"
    layer.eval()
    y1, aux1 = layer(x)
    y2, _ = layer(x)
    assert torch.equal(aux1.kept_E, aux1.routed_E)
    assert torch.equal(y1, y2)


def test_an_input_without_tokens_is_refused_by_name():
    for overrides in ({"capacity_factor": None}, {"capacity_factor": 1.0}, {"router": "expert_choice", "capacity_factor": 2.0}):
        layer = MoELayer(HIDDEN, EXPERT_HIDDEN, MoEConfig(num_experts=4, top_k=2, **overrides), seed=1)
        with pytest.raises(ValueError, match=r"MoELayer: the input \(2, 0, 16\) holds no tokens"):
            layer(torch.randn(2, 0, HIDDEN))


def test_capacity_formula():
    assert expert_capacity(100, 8, 2, 1.25, 4) == 32  # ceil(2 * 100 * 1.25 / 8) = 31.25 -> 32
    assert expert_capacity(10, 8, 1, 1.0, 4) == 4  # min_capacity wins
    assert expert_capacity(3, 2, 2, 4.0, 0) == 3  # never more than T
    # Whole numbers computed in floating point: 1 x 100 x 1.1 / 11 is 10.000000000000002, and the
    # capacity factor as written gives 10 slots, not 11.
    assert expert_capacity(100, 11, 1, 1.1, 0) == 10 and expert_capacity(1000, 7, 1, 0.7, 0) == 100
    from moe.expert_choice import group_capacity

    assert group_capacity(100, 11, 1.1, 0) == 10 and group_capacity(64, 8, 2.0, 0) == 16
    assert group_capacity(100, 8, 1.25, 0) == 16  # 15.625 -> 16


def test_packed_experts_stack_as_a_view_and_stay_live():
    """pack_expert_weights (inference): the same outputs; the per-forward stack shares the experts'
    storage (no copy of every expert per generated token, and no second copy kept either); a later
    in-place change is seen, and gradients still reach each expert."""
    from moe.expert_storage import evenly_spaced

    torch.manual_seed(0)
    layer = _layer(capacity_factor=None).eval()
    x = torch.randn(2, 7, HIDDEN, dtype=torch.float64)
    with torch.no_grad():
        before = layer(x)[0]
    w2_object = layer.local_experts[0].w2.weight
    layer.pack_expert_weights()
    assert layer.local_experts[0].w2.weight is w2_object
    assert evenly_spaced([e.w1.weight for e in layer.local_experts]) is not None
    w1_eDF, _, _ = layer._expert_weights()
    assert w1_eDF.untyped_storage().data_ptr() == layer.local_experts[0].w1.weight.untyped_storage().data_ptr()
    with torch.no_grad():
        assert torch.equal(layer(x)[0], before)
        layer.local_experts[0].w2.weight.mul_(2.0)
        assert not torch.equal(layer(x)[0], before)
    layer(x)[0].sum().backward()
    assert all(e.w2.weight.grad is not None for e in layer.local_experts)


@pytest.mark.parametrize(("router", "scope"),
                         [("token_choice", "micro_batch"), ("token_choice", "global"), ("expert_choice", "micro_batch")])
def test_auxiliary_loss_equals_its_formula_in_value_and_router_gradient(router, scope):
    """aux.loss = aux_loss_coef * E * sum_e f_e * P_e + z_loss_coef * mean_t(logsumexp_e(x W^T)^2),
    computed here by hand from the router weight: f_e the share of the T*K assignments choosing e
    (micro_batch) or the layer's previous-step fractions (global); expert choice has no balancing term."""
    torch.manual_seed(5)
    top_k, num_experts = 2, 4
    layer = _layer(num_experts=num_experts, top_k=top_k, capacity_factor=2.0, router=router,
                   aux_loss_scope=scope, aux_loss_coef=0.3 if router == "token_choice" else 0.0, z_loss_coef=0.05)
    if scope == "global":  # a previous step's load, not the uniform start, so f is visibly the buffer's
        layer.router.balance_fraction.copy_(torch.tensor([0.4, 0.3, 0.2, 0.1]))
    x = torch.randn(2, 9, HIDDEN, dtype=torch.float64)
    _, aux = layer(x)
    aux.loss.backward()
    fast_grad = layer.router.weight.grad.clone()

    weight = layer.router.weight.detach().clone().requires_grad_(True)
    logits = x.reshape(-1, HIDDEN).float() @ weight.float().t()
    probs = torch.softmax(logits, dim=-1)
    expected = 0.05 * (torch.logsumexp(logits, dim=-1) ** 2).mean()
    if router == "token_choice":
        if scope == "global":
            fraction = layer.router.balance_fraction.clone()
        else:
            chosen = probs.detach().topk(top_k, dim=-1).indices.reshape(-1).tolist()
            fraction = torch.tensor([chosen.count(e) / len(chosen) for e in range(num_experts)])
        expected = expected + 0.3 * num_experts * (fraction * probs.mean(dim=0)).sum()
    expected.backward()

    assert float(expected) > 0.05
    torch.testing.assert_close(aux.loss.float(), expected.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(fast_grad.float(), weight.grad.float(), rtol=1e-5, atol=1e-7)
    assert fast_grad.abs().max() > 1e-3  # the comparison is of gradients that matter
