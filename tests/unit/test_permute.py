"""moe/permute.py against plain indexing with autograd (the oracle), forward and backward."""

from __future__ import annotations

import pytest
import torch

from moe.dispatch import assign_slots, filled_slots_first
from moe.permute import combine_from_slots, combine_in_token_order, permute_rows, rows_in_expert_order, rows_to_slots


def _kept_order(num_tokens: int, top_k: int, num_experts: int, keep: float, generator: torch.Generator):
    """Kept assignments sorted by a random expert choice: distinct indices in [0, T*K)."""
    expert_A = torch.randint(0, num_experts, (num_tokens * top_k,), generator=generator)
    kept_A = torch.rand(num_tokens * top_k, generator=generator) < keep
    kept = torch.nonzero(kept_A, as_tuple=True)[0]
    return kept[torch.argsort(expert_A[kept], stable=True)], kept_A


def _output_and_gradients(fn, x, weight, grad_out):
    """fn(x, weight) and the gradients of <output, grad_out> with respect to x and weight."""
    x_ = x.clone().requires_grad_()
    w_ = weight.clone().requires_grad_()
    y = fn(x_, w_)
    y.backward(grad_out)
    return y.detach(), x_.grad, w_.grad


@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize("keep", [1.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_permute_and_combine_match_plain_indexing(top_k, keep, dtype):
    generator = torch.Generator().manual_seed(top_k * 10 + int(keep * 10))
    num_tokens, dim = 37, 12
    order_N, kept_A = _kept_order(num_tokens, top_k, 5, keep, generator)
    x = torch.randn(num_tokens, dim, generator=generator).to(dtype)
    weight = torch.rand(num_tokens, top_k, generator=generator)  # fp32, as the router gives them
    expert_scale = torch.randn(order_N.numel(), dim, generator=generator).to(dtype)  # stands in for the experts
    grad_out = torch.randn(num_tokens, dim, generator=generator).to(dtype)

    def fast(x_, w_):
        rows = rows_in_expert_order(x_, order_N, top_k)
        return combine_in_token_order(rows * expert_scale, order_N, w_)

    def oracle(x_, w_):
        token_A = torch.arange(num_tokens).repeat_interleave(top_k)
        rows = x_[token_A[order_N]] * expert_scale
        out = torch.zeros(num_tokens, dim, dtype=torch.float32 if dtype != torch.float64 else dtype)
        for row, assignment in enumerate(order_N.tolist()):
            token, choice = divmod(assignment, top_k)
            out[token] = out[token] + w_[token, choice].to(out.dtype) * rows[row].to(out.dtype)
        return out.to(dtype)

    results = [_output_and_gradients(fn, x, weight, grad_out) for fn in (fast, oracle)]
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    for got, want in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    # Dropped assignments get no gradient through their weight, kept ones do.
    dropped = ~kept_A.view(num_tokens, top_k)
    assert torch.all(results[0][2][dropped] == 0)


def test_rows_in_expert_order_rejects_a_3d_input():
    with pytest.raises(ValueError, match="x_TD must be 2-D"):
        rows_in_expert_order(torch.zeros(2, 3, 4), torch.arange(2), 1)



@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("capacity", [3, 40])  # 3 drops many assignments, 40 none
def test_slot_layout_matches_plain_indexing(top_k, capacity):
    generator = torch.Generator().manual_seed(top_k * 100 + capacity)
    num_tokens, dim, num_experts = 29, 6, 4
    logits = torch.randn(num_tokens, num_experts, generator=generator)
    topk_idx = logits.topk(top_k, dim=-1).indices
    slot_TK = assign_slots(topk_idx, num_experts, capacity)
    num_slots = num_experts * capacity
    x = torch.randn(num_tokens, dim, generator=generator, dtype=torch.float64)
    weight = torch.rand(num_tokens, top_k, generator=generator, dtype=torch.float64)
    expert_scale = torch.randn(num_slots, dim, generator=generator, dtype=torch.float64)
    grad_out = torch.randn(num_tokens, dim, generator=generator, dtype=torch.float64)

    def fast(x_, w_):
        buffer = rows_to_slots(x_, slot_TK.reshape(-1), top_k, num_slots)
        return combine_from_slots(buffer * expert_scale, slot_TK, w_)

    def slot_buffer(x_):
        buffer = torch.zeros(num_slots, dim, dtype=x_.dtype)
        for token in range(num_tokens):
            for choice in range(top_k):
                slot = int(slot_TK[token, choice])
                if slot >= 0:
                    buffer[slot] = x_[token]
        return buffer

    def oracle(x_, w_):
        y = slot_buffer(x_) * expert_scale
        out = torch.zeros(num_tokens, dim, dtype=x_.dtype)
        for token in range(num_tokens):
            for choice in range(top_k):
                slot = int(slot_TK[token, choice])
                if slot >= 0:
                    out[token] = out[token] + w_[token, choice] * y[slot]
        return out

    results = [_output_and_gradients(fn, x, weight, grad_out) for fn in (fast, oracle)]
    for got, want in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    if capacity == 3:
        assert bool((slot_TK < 0).any()), "the small capacity should drop some assignments"
    # The buffer itself: each kept assignment's token in its slot, every other slot exactly zero
    # (the experts run on empty slots too).
    expected = slot_buffer(x)
    assert torch.equal(rows_to_slots(x, slot_TK.reshape(-1), top_k, num_slots), expected)
    if capacity == 40:
        assert bool((expected == 0).all(dim=1).any()), "some slots should stay empty"


def test_permute_rows_matches_plain_indexing_forward_and_backward():
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(11, 5, generator=generator, dtype=torch.float64)
    permutation = torch.randperm(11, generator=generator)
    grad_out = torch.randn(11, 5, generator=generator, dtype=torch.float64)
    results = []
    for gather in (permute_rows, lambda x_, p_: x_[p_]):
        leaf = x.clone().requires_grad_()
        y = gather(leaf, permutation)
        y.backward(grad_out)
        results.append((y.detach(), leaf.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    with pytest.raises(ValueError, match="permutation"):
        permute_rows(x, permutation[:5])


@pytest.mark.parametrize("counts", [[[2, 0, 3], [3, 1, 0]], [[0, 0, 0], [3, 3, 3]], [[3, 3, 3], [3, 3, 3]]])
def test_filled_slots_first_groups_filled_slots_by_expert_and_pads_with_the_empty_ones(counts):
    """Received slots [ep=2, e=3, C=3]: rank r's block for local expert j has counts[r][j] filled
    slots at its front. The oracle walks the slots in the order the grouped GEMM wants them."""
    counts_Re = torch.tensor(counts)
    ep, e, capacity = 2, 3, 3

    def slot(r, j, p):
        return (r * e + j) * capacity + p

    want_filled = [slot(r, j, p) for j in range(e) for r in range(ep) for p in range(counts[r][j])]
    want_empty = [slot(r, j, p) for r in range(ep) for j in range(e) for p in range(counts[r][j], capacity)]
    order, destination, rows_e = filled_slots_first(counts_Re, capacity)
    assert order.tolist() == want_filled + want_empty
    assert rows_e.tolist() == [counts[0][j] + counts[1][j] for j in range(e)]
    assert torch.equal(order[destination], torch.arange(ep * e * capacity))
