"""End-to-end training throughput: our MoE layer vs stock DeepSpeed MoE layers, one process.

    python -m bench.end_to_end [--steps N] [--warmup N] [--json PATH] [hydra overrides ...]
    python -m bench.end_to_end experiment=h100_350m          # on one H100/H200
    python -m bench.end_to_end model=gpt_tiny --steps 5      # CPU smoke
    python -m bench.end_to_end --compile experiment=h100_350m  # also both with trainer.compile=true

The same composed config is trained through the real DeepSpeed engine and `Trainer.train_step`
twice, with `moe.implementation=ours` and `moe.implementation=deepspeed` (stock
`deepspeed.moe.layer.MoE`, its own top-k gate, capacity layout and expert loop), on the same
data. After `--warmup` steps, every step is timed (CUDA synchronised); we report the median.

MFU = FLOPs per token x tokens/s / peak, FLOPs per token = 6 x active matmul parameters (K of E
experts, the output projection, not the embedding lookup) + 12 x layers x width x sequence
(attention), peak = the device's dense bf16 datasheet figure (989 TFLOP/s for H100/H200 SXM), or
a measured fp32 matmul on a CPU.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import NoReturn

import deepspeed
import torch
from hydra import compose, initialize_config_dir

from bench.output import device_name, json_destination
from train.cli import CONF_DIR, override_problem
from train.config import to_run_config
from train.distributed import init_world, resolve_device
from train.durable import write_text_atomically
from train.flops import peak_tflops
from train.loop import build_trainer
from train.one_line_arguments import non_negative_int, positive_int


def measure(overrides: list[str], implementation: str, steps: int, warmup: int, compiled: bool = False) -> dict:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, f"moe.implementation={implementation}",
                                           f"trainer.compile={str(compiled).lower()}"])
    run = to_run_config(cfg)
    world = init_world(run.trainer.device)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(run, world, lambda: Path(tmp))
        times = []
        try:
            for step in range(warmup + steps):
                if world.device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                trainer.train_step(step)
                if world.device.type == "cuda":
                    torch.cuda.synchronize()
                if step >= warmup:
                    times.append(time.perf_counter() - start)
        finally:
            # Measured or failed (out of memory, say), the engine goes before the next variant is
            # built: a traceback keeps this frame, and with it `trainer`, alive for a while yet.
            trainer.engine.destroy()
    median = statistics.median(times)
    tokens_per_s = trainer.tokens_per_step / median
    result = {
        "implementation": implementation + ("+compile" if compiled else ""),
        "step_s_median": median,
        "step_s_min": min(times),
        "tokens_per_s": tokens_per_s,
        "mfu": trainer.flops_per_token * tokens_per_s / (trainer.peak_tflops * 1e12 * world.world_size),
        "peak_tflops": trainer.peak_tflops,
        "active_params": trainer.params["active"],
        "total_params": trainer.params["total"],
        "flops_per_token": trainer.flops_per_token,
        "tokens_per_step": trainer.tokens_per_step,
        "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if world.device.type == "cuda" else None,
    }
    del trainer
    _release_memory()
    return result


def _release_memory() -> None:
    """What one variant held, freed before the next is built: engines hold reference cycles, and
    compiled graphs of a model that is gone stay cached until dynamo is reset."""
    gc.collect()
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


VARIANTS = ("ours", "deepspeed", "ours+compile", "deepspeed+compile")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str], list[str]]:
    """(options, variant names, Hydra overrides), every one checked before anything is built: a typo
    must not cost a GPU session's minutes. A bad one exits with status 2 and one `error:` line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=positive_int, default=20, help="timed steps (default 20)")
    parser.add_argument("--warmup", type=non_negative_int, default=5, help="untimed steps first (default 5)")
    parser.add_argument("--json", type=Path, default=None, help="default: runs/bench/end_to_end-<time>.json")
    parser.add_argument("--compile", action="store_true",
                        help="also run both with trainer.compile=true (warm-up steps absorb the compilation)")
    parser.add_argument("--variants", default=None,
                        help=f"comma-separated subset of {','.join(VARIANTS)} (default: the first two, all four with --compile)")
    args, overrides = parser.parse_known_args(argv)
    flags = [arg for arg in overrides if arg.startswith("-")]
    if flags:  # a mistyped option would otherwise pass as an "override" that nothing checks
        _refuse(f"unknown option {flags[0]}; options are --steps, --warmup, --json, --compile, --variants")
    names = args.variants.split(",") if args.variants else list(VARIANTS[: 4 if args.compile else 2])
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        _refuse(f"--variants: unknown {', '.join(unknown)}; expected some of {', '.join(VARIANTS)}")
    problem = override_problem(overrides)
    if problem is not None:
        _refuse(problem)
    return args, names, overrides


