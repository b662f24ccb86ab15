"""Shared fixtures: config composition the way the command line does it, and the GPU skip."""

from __future__ import annotations

import os

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
