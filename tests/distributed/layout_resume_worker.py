"""One rank of a resume at another layout (run by test_layout_resume.py through the launcher).

`python layout_resume_worker.py <hydra overrides>` runs `train(cfg)` with `trainer.resume=true`;
right after `checkpoint.load` it checks, on every rank and for every parameter this rank holds,
that what the engine now has is exactly what the checkpoint's layout-free state saved: the fp32
master weight, the model weight, both AdamW moments, AdamW's step count, the learning-rate
schedule's position and the optimizer's learning rate. The saved files are read here with plain
`torch.load`, not through the loading code under test. Then training continues as usual.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
from hydra import compose, initialize_config_dir

from train import checkpoint, portable_state
from train.cli import CONF_DIR
from train.distributed import close_world
from train.loop import train


def _saved_state(tag_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    saved: dict[str, dict[str, torch.Tensor]] = {}
    for path in sorted((tag_dir / "portable").glob("rank_*.pt")):
        saved.update(torch.load(path, weights_only=True))
    return saved


def _verify(engine, checkpoint_dir: Path) -> None:
    tag_dir = checkpoint_dir / checkpoint.latest_tag(checkpoint_dir)
    saved = _saved_state(tag_dir)
    index = portable_state.read_index(tag_dir)
    deepspeed_state = torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=False)
    checked, moment_mass = 0, 0.0
    for name, param in portable_state.global_parameter_names(engine.module):
        expected = saved[name]
        # Collectives over the parameter's data-parallel group: every rank, same order.
        master = safe_get_full_fp32_param(param)
        moments = {key: safe_get_full_optimizer_state(param, key) for key in ("exp_avg", "exp_avg_sq")}
        assert torch.equal(master, expected["fp32"]), f"fp32 master weight of {name}"
        assert torch.equal(param.detach(), expected["fp32"]), f"model weight of {name}"
        for key, value in moments.items():
            assert torch.equal(value, expected[key]), f"{key} of {name}"
            moment_mass += float(value.abs().sum())
        checked += 1
    assert moment_mass > 0, "every AdamW moment is zero: the optimizer state was reset, not carried over"
    inner = engine.optimizer.optimizer
    for flat in engine.optimizer.single_partition_of_fp32_groups:
        assert int(inner.state[flat]["step"]) == index["optimizer_step"] > 0
    assert engine.lr_scheduler.state_dict() == deepspeed_state["lr_scheduler"]
    expected_lr = engine.lr_scheduler.get_lr()[0]
    assert expected_lr > 0 and all(group["lr"] == expected_lr for group in engine.optimizer.param_groups)
    assert engine.global_steps == deepspeed_state["global_steps"]
    print(f"rank {dist.get_rank()}: verified {checked} parameters (weights, fp32 masters, exp_avg, exp_avg_sq), "
          f"AdamW step {index['optimizer_step']}, lr {expected_lr:.6g}", flush=True)


def main(overrides: list[str]) -> None:
    original_load = checkpoint.load

    def load_then_verify(engine, checkpoint_dir, rank):
        client_state = original_load(engine, checkpoint_dir, rank)
        _verify(engine, Path(checkpoint_dir))
        return client_state

    checkpoint.load = load_then_verify
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, "trainer.resume=true"])
    train(cfg)
    close_world()


if __name__ == "__main__":
    main(sys.argv[1:])
