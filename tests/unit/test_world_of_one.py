"""A run started without a launcher (a world of one) rendezvouses in memory: no TCP port is drawn,
so none can be taken before it is bound, and a stale MASTER_PORT in the shell changes nothing."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import torch
from train.distributed import close_world, init_world
for _ in range(2):  # a second world after the first is closed, as in-process tests and tools start them
    world = init_world("cpu")
    total = torch.ones(1)
    torch.distributed.all_reduce(total)
    print("world", world.world_size, "sum", int(total.item()))
    close_world()
"""


@pytest.mark.parametrize("stale", [{}, {"MASTER_ADDR": "10.255.255.1"}], ids=["port", "port-and-address"])
def test_world_of_one_starts_while_a_stale_master_port_is_taken(tmp_path, stale):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-c", SCRIPT], cwd=tmp_path, capture_output=True, text=True, timeout=300,
            env=subprocess_env(PYTHONPATH=str(ROOT), MASTER_PORT=str(port), **stale, OMP_NUM_THREADS="1"),
        )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("world 1 sum 1") == 2, result.stdout
