"""Routers against slow loop references (selection, weights, drops, gradients), routing
invariants, split-invariance of the balancing loss, bias balancing, expert choice's causal mode."""

from __future__ import annotations

import pytest
import torch

from moe import MoEConfig, MoELayer
from moe.dispatch import expert_capacity
from moe.expert_choice import group_capacity
from moe.losses import load_balancing_loss, load_balancing_loss_fixed_fraction
from moe.reference import reference_expert_choice, reference_threshold_routing, reference_token_choice
from moe.router_state import update_routing_state

HIDDEN, EXPERT_HIDDEN, EXPERTS = 16, 24, 4


def _layer(**overrides) -> MoELayer:
    cfg = MoEConfig(**{"num_experts": EXPERTS, "min_capacity": 0, **overrides})
    torch.manual_seed(0)
    return MoELayer(HIDDEN, EXPERT_HIDDEN, cfg, seed=1).double()


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


def _compare(layer: MoELayer, x: torch.Tensor, reference_fn) -> None:
    """Outputs, input gradient and every parameter gradient of layer(x) vs reference_fn(x_TD)."""
    grad_out = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(5))
    y, _ = layer(x)
    (y * grad_out).sum().backward()
    fast_dx, fast = x.grad.clone(), _grads(layer)
    x.grad = None
    layer.zero_grad()
    y_ref = reference_fn(x.reshape(-1, x.shape[-1])).view_as(y)
    (y_ref * grad_out).sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fast_dx, x.grad, rtol=1e-6, atol=1e-6)
    slow = _grads(layer)
    assert any("gate" in name for name in slow) and any("deepspeed_experts" in name for name in slow)
    # An expert that got no token has no gradient in the reference and a zero one in the fast
    # path (it ran on empty, zero-filled slots): both mean zero.
    for name, param in layer.named_parameters():
        zero = torch.zeros_like(param)
        torch.testing.assert_close(fast.get(name, zero), slow.get(name, zero), rtol=1e-6, atol=1e-6, msg=name)


