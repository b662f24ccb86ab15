"""Layout-free optimizer state: what lets a checkpoint resume at another expert-parallel or
data-parallel size with its optimizer intact.

DeepSpeed's ZeRO files hold each rank's flat partition of the fp32 master weights and AdamW
moments; their boundaries depend on the number of ranks and on which experts a rank holds, so
at another layout DeepSpeed can load the weights but not the optimizer (FACTS.md). Next to its
files, every save therefore also writes, for each parameter by name, the whole fp32 master
weight and every AdamW moment, experts under their *global* index:

    <tag>/portable/index.json      layout, optimizer step, moment names, parameter -> file
    <tag>/portable/rank_<r>.pt     {name: {"fp32": ..., "exp_avg": ..., "exp_avg_sq": ...}}

Dense parameters are written by rank 0, each expert by the rank of expert-data-parallel rank 0
that holds it, so every tensor is written once. Gathering a parameter is a collective over its
data-parallel group (ZeRO partitions it there): every rank walks the parameters in the same
order. Loading at another layout scatters the same tensors back into the new partitions.

Not covered: tensor parallelism (a name then stands for a different shard on every
tensor-parallel rank), where the state is not written and a change of layout is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE
from deepspeed.moe.utils import is_moe_param
from deepspeed.utils import (
    groups,
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)

from train.durable import write_text_atomically
from train.rank_writes import RankWrites

DIRECTORY = "portable"
INDEX = "index.json"
FORMAT = 1


def current_layout(engine) -> dict[str, Any]:
    """What DeepSpeed's own optimizer files depend on: if any of it differs, they do not load."""
    return {
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "ep_sizes": sorted({m.ep_size for m in engine.module.modules() if isinstance(m, MoE)}),
        "tensor_parallel": engine.mp_world_size,
        "zero_stage": engine.zero_optimization_stage(),
        "bf16": bool(engine.bfloat16_enabled()),
    }


def describe(layout: dict[str, Any]) -> str:
    ep = "/".join(map(str, layout["ep_sizes"])) or "-"
    ranks = layout["world_size"]
    return (f"{ranks} rank{'s' if ranks != 1 else ''}, ep_size {ep}, tensor parallel {layout['tensor_parallel']}, "
            f"ZeRO-{layout['zero_stage']}, {'bf16' if layout['bf16'] else 'fp32'}")


def supported(engine) -> bool:
    return engine.mp_world_size == 1 and engine.zero_optimization_stage() in (1, 2)


def global_parameter_names(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) in module order, expert parameters renamed from their local index on
    this rank to their global index: `...deepspeed_experts.<global>.<rest>` (as DeepSpeed names
    its per-expert checkpoint files), so a name means the same tensor at every layout."""
    renamed: dict[int, str] = {}
    for module_name, module in model.named_modules():
        if not isinstance(module, MoE):
            continue
        ep_rank = groups._get_expert_parallel_rank(module.expert_group_name) if module.ep_size > 1 else 0
        prefix = ".".join(filter(None, [module_name, "deepspeed_moe.experts.deepspeed_experts"]))
        for local_index, expert in enumerate(module.deepspeed_moe.experts.deepspeed_experts):
            global_index = ep_rank * module.num_local_experts + local_index
            for name, param in expert.named_parameters():
                renamed[id(param)] = f"{prefix}.{global_index}.{name}"
    return [(renamed.get(id(param), name), param) for name, param in model.named_parameters()]


def _optimized(engine) -> list[tuple[str, torch.nn.Parameter]]:
    # Parameters ZeRO manages carry `_hp_mapping` (None on ranks whose partition misses them).
    return [(name, param) for name, param in global_parameter_names(engine.module) if hasattr(param, "_hp_mapping")]


def _writes(param: torch.nn.Parameter) -> bool:
    """One writer per tensor: global rank 0 for dense parameters, expert-data-parallel rank 0 for experts."""
    if is_moe_param(param):
        return groups._get_expert_data_parallel_rank(param.group_name) == 0
    return dist.get_rank() == 0


def _inner_state(engine) -> tuple[list[str], int]:
    """Names of the moment tensors (exp_avg, exp_avg_sq, ...) and the optimizer's step count,
    read from this rank's first flat fp32 partition ([] and 0 before the first step)."""
    zero = engine.optimizer
    flat = zero.single_partition_of_fp32_groups[0]
    state = zero.optimizer.state.get(flat, {})
    keys = sorted(k for k, v in state.items() if torch.is_tensor(v) and v.shape == flat.shape)
    step = int(state["step"]) if "step" in state else 0
    return keys, step


def _link_moments(zero) -> None:
    """Point every parameter's ZeRO mapping at its slice of the moment tensors. DeepSpeed 0.19.8
    links them once, right after the first param group's first step, when the other groups have
    no state yet: `safe_get_full_optimizer_state` then fails for every parameter outside the
    first group. Re-linking now that every group has its state fixes that."""
    zero._hp_optimizer_states_linked = False
    zero._lazy_init_hp_params_optimizer_state()


