"""Process-group set-up: from the launcher's environment, or a world of one without a launcher."""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass

import torch

from train.config import ConfigError


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    tensor_parallel: int = 1
    """Ranks per tensor-parallel group (consecutive ranks, megatron-core's order)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def data_parallel_size(self) -> int:
        """Model replicas: tensor-parallel ranks share one replica and one slice of every batch."""
        return self.world_size // self.tensor_parallel

    @property
    def data_parallel_rank(self) -> int:
        return self.rank // self.tensor_parallel

    @property
    def replica_group(self):
        """One rank per tensor-parallel group (the ranks with this rank's tensor-parallel rank):
        statistics summed over it count every token once. None = the whole world."""
        if self.tensor_parallel == 1:
            return None
        return megatron_parallel_state().get_data_parallel_group()


def launcher_world_size() -> int:
    """World size as the launcher (deepspeed, torchrun, srun + our scripts) set it; 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("trainer.device=cuda but no CUDA device is available (use auto or cpu)")
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def init_world(requested_device: str, tensor_parallel: int = 1) -> World:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, NCCL on GPU), and
    megatron-core's parallel state when tensor_parallel > 1."""
    device = resolve_device(requested_device)
    if device.type == "cpu":
        # DeepSpeed picks its accelerator from this; without it a CUDA build on a GPU-less
        # machine (or a user asking for cpu on a GPU box) would pick the wrong one.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.ops

    # On CPU, init_distributed JIT-compiles a shared-memory comm op (45-100 s cold) that
    # training never uses; DeepSpeed only builds it when the op is marked compatible.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.utils.logger.setLevel(logging.WARNING)

    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "RANK" not in os.environ:  # no launcher (every one sets RANK): a world of one
            # It rendezvouses in memory. A TCP store would need a port, and a port drawn free can be
            # taken by another process's connection before the store binds it. RANK stays unset, so
            # that a later start in this process (tests start several) is a world of one again.
            os.environ.update(WORLD_SIZE="1", LOCAL_RANK="0")  # DeepSpeed's engine reads LOCAL_RANK
            torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1)
        # Wraps the group made above, or makes one from the launcher's environment.
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    world_size = torch.distributed.get_world_size()
    if world_size % tensor_parallel:
        raise ValueError(f"model.tensor_parallel={tensor_parallel} must divide the world size {world_size}")
    if tensor_parallel > 1:
        from train import tensor_parallel as tp

        tp.initialize(tensor_parallel)
    return World(
        rank=torch.distributed.get_rank(),
        world_size=world_size,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        device=device,
        tensor_parallel=tensor_parallel,
    )


def megatron_parallel_state():
    """megatron.core.parallel_state, imported without the four warnings megatron-core prints at
    import when Apex and Transformer Engine are absent (they are not needed here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core import parallel_state
    return parallel_state


def stop_every_rank_on(problem: str | None, error: type[Exception] = ConfigError, group=None) -> None:
    """Collective (over `group`, default the world): rank 0's `problem` (what only rank 0 checked or
    did; the others pass None) raised as `error` on every rank, so that no rank is left waiting for
    one that stopped."""
    shared = [problem]
    torch.distributed.broadcast_object_list(shared, src=0, group=group)
    if shared[0] is not None:
        raise error(shared[0])


def close_world() -> None:
    """Tear the process groups down before the interpreter exits. Left to interpreter shutdown,
    gloo's worker threads can be destroyed while still joinable, and the process then aborts
    ("terminate called without an active exception", status -6) after a run that succeeded: seen
    in CI on a two-rank gloo job."""
    if not torch.distributed.is_initialized():
        return
    try:
        parallel_state = megatron_parallel_state()
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
    except ImportError:
        pass
    torch.distributed.destroy_process_group()