# ---------------------------------------------------------------- token choice variants
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("drop_policy", ["position", "probability"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_token_choice_variants_equal_reference(score_func, drop_policy, with_bias):
    layer = _layer(top_k=2, capacity_factor=0.75, score_func=score_func, drop_policy=drop_policy,
                   bias_update_rate=0.01 if with_bias else 0.0, aux_loss_scope="micro_batch")
    bias = torch.tensor([0.3, -0.2, 0.0, 0.1])
    if with_bias:
        layer.router.selection_bias.copy_(bias)
    x = torch.randn(2, 10, HIDDEN, dtype=torch.float64, requires_grad=True)
    capacity = expert_capacity(20, EXPERTS, 2, 0.75, 0)
    _compare(layer, x, lambda x_TD: reference_token_choice(
        x_TD, layer.router.weight, list(layer.local_experts), 2, capacity, True, score_func,
        bias if with_bias else None, drop_policy)[0])


def test_a_learned_bias_routes_with_its_update_rate_at_zero():
    """Resuming or evaluating an aux-loss-free run with moe.bias_update_rate=0 (the bias frozen) must
    route as the run learned to: the bias selects, the rate only moves it."""
    layer = _layer(top_k=2, capacity_factor=None, bias_update_rate=0.0, aux_loss_scope="micro_batch")
    bias = torch.tensor([0.3, -0.2, 0.0, 0.1])
    layer.router.selection_bias.copy_(bias)
    x = torch.randn(2, 10, HIDDEN, dtype=torch.float64, requires_grad=True)
    _compare(layer, x, lambda x_TD: reference_token_choice(
        x_TD, layer.router.weight, list(layer.local_experts), 2, None, True, "softmax", bias)[0])
    update_routing_state(layer)
    assert torch.equal(layer.router.selection_bias, bias.float()), "a rate of 0 leaves the bias where it is"


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("normalize_topk", [True, False])
def test_top1_router_learns_from_the_output(score_func, normalize_topk):
    """At K = 1 the combine weight is the router's score, normalize_topk or not: renormalised it would
    be exactly 1 and the router would get no gradient from the language-model loss."""
    layer = _layer(top_k=1, capacity_factor=None, score_func=score_func, normalize_topk=normalize_topk,
                   aux_loss_coef=0.0, z_loss_coef=0.0)
    x = torch.randn(2, 10, HIDDEN, dtype=torch.float64)
    y, aux = layer(x)
    (y.square().sum() + aux.loss).backward()  # (the auxiliary losses are off: 0)
    router_grad = layer.router.weight.grad
    # ~1e-6 here; with the weight renormalised to 1 it is round-off (~1e-13).
    assert router_grad is not None and router_grad.abs().max() > 1e-9
    # And the layer equals the per-token reference (which keeps the score as the weight too).
    layer = _layer(top_k=1, capacity_factor=0.75, score_func=score_func, normalize_topk=normalize_topk)
    x = torch.randn(2, 10, HIDDEN, dtype=torch.float64, requires_grad=True)
    capacity = expert_capacity(20, EXPERTS, 1, 0.75, 0)
    _compare(layer, x, lambda x_TD: reference_token_choice(
        x_TD, layer.router.weight, list(layer.local_experts), 1, capacity, normalize_topk, score_func)[0])


def test_jitter_only_in_training():
    layer = _layer(top_k=2, capacity_factor=None, eval_capacity_factor=None, jitter_eps=0.2)
    x = torch.randn(30, HIDDEN, dtype=torch.float64)
    layer.eval()
    assert torch.equal(layer(x)[0], layer(x)[0])
    layer.train()
    assert not torch.equal(layer.router(x).probs_TE, layer.router(x).probs_TE)


@pytest.mark.parametrize("router", ["token_choice", "expert_choice"])
def test_routing_is_fp32_under_bf16_autocast(router):
    """Autocast runs linear layers in bf16; the router's logits stay fp32 under it, so a token's
    experts (and expert choice's top-C tokens) are the ones chosen without it."""
    extra = {"capacity_factor": 2.0} if router == "expert_choice" else {"top_k": 2}
    layer = _layer(router=router, **extra).float()
    x = torch.randn(512, HIDDEN, generator=torch.Generator().manual_seed(3))
    plain = layer.router.scores(x) if router == "expert_choice" else layer.router(x).logits_TE
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = layer.router.scores(x) if router == "expert_choice" else layer.router(x).logits_TE
    if router == "expert_choice":
        plain, autocast = plain[1], autocast[1]  # (probs, logits)
    assert autocast.dtype == torch.float32
    assert torch.equal(autocast, plain)


# ---------------------------------------------------------------- expert choice
@pytest.mark.parametrize("group", ["batch", "sequence"])
@pytest.mark.parametrize("cap", [None, 1])
def test_expert_choice_equals_reference(group, cap):
    layer = _layer(router="expert_choice", capacity_factor=2.0, ec_group=group, ec_max_experts_per_token=cap)
    x = torch.randn(3, 8, HIDDEN, dtype=torch.float64, requires_grad=True)
    group_size = 24 if group == "batch" else 8
    capacity = group_capacity(group_size, EXPERTS, 2.0, 0)
    _compare(layer, x, lambda x_TD: reference_expert_choice(
        x_TD, layer.router.weight, list(layer.local_experts), group_size, capacity, cap)[0])


def test_expert_choice_gives_every_expert_exactly_c_tokens():
    layer = _layer(router="expert_choice", capacity_factor=2.0)
    x = torch.randn(2, 16, HIDDEN, dtype=torch.float64)
    _, aux = layer(x)
    capacity = group_capacity(32, EXPERTS, 2.0, 0)
    assert aux.kept_E.tolist() == [capacity] * EXPERTS
    assert int(aux.experts_per_token.sum()) == 32
    assert int((aux.experts_per_token * torch.arange(EXPERTS + 1)).sum()) == capacity * EXPERTS


def _trained_thresholds(layer: MoELayer) -> None:
    layer.train()
    for seed in range(3):
        layer(torch.randn(4, 16, HIDDEN, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
        update_routing_state(layer)
    layer.eval()


def test_expert_choice_causal_mode_equals_threshold_reference_and_is_causal():
    layer = _layer(router="expert_choice", capacity_factor=2.0, ec_eval_mode="causal")
    with pytest.raises(RuntimeError, match="thresholds"):
        layer.eval()
        layer(torch.randn(1, 4, HIDDEN, dtype=torch.float64))
    _trained_thresholds(layer)
    assert float(layer.router.threshold_ready) == 1.0 and (layer.router.threshold > 0).all()
    x = torch.randn(2, 12, HIDDEN, dtype=torch.float64, requires_grad=True)
    _compare(layer, x, lambda x_TD: reference_threshold_routing(
        x_TD, layer.router.weight, list(layer.local_experts), layer.router.threshold))

    with torch.no_grad():
        changed = x.detach().clone()
        changed[:, 6:] = torch.randn(2, 6, HIDDEN, dtype=torch.float64)
        torch.testing.assert_close(layer(changed)[0][:, :6], layer(x.detach())[0][:, :6], rtol=0, atol=0)
        # Batch mode peeks at later tokens: changing them changes earlier outputs.
        layer.ec_eval_mode = "batch"
        assert not torch.allclose(layer(changed)[0][:, :6], layer(x.detach())[0][:, :6])


@pytest.mark.parametrize("jitter_eps", [0.0, 0.5])
def test_threshold_tracks_the_cth_largest_score(jitter_eps):
    """The C-th largest score without jitter, jitter or not: causal routing scores without it."""
    layer = _layer(router="expert_choice", capacity_factor=2.0, ec_threshold_momentum=1.0, jitter_eps=jitter_eps)
    x = torch.randn(32, HIDDEN, dtype=torch.float64)
    layer.train()
    layer(x)
    update_routing_state(layer)
    probs = torch.softmax(x.float() @ layer.router.weight.float().t(), dim=-1)
    capacity = group_capacity(32, EXPERTS, 2.0, 0)
    expected = probs.topk(capacity, dim=0).values[-1]
    torch.testing.assert_close(layer.router.threshold, expected.float(), rtol=1e-6, atol=1e-7)


def test_thresholds_average_the_groups_and_move_by_the_momentum_after_the_first_step():
    """The threshold is the mean over groups (and micro-batches) of each group's C-th largest score,
    taken as it is at the first step and moved a momentum's share of the way after that."""
    momentum = 0.25
    layer = _layer(router="expert_choice", capacity_factor=2.0, ec_group="sequence", ec_threshold_momentum=momentum)
    layer.train()
    capacity = group_capacity(8, EXPERTS, 2.0, 0)

    def observed(batches):  # the mean over every sequence of every micro-batch of its C-th largest score
        cth = []
        for x in batches:
            probs = torch.softmax(x.float() @ layer.router.weight.float().t(), dim=-1)
            cth.append(probs.topk(capacity, dim=1).values[:, -1])
        return torch.cat(cth).mean(dim=0)

    first = [torch.randn(3, 8, HIDDEN, dtype=torch.float64) for _ in range(2)]  # 2 micro-batches of 3 sequences
    for x in first:
        layer(x)
    update_routing_state(layer)
    torch.testing.assert_close(layer.router.threshold, observed(first), rtol=1e-6, atol=1e-7)
    before = layer.router.threshold.clone()
    second = [torch.randn(4, 8, HIDDEN, dtype=torch.float64) * 2]
    layer(second[0])
    update_routing_state(layer)
    expected = before + momentum * (observed(second) - before)
    assert not torch.allclose(expected, observed(second)) and not torch.allclose(expected, before)
    torch.testing.assert_close(layer.router.threshold, expected, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- balancing
def test_global_balancing_loss_is_split_invariant_in_value_and_gradient():
    torch.manual_seed(0)
    logits = torch.randn(48, EXPERTS, dtype=torch.float64, requires_grad=True)
    fraction = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)

    whole = load_balancing_loss_fixed_fraction(logits.softmax(-1), fraction)
    (whole_grad,) = torch.autograd.grad(whole, logits)
    # 4 accumulation steps of 12 tokens, averaged as DeepSpeed averages micro-batch losses.
    parts = [load_balancing_loss_fixed_fraction(chunk.softmax(-1), fraction) for chunk in logits.split(12)]
    split = sum(parts) / 4
    (split_grad,) = torch.autograd.grad(split, logits)
    torch.testing.assert_close(split, whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(split_grad, whole_grad, rtol=1e-12, atol=1e-12)

    # The paper's per-micro-batch form (the default) is not split-invariant: "global" is.
    idx = logits.topk(2, dim=-1).indices
    per_micro = sum(load_balancing_loss(c.softmax(-1), i) for c, i in zip(logits.split(12), idx.split(12))) / 4
    assert not torch.isclose(per_micro, load_balancing_loss(logits.softmax(-1), idx))


def test_global_fraction_is_the_previous_steps_load_over_all_micro_batches():
    layer = _layer(top_k=2, capacity_factor=None)
    layer.train()
    counts = torch.zeros(EXPERTS, dtype=torch.float64)
    for seed in range(3):  # three micro-batches of one optimizer step
        x = torch.randn(20, HIDDEN, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        _, aux = layer(x)
        counts += aux.routed_E
    update_routing_state(layer)
    torch.testing.assert_close(layer.router.balance_fraction.double(), counts / counts.sum())


def test_bias_balancing_drives_a_skewed_router_toward_uniform():
    layer = _layer(top_k=1, capacity_factor=None, bias_update_rate=0.002, aux_loss_coef=0.0)
    with torch.no_grad():
        layer.router.weight[0] += 0.1  # on these inputs expert 0 wins every token
    layer.train()
    generator = torch.Generator().manual_seed(0)
    loads = []
    for _ in range(300):  # one optimizer step per batch, fresh tokens each time
        batch = torch.randn(256, HIDDEN, dtype=torch.float64, generator=generator).abs()
        with torch.no_grad():
            _, aux = layer(batch)
        loads.append(aux.routed_E.double())
        update_routing_state(layer)

    def cv(load: torch.Tensor) -> float:
        return float(load.std(unbiased=False) / load.mean())

    assert loads[0].tolist() == [256.0, 0.0, 0.0, 0.0]
    assert cv(loads[-1]) < 0.3, loads[-1]
    assert cv(torch.stack(loads[-50:]).mean(0)) < 0.1
    bias = layer.router.selection_bias
    assert bias[0] == bias.min(), "the overloaded expert must end with the lowest bias"


def test_shared_expert_adds_a_dense_path():
    layer = _layer(top_k=1, capacity_factor=None, shared_expert_hidden=8)
    x = torch.randn(5, HIDDEN, dtype=torch.float64)
    y, _ = layer(x)
    routed, _ = reference_token_choice(x, layer.router.weight, list(layer.local_experts), 1, None, True)
    torch.testing.assert_close(y, routed + layer.shared_mlp(x), rtol=1e-6, atol=1e-6)


def test_router_state_survives_bf16_and_stays_out_of_expert_checkpoint_keys():
    for router in ("token_choice", "expert_choice"):
        layer = _layer(router=router, capacity_factor=2.0, shared_expert_hidden=8).bfloat16()
        for name, buffer in layer.router.named_buffers():
            assert buffer.dtype == torch.float32, name
        for key in layer.state_dict():
            # DeepSpeed files every MoE-module key containing "expert" as a routed expert's weight.
            assert ("expert" in key) == ("deepspeed_experts" in key), key
    layer = _layer(bias_update_rate=0.01)
    layer.router.selection_bias.fill_(1.0 / 3.0)
    layer.bfloat16()
    assert float(layer.router.selection_bias[0]) == float(torch.tensor(1.0 / 3.0)), "rounded through bf16"


def test_layer_balancing_loss_is_split_invariant_through_the_layer():
    """Through the MoE layer: one micro-batch of 32 tokens vs 4 accumulation steps of 8."""
    layer = _layer(top_k=2, capacity_factor=None, aux_loss_coef=1.0, aux_loss_scope="global")
    layer.router.balance_fraction.copy_(torch.tensor([0.4, 0.3, 0.2, 0.1]))
    x = torch.randn(4, 8, HIDDEN, dtype=torch.float64)

    _, whole = layer(x.reshape(1, 32, HIDDEN))
    whole.loss.backward()
    whole_grad = layer.router.weight.grad.clone()
    layer.zero_grad()
    split_loss = sum(layer(x[i : i + 1])[1].loss for i in range(4)) / 4
    split_loss.backward()
    # Router math is fp32 by design, hence fp32 tolerances.
    torch.testing.assert_close(split_loss, whole.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(layer.router.weight.grad, whole_grad, rtol=1e-5, atol=1e-7)
