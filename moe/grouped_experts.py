"""Expert compute on stacked weights: one batched GEMM per projection instead of a loop over experts.

Legend: N rows (token-choice pairs, sorted by expert), D model dim, e local experts, C capacity,
F expert hidden.

The experts stay a ModuleList of `SwiGLUExpert` (DeepSpeed's per-expert checkpoint files are
named after it), so the weights are stacked per forward: a strided view of their storage where
DeepSpeed's flat buffer (or `pack_expert_weights`) put them evenly apart, else `torch.stack`, one
copy of the expert weights (moe/expert_storage.py). Either way the backward hands every expert its
own gradient. Two layouts:

- fixed capacity, [e, C, D]: `torch.bmm` (capacity mode, expert choice; the loop below on a CPU
  from `CPU_LOOP_ROWS_PER_EXPERT` rows per expert);
- variable group sizes, rows sorted by expert, [N, D] with counts [e] (dropless):
  `torch._grouped_mm` with cumulative int32 offsets where this torch, device and dtype run it,
  otherwise (and on a CPU from `CPU_LOOP_ROWS_PER_EXPERT` rows per expert, where it is faster) a
  loop over the experts' row ranges with the same math, one autograd node (`_SplitLoopSwiGLU`).

`swiglu_loop` calls the expert modules themselves and is the oracle for both.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from moe.expert_storage import stacked_parameters
from moe.experts import SwiGLUExpert

# torch._grouped_mm wants every non-unit stride, and on CUDA every data pointer, to be a multiple
# of 16 bytes ("strides should be multiple of 16 bytes").
_ALIGN_BYTES = 16

CPU_LOOP_ROWS_PER_EXPERT = 256
"""From this many rows per expert on average, a CPU runs the loop of plain matmuls (`_SplitLoopSwiGLU`)
rather than `torch._grouped_mm` or `torch.bmm`, whose time grows faster than the rows there. Forward
and backward, 8 experts, D 192 / F 512 and D 256 / F 1024, interleaved: the loop ties the grouped
kernel at 256 rows per expert and takes 4-8% less time at 512, 6-16% at 1024; it takes 4-14% less
than `torch.bmm` from 256 rows (bench/RESULTS.md, seventeenth session). Below about 128 rows the
grouped kernel is faster. GPUs always take the grouped GEMM where it runs."""


ExpertWeights = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""(w1_eDF, w3_eDF, w2_eFD): the stacked weights of e local experts."""


def stack_expert_weights(experts: Sequence[SwiGLUExpert]) -> ExpertWeights:
    """(w1_eDF, w3_eDF, w2_eFD) stacked from e experts; differentiable back to each expert's weights,
    and a view (no copy) where their storage allows (moe/expert_storage.py).

    nn.Linear stores its weight as [out, in], so the stack is [e, out, in] and the result is its
    transposed view [e, in, out]: column-major per expert, which is the layout grouped GEMMs take
    for their second operand, so no second copy is made.
    """
    if len(experts) == 0:
        raise ValueError("experts must hold at least one SwiGLUExpert, got an empty sequence")
    first = experts[0]
    for i, expert in enumerate(experts):
        for name in ("w1", "w3", "w2"):
            got, want = getattr(expert, name).weight, getattr(first, name).weight
            if got.shape != want.shape or got.dtype != want.dtype or got.device != want.device:
                raise ValueError(
                    f"experts[{i}].{name}.weight is {tuple(got.shape)} {got.dtype} on {got.device}, "
                    f"experts[0].{name}.weight is {tuple(want.shape)} {want.dtype} on {want.device}"
                )
    w1_eFD = stacked_parameters([expert.w1.weight for expert in experts])
    w3_eFD = stacked_parameters([expert.w3.weight for expert in experts])
    w2_eDF = stacked_parameters([expert.w2.weight for expert in experts])
    return w1_eFD.transpose(1, 2), w3_eFD.transpose(1, 2), w2_eDF.transpose(1, 2)


