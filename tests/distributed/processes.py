"""Starting the training processes of the distributed tests: gloo ranks on CPU, either started here
one process per rank or through DeepSpeed's launcher, and single subprocesses. A failed start fails
the test with the tail of what the processes printed."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from conftest import free_port, subprocess_env

ROOT = Path(__file__).resolve().parents[2]
TAIL = 4000
"""Characters of each output stream a failed process shows."""


def rank_env(**extra: str) -> dict[str, str]:
    """The environment of a CPU training process: one thread per rank, so that several ranks share
    the machine's cores without oversubscribing them."""
    return subprocess_env(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", **extra)


def tail(result: subprocess.CompletedProcess) -> str:
    return result.stdout[-TAIL:] + result.stderr[-TAIL:]


def run(command: list[str], cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 600,
        check: bool = True) -> subprocess.CompletedProcess:
    """`command` to completion (environment `rank_env()` unless given); with `check`, the test fails
    with the tail of its output unless it exits with 0."""
    result = subprocess.run(command, cwd=cwd, env=rank_env() if env is None else env, capture_output=True, text=True,
                            timeout=timeout)
    if check:
        assert result.returncode == 0, tail(result)
    return result


def deepspeed_launch(ranks: int, cwd: Path, overrides: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus <ranks> --no_local_rank --module train <overrides>` (gloo ranks on CPU)."""
    command = [
        sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--no_local_rank",
        "--master_port", str(free_port()), "--module", "train", *overrides,
    ]
    return run(command, cwd, timeout=timeout)


def launch_ranks(ranks: int, command: list[str], cwd: Path | None = None, timeout: float = 600,
                 status: int = 0) -> list[str]:
    """`ranks` processes of `command`, with the variables a launcher sets (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT): what `deepspeed --num_gpus <ranks> --no_local_rank` runs,
    without its two extra Python start-ups per run (tests that use deepspeed_launch cover the launcher).
    Returns each rank's output under a `--- rank <r> (exit status <s>)` line; fails the test, after
    stopping the other ranks, as soon as one exits with another status than `status` or the time is up."""
    port = str(free_port())
    logs = [tempfile.TemporaryFile(mode="w+") for _ in range(ranks)]  # a pipe nobody reads could fill and block a rank
    processes = [
        subprocess.Popen(command, cwd=cwd, stdout=logs[rank], stderr=subprocess.STDOUT,
                         env=rank_env(RANK=str(rank), WORLD_SIZE=str(ranks), LOCAL_RANK=str(rank),
                                      MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
        for rank in range(ranks)
    ]
    deadline = time.monotonic() + timeout
    timed_out = False
    try:
        # Poll every rank each time: any(p.poll() ...) stops at the first running rank and would not
        # see a later one fail.
        while None in (codes := [p.poll() for p in processes]):
            if any(code not in (None, status) for code in codes):
                break
            if time.monotonic() > deadline:
                timed_out = True
                break
            time.sleep(0.1)
    finally:
        for process in processes:  # a rank left waiting for a failed peer would wait for gloo's timeout
            if process.poll() is None:
                process.kill()
                process.wait()
    outputs = []
    for rank, log in enumerate(logs):
        log.seek(0)
        outputs.append(f"--- rank {rank} (exit status {processes[rank].returncode})\n{log.read()}")
        log.close()
    output = "\n".join(outputs)
    timed_out_line = f"timed out after {timeout} s\n" if timed_out else ""
    assert all(p.returncode == status for p in processes), timed_out_line + output[-6000:]
    return outputs
