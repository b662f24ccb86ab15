"""moe/expert_storage.py: stacking the experts' weights as a view of their storage, not a copy,
gives the same values and gradients as `torch.stack` and the per-expert module loop."""

from __future__ import annotations

import pytest
import torch
from test_grouped_experts import DIM, HIDDEN, _experts  # same experts as the grouped-GEMM oracle tests

from moe.expert_storage import evenly_spaced, pack_expert_weights, stacked_parameters
from moe.grouped_experts import stack_expert_weights, swiglu_capacity, swiglu_grouped, swiglu_loop


def _grads(experts) -> list[torch.Tensor]:
    return [p.grad.clone() for e in experts for p in e.parameters()]


def test_packed_experts_stack_without_a_copy():
    experts = _experts(4, torch.float32)
    values = [p.detach().clone() for e in experts for p in e.parameters()]
    params_before = [p for e in experts for p in e.parameters()]
    pack_expert_weights(experts)
    # Same parameter objects and values, now in one buffer.
    assert [p for e in experts for p in e.parameters()] == params_before
    assert all(torch.equal(p, v) for p, v in zip(params_before, values, strict=True))
    w1 = [e.w1.weight for e in experts]
    assert evenly_spaced(w1) == 3 * DIM * HIDDEN
    w1_eDF, w3_eDF, w2_eFD = stack_expert_weights(experts)
    for stacked, first in ((w1_eDF, experts[0].w1.weight), (w3_eDF, experts[0].w3.weight), (w2_eFD, experts[0].w2.weight)):
        assert stacked.data_ptr() == first.data_ptr(), "a view of the experts' storage, not a copy"
    # A change to an expert's weight shows in the stack: it is the same memory.
    with torch.no_grad():
        experts[2].w3.weight[1, 5] = 123.0
    assert stack_expert_weights(experts)[1][2, 5, 1] == 123.0


def test_separately_allocated_or_reordered_weights_fall_back_to_a_copy():
    experts = _experts(3, torch.float32)
    assert evenly_spaced([e.w1.weight for e in experts]) is None  # separate allocations
    pack_expert_weights(experts)
    assert evenly_spaced([e.w1.weight for e in reversed(experts)]) is None
    assert evenly_spaced([experts[0].w1.weight, experts[0].w3.weight, experts[1].w1.weight]) is None  # uneven
    assert evenly_spaced([experts[0].w1.weight]) is None
    assert evenly_spaced([experts[0].w1.weight.t(), experts[1].w1.weight.t()]) is None  # not contiguous
    reversed_stack = stacked_parameters([e.w1.weight for e in reversed(experts)])
    assert torch.equal(reversed_stack, torch.stack([e.w1.weight for e in reversed(experts)]))


@pytest.mark.parametrize("layout", ["grouped", "capacity"])
def test_view_stack_matches_the_module_loop_forward_and_backward(layout):
    """Packed (view) and separate (torch.stack) experts against the per-expert modules (the oracle)."""
    dtype = torch.float64 if layout == "capacity" else torch.float32
    counts = [5, 0, 7, 3]
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(sum(counts), DIM, generator=generator, dtype=dtype)
    grad = torch.randn(sum(counts), DIM, generator=generator, dtype=dtype)
    results = []
    for packed in (True, False, None):  # None: the oracle loop over the modules
        experts = _experts(4, dtype)
        if packed:
            pack_expert_weights(experts)
        x_ = x.clone().requires_grad_()
        if packed is None:
            y = swiglu_loop(x_, counts, experts)
        elif layout == "grouped":
            y = swiglu_grouped(x_, counts, *stack_expert_weights(experts))
        else:  # every expert gets C = 7 rows: the loop's rows padded with zeros
            chunks = torch.split(x_, counts)
            x_eCD = torch.stack([torch.cat([c, c.new_zeros(7 - c.shape[0], DIM)]) for c in chunks])
            y_eCD = swiglu_capacity(x_eCD, *stack_expert_weights(experts))
            y = torch.cat([y_eCD[i, :n] for i, n in enumerate(counts)])
        y.backward(grad)
        results.append((y.detach(), x_.grad, _grads(experts)))
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-12)
    for got in results[:2]:
        torch.testing.assert_close(got[0], results[2][0], **tol)
        torch.testing.assert_close(got[1], results[2][1], **tol)
        for g, want in zip(got[2], results[2][2], strict=True):
            torch.testing.assert_close(g, want, **tol)


def test_expert_optimizer_groups_hold_whole_layers():
    """ZeRO flattens each optimizer group into its own buffer: a layer whose experts straddle two
    groups could not be stacked as a view. DeepSpeed's split at its plain cap cuts layers; ours does not."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    from moe import MoEConfig
    from train.engine import expert_group_cap, optimizer_param_groups
    from train.model import GPT, ModelConfig

    model = GPT(ModelConfig(seq_len=16, num_layers=5, hidden_size=32, num_heads=4, ffn_hidden=48),
                MoEConfig(num_experts=4, top_k=2), 64, seed=0)
    layers = [list(block.ffn.deepspeed_moe.experts.parameters()) for block in model.blocks]
    per_layer = sum(p.numel() for p in layers[0])
    cap = int(2.5 * per_layer)  # a stand-in for DeepSpeed's 178,956,971 elements at a real size
    assert expert_group_cap(model, cap) == 2 * per_layer

    def expert_groups(groups):
        return [g["params"] for g in groups if g.get("moe")]

    def layer_of(param):
        return next(i for i, layer in enumerate(layers) if any(param is p for p in layer))

    ours = expert_groups(optimizer_param_groups(model, 0.1, expert_cap=cap))
    assert [sorted({layer_of(p) for p in group}) for group in ours] == [[0, 1], [2, 3], [4]]
    assert [len(group) for group in ours] == [2 * len(layers[0]), 2 * len(layers[0]), len(layers[0])]
    decay = [p for p in model.parameters() if p.dim() >= 2]
    plain = expert_groups(split_params_into_different_moe_groups_for_optimizer(
        [{"name": "decay", "params": decay, "weight_decay": 0.1}], max_group_size=cap))

    def groups_holding(groups, layer: int) -> set[int]:
        return {index for index, group in enumerate(groups) for p in group if layer_of(p) == layer}

    assert all(len(groups_holding(ours, layer)) == 1 for layer in range(5))
    assert any(len(groups_holding(plain, layer)) > 1 for layer in range(5)), "the plain cap should cut a layer"