def swiglu_capacity(
    x_eCD: torch.Tensor, w1_eDF: torch.Tensor, w3_eDF: torch.Tensor, w2_eFD: torch.Tensor
) -> torch.Tensor:
    """y_eCD = (silu(x W1) * (x W3)) W2 per expert, every expert holding C rows (padding included)."""
    if x_eCD.dim() != 3:
        raise ValueError(f"x_eCD must be 3-D [e, C, D], got shape {tuple(x_eCD.shape)}")
    _check_weights(x_eCD.shape[-1], w1_eDF, w3_eDF, w2_eFD)
    if x_eCD.shape[0] != w1_eDF.shape[0]:
        raise ValueError(f"x_eCD has {x_eCD.shape[0]} experts, the weights have {w1_eDF.shape[0]}")
    num_experts, capacity, dim = x_eCD.shape
    if capacity_uses_loop(x_eCD):
        # Large groups on a CPU: the loop of plain matmuls beats the batched one too (see the constant).
        # Cast as `torch.bmm` would under autocast; the loop's node runs with autocast off.
        x_eCD, w1_eDF, w3_eDF, w2_eFD = _autocast_operands(x_eCD, w1_eDF, w3_eDF, w2_eFD)
        x_ND = x_eCD.reshape(num_experts * capacity, dim)
        counts_e = torch.full((num_experts,), capacity, dtype=torch.int64)
        return _swiglu_split_loop(x_ND, counts_e, w1_eDF, w3_eDF, w2_eFD).view(num_experts, capacity, dim)
    h_eCF = F.silu(torch.bmm(x_eCD, w1_eDF)) * torch.bmm(x_eCD, w3_eDF)
    return torch.bmm(h_eCF, w2_eFD)


def swiglu_grouped(
    x_ND: torch.Tensor,
    counts_e: torch.Tensor | Sequence[int],
    w1_eDF: torch.Tensor,
    w3_eDF: torch.Tensor,
    w2_eFD: torch.Tensor,
    *,
    use_grouped_mm: bool | None = None,
    padded: bool = False,
) -> torch.Tensor:
    """y_ND for rows sorted by expert: rows counts[0] .. belong to expert 0, the next counts[1] to expert 1, ...

    `use_grouped_mm`: None picks `torch._grouped_mm` wherever it runs, except on a CPU with many rows
    per expert (see `uses_grouped_mm`); False forces the loop over experts, True insists on the
    grouped GEMM.
    Zero-row experts are fine. `counts_e` must sum to N; that is checked when the counts are on
    the CPU, but not for CUDA counts on the grouped-GEMM path, where checking would cost a
    device-to-host sync (rows past the last offset would come back uninitialised).

    `padded=True`: the counts may sum to fewer than N; the rows past their total are padding
    (token choice's dropped assignments, sorted after the kept ones). Their outputs are zero and
    they receive zero gradient. On the grouped-GEMM path the total stays on the device, so a
    capacity layer needs no host sync to learn how many assignments it kept.
    """
    if x_ND.dim() != 2:
        raise ValueError(f"x_ND must be 2-D [N, D], got shape {tuple(x_ND.shape)}")
    _check_weights(x_ND.shape[-1], w1_eDF, w3_eDF, w2_eFD)
    num_experts = w1_eDF.shape[0]
    # Counts given as a list stay on the CPU, so they are always checked; offsets move to x's device below.
    counts_e = _counts_tensor(counts_e, torch.device("cpu"))
    if counts_e.dim() != 1 or counts_e.shape[0] != num_experts:
        raise ValueError(f"counts_e must be 1-D with one count per expert ({num_experts}), got shape {tuple(counts_e.shape)}")
    if counts_e.dtype.is_floating_point or counts_e.dtype == torch.bool:
        raise ValueError(f"counts_e must hold integers, got {counts_e.dtype}")
    if counts_e.device.type == "cpu" and not torch.compiler.is_compiling():
        _check_counts(counts_e.tolist(), x_ND.shape[0], padded)

    x_ND, w1_eDF, w3_eDF, w2_eFD = _autocast_operands(x_ND, w1_eDF, w3_eDF, w2_eFD)
    if use_grouped_mm and not grouped_mm_runs(x_ND, w1_eDF, w2_eFD):
        raise ValueError(
            f"use_grouped_mm=True but torch._grouped_mm cannot run {x_ND.dtype} on {x_ND.device} "
            f"with D={x_ND.shape[-1]}, F={w1_eDF.shape[-1]} (needs fp32/bf16/fp16 and 16-byte rows)"
        )
    grouped = use_grouped_mm if use_grouped_mm is not None else uses_grouped_mm(x_ND, w1_eDF, w2_eFD)
    if not grouped:
        if not padded:
            return _swiglu_split_loop(x_ND, counts_e, w1_eDF, w3_eDF, w2_eFD)
        # The loop sizes its chunks on the host anyway: compute the real rows, append zero padding.
        total = int(counts_e.sum())
        y_ND = _swiglu_split_loop(x_ND[:total], counts_e, w1_eDF, w3_eDF, w2_eFD)
        return torch.cat([y_ND, y_ND.new_zeros(x_ND.shape[0] - total, y_ND.shape[-1])])

    if torch.compiler.is_compiling() and not _TRACEABLE.get(x_ND.dtype, False):
        # A graph cannot hold the op in this dtype (see `_grouped_mm_traces`): run it eagerly, one
        # graph break, rather than fall back to the slower loop.
        return _swiglu_grouped_mm_eager(x_ND, counts_e, w1_eDF, w3_eDF, w2_eFD, padded)
    return _swiglu_grouped_mm(x_ND, counts_e, w1_eDF, w3_eDF, w2_eFD, padded)


