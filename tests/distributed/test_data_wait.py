"""The ranks wait for rank 0 to prepare the data however long it takes (train/loop.py
`_prepared_data`): longer than the process group's own timeout, which a large corpus outlasts."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.distributed

GROUP_TIMEOUT_S, PREPARATION_S = 2, 6


def _prepare_slowly(rank: int, world_size: int, store_file: str, results) -> None:
    import train.loop as loop
    from train.distributed import World

    def prepare_dataset(source, announce_cached=True, **kwargs):
        if rank == 0:
            time.sleep(PREPARATION_S)  # a corpus being tokenised; the others wait in a collective
        return Path(kwargs["cache_dir"]) / "prepared"

    loop.prepare_dataset = prepare_dataset
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=GROUP_TIMEOUT_S))
    try:
        run = SimpleNamespace(data=SimpleNamespace(files=[], cache_dir="cache", vocab_size=512, val_fraction=0.1,
                                                   text_field="text"))
        world = World(rank=rank, world_size=world_size, local_rank=rank, device=torch.device("cpu"))
        results[rank] = str(loop._prepared_data(run, world))
    finally:
        dist.destroy_process_group()


def test_ranks_wait_for_a_preparation_longer_than_the_process_group_timeout(tmp_path):
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_prepare_slowly, args=(2, str(tmp_path / "store"), results), nprocs=2)
        assert dict(results) == {0: "cache/prepared", 1: "cache/prepared"}
