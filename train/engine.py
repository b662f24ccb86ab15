"""The DeepSpeed engine: config dict from our typed config, MoE parameter groups, initialize.

The one place that calls `deepspeed.initialize`.
"""

from __future__ import annotations

from typing import Any

import deepspeed
import torch
from deepspeed.moe.layer import MoE
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

from train.config import RunConfig
from train.lr_schedule import WarmupCosine


def use_bf16(run: RunConfig, device: torch.device) -> bool:
    if run.deepspeed.precision == "auto":
        return device.type == "cuda"
    return run.deepspeed.precision == "bf16"


def deepspeed_config(run: RunConfig, device: torch.device) -> dict[str, Any]:
    """The DeepSpeed JSON config. Batch sizes per rank; DeepSpeed derives the global batch."""
    ds = run.deepspeed
    adamw_params: dict[str, Any] = {
        "lr": ds.lr,
        "betas": [ds.beta1, ds.beta2],
        "eps": ds.eps,
        "weight_decay": ds.weight_decay,
        # torch's AdamW: DeepSpeed's FusedAdam would JIT-compile a CUDA/C++ op first.
        "torch_adam": True,
    }
    if device.type == "cuda":
        adamw_params["fused"] = True
    return {
        "train_micro_batch_size_per_gpu": run.trainer.micro_batch_size,
        "gradient_accumulation_steps": run.trainer.grad_accum,
        "gradient_clipping": ds.grad_clip,
        "zero_optimization": {"stage": ds.zero_stage},
        "bf16": {"enabled": use_bf16(run, device)},
        "optimizer": {"type": "AdamW", "params": adamw_params},
        # The schedule is ours (train/lr_schedule.py), passed to deepspeed.initialize.
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


DEEPSPEED_EXPERT_GROUP_CAP = 178_956_971
"""DeepSpeed's default cap on the elements of one expert parameter group (2^31 bytes of the 12-byte
fp32 master weight and Adam moments per element)."""


def expert_group_cap(model: torch.nn.Module, cap: int = DEEPSPEED_EXPERT_GROUP_CAP) -> int:
    """The largest whole number of MoE layers' expert parameters within `cap` elements, as the size
    at which DeepSpeed splits the expert parameters into optimizer groups.

    ZeRO flattens each group into a buffer of its own. Split at DeepSpeed's plain cap, a group ends
    in the middle of a layer (at 350M, 9 of 24 layers), whose experts then lie in two buffers: their
    stacked weights can no longer be a view (moe/expert_storage.py) and are copied on every forward.
    Every MoE layer of a model has the same experts; where not, the plain cap."""
    sizes = {sum(p.numel() for p in layer.deepspeed_moe.experts.parameters())
             for layer in model.modules() if isinstance(layer, MoE)}
    if len(sizes) != 1:
        return cap
    per_layer = sizes.pop()
    if not 0 < per_layer <= cap:
        return cap
    return cap // per_layer * per_layer


def optimizer_param_groups(model: torch.nn.Module, weight_decay: float,
                           expert_cap: int = DEEPSPEED_EXPERT_GROUP_CAP) -> list[dict[str, Any]]:
    """Decay for matrices, none for norms; then DeepSpeed's split of expert parameters into
    their own groups, which ZeRO reduces over the expert-data-parallel group, each holding whole
    MoE layers (`expert_group_cap`)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    return split_params_into_different_moe_groups_for_optimizer(groups, max_group_size=expert_group_cap(model, expert_cap))


def build_engine(model: torch.nn.Module, run: RunConfig, device: torch.device, mpu=None):
    """`mpu`: the tensor-parallel unit (train.tensor_parallel.MegatronMPU) when model.tensor_parallel > 1;
    DeepSpeed then reduces gradients over its data-parallel group and counts split weights in the norm."""
    ds = run.deepspeed
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        mpu=mpu,
        model_parameters=optimizer_param_groups(model, ds.weight_decay),
        config=deepspeed_config(run, device),
        lr_scheduler=lambda optimizer: WarmupCosine(optimizer, ds.warmup_steps, run.trainer.max_steps, ds.min_lr_ratio),
    )
    return engine, scheduler


def optimizer_settings(engine) -> list[dict[str, Any]]:
    """Each optimizer group's hyperparameters but the learning rate (the schedule's): what the run's
    configuration asked for, to be put back after a checkpoint's optimizer state brings its own."""
    return [{key: value for key, value in group.items() if key not in ("params", "lr")}
            for group in engine.optimizer.param_groups]


def restore_optimizer_settings(engine, settings: list[dict[str, Any]]) -> None:
    """After a checkpoint load: this run's betas, eps and weight decay, and its schedule's learning
    rate at the loaded step (DeepSpeed's load restores the saved run's, so a changed deepspeed.lr or
    weight_decay would otherwise not apply at the same layout)."""
    for group, wanted in zip(engine.optimizer.param_groups, settings, strict=True):
        group.update(wanted)
    if engine.lr_scheduler is not None:
        engine.lr_scheduler.step(engine.lr_scheduler.last_batch_iteration)