def _swiglu_grouped_mm(
    x_ND: torch.Tensor, counts_e: torch.Tensor, w1_eDF: torch.Tensor, w3_eDF: torch.Tensor, w2_eFD: torch.Tensor, padded: bool
) -> torch.Tensor:
    offs_e = torch.cumsum(counts_e.to(x_ND.device), dim=0, dtype=torch.int32)
    padding_N1 = None
    if padded:
        # torch._grouped_mm leaves the rows past the last offset uninitialised, in its output and in
        # its input gradient. Zeroing the input here gives those rows a zero gradient whatever the
        # backward leaves there; zeroing the output below makes them contribute nothing. The weight
        # gradients only ever read rows inside the groups.
        padding_N1 = (torch.arange(x_ND.shape[0], device=x_ND.device) >= offs_e[-1]).unsqueeze(-1)
        x_ND = x_ND.masked_fill(padding_N1, 0)
    x_ND = _aligned(x_ND)
    w1_eDF, w3_eDF, w2_eFD = (_gemm_layout(w) for w in (w1_eDF, w3_eDF, w2_eFD))
    h_NF = F.silu(torch._grouped_mm(x_ND, w1_eDF, offs=offs_e)) * torch._grouped_mm(x_ND, w3_eDF, offs=offs_e)
    y_ND = torch._grouped_mm(h_NF, w2_eFD, offs=offs_e)
    # The caller's gradient may be stride-0 (`y.sum().backward()`) or transposed, which the
    # grouped GEMM's backward rejects; this identity hands it a dense, aligned copy instead.
    y_ND = _DenseGrad.apply(y_ND)
    return y_ND if padding_N1 is None else y_ND.masked_fill(padding_N1, 0)


_swiglu_grouped_mm_eager = torch.compiler.disable(_swiglu_grouped_mm)


def swiglu_loop(x_ND: torch.Tensor, counts_e: torch.Tensor | Sequence[int], experts: Sequence[SwiGLUExpert]) -> torch.Tensor:
    """The reference: each expert module on its own rows, concatenated in expert order."""
    if x_ND.dim() != 2:
        raise ValueError(f"x_ND must be 2-D [N, D], got shape {tuple(x_ND.shape)}")
    sizes = _counts_tensor(counts_e, torch.device("cpu")).tolist()
    if len(sizes) != len(experts):
        raise ValueError(f"counts_e has {len(sizes)} entries for {len(experts)} experts")
    _check_counts(sizes, x_ND.shape[0])
    chunks = torch.split(x_ND, sizes)
    return torch.cat([expert(chunk) for expert, chunk in zip(experts, chunks, strict=True)])


def capacity_uses_loop(x_eCD: torch.Tensor) -> bool:
    """Whether `swiglu_capacity` runs the loop of plain matmuls rather than `torch.bmm` (a CPU with
    `CPU_LOOP_ROWS_PER_EXPERT` rows per expert or more)."""
    return x_eCD.device.type == "cpu" and x_eCD.shape[1] >= CPU_LOOP_ROWS_PER_EXPERT


