"""Shared fixtures: config composition the way the command line does it, and the GPU skip."""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture
def compose_run():
    """compose_run(overrides) -> DictConfig, composed from conf/ exactly as `python -m train` would."""
    from hydra import compose, initialize_config_dir

    from train.cli import CONF_DIR

    def _compose(overrides: list[str]):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose("config", overrides=overrides)

    return _compose


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    if os.environ.get("MOE_REQUIRE_CUDA") == "1":
        # bench/gpu_all.sh: on the GPU machine, GPU tests that all skip (a CPU-only torch, a driver
        # torch cannot use) must fail the step, not pass it.
        raise pytest.UsageError("MOE_REQUIRE_CUDA=1 but torch sees no CUDA device: the GPU tests cannot run")
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def free_ports(count: int) -> list[int]:
    """`count` distinct free TCP ports on 127.0.0.1 for servers a test starts (a rendezvous store,
    slurmctld), drawn below the kernel's ephemeral range. A port from `bind(("127.0.0.1", 0))` lies in
    that range, where, in the seconds between choosing it and the server binding it, an outgoing
    connection anywhere on the machine may be given it: another test file's ranks connecting to their
    own store did, under pytest-xdist, and the rank that should have listened failed with EADDRINUSE."""
    low = _ephemeral_range_start()
    if low < 12_000:  # no room below it: fall back to the kernel's choice
        return _kernel_ports(count)
    chosen: list[int] = []
    draw = random.SystemRandom()  # independent of any seed a test sets, and of the other workers
    for _ in range(1000):
        port = draw.randrange(low - 10_000, low)
        if port not in chosen and _bindable(port):
            chosen.append(port)
            if len(chosen) == count:
                return chosen
    return _kernel_ports(count)


def free_port() -> int:
    """One port from `free_ports`."""
    return free_ports(1)[0]


def _ephemeral_range_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _kernel_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


DISTRIBUTED_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


def ctrl_c_as_at_a_terminal() -> None:
    """A Popen preexec_fn: SIGINT back to its default in the child. A test suite started as a shell's
    background job (`bash .ci/run &`) runs with SIGINT ignored, every child inherits that, and the
    training keeps an ignored SIGINT on purpose (train/preemption.py): a test of what Ctrl-C does
    needs the terminal's case."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def ctrl_c_enabled():
    """In this process, SIGINT handled as Python does at a terminal (KeyboardInterrupt) for the test,
    whatever the suite was started with (see `ctrl_c_as_at_a_terminal`)."""
    import signal

    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a training subprocess: in-process tests set RANK, MASTER_PORT, ... in
    this process (a world of one), and a child inheriting them would try to join that world."""
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_VARIABLES}
    return {**env, **extra}


def assert_close_by_norm(got: torch.Tensor, want: torch.Tensor, rtol: float, name: str) -> None:
    """||got - want|| <= rtol ||want||, in fp32, with no absolute floor: the MoE layers' outputs and
    gradients are of order 1e-4 at their init, where an absolute tolerance of 1e-5 would pass elements
    a few percent off, or a layer that gave zeros."""
    got, want = got.float(), want.float()
    error = (got - want).norm() / want.norm().clamp_min(1e-30)
    assert error <= rtol, f"{name}: relative error {error:.2e} (allowed {rtol:.0e})"
