"""Stacked-weight expert compute against the per-expert module loop: outputs and every gradient.

Legend: N rows sorted by expert, D model dim, e local experts, C capacity, F expert hidden.

`torch._grouped_mm` takes fp32/bf16/fp16 only, so the grouped path is checked in fp32 (where it
equals the loop to rounding) and the fallback loop and `bmm` in fp64.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_by_norm

from moe import SwiGLUExpert
from moe.experts import expert_generator
from moe.grouped_experts import (
    CPU_LOOP_ROWS_PER_EXPERT,
    capacity_uses_loop,
    grouped_mm_available,
    stack_expert_weights,
    swiglu_capacity,
    swiglu_grouped,
    swiglu_loop,
    uses_grouped_mm,
)

# Multiples of 8, so fp32 and bf16 rows meet the grouped GEMM's 16-byte stride rule.
DIM, HIDDEN = 16, 24

COUNTS = {
    "uneven": [5, 0, 7, 3],
    "one-busy": [0, 0, 9, 0],
    "single-expert": [6],
    "no-rows": [0, 0, 0],
}


def _experts(num_experts: int, dtype: torch.dtype, dim: int = DIM, hidden: int = HIDDEN) -> list[SwiGLUExpert]:
    experts = []
    for i in range(num_experts):
        expert = SwiGLUExpert(dim, hidden)
        # std 0.3 keeps activations O(1), so gradient mismatches are not hidden by tiny values.
        expert.init_weights(0.3, 0.3, expert_generator(0, 0, i))
        experts.append(expert.to(dtype))
    return experts


def _param_grads(experts: list[SwiGLUExpert]) -> dict[str, torch.Tensor]:
    # An expert with no rows may get no gradient at all on one path and zeros on another.
    return {
        f"{i}.{name}": (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
        for i, expert in enumerate(experts)
        for name, p in expert.named_parameters()
    }


def _clear(x: torch.Tensor, experts: list[SwiGLUExpert]) -> None:
    x.grad = None
    for expert in experts:
        expert.zero_grad(set_to_none=True)


def _run(fn, x: torch.Tensor, experts: list[SwiGLUExpert], grad: torch.Tensor | None):
    """Output, input gradient and expert gradients of fn(x); grad=None backpropagates y.sum()."""
    y = fn(x)
    if grad is None:
        y.sum().backward()
    else:
        y.backward(grad)
    result = y.detach().clone(), x.grad.clone(), _param_grads(experts)
    _clear(x, experts)
    return result


def _assert_same(fast, ref, **tol) -> None:
    y, dx, grads = fast
    y_ref, dx_ref, grads_ref = ref
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(dx, dx_ref, **tol)
    assert grads.keys() == grads_ref.keys()
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], msg=name, **tol)


def _assert_close_by_norm(fast, ref, rtol: float) -> None:
    """Output, input gradient and every expert gradient within rtol of the reference's norm (+1e-3):
    bf16 paths round at the same points but accumulate in different orders, so single elements differ."""
    y, dx, grads = fast
    y_ref, dx_ref, grads_ref = ref
    for a, b in [(y, y_ref), (dx, dx_ref)] + [(grads[k], grads_ref[k]) for k in grads_ref]:
        assert (a.float() - b.float()).norm() <= rtol * b.float().norm() + 1e-3


def _grouped(counts):
    def fn(x, experts):
        return swiglu_grouped(x, counts, *stack_expert_weights(experts))

    return fn


def test_stack_expert_weights_layout_and_gradients():
    experts = _experts(3, torch.float64)
    w1_eDF, w3_eDF, w2_eFD = stack_expert_weights(experts)
    assert w1_eDF.shape == w3_eDF.shape == (3, DIM, HIDDEN) and w2_eFD.shape == (3, HIDDEN, DIM)
    for i, expert in enumerate(experts):
        assert torch.equal(w1_eDF[i], expert.w1.weight.t())
        assert torch.equal(w3_eDF[i], expert.w3.weight.t())
        assert torch.equal(w2_eFD[i], expert.w2.weight.t())
    scale = torch.arange(3, dtype=torch.float64).view(3, 1, 1)
    (w1_eDF * scale).sum().backward()
    for i, expert in enumerate(experts):
        torch.testing.assert_close(expert.w1.weight.grad, torch.full_like(expert.w1.weight, float(i)))
        assert expert.w2.weight.grad is None


@pytest.mark.parametrize("counts", COUNTS.values(), ids=COUNTS.keys())
def test_grouped_mm_path_equals_loop_fp32(counts):
    if not grouped_mm_available("cpu", torch.float32):
        pytest.skip("this torch has no CPU torch._grouped_mm")
    torch.manual_seed(0)
    experts = _experts(len(counts), torch.float32)
    x = torch.randn(sum(counts), DIM, requires_grad=True)
    grad = torch.randn(sum(counts), DIM)
    assert uses_grouped_mm(x, *stack_expert_weights(experts)[::2])

    fast = _run(lambda x: swiglu_grouped(x, counts, *stack_expert_weights(experts)), x, experts, grad)
    ref = _run(lambda x: swiglu_loop(x, counts, experts), x, experts, grad)
    _assert_same(fast, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("counts", COUNTS.values(), ids=COUNTS.keys())
def test_fallback_loop_equals_module_loop_fp64(counts):
    torch.manual_seed(1)
    experts = _experts(len(counts), torch.float64)
    x = torch.randn(sum(counts), DIM, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(sum(counts), DIM, dtype=torch.float64)
    assert not uses_grouped_mm(x, *stack_expert_weights(experts)[::2])  # no fp64 grouped GEMM

    fast = _run(lambda x: swiglu_grouped(x, counts, *stack_expert_weights(experts)), x, experts, grad)
    ref = _run(lambda x: swiglu_loop(x, counts, experts), x, experts, grad)
    _assert_same(fast, ref, rtol=1e-12, atol=1e-12)


def test_forced_loop_equals_module_loop_fp32():
    counts = [5, 0, 7, 3]
    experts = _experts(4, torch.float32)
    x = torch.randn(15, DIM, requires_grad=True)
    grad = torch.randn(15, DIM)
    fast = _run(lambda x: swiglu_grouped(x, counts, *stack_expert_weights(experts), use_grouped_mm=False), x, experts, grad)
    ref = _run(lambda x: swiglu_loop(x, counts, experts), x, experts, grad)
    _assert_same(fast, ref, rtol=1e-5, atol=1e-6)


def test_unaligned_width_falls_back_to_the_loop():
    # D = 6 fp32 is a 24-byte row stride, which the grouped GEMM rejects.
    counts = [3, 0, 4]
    experts = _experts(3, torch.float32, dim=6, hidden=10)
    x = torch.randn(7, 6, requires_grad=True)
    assert not uses_grouped_mm(x, *stack_expert_weights(experts)[::2])
    fast = _run(lambda x: swiglu_grouped(x, counts, *stack_expert_weights(experts)), x, experts, None)
    ref = _run(lambda x: swiglu_loop(x, counts, experts), x, experts, None)
    _assert_same(fast, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("incoming", ["sum", "transposed"])
def test_grouped_backward_takes_any_gradient_layout(incoming):
    # y.sum().backward() sends a stride-0 expanded gradient, and a transposed one has a 4*N-byte
    # stride; the raw grouped GEMM backward rejects both.
    counts = [5, 0, 7, 3]
    experts = _experts(4, torch.float32)
    x = torch.randn(15, DIM, requires_grad=True)
    grad = None if incoming == "sum" else torch.randn(DIM, 15).t()
    fast = _run(lambda x: swiglu_grouped(x, counts, *stack_expert_weights(experts)), x, experts, grad)
    ref = _run(lambda x: swiglu_loop(x, counts, experts), x, experts, grad)
    _assert_same(fast, ref, rtol=1e-5, atol=1e-6)


def test_grouped_backward_with_no_rows_at_all():
    # Every count 0 (a rank that received nothing): the gradient of `y.sum()` is then an empty tensor
    # with stride 0, which counts as contiguous and which the grouped GEMM rejects.
    experts = _experts(4, torch.float32)
    x = torch.randn(0, DIM, requires_grad=True)
    weights = [w.detach().requires_grad_() for w in stack_expert_weights(experts)]
    swiglu_grouped(x, [0, 0, 0, 0], *weights).sum().backward()
    assert x.grad.shape == (0, DIM)
    assert all(w.grad is None or not w.grad.any() for w in weights)


def test_counts_as_tensor_int32_and_list_agree():
    counts = [2, 4, 0, 3]
    experts = _experts(4, torch.float32)
    x = torch.randn(9, DIM)
    weights = stack_expert_weights(experts)
    with torch.no_grad():
        from_list = swiglu_grouped(x, counts, *weights)
        from_tensor = swiglu_grouped(x, torch.tensor(counts, dtype=torch.int32), *weights)
    assert torch.equal(from_list, from_tensor)


@pytest.mark.parametrize("capacity", [5, CPU_LOOP_ROWS_PER_EXPERT], ids=["bmm", "cpu-loop"])
@pytest.mark.parametrize("num_experts", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_capacity_bmm_equals_module_loop(num_experts, dtype, capacity):
    torch.manual_seed(2)
    experts = _experts(num_experts, dtype)
    x = torch.randn(num_experts, capacity, DIM, dtype=dtype, requires_grad=True)
    grad = torch.randn(num_experts, capacity, DIM, dtype=dtype)

    def reference(x):
        return torch.stack([expert(x[i]) for i, expert in enumerate(experts)])

    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
    fast = _run(lambda x: swiglu_capacity(x, *stack_expert_weights(experts)), x, experts, grad)
    ref = _run(reference, x, experts, grad)
    _assert_same(fast, ref, **tol)
    fast_sum = _run(lambda x: swiglu_capacity(x, *stack_expert_weights(experts)), x, experts, None)
    _assert_same(fast_sum, _run(reference, x, experts, None), **tol)


def test_bf16_forward_runs_and_tracks_fp32():
    counts = [5, 0, 7, 3]
    experts = _experts(4, torch.float32)
    x = torch.randn(15, DIM)
    slots = x[:12].view(4, 3, DIM)  # the capacity layout: expert i takes slots[i]
    with torch.no_grad():
        want = swiglu_loop(x, counts, experts)
        want_capacity = torch.stack([expert(slots[i]) for i, expert in enumerate(experts)])
        weights_bf16 = [w.bfloat16() for w in stack_expert_weights(experts)]
        grouped = swiglu_grouped(x.bfloat16(), counts, *weights_bf16)
        capacity = swiglu_capacity(slots.bfloat16(), *weights_bf16)
    assert grouped.dtype == capacity.dtype == torch.bfloat16
    assert uses_grouped_mm(x.bfloat16(), weights_bf16[0], weights_bf16[2]) == grouped_mm_available("cpu", torch.bfloat16)
    for got, reference in [(grouped, want), (capacity, want_capacity)]:
        assert_close_by_norm(got, reference, 2e-2, "bf16 expert output")


@pytest.mark.parametrize("path", ["grouped", "grouped-loop", "capacity-bmm", "capacity-loop"])
def test_autocast_runs_in_the_autocast_dtype(path):
    """fp32 operands under bf16 autocast run in bf16 on every path, as `@` would, including the
    CPU loop that swiglu_capacity takes from CPU_LOOP_ROWS_PER_EXPERT rows per expert."""
    rows = CPU_LOOP_ROWS_PER_EXPERT if path == "capacity-loop" else 3
    counts = [rows, rows] if path.startswith("capacity") else [3, 4]
    experts = _experts(2, torch.float32)
    x = torch.randn(sum(counts), DIM)
    weights = stack_expert_weights(experts)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        if path.startswith("capacity"):
            assert capacity_uses_loop(x.view(2, rows, DIM)) == (path == "capacity-loop")
            y = swiglu_capacity(x.view(2, rows, DIM), *weights).view(-1, DIM)
        else:
            y = swiglu_grouped(x, counts, *weights, use_grouped_mm=False if path == "grouped-loop" else None)
        y_ref = swiglu_loop(x, counts, experts)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=0.05, atol=0.05)


def test_grouped_mm_available_is_a_cached_bool():
    assert grouped_mm_available() is grouped_mm_available("cpu", torch.float32)
    assert isinstance(grouped_mm_available(), bool)
    assert grouped_mm_available("cpu", torch.float64) is False


def test_misuse_raises_value_error_naming_the_argument():
    experts = _experts(3, torch.float32)
    w1, w3, w2 = stack_expert_weights(experts)
    x = torch.randn(6, DIM)
    with pytest.raises(ValueError, match="counts_e"):
        swiglu_grouped(x, [2, 4], w1, w3, w2)
    with pytest.raises(ValueError, match="counts_e"):
        swiglu_grouped(x, [2, 2, 1], w1, w3, w2)
    with pytest.raises(ValueError, match="counts_e"):
        swiglu_grouped(x, [8, -2, 0], w1, w3, w2)
    with pytest.raises(ValueError, match="x_ND"):
        swiglu_grouped(x.view(2, 3, DIM), [2, 2, 2], w1, w3, w2)
    with pytest.raises(ValueError, match="w1_eDF"):
        swiglu_grouped(torch.randn(6, DIM + 8), [2, 2, 2], w1, w3, w2)
    with pytest.raises(ValueError, match="w2_eFD"):
        swiglu_grouped(x, [2, 2, 2], w1, w3, w2[:, :, :-1])
    with pytest.raises(ValueError, match="use_grouped_mm"):
        swiglu_grouped(x.double(), [2, 2, 2], *(w.double() for w in (w1, w3, w2)), use_grouped_mm=True)
    with pytest.raises(ValueError, match="x_eCD"):
        swiglu_capacity(torch.randn(2, 4, DIM), w1, w3, w2)
    with pytest.raises(ValueError, match="experts"):
        stack_expert_weights([])
    with pytest.raises(ValueError, match=r"experts\[1\]"):
        stack_expert_weights([experts[0], SwiGLUExpert(DIM, HIDDEN + 8)])
    with pytest.raises(ValueError, match="counts_e"):
        swiglu_loop(x, [6], experts)


def _padded_reference(counts: list[int], padding: int, experts: list[SwiGLUExpert]):
    """The module loop on the real rows, zeros for the padding rows (which get no gradient)."""
    def fn(x):
        y = swiglu_loop(x[: sum(counts)], counts, experts)
        return torch.cat([y, y.new_zeros(padding, y.shape[-1])])

    return fn


@pytest.mark.parametrize("path", ["grouped", "loop"])
@pytest.mark.parametrize("counts", COUNTS.values(), ids=COUNTS.keys())
def test_padded_rows_give_zero_output_and_no_gradient(path, counts):
    """Capacity mode's layout: kept rows sorted by expert, then dropped rows the counts do not cover.
    The grouped GEMM leaves such rows uninitialised (garbage, often huge) forward and backward, so
    this is checked with a non-zero incoming gradient on the padding rows too."""
    if path == "grouped" and not grouped_mm_available("cpu", torch.float32):
        pytest.skip("this torch has no CPU torch._grouped_mm")
    torch.manual_seed(2)
    padding = 5
    experts = _experts(len(counts), torch.float32)
    x = torch.randn(sum(counts) + padding, DIM, requires_grad=True)
    grad = torch.randn(sum(counts) + padding, DIM)
    use = path == "grouped"

    fast = _run(lambda x: swiglu_grouped(x, torch.tensor(counts), *stack_expert_weights(experts), padded=True,
                                         use_grouped_mm=use), x, experts, grad)
    ref = _run(_padded_reference(counts, padding, experts), x, experts, grad)
    assert torch.equal(fast[0][sum(counts):], torch.zeros(padding, DIM))
    assert torch.equal(fast[1][sum(counts):], torch.zeros(padding, DIM))
    _assert_same(fast, ref, rtol=1e-5, atol=1e-6)


def test_cpu_takes_the_loop_from_many_rows_per_expert():
    """The default path on a CPU: the grouped GEMM for small groups, the loop of matmuls for groups
    of CPU_LOOP_ROWS_PER_EXPERT rows and more (faster there); both give the same result."""
    from moe.grouped_experts import CPU_LOOP_ROWS_PER_EXPERT, grouped_mm_runs

    if not grouped_mm_available("cpu", torch.float32):
        pytest.skip("this torch has no CPU torch._grouped_mm")
    experts = _experts(2, torch.float32)
    weights = stack_expert_weights(experts)
    small, large = torch.randn(2 * CPU_LOOP_ROWS_PER_EXPERT - 1, DIM), torch.randn(2 * CPU_LOOP_ROWS_PER_EXPERT, DIM)
    assert uses_grouped_mm(small, weights[0], weights[2])
    assert grouped_mm_runs(large, weights[0], weights[2]) and not uses_grouped_mm(large, weights[0], weights[2])
    counts = [CPU_LOOP_ROWS_PER_EXPERT + 5, CPU_LOOP_ROWS_PER_EXPERT - 5]
    with torch.no_grad():
        default = swiglu_grouped(large, counts, *weights)
        assert torch.equal(default, swiglu_grouped(large, counts, *weights, use_grouped_mm=False))
        torch.testing.assert_close(default, swiglu_grouped(large, counts, *weights, use_grouped_mm=True),
                                   rtol=1e-5, atol=1e-6)


def test_padded_counts_may_not_exceed_the_rows():
    w1, w3, w2 = stack_expert_weights(_experts(3, torch.float32))
    with pytest.raises(ValueError, match="at most the number of rows"):
        swiglu_grouped(torch.randn(6, DIM), [2, 4, 1], w1, w3, w2, padded=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_padded_grouped_equals_loop(dtype):
    """The padded layout on a GPU with device-side counts (no host sync), against the module loop."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    counts, padding = [64, 0, 200, 8], 40
    device = torch.device("cuda")
    experts = [e.to(device) for e in _experts(4, dtype, dim=64, hidden=128)]
    x = torch.randn(sum(counts) + padding, 64, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(sum(counts) + padding, 64, device=device, dtype=dtype)
    counts_e = torch.tensor(counts, device=device)
    fast = _run(lambda x: swiglu_grouped(x, counts_e, *stack_expert_weights(experts), padded=True), x, experts, grad)
    ref = _run(_padded_reference(counts, padding, experts), x, experts, grad)
    assert not fast[0][sum(counts):].any() and not fast[1][sum(counts):].any()
    _assert_close_by_norm(fast, ref, 1e-4 if dtype == torch.float32 else 2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_grouped_equals_loop(dtype):
    """On a GPU, whichever path runs (grouped GEMM where the device has it) against the module loop."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    counts = [64, 0, 200, 8]
    device = torch.device("cuda")
    experts = [e.to(device) for e in _experts(4, dtype, dim=64, hidden=128)]
    x = torch.randn(sum(counts), 64, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(sum(counts), 64, device=device, dtype=dtype)
    counts_e = torch.tensor(counts, device=device)
    fast = _run(lambda x: swiglu_grouped(x, counts_e, *stack_expert_weights(experts)), x, experts, grad)
    ref = _run(lambda x: swiglu_loop(x, counts, experts), x, experts, grad)
    sum_grads = _run(lambda x: swiglu_grouped(x, counts_e, *stack_expert_weights(experts)), x, experts, None)
    sum_ref = _run(lambda x: swiglu_loop(x, counts, experts), x, experts, None)
    if dtype == torch.float32:
        _assert_same(fast, ref, rtol=1e-4, atol=1e-4)
        _assert_same(sum_grads, sum_ref, rtol=1e-4, atol=1e-4)
        return
    # bf16: both paths round at the same points but accumulate in different orders, so compare
    # whole tensors by relative error rather than element by element.
    for got, want in ((fast, ref), (sum_grads, sum_ref)):
        _assert_close_by_norm(got, want, 2e-2)


def test_probe_is_not_fooled_by_no_grad():
    from moe.grouped_experts import _PROBED

    _PROBED.clear()
    with torch.no_grad():
        first = grouped_mm_available("cpu", torch.float32)
    assert first == hasattr(torch, "_grouped_mm")


@pytest.mark.parametrize(
    "device, dtype",
    [("cpu", torch.float32), ("cpu", torch.float64),
     pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu), pytest.param("cuda", torch.float32, marks=pytest.mark.gpu)],
)
def test_filled_slots_through_the_grouped_gemm_equal_every_slot_through_bmm(device, dtype):
    """Token choice's received capacity slots across ranks (moe/layer.py `_filled_slots_only`): the
    filled ones gathered first (`filled_slots_first`, `permute_rows`) through the padded grouped GEMM
    give what a batched GEMM over every slot gives, empty slots (zero rows) included: outputs, slot
    gradients and every expert gradient. fp32 takes torch._grouped_mm on a CPU, fp64 the loop."""
    from moe.dispatch import filled_slots_first
    from moe.permute import permute_rows

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    ep, e, capacity = 2, 3, 5
    counts_Re = torch.tensor([[5, 0, 2], [3, 1, 5]], device=device)
    experts = [x.to(device) for x in _experts(e, dtype)]
    generator = torch.Generator().manual_seed(3)
    received = torch.randn(ep, e, capacity, DIM, generator=generator).to(device, dtype)
    filled = torch.arange(capacity, device=device).view(1, 1, capacity) < counts_Re.unsqueeze(-1)
    received = (received * filled.unsqueeze(-1)).reshape(ep * e * capacity, DIM).requires_grad_()
    grad = torch.randn(ep * e * capacity, DIM, generator=generator).to(device, dtype)

    def compacted(x_SD):
        order, destination, rows_e = filled_slots_first(counts_Re, capacity)
        out = swiglu_grouped(permute_rows(x_SD, order), rows_e, *stack_expert_weights(experts), padded=True)
        return permute_rows(out, destination)

    def every_slot(x_SD):
        per_expert = x_SD.view(ep, e, capacity, DIM).transpose(0, 1).reshape(e, ep * capacity, DIM)
        out = swiglu_capacity(per_expert, *stack_expert_weights(experts))
        return out.view(e, ep, capacity, DIM).transpose(0, 1).reshape(ep * e * capacity, DIM)

    fast, ref = _run(compacted, received, experts, grad), _run(every_slot, received, experts, grad)
    if dtype == torch.bfloat16:
        _assert_close_by_norm(fast, ref, 2e-2)
    else:
        _assert_same(fast, ref, rtol=1e-5, atol=1e-5)
    assert not fast[0][~filled.reshape(-1)].any(), "empty slots must come back zero"


@pytest.mark.parametrize("packed", [True, False], ids=["packed-views", "stacked-copies"])
@pytest.mark.parametrize("incoming", ["random", "sum"])
def test_split_loop_node_equals_module_loop_fp64(packed, incoming):
    """The loop's own autograd node (`_SplitLoopSwiGLU`: outputs and gradients written into
    preallocated buffers) against the expert modules under plain autograd: output, input gradient
    and every expert's weight gradients, with uneven counts and a zero-row expert, on weights
    stacked as strided views of one buffer (as DeepSpeed lays them out) and as `torch.stack` copies."""
    from moe.expert_storage import evenly_spaced, pack_expert_weights
    from moe.grouped_experts import _SplitLoopSwiGLU

    counts = [5, 0, 7, 3, 1]
    torch.manual_seed(4)
    experts = _experts(len(counts), torch.float64)
    if packed:
        pack_expert_weights(experts)
        assert evenly_spaced([e.w1.weight for e in experts]) is not None
    x = torch.randn(sum(counts), DIM, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(sum(counts), DIM, dtype=torch.float64) if incoming == "random" else None

    def fast_fn(x):
        y = swiglu_grouped(x, counts, *stack_expert_weights(experts), use_grouped_mm=False)
        assert type(y.grad_fn).__name__ == f"{_SplitLoopSwiGLU.__name__}Backward"
        return y

    fast = _run(fast_fn, x, experts, grad)
    ref = _run(lambda x: swiglu_loop(x, counts, experts), x, experts, grad)
    _assert_same(fast, ref, rtol=1e-12, atol=1e-12)
    for name in ("w1", "w3", "w2"):
        assert torch.equal(fast[2][f"1.{name}.weight"], torch.zeros(getattr(experts[1], name).weight.shape, dtype=torch.float64))


@pytest.mark.parametrize("frozen", ["x", "experts"])
def test_split_loop_node_gradients_of_only_what_requires_them(frozen):
    """Only x, or only the experts, requiring gradients: the other side's gradients still equal the
    module loop's."""
    counts = [4, 0, 6]
    experts = _experts(3, torch.float64)
    x = torch.randn(10, DIM, dtype=torch.float64, requires_grad=frozen != "x")
    for p in (p for e in experts for p in e.parameters()):
        p.requires_grad_(frozen != "experts")
    grad = torch.randn(10, DIM, dtype=torch.float64)
    results = []
    for fn in (lambda: swiglu_grouped(x, counts, *stack_expert_weights(experts), use_grouped_mm=False),
               lambda: swiglu_loop(x, counts, experts)):
        fn().backward(grad)
        results.append((x.grad, [p.grad for e in experts for p in e.parameters()]))
        _clear(x, experts)
    (dx, dws), (dx_ref, dws_ref) = results
    if frozen == "x":
        assert dx is None and dx_ref is None
        for got, want in zip(dws, dws_ref, strict=True):
            torch.testing.assert_close(got if got is not None else torch.zeros_like(want), want, rtol=1e-12, atol=1e-12)
    else:
        assert all(g is None for g in dws)
        torch.testing.assert_close(dx, dx_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("use_grouped_mm", [False, True], ids=["loop", "grouped"])
def test_bf16_tracks_fp32_forward_and_backward(use_grouped_mm):
    """bf16 through the loop's node (fp32 accumulation inside each GEMM) and through torch._grouped_mm:
    output, input and every expert's gradients within bf16 rounding of the fp32 loop."""
    if use_grouped_mm and not grouped_mm_available("cpu", torch.bfloat16):
        pytest.skip("this torch has no bf16 torch._grouped_mm on the CPU")
    counts = [5, 0, 7, 3]
    experts = _experts(4, torch.float32)
    x = torch.randn(15, DIM, requires_grad=True)
    grad = torch.randn(15, DIM)
    ref = _run(lambda x: swiglu_loop(x, counts, experts), x, experts, grad)
    experts = [e.to(torch.bfloat16) for e in experts]
    x16 = x.detach().bfloat16().requires_grad_()
    fast = _run(lambda x: swiglu_grouped(x, counts, *stack_expert_weights(experts), use_grouped_mm=use_grouped_mm),
                x16, experts, grad.bfloat16())
    _assert_close_by_norm(fast, ref, 2e-2)