def uses_grouped_mm(x_ND: torch.Tensor, w1_eDF: torch.Tensor, w2_eFD: torch.Tensor) -> bool:
    """Whether `swiglu_grouped` takes the `torch._grouped_mm` path for operands like these (by default)."""
    if not grouped_mm_runs(x_ND, w1_eDF, w2_eFD):
        return False
    return x_ND.device.type != "cpu" or x_ND.shape[0] < CPU_LOOP_ROWS_PER_EXPERT * w1_eDF.shape[0]


def padding_rows_cost_nothing(x_ND: torch.Tensor, w1_eDF: torch.Tensor, w2_eFD: torch.Tensor) -> bool:
    """Whether `swiglu_grouped(..., padded=True)` computes only the real rows without waiting for the
    device: `torch._grouped_mm` (after autocast, as `swiglu_grouped` casts), or any path on a CPU,
    where reading the row count to the host costs nothing. Elsewhere the loop would read the counts
    to the host, and a batched GEMM over every row, padding included, is the better choice."""
    if x_ND.device.type == "cpu":
        return True
    # Decided from dtypes and widths alone: casting the operands here (weights included) would copy
    # them once more on every forward.
    device_type = x_ND.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)  # swiglu_grouped casts every operand to it
    elif w1_eDF.dtype == x_ND.dtype == w2_eFD.dtype:
        dtype = x_ND.dtype
    else:
        return False
    return _grouped_mm_fits(x_ND.device, dtype, x_ND.shape[-1], w1_eDF.shape[-1])