def save(engine, tag_dir: Path, writes: RankWrites, with_tensors: bool = True) -> None:
    """Collective: every rank calls it, before `latest` moves to this tag. Its files are written
    through `writes`, which records a failure instead of raising it, so every rank still reaches
    the gather and the barrier (train/rank_writes.py).

    `with_tensors=False` (trainer.portable_checkpoint=false) writes only the index, with the layout and
    no tensors: the checkpoint then resumes at its own layout only, and a resume elsewhere is
    refused with a message instead of silently losing the optimizer state. Where the copy is not
    supported (tensor parallelism) the index alone is written too, for the same refusal."""
    if not supported(engine):
        if dist.get_rank() == 0:
            directory = tag_dir / DIRECTORY
            writes.run(directory / INDEX, lambda: _write_index(engine, directory, step=None, keys=[], files={},
                                                               with_tensors=False))
        return
    keys, step = _inner_state(engine)
    if keys and with_tensors:
        _link_moments(engine.optimizer)
    mine: dict[str, dict[str, torch.Tensor]] = {}
    for name, param in _optimized(engine) if with_tensors else ():
        tensors = {"fp32": safe_get_full_fp32_param(param)}
        for key in keys:
            tensors[key] = safe_get_full_optimizer_state(param, key)
        if _writes(param):
            mine[name] = {k: v.detach().cpu().clone() for k, v in tensors.items()}
    rank = dist.get_rank()
    directory = tag_dir / DIRECTORY
    file_name = f"rank_{rank:05d}.pt"

    def write_mine() -> None:
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(mine, directory / file_name)

    if mine:
        writes.run(directory / file_name, write_mine)
    written: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(written, (file_name, sorted(mine)))
    if rank == 0:
        files = {name: file for file, names in written for name in names}
        writes.run(directory / INDEX, lambda: _write_index(engine, directory, step, keys, files, with_tensors))
    dist.barrier()


def _write_index(engine, directory: Path, step: int | None, keys: list[str], files: dict[str, str],
                 with_tensors: bool) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    index = {"format": FORMAT, "layout": current_layout(engine), "optimizer_step": step,
             "state_keys": keys, "files": files, "tensors": with_tensors}
    write_text_atomically(directory / INDEX, json.dumps(index, indent=1))


def read_index(tag_dir: Path) -> dict[str, Any] | None:
    path = tag_dir / DIRECTORY / INDEX
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def read_tensors(tag_dir: Path, index: dict[str, Any], names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """The saved tensors of `names` (memory-mapped: only what is used is read)."""
    by_file: dict[str, list[str]] = {}
    for name in names:
        if name not in index["files"]:
            raise KeyError(f"{tag_dir / DIRECTORY} has no saved state for parameter {name!r}")
        by_file.setdefault(index["files"][name], []).append(name)
    found: dict[str, dict[str, torch.Tensor]] = {}
    for file, wanted in by_file.items():
        saved = torch.load(tag_dir / DIRECTORY / file, map_location="cpu", mmap=True, weights_only=True)
        found.update({name: saved[name] for name in wanted})
    return found


def restore(engine, tag_dir: Path, index: dict[str, Any]) -> None:
    """After DeepSpeed has loaded weights, scheduler and counters (not the optimizer), put the fp32
    master weights, moments and step count into this layout's ZeRO partitions. Local: no collective
    until the final all-gather of the weights."""
    zero, inner = engine.optimizer, engine.optimizer.optimizer
    keys, step = index["state_keys"], index["optimizer_step"]
    if keys:
        # Fresh engine: AdamW creates its state lazily at the first step. Create it now (the
        # shapes of this layout's flat partitions), link ZeRO's per-parameter views, then fill them.
        for flat, group in zip(zero.single_partition_of_fp32_groups, inner.param_groups):
            on_device = group.get("fused") or group.get("capturable")
            state = {"step": torch.tensor(float(step), dtype=torch.float32, device=flat.device if on_device else "cpu")}
            state.update({key: torch.zeros_like(flat) for key in keys})
            inner.state[flat] = state
        _link_moments(zero)
    optimized = _optimized(engine)
    saved = read_tensors(tag_dir, index, [name for name, _ in optimized])
    for name, param in optimized:
        tensors = saved[name]
        if tuple(tensors["fp32"].shape) != tuple(param.shape):
            raise ValueError(f"{tag_dir}: parameter {name} has shape {tuple(tensors['fp32'].shape)}, "
                             f"the model has {tuple(param.shape)}")
        safe_set_full_fp32_param(param, tensors["fp32"].to(param.device))
        for key in keys:
            safe_set_full_optimizer_state(param, tensors[key].to(param.device), key)
    # Model weights (bf16 copies in a bf16 run) from the restored fp32 masters, on every rank.
    zero.update_lp_params()
