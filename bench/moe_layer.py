"""MoE layer speed: forward+backward of every variant in one process, on the same inputs.

Legend: T tokens, D model dim, E experts, K top-k, F expert hidden, C capacity, N rows (T*K routed pairs).

    python -m bench.moe_layer [--device cpu|cuda] [--shapes cpu|gpu] [--repeats N] [--json PATH]

Method
- All variants of one shape get the same x_TD (seeded) and the same incoming gradient grad_TD;
  one step is `y = variant(x); y.backward(grad_TD)`. A fixed dense gradient rather than
  `y.sum()` keeps a loss kernel out of the timing and gives the backward realistic strides.
- Gradients (parameters and x) are set to None before every step, outside the timed window.
- All variants of a shape are built side by side and warmed up (`--warmup` untimed steps each),
  then timed in `--repeats` interleaved rounds: one step of every variant per round, the order
  rotated each round, each step bracketed by `torch.cuda.synchronize()` on GPU. The table shows
  the median and the minimum ms. Interleaving puts each variant's steps beside the baseline's in
  time, so a slow drift of the machine (other load, clocks) reaches every variant alike.
- Active FLOPs count only the expert GEMMs of the K experts each token visits: three D x F
  matmuls per (token, choice) at 2 FLOPs per multiply-add, so forward = 2*3*T*K*D*F and
  forward+backward = 3 x forward (the backward does an input-gradient and a weight-gradient
  GEMM per forward GEMM). The router (2*T*D*E), dispatch and the padding slots of capacity
  mode are not counted: work a variant wastes shows up as lower TFLOP/s.
- "vs dense" = the median over rounds of (variant ms / `dense` ms in the same round), where `dense`
  is a SwiGLU FFN of hidden K*F, which has exactly the active FLOPs of top-K experts of hidden F:
  the price of sparsity at equal useful work. The JSON also keeps the ratio of the two medians.
  A compiled variant (`*+compile`, asked for by name) is compared with `dense+compile` when that ran:
  inductor fuses the dense FFN's SiLU x gate too. Warm-up steps absorb the compilation.
- Peak memory is measured in a separate pass after all timings, one step per variant, as the
  growth over what was in use before the step (weights, x, grad_TD are already there; the
  step adds activations, gradients and temporaries). CUDA: `max_memory_allocated` after
  `reset_peak_memory_stats`, in this process. CPU: growth of the peak resident set (VmHWM,
  reset through /proc/self/clear_refs) with glibc told to mmap every block above 128 KiB, so
  freed tensors leave the resident set at once, in a fresh child process (see
  `measure_memory_in_child`); `n/a` where that cannot be arranged. The malloc setting would
  slow the timed steps, which is why memory gets its own pass.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.output import device_name, json_destination
from train.durable import write_text_atomically

CAPACITY_FACTOR = 1.25
VARIANTS = (
    "dense", "deepspeed", "ours-capacity", "ours-dropless", "ours-expert-choice", "grouped-floor", "grouped-floor+stack",
    "bmm-floor", "loop-floor",
)  # fmt: skip
COMPILED_VARIANTS = ("dense+compile", "ours-capacity+compile", "ours-dropless+compile", "ours-expert-choice+compile")
"""Not run by default (each compiles per shape); no memory pass (it would compile them again)."""


@dataclass(frozen=True)
class Shape:
    tokens: int
    dim: int
    hidden: int
    experts: int
    top_k: int
    dtype: torch.dtype

    @property
    def label(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return f"T={self.tokens} D={self.dim} F={self.hidden} E={self.experts} K={self.top_k} {dtype}"

    @property
    def active_flops(self) -> int:
        """Forward+backward FLOPs of the expert GEMMs: 3 x 2*3*T*K*D*F."""
        return 3 * 2 * 3 * self.tokens * self.top_k * self.dim * self.hidden


SHAPES = {
    "cpu": [
        Shape(4096, 256, 1024, 8, 1, torch.float32),
        Shape(4096, 256, 1024, 8, 2, torch.float32),
    ],
    "gpu": [
        Shape(16384, 1024, 4096, 8, 2, torch.bfloat16),
        Shape(8192, 768, 3072, 8, 2, torch.bfloat16),
        Shape(16384, 1024, 512, 64, 8, torch.bfloat16),
    ],
}


@dataclass
class Step:
    """One variant built for one shape."""

    run: Callable[[], None]
    """Forward and backward with the fixed incoming gradient."""
    params: list[torch.Tensor]
    """Every leaf whose gradient the step fills (parameters and the input)."""
    note: Callable[[], str] = lambda: ""
    """What the variant actually did (gate, capacity, kernel path), read after it ran."""

    def reset(self) -> None:
        for p in self.params:
            p.grad = None


@dataclass
class Result:
    shape: Shape
    variant: str
    times_ms: list[float] = field(default_factory=list)
    note: str = ""
    error: str | None = None
    peak_mib: float | None = None
    memory_error: str | None = None

    @property
    def median_ms(self) -> float | None:
        return statistics.median(self.times_ms) if self.times_ms else None

    @property
    def tflops(self) -> float | None:
        ms = self.median_ms
        return self.shape.active_flops / (ms * 1e-3) / 1e12 if ms else None


# ---------------------------------------------------------------------------------------------- variants


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def _expert(dim: int, hidden: int, index: int, device: torch.device, dtype: torch.dtype):
    from moe.experts import SwiGLUExpert, expert_generator

    expert = SwiGLUExpert(dim, hidden)
    expert.init_weights(0.02, 0.02, expert_generator(0, 0, index))
    return expert.to(device, dtype)


def _balanced_counts(rows: int, experts: int) -> list[int]:
    base, extra = divmod(rows, experts)
    return [base + (1 if i < extra else 0) for i in range(experts)]


def build_dense(s: Shape, x_TD: torch.Tensor, grad_TD: torch.Tensor, compiled: bool = False) -> Step:
    ffn = _expert(s.dim, s.top_k * s.hidden, 0, x_TD.device, s.dtype)
    if compiled:
        ffn.compile()  # inductor fuses SiLU x gate between the GEMMs, as it does in the compiled MoE layer
    x = _leaf(x_TD)
    return Step(lambda: ffn(x).backward(grad_TD), [*ffn.parameters(), x], lambda: f"SwiGLU FFN, hidden K*F={s.top_k * s.hidden}")


def build_deepspeed(s: Shape, x_TD: torch.Tensor, grad_TD: torch.Tensor) -> Step:
    from deepspeed.moe.layer import MoE

    from moe.experts import SwiGLUExpert, expert_generator

    layer = MoE(
        s.dim,
        expert=SwiGLUExpert(s.dim, s.hidden),
        num_experts=s.experts,
        ep_size=1,
        k=s.top_k,
        capacity_factor=CAPACITY_FACTOR,
        eval_capacity_factor=CAPACITY_FACTOR,
        min_capacity=0,
        drop_tokens=True,
        top2_2nd_expert_sampling=False,
    )
    # `Experts` deep-copies one module; distinct weights do not change the speed but keep the
    # experts comparable to ours.
    for i, expert in enumerate(layer.deepspeed_moe.experts.deepspeed_experts):
        expert.init_weights(0.02, 0.02, expert_generator(0, 0, i))
    layer.set_deepspeed_parallelism()
    layer.to(x_TD.device, s.dtype).train()
    x = _leaf(x_TD)

    def run() -> None:
        y, _, _ = layer(x)
        y.backward(grad_TD)

    gate = {1: "top1gating", 2: "top2gating"}.get(s.top_k, "topkgating")
    return Step(run, [*layer.parameters(), x], lambda: f"{gate}, cf {CAPACITY_FACTOR}")


def build_ours(
    s: Shape, x_TD: torch.Tensor, grad_TD: torch.Tensor, capacity_factor: float | None, router: str = "token_choice",
    compiled: bool = False,
) -> Step:
    """Our layer. Expert choice runs with c = K (every expert takes T*K/E tokens of the batch), which
    has exactly the active FLOPs of top-K token choice, so the same dense FFN is its baseline.
    `compiled`: `MoELayer.compile_forward()`, what `trainer.compile=true` does to it."""
    from moe import MoEConfig, MoELayer

    if router == "expert_choice":
        cfg = MoEConfig(num_experts=s.experts, router=router, capacity_factor=float(s.top_k), ec_group="batch",
                        min_capacity=0)
    else:
        cfg = MoEConfig(num_experts=s.experts, top_k=s.top_k, capacity_factor=capacity_factor, min_capacity=0)
    layer = MoELayer(s.dim, s.hidden, cfg)
    layer.set_deepspeed_parallelism()
    layer.to(x_TD.device, s.dtype).train()
    # Lay the experts out as DeepSpeed's ZeRO flat buffer does in training, so the per-forward stack
    # of expert weights is a view, as it is inside the engine (moe/expert_storage.py).
    layer.pack_expert_weights()
    if compiled:
        layer.compile_forward()
    x = _leaf(x_TD)
    seen: dict[str, int] = {}

    def run() -> None:
        y, aux = layer(x)
        y.backward(grad_TD)
        seen["capacity"] = aux.capacity

    def note() -> str:
        if router == "expert_choice":
            return f"expert choice c={s.top_k}, C={seen.get('capacity')}"
        mode = "dropless" if capacity_factor is None else f"cf {capacity_factor}"
        capacity = seen.get("capacity")
        return mode if capacity is None else f"{mode}, C={capacity}"

    return Step(run, [*layer.parameters(), x], note)


def build_floor(s: Shape, x_TD: torch.Tensor, grad_TD: torch.Tensor, kind: str) -> Step:
    """Expert GEMMs alone on T*K pre-sorted rows spread evenly over E experts.

    kind: "grouped" (swiglu_grouped on pre-stacked weights), "grouped+stack" (stacking the expert
    modules inside the step), "loop" (swiglu_grouped's per-expert fallback, forced), "bmm"
    (swiglu_capacity on an [E, T*K/E, D] block).
    """
    from moe.grouped_experts import (
        capacity_uses_loop,
        stack_expert_weights,
        swiglu_capacity,
        swiglu_grouped,
        uses_grouped_mm,
    )

    device = x_TD.device
    experts = [_expert(s.dim, s.hidden, i, device, s.dtype) for i in range(s.experts)]
    counts = _balanced_counts(s.tokens * s.top_k, s.experts)
    counts_e = torch.tensor(counts, device=device)
    # Each token repeated K times stands in for its K routed copies.
    x_ND = _leaf(x_TD.repeat(s.top_k, 1))
    grad_ND = grad_TD.repeat(s.top_k, 1)
    # Pre-stacked leaves in the layout stack_expert_weights produces (column-major per expert).
    stacked = [w.detach().requires_grad_(True) for w in stack_expert_weights(experts)]
    path = "torch._grouped_mm" if uses_grouped_mm(x_ND, stacked[0], stacked[2]) else "loop over experts"
    cpu_loop = capacity_uses_loop(x_ND.detach().view(s.experts, -1, s.dim)) if len(set(counts)) == 1 else False
    bmm_path = "loop over experts (swiglu_capacity on a CPU)" if cpu_loop else "torch.bmm"

    if kind == "bmm":
        if len(set(counts)) != 1:
            raise ValueError(f"bmm-floor needs T*K divisible by E, got T*K={s.tokens * s.top_k}, E={s.experts}")
        x_eCD = _leaf(x_ND.detach().view(s.experts, counts[0], s.dim))
        grad_eCD = grad_ND.view(s.experts, counts[0], s.dim)
        return Step(
            lambda: swiglu_capacity(x_eCD, *stacked).backward(grad_eCD), [*stacked, x_eCD], lambda: f"{bmm_path}, C={counts[0]}"
        )
    if kind == "grouped+stack":
        return Step(
            lambda: swiglu_grouped(x_ND, counts_e, *stack_expert_weights(experts)).backward(grad_ND),
            [*(p for e in experts for p in e.parameters()), x_ND],
            lambda: f"{path}, stack per step",
        )
    if kind == "loop":
        return Step(
            lambda: swiglu_grouped(x_ND, counts_e, *stacked, use_grouped_mm=False).backward(grad_ND),
            [*stacked, x_ND],
            lambda: "loop over experts (forced)",
        )
    return Step(lambda: swiglu_grouped(x_ND, counts_e, *stacked).backward(grad_ND), [*stacked, x_ND], lambda: path)


BUILDERS: dict[str, Callable[[Shape, torch.Tensor, torch.Tensor], Step]] = {
    "dense": build_dense,
    "deepspeed": build_deepspeed,
    "ours-capacity": lambda s, x, g: build_ours(s, x, g, CAPACITY_FACTOR),
    "ours-dropless": lambda s, x, g: build_ours(s, x, g, None),
    "ours-expert-choice": lambda s, x, g: build_ours(s, x, g, None, router="expert_choice"),
    "grouped-floor": lambda s, x, g: build_floor(s, x, g, "grouped"),
    "grouped-floor+stack": lambda s, x, g: build_floor(s, x, g, "grouped+stack"),
    "bmm-floor": lambda s, x, g: build_floor(s, x, g, "bmm"),
    "loop-floor": lambda s, x, g: build_floor(s, x, g, "loop"),
    # Compiled (inductor; the warm-up steps absorb the compilation). Compared with the compiled dense
    # FFN when that ran too: compiling fuses its elementwise work as well.
    "dense+compile": lambda s, x, g: build_dense(s, x, g, compiled=True),
    "ours-capacity+compile": lambda s, x, g: build_ours(s, x, g, CAPACITY_FACTOR, compiled=True),
    "ours-dropless+compile": lambda s, x, g: build_ours(s, x, g, None, compiled=True),
    "ours-expert-choice+compile": lambda s, x, g: build_ours(s, x, g, None, router="expert_choice", compiled=True),
}


# ---------------------------------------------------------------------------------------------- measuring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(step: Step, device: torch.device) -> float:
    """One forward+backward in ms; the gradients it made are dropped afterwards, outside the window,
    so that the variants waiting for their turn hold only their weights."""
    step.reset()
    _sync(device)
    start = time.perf_counter()
    step.run()
    _sync(device)
    elapsed_ms = (time.perf_counter() - start) * 1e3
    step.reset()
    return elapsed_ms


def paired_ratio(times_ms: list[float], baseline_ms: list[float]) -> float | None:
    """Median over rounds of (this variant's time / the baseline's time in the same round).

    The rounds interleave the variants, so both times of a pair saw the same machine state; a drift
    (another process, clocks, thermals) moves both and cancels in the ratio, where a ratio of two
    medians taken minutes apart would carry it."""
    if not times_ms or len(times_ms) != len(baseline_ms):
        return None
    return statistics.median(t / b for t, b in zip(times_ms, baseline_ms, strict=True))


class PeakMemory:
    """Memory one step adds at its peak, in MiB (see the module docstring); None where unmeasurable."""

    # glibc's mallopt parameters (malloc.h).
    _M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.libc = None
        if device.type == "cpu":
            self.libc = self._prepare_cpu()

    def _prepare_cpu(self):
        try:
            libc = ctypes.CDLL("libc.so.6")
            threshold = 128 * 1024
            if not (libc.mallopt(self._M_MMAP_THRESHOLD, threshold) and libc.mallopt(self._M_TRIM_THRESHOLD, threshold)):
                return None
            self._reset_hwm()
            self._status_kib("VmHWM")
            return libc
        except (OSError, AttributeError, ValueError):
            return None

    @staticmethod
    def _reset_hwm() -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    @staticmethod
    def _status_kib(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        raise ValueError(f"{key} not in /proc/self/status")

    @property
    def method(self) -> str:
        if self.device.type == "cuda":
            return "cuda max_memory_allocated growth over one step"
        return "RSS peak growth over one step (VmHWM, glibc mmap threshold 128 KiB)" if self.libc else "n/a"

    def measure(self, step: Step) -> float | None:
        step.reset()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            step.run()
            torch.cuda.synchronize(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - base) / 2**20
        if self.libc is None:
            return None
        self.libc.malloc_trim(0)
        base = self._status_kib("VmRSS")
        self._reset_hwm()
        step.run()
        return (self._status_kib("VmHWM") - base) / 1024


# ---------------------------------------------------------------------------------------------- driver


def _inputs(s: Shape, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)
    x_TD = torch.randn(s.tokens, s.dim, generator=generator)
    grad_TD = torch.randn(s.tokens, s.dim, generator=generator) / s.tokens**0.5
    return x_TD.to(device, s.dtype), grad_TD.to(device, s.dtype)


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _error_text(exc: BaseException) -> str:
    first_line = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first_line[:110]}"


def run_shape(s: Shape, variants: list[str], device: torch.device, warmup: int, repeats: int) -> list[Result]:
    """Every variant of one shape, built side by side and timed in interleaved rounds.

    Each variant is built and warmed up in turn; then every round times one step of each variant,
    the order rotated by one per round so that no variant always runs first (or right after the same
    neighbour). A variant that fails (to build, to warm up, or in a round: OOM, an upstream assert)
    keeps its error and leaves the rounds; the others go on."""
    # A shape of its own for the compiled variants: left over from the previous shape, dynamo's
    # cache would recompile them with symbolic sizes (automatic dynamic shapes), which training,
    # whose shapes never change, does not run.
    torch._dynamo.reset()
    x_TD, grad_TD = _inputs(s, device)
    print(f"[bench] {s.label} on {device.type}: {len(variants)} variants, {repeats} interleaved rounds", file=sys.stderr)
    results = [Result(s, name) for name in variants]
    steps: dict[int, Step] = {}
    for i, result in enumerate(results):
        try:
            step = BUILDERS[result.variant](s, x_TD, grad_TD)
            for _ in range(warmup):
                step.reset()
                step.run()
            step.reset()
            steps[i] = step
        except Exception as exc:  # one failing variant must not end the run
            result.error = _error_text(exc)
            _release(device)
    for round_index in range(repeats):
        order = list(steps)
        shift = round_index % max(len(order), 1)
        for i in order[shift:] + order[:shift]:
            try:
                results[i].times_ms.append(time_once(steps[i], device))
            except Exception as exc:
                results[i].error, results[i].times_ms = _error_text(exc), []
                del steps[i]
                _release(device)
    for i, step in steps.items():
        results[i].note = step.note()
    steps.clear()
    _release(device)
    for result in results:
        shown = f"{result.median_ms:.1f} ms" if result.error is None else result.error
        print(f"[bench]   {result.variant:<26} {shown}", file=sys.stderr)
    return results


def run_all(shapes: list[Shape], variants: list[str], device: torch.device, warmup: int, repeats: int) -> list[Result]:
    return [result for s in shapes for result in run_shape(s, variants, device, warmup, repeats)]


def measure_memory(results: list[Result], device: torch.device) -> str:
    memory = PeakMemory(device)
    if memory.method == "n/a":
        return memory.method
    inputs: dict[Shape, tuple[torch.Tensor, torch.Tensor]] = {}
    for result in results:
        if result.error is not None or result.variant in COMPILED_VARIANTS:
            continue
        s = result.shape
        if s not in inputs:
            inputs.clear()
            _release(device)
            inputs[s] = _inputs(s, device)
        try:
            step = BUILDERS[result.variant](s, *inputs[s])
            step.reset()
            step.run()  # warm: lazy state (process-group lookups, caches) is not the step's memory
            result.peak_mib = memory.measure(step)
            del step
        except Exception as exc:
            result.memory_error = _error_text(exc)
        _release(device)
    return memory.method


def measure_memory_in_child(results: list[Result], args: argparse.Namespace) -> str:
    """The CPU memory pass, run by a fresh interpreter.

    After the timing pass this process's allocator and libraries hold state (freed heap, scratch
    buffers) that made one step's resident growth read up to ~40 MiB high and vary from run to
    run; in a fresh process the figures repeat to the MiB and match the tensors' own sizes.
    """
    wanted = [v for v in VARIANTS if any(r.variant == v and r.error is None for r in results)]
    if not wanted:
        return "n/a"
    # The child makes its own world of one on a free port, not this process's rendezvous.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "memory.json"
        command = [
            sys.executable, "-m", "bench.moe_layer", "--device", "cpu", "--shapes", args.shapes,
            "--threads", str(args.threads), "--variants", ",".join(wanted), "--memory-pass", str(out),
        ]  # fmt: skip
        proc = subprocess.run(command, env=env, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            return f"n/a (the memory pass failed: {last[:160]})"
        data = json.loads(out.read_text())
    for r in results:
        entry = data["peaks"].get(f"{r.shape.label}|{r.variant}")
        if entry is not None and r.error is None:
            r.peak_mib, r.memory_error = entry["peak_mib"], entry["error"]
    return f"{data['method']}, in a fresh process"


def _memory_pass_child(args: argparse.Namespace, device: torch.device) -> int:
    results = [Result(s, v) for s in SHAPES[args.shapes] for v in args.variants]
    method = measure_memory(results, device)
    peaks = {f"{r.shape.label}|{r.variant}": {"peak_mib": r.peak_mib, "error": r.memory_error} for r in results}
    args.memory_pass.write_text(json.dumps({"method": method, "peaks": peaks}))
    return 0


def _baseline(results: list[Result], r: Result) -> Result | None:
    """The "vs dense" baseline of a row: the compiled dense FFN for a compiled variant when it ran,
    else the eager one."""
    wanted = ("dense+compile", "dense") if r.variant.endswith("+compile") else ("dense",)
    for name in wanted:
        found = next((d for d in results if d.shape == r.shape and d.variant == name and d.error is None and d.times_ms), None)
        if found:
            return found
    return None


def vs_dense(results: list[Result], r: Result) -> float | None:
    """Paired ratio to the row's baseline (`paired_ratio`); None without one."""
    base = _baseline(results, r)
    return paired_ratio(r.times_ms, base.times_ms) if base is not None and r.error is None else None