def _refuse(problem: str) -> NoReturn:
    print(f"error: {problem}", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    args, names, overrides = parse_args()
    try:
        json_path = json_destination(args.json, "end_to_end")
    except ValueError as error:
        _refuse(str(error))
    overrides = [*overrides, "logging.progress_bar=false"]
    device = resolve_device("auto")
    configured = _configured_peak(overrides)
    # One peak for every variant: on a CPU it is measured, and two measurements would differ. Its
    # source is kept here: each run only sees the override and would call it "trainer.peak_tflops".
    peak, peak_source = peak_tflops(device, configured)
    if configured is None:
        overrides.append(f"trainer.peak_tflops={peak:.6g}")
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "command": " ".join(["python -m bench.end_to_end", *sys.argv[1:]]),
        "steps": args.steps,
        "warmup": args.warmup,
        "peak_tflops": peak,
        "peak_source": peak_source,
        "mfu": "flops_per_token x tokens/s / (peak_tflops x world size); flops_per_token = 6 x active matmul "
               "parameters + 12 x layers x width x sequence",
    }
    print(f"config: {' '.join(overrides)}", file=sys.stderr)
    results = []
    for name in names:
        implementation, compiled = name.removesuffix("+compile"), name.endswith("+compile")
        results.append(_measure_or_error(overrides, implementation, args.steps, args.warmup, compiled))
        # Each variant's figures are out (and on disk) as soon as it finishes: a later variant that
        # runs past the device's time limit must not take the earlier ones with it.
        print(f"done: {format_row(results[-1], results)}", file=sys.stderr, flush=True)
        write_text_atomically(json_path, json.dumps({"meta": meta, "overrides": overrides, "results": results,
                                                     "finished": len(results) == len(names)}, indent=2) + "\n")
    print("| implementation | step ms (median) | tokens/s | MFU | vs stock DeepSpeed, compiled alike |")
    print("|---|---|---|---|---|")
    for r in results:
        print(format_row(r, results))
    measured = [r for r in results if "error" not in r]
    if measured:
        first = measured[0]
        print(f"MFU against {peak:.3g} TFLOP/s ({peak_source}) on {meta['device']}, "
              f"{first['flops_per_token'] / 1e9:.3f} GFLOP per token, {first['active_params'] / 1e6:.1f}M active parameters "
              f"of {first['total_params'] / 1e6:.1f}M, {first['tokens_per_step']} tokens per optimizer step")
    print(f"json: {json_path}", file=sys.stderr)
    if len(measured) < len(results):
        sys.exit(1)


def _configured_peak(overrides: list[str]) -> float | None:
    """trainer.peak_tflops as the command line sets it; None where it is not set or is null."""
    value = next((o.split("=", 1)[1] for o in reversed(overrides) if o.startswith("trainer.peak_tflops=")), None)
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None  # "null": found per device, as in training


def format_row(result: dict, results: list[dict]) -> str:
    """One markdown table row; the last column against stock DeepSpeed layers compiled alike (a
    `+compile` row against `deepspeed+compile`: compiling the attention and norms is not our MoE
    layer's gain), or against eager stock, said so, where the compiled one has not run."""
    if "error" in result:
        return f"| {result['implementation']} | failed: {result['error']} | | | |"
    measured = {r["implementation"]: r for r in results if "error" not in r}
    compiled = result["implementation"].endswith("+compile")
    stock = measured.get("deepspeed+compile" if compiled else "deepspeed")
    against = ""
    if stock is None and compiled:
        stock, against = measured.get("deepspeed"), " (vs eager stock)"
    ratio = f"{result['tokens_per_s'] / stock['tokens_per_s']:.2f}x{against}" if stock else "n/a"
    return (f"| {result['implementation']} | {1000 * result['step_s_median']:.1f} | {result['tokens_per_s']:.0f} | "
            f"{100 * result['mfu']:.1f}% | {ratio} |")


def _measure_or_error(overrides: list[str], implementation: str, steps: int, warmup: int, compiled: bool) -> dict:
    """One variant's figures, or its error: a variant that fails (a compiler error on a new device,
    out of memory) must not cost the others' figures, which a GPU session has little time to redo."""
    try:
        return measure(overrides, implementation, steps, warmup, compiled)
    except Exception as exc:  # noqa: BLE001 - reported in the table and the exit status
        traceback.print_exc()
        name = implementation + ("+compile" if compiled else "")
        failed = {"implementation": name, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
    # Here, past the except clause, the exception and its traceback (which held the failed run's
    # frames, its model and engine among them) are gone: now the memory can be given back.
    _release_memory()
    return failed


if __name__ == "__main__":
    main()