def grouped_mm_runs(x_ND: torch.Tensor, w1_eDF: torch.Tensor, w2_eFD: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm` can run operands like these at all (dtype, device, 16-byte rows)."""
    dtype = x_ND.dtype
    if w1_eDF.dtype != dtype or w2_eFD.dtype != dtype:
        return False
    return _grouped_mm_fits(x_ND.device, dtype, x_ND.shape[-1], w1_eDF.shape[-1])


def _grouped_mm_fits(device: torch.device, dtype: torch.dtype, dim: int, hidden: int) -> bool:
    if not grouped_mm_available(device, dtype):
        return False
    # D and F are the row strides of x, the hidden activations, the output and the weights.
    align = _ALIGN_BYTES // dtype.itemsize
    return dim % align == 0 and hidden % align == 0


def grouped_mm_available(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> bool:
    """Whether `torch._grouped_mm` runs forward and backward, correctly, on this device and dtype.

    Decided once per (device, dtype) by a tiny call with a zero-row group, checked against a loop.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (device.type, device.index, dtype)
    if torch.compiler.is_compiling():
        # A graph cannot run the probe (it calls backward); `warm_grouped_mm_probe` ran it eagerly
        # first. Unprobed, the answer is "no": the loop, slower but right.
        return _PROBED.get(key, False)
    if key not in _PROBED:
        _PROBED[key] = _probe_grouped_mm(device, dtype)
    return _PROBED[key]


def warm_grouped_mm_probe(device: torch.device | str, dtypes: Sequence[torch.dtype]) -> None:
    """Probe `torch._grouped_mm` for these dtypes (and autocast's, when on) outside any compiled
    graph, so that a compiled caller finds the answers (see `grouped_mm_available`)."""
    device = torch.device(device)
    if torch.is_autocast_enabled(device.type):
        dtypes = (*dtypes, torch.get_autocast_dtype(device.type))
    for dtype in set(dtypes):
        grouped_mm_available(device, dtype)
        if dtype not in _TRACEABLE:
            _TRACEABLE[dtype] = _grouped_mm_traces(dtype)


_PROBED: dict[tuple[str, int | None, torch.dtype], bool] = {}
"""(device type, index, dtype) -> whether `torch._grouped_mm` runs there; probed once per process."""
_TRACEABLE: dict[torch.dtype, bool] = {}
"""dtype -> whether a compiled graph can hold `torch._grouped_mm` (`_grouped_mm_traces`)."""


def _grouped_mm_traces(dtype: torch.dtype) -> bool:
    """Whether a compiled graph can hold `torch._grouped_mm` in this dtype: its shape function (the
    meta kernel, which tracing runs) accepts bf16 only in torch 2.13, while the CPU and CUDA kernels
    also take fp32."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        x_ND = torch.empty(8, 16, device="meta", dtype=dtype)
        w_eDF = torch.empty(2, 32, 16, device="meta", dtype=dtype).transpose(1, 2)
        torch._grouped_mm(x_ND, w_eDF, offs=torch.empty(2, device="meta", dtype=torch.int32))
        return True
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return False


def _probe_grouped_mm(device: torch.device, dtype: torch.dtype) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    # The first caller may be inside torch.no_grad() (an eval step): the probe's backward must
    # still run, or the answer "no" would be cached for the whole process. It may also be inside
    # activation checkpointing, whose hooks count the tensors a forward saves and require its
    # recomputation (where the answer is cached and no probe runs) to save as many: identity hooks
    # keep the probe's own tensors out of that count.
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        return _grouped_mm_runs(device, dtype)


def _grouped_mm_runs(device: torch.device, dtype: torch.dtype) -> bool:
    try:
        # Small integers are exact in every dtype tried, so the comparison can be strict-ish.
        generator = torch.Generator().manual_seed(0)
        x_ND = torch.randint(-2, 3, (6, 8), generator=generator).to(device, dtype).requires_grad_()
        w_eFD = torch.randint(-2, 3, (3, 16, 8), generator=generator).to(device, dtype)
        w_eDF = w_eFD.transpose(1, 2).requires_grad_()
        counts = [2, 0, 4]
        offs_e = torch.tensor(counts, device=device).cumsum(0, dtype=torch.int32)
        y_NF = torch._grouped_mm(x_ND, w_eDF, offs=offs_e)
        y_NF.backward(torch.ones_like(y_NF))
        chunks = torch.split(x_ND.detach().float(), counts)
        want = torch.cat([chunk @ w_eDF[i].detach().float() for i, chunk in enumerate(chunks)])
        return (
            torch.allclose(y_NF.detach().float(), want)
            and x_ND.grad is not None
            and w_eDF.grad is not None
            and bool(torch.isfinite(w_eDF.grad).all())
        )
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return False


class _DenseGrad(torch.autograd.Function):
    """Identity forward; backward passes the gradient on as a dense, 16-byte-aligned tensor."""

    @staticmethod
    def forward(ctx, y: torch.Tensor) -> torch.Tensor:
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _aligned(grad)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """Row-major and 16-byte aligned; copies only when it is not already."""
    if t.numel() == 0:
        # An empty tensor counts as contiguous whatever its strides ((0, 0) when expanded from a
        # scalar, as `y.sum()`'s gradient is), and the grouped GEMM rejects those strides.
        return t.clone(memory_format=torch.contiguous_format)  # (a clone, so that autograd still sees through it)
    t = t.contiguous()
    if torch.compiler.is_compiling():
        # No data pointer while tracing; inductor allocates aligned buffers and checks the
        # alignment of a graph's inputs itself.
        return t
    if t.data_ptr() % _ALIGN_BYTES != 0:
        t = t.clone()
    return t


def _gemm_layout(w_eIO: torch.Tensor) -> torch.Tensor:
    """Row- or column-major per expert and aligned, as the grouped GEMM needs; stacked weights already are."""
    row_major = w_eIO.stride(-1) == 1
    col_major = w_eIO.stride(-2) == 1
    if (row_major or col_major) and (torch.compiler.is_compiling() or w_eIO.data_ptr() % _ALIGN_BYTES == 0):
        return w_eIO
    return _aligned(w_eIO)


def _autocast_operands(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Cast to the autocast dtype when autocast is on, as `@` would: `_grouped_mm` is not on autocast's lists."""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) for t in tensors)


def _swiglu_split_loop(
    x_ND: torch.Tensor, counts_e: torch.Tensor, w1_eDF: torch.Tensor, w3_eDF: torch.Tensor, w2_eFD: torch.Tensor
) -> torch.Tensor:
    """The same math as the grouped path, one expert at a time (any dtype, any device). The callers
    have already cast the operands to the autocast dtype, where autocast is on.

    Eagerly, one autograd node (`_SplitLoopSwiGLU`) that writes every expert's output, input
    gradient and weight gradients straight into preallocated buffers; traced by torch.compile (or
    with mixed dtypes, which it leaves to `@` to reject), the plain autograd loop.
    """
    sizes = counts_e.tolist()
    _check_counts(sizes, x_ND.shape[0])
    if torch.compiler.is_compiling() or not x_ND.dtype == w1_eDF.dtype == w2_eFD.dtype:
        return _swiglu_split_loop_autograd(x_ND, sizes, w1_eDF, w3_eDF, w2_eFD)
    return _SplitLoopSwiGLU.apply(x_ND, sizes, w1_eDF, w3_eDF, w2_eFD)


def _swiglu_split_loop_autograd(
    x_ND: torch.Tensor, sizes: list[int], w1_eDF: torch.Tensor, w3_eDF: torch.Tensor, w2_eFD: torch.Tensor
) -> torch.Tensor:
    outputs = []
    # unbind, not w[i]: indexing differentiates into a zero-filled [e, ...] gradient per expert (e^2
    # weight-sized writes per projection), unbind into one stack of the e expert gradients.
    experts = zip(torch.split(x_ND, sizes), w1_eDF.unbind(0), w3_eDF.unbind(0), w2_eFD.unbind(0), strict=True)
    for x_nD, w1_DF, w3_DF, w2_FD in experts:
        h_nF = F.silu(x_nD @ w1_DF) * (x_nD @ w3_DF)
        outputs.append(h_nF @ w2_FD)
    return torch.cat(outputs)


class _SplitLoopSwiGLU(torch.autograd.Function):
    """y_ND = (silu(x W1) * (x W3)) W2 per expert's rows, without autograd's per-expert graph.

    The forward writes each expert's output into one [N, D] tensor (no `torch.cat`) and keeps the two
    pre-activations a = x W1, b = x W3 ([N, F] each); the backward recomputes silu(a) and h from them
    and writes the input gradient and each expert's weight gradients into [N, D] and [e, ...] tensors
    laid out like the weights (no `torch.stack` of per-expert gradients, and a contiguous slice per
    expert where the weights are stacked views of the experts' own parameters).
    """

    @staticmethod
    def forward(ctx, x_ND, sizes, w1_eDF, w3_eDF, w2_eFD):
        num_rows, hidden = x_ND.shape[0], w1_eDF.shape[-1]
        with torch.autocast(x_ND.device.type, enabled=False):
            y_ND = x_ND.new_empty(num_rows, x_ND.shape[-1])
            a_NF = x_ND.new_empty(num_rows, hidden)
            b_NF = x_ND.new_empty(num_rows, hidden)
            for i, (start, end) in enumerate(_bounds(sizes)):
                if start == end:
                    continue
                x_nD, a_nF, b_nF = x_ND[start:end], a_NF[start:end], b_NF[start:end]
                torch.mm(x_nD, w1_eDF[i], out=a_nF)
                torch.mm(x_nD, w3_eDF[i], out=b_nF)
                h_nF = F.silu(a_nF).mul_(b_nF)
                torch.mm(h_nF, w2_eFD[i], out=y_ND[start:end])
        ctx.sizes = sizes
        ctx.save_for_backward(x_ND, w1_eDF, w3_eDF, w2_eFD, a_NF, b_NF)
        return y_ND

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy_ND):
        x_ND, w1_eDF, w3_eDF, w2_eFD, a_NF, b_NF = ctx.saved_tensors
        need_x, _, need_w1, need_w3, need_w2 = ctx.needs_input_grad
        need_h = need_x or need_w1 or need_w3
        gx_ND = x_ND.new_empty(x_ND.shape) if need_x else None
        gw1_eDF = _grad_like(w1_eDF) if need_w1 else None
        gw3_eDF = _grad_like(w3_eDF) if need_w3 else None
        gw2_eFD = _grad_like(w2_eFD) if need_w2 else None
        with torch.autocast(x_ND.device.type, enabled=False):
            for i, (start, end) in enumerate(_bounds(ctx.sizes)):
                if start == end:
                    for g_eIO in (gw1_eDF, gw3_eDF, gw2_eFD):
                        if g_eIO is not None:
                            g_eIO[i].zero_()
                    continue
                x_nD, a_nF, b_nF, gy_nD = x_ND[start:end], a_NF[start:end], b_NF[start:end], gy_ND[start:end]
                s_nF = F.silu(a_nF)
                if gw2_eFD is not None:
                    _mm_into(torch.mul(s_nF, b_nF).t(), gy_nD, gw2_eFD[i])
                if not need_h:
                    continue
                dh_nF = torch.mm(gy_nD, w2_eFD[i].t())
                db_nF = s_nF.mul_(dh_nF)  # d/db of silu(a) * b
                da_nF = torch.ops.aten.silu_backward(dh_nF.mul_(b_nF), a_nF)
                if gw1_eDF is not None:
                    _mm_into(x_nD.t(), da_nF, gw1_eDF[i])
                if gw3_eDF is not None:
                    _mm_into(x_nD.t(), db_nF, gw3_eDF[i])
                if gx_ND is not None:
                    gx_nD = gx_ND[start:end]
                    torch.mm(da_nF, w1_eDF[i].t(), out=gx_nD)
                    gx_nD.addmm_(db_nF, w3_eDF[i].t())
        return gx_ND, None, gw1_eDF, gw3_eDF, gw2_eFD


def _bounds(sizes: list[int]) -> list[tuple[int, int]]:
    """(start, end) row range of every expert, from its row count."""
    bounds, start = [], 0
    for size in sizes:
        bounds.append((start, start + size))
        start += size
    return bounds


def _grad_like(w_eIO: torch.Tensor) -> torch.Tensor:
    """An uninitialised gradient for w_eIO, contiguous per expert in w_eIO's own orientation: column-major
    [e, I, O] (the transposed view of stacked nn.Linear weights) where w_eIO is, so that each expert's
    parameter receives a contiguous slice."""
    num_experts, rows, cols = w_eIO.shape
    if w_eIO.stride(-2) == 1 and w_eIO.stride(-1) != 1:
        return w_eIO.new_empty(num_experts, cols, rows).transpose(1, 2)
    return w_eIO.new_empty(num_experts, rows, cols)


def _mm_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """out = a @ b, where out is contiguous or the transpose of a contiguous matrix."""
    if out.is_contiguous():
        torch.mm(a, b, out=out)
    else:
        torch.mm(b.t(), a.t(), out=out.t())


def _counts_tensor(counts_e: torch.Tensor | Sequence[int], device: torch.device) -> torch.Tensor:
    if isinstance(counts_e, torch.Tensor):
        return counts_e
    return torch.tensor(list(counts_e), dtype=torch.int64, device=device)


def _check_counts(sizes: list[int], num_rows: int, padded: bool = False) -> None:
    if any(size < 0 for size in sizes):
        raise ValueError(f"counts_e must be non-negative, got {sizes}")
    if padded and sum(sizes) > num_rows:
        raise ValueError(f"counts_e must sum to at most the number of rows of x_ND ({num_rows}), got {sum(sizes)}")
    if not padded and sum(sizes) != num_rows:
        raise ValueError(f"counts_e must sum to the number of rows of x_ND ({num_rows}), got {sum(sizes)}")


def _check_weights(dim: int, w1_eDF: torch.Tensor, w3_eDF: torch.Tensor, w2_eFD: torch.Tensor) -> None:
    if w1_eDF.dim() != 3 or w1_eDF.shape[1] != dim:
        raise ValueError(f"w1_eDF must be [e, D={dim}, F], got shape {tuple(w1_eDF.shape)}")
    if w3_eDF.shape != w1_eDF.shape:
        raise ValueError(f"w3_eDF must have w1_eDF's shape {tuple(w1_eDF.shape)}, got {tuple(w3_eDF.shape)}")
    num_experts, _, hidden = w1_eDF.shape
    if tuple(w2_eFD.shape) != (num_experts, hidden, dim):
        raise ValueError(f"w2_eFD must be [e={num_experts}, F={hidden}, D={dim}], got shape {tuple(w2_eFD.shape)}")
    if num_experts < 1:
        raise ValueError("the weights must hold at least one expert (e >= 1)")
    if not w1_eDF.dtype == w3_eDF.dtype == w2_eFD.dtype:
        raise ValueError(f"w1_eDF, w3_eDF, w2_eFD must share one dtype, got {w1_eDF.dtype}, {w3_eDF.dtype}, {w2_eFD.dtype}")