def format_table(results: list[Result]) -> str:
    lines = []
    for s in dict.fromkeys(r.shape for r in results):
        rows = [r for r in results if r.shape == s]
        lines.append(f"\n{s.label}: {s.active_flops / 1e9:.1f} active GFLOP per forward+backward")
        lines.append("| variant | ms (median) | min | TFLOP/s | vs dense | peak MiB | note |")
        lines.append("|---|---|---|---|---|---|---|")
        for r in rows:
            if r.error is not None:
                lines.append(f"| {r.variant} | - | - | - | - | - | {r.error} |")
                continue
            ratio = vs_dense(results, r)
            ratio = f"{ratio:.2f}" if ratio is not None else "n/a"
            peak = f"{r.peak_mib:.0f}" if r.peak_mib is not None else "n/a"
            note = r.note if r.memory_error is None else f"{r.note}; memory pass: {r.memory_error}"
            lines.append(
                f"| {r.variant} | {r.median_ms:.2f} | {min(r.times_ms):.2f} | {r.tflops:.3f} | {ratio} | {peak} | {note} |"
            )
    return "\n".join(lines)


def _load_1min() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def to_json(results: list[Result], meta: dict) -> dict:
    rows = []
    for r in results:
        base = _baseline(results, r)
        rows.append({
            "tokens": r.shape.tokens, "dim": r.shape.dim, "hidden": r.shape.hidden, "experts": r.shape.experts,
            "top_k": r.shape.top_k, "dtype": str(r.shape.dtype).removeprefix("torch."), "variant": r.variant,
            "ms_median": r.median_ms, "ms_min": min(r.times_ms) if r.times_ms else None, "ms_all": r.times_ms,
            "active_tflops": r.tflops, "vs_dense": vs_dense(results, r),
            "vs_dense_of_medians": (r.median_ms / base.median_ms) if (base and r.median_ms) else None,
            "peak_mib": r.peak_mib, "memory_error": r.memory_error, "note": r.note, "error": r.error,
        })  # fmt: skip
    return {"meta": meta, "results": rows}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.moe_layer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", choices=sorted(SHAPES), default=None, help="default: cpu on CPU, gpu on CUDA")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed rounds, one step of each variant per round (default 5 on CPU, 30 on CUDA)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2 on CPU, 5 on CUDA)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (CPU runs only)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated subset of {','.join(VARIANTS + COMPILED_VARIANTS)} (default: all but compiled)")
    parser.add_argument("--json", type=Path, default=None, help="default: runs/bench/moe_layer-<device>-<shapes>-<time>.json")
    # Internal: the CPU memory pass in a fresh process writes its figures here and times nothing.
    parser.add_argument("--memory-pass", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    on_cpu = args.device == "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available")
    args.shapes = args.shapes or ("cpu" if on_cpu else "gpu")
    args.repeats = args.repeats if args.repeats is not None else (5 if on_cpu else 30)
    args.warmup = args.warmup if args.warmup is not None else (2 if on_cpu else 5)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS + COMPILED_VARIANTS]
    if unknown or not args.variants:
        parser.error(f"--variants must name some of {', '.join(VARIANTS + COMPILED_VARIANTS)}, got {unknown or 'none'}")
    if args.memory_pass is None:
        try:
            args.json = json_destination(args.json, f"moe_layer-{args.device}-{args.shapes}")
        except ValueError as error:
            parser.error(str(error))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    # DeepSpeed's MoE needs torch.distributed and its expert-parallel groups even for one rank;
    # init_world makes a world of one (gloo on CPU, NCCL on CUDA) and skips the CPU comm-op JIT build.
    from train.distributed import init_world

    world = init_world(args.device)
    if world.world_size != 1:
        raise SystemExit(f"bench.moe_layer runs as one process, got WORLD_SIZE={world.world_size}")
    device = world.device
    if args.memory_pass is not None:
        return _memory_pass_child(args, device)
    # Timed under the host allocator setting CPU training runs with (train/host_memory.py): it speeds
    # up every variant's fresh activations, the dense FFN's most. Not in the memory pass above, which
    # sets malloc its own way to see freed memory leave the resident set.
    host_memory = "default malloc"
    if device.type == "cpu":
        from train.host_memory import keep_freed_memory

        host_memory = "freed blocks kept (train/host_memory.py)" if keep_freed_memory() else "default malloc (not glibc)"
    started = datetime.datetime.now(datetime.timezone.utc)
    # CPU timings move with whatever else runs on the machine; keep the load beside them.
    load_start = _load_1min()

    results = run_all(SHAPES[args.shapes], args.variants, device, args.warmup, args.repeats)
    memory_method = measure_memory(results, device) if device.type == "cuda" else measure_memory_in_child(results, args)
    print(format_table(results))

    import deepspeed

    from moe.grouped_experts import grouped_mm_available

    meta = {
        "date": started.isoformat(timespec="seconds"),
        "device": device_name(device),
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "command": " ".join(["python -m bench.moe_layer", *(argv if argv is not None else sys.argv[1:])]),
        "warmup": args.warmup,
        "repeats": args.repeats,
        "capacity_factor": CAPACITY_FACTOR,
        "grouped_mm_available": {str(s.dtype): grouped_mm_available(device, s.dtype) for s in SHAPES[args.shapes]},
        "flops": "active expert GEMM FLOPs, forward+backward = 3 * 2*3*T*K*D*F",
        "peak_memory": memory_method,
        "host_allocator": host_memory,
        "host_load_1min": {"start": load_start, "end": _load_1min()},
    }
    path = args.json
    write_text_atomically(path, json.dumps(to_json(results, meta), indent=1) + "\n")
    print(f"\n{meta['device']}, torch {meta['torch']}, deepspeed {meta['deepspeed']}; peak memory: {memory_method}")
    print(f"host malloc {host_memory}")
    print(f"host load   1-min average {load_start} at start, {meta['host_load_1min']['end']} at end")
    print(f"json        {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
