"""The ranks' agreement on a stop signal (train/preemption.py `PreemptionWatch.agreed`) when the signal
reached only some ranks, or different signals reached different ranks: two gloo processes."""

from __future__ import annotations

import os
import signal

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from train.preemption import PreemptionWatch

pytestmark = pytest.mark.distributed


def _agree(rank: int, world_size: int, store_file: str, received_by_rank: list[str | None], results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world_size)
    try:
        watch = PreemptionWatch()
        with watch:
            if received_by_rank[rank] is not None:
                os.kill(os.getpid(), signal.Signals[received_by_rank[rank]])  # handled before os.kill returns
            results[rank] = watch.agreed()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(("received_by_rank", "agreed"), [
    ([None, None], None),
    ([None, "SIGUSR1"], "SIGUSR1"),  # only a peer got it: rank 0 (the one that writes the record) names it too
    (["SIGINT", None], "SIGINT"),  # Ctrl-C seen by rank 0 alone: every rank is interrupted (exit 130), none preempted
    (["SIGINT", "SIGTERM"], "SIGTERM"),  # the scheduler's signal wins: the job is requeued
])
def test_every_rank_agrees_on_the_same_signal(tmp_path, received_by_rank, agreed):
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_agree, args=(2, str(tmp_path / "store"), received_by_rank, results), nprocs=2)
        assert dict(results) == {0: agreed, 1: agreed}
