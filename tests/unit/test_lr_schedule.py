"""train/lr_schedule.py: step n runs at its own warm-up or cosine rate from the first step on, with
DeepSpeed's scheduler interface and state."""

from __future__ import annotations

import math

import pytest
import torch

from train.lr_schedule import WarmupCosine, short_warmup_warning


def _schedule(warmup: int = 4, total: int = 10, min_ratio: float = 0.1, lr: float = 1e-3) -> WarmupCosine:
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=lr)
    return WarmupCosine(optimizer, warmup, total, min_ratio)


def test_ratio_by_hand():
    schedule = _schedule()
    assert [schedule.ratio(n) for n in range(1, 5)] == [0.25, 0.5, 0.75, 1.0]  # the first step already moves
    # After warm-up, cosine from 1 to the floor over the remaining 6 steps, the last one at the floor.
    for n in range(5, 11):
        assert schedule.ratio(n) == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi * (n - 4) / 6)) / 2)
    assert schedule.ratio(10) == pytest.approx(0.1) and schedule.ratio(12) == pytest.approx(0.1)
    assert all(schedule.ratio(n) > schedule.ratio(n + 1) for n in range(4, 10))


def test_each_optimizer_step_runs_at_its_own_rate():
    schedule = _schedule()
    used = []
    for _ in range(10):
        used.append(schedule.get_last_lr()[0])  # what the optimizer step about to run uses
        schedule.optimizer.step()
        schedule.step()  # as DeepSpeed's engine does after each optimizer step
        assert schedule.last_step_lr() == pytest.approx(used[-1])
    assert used == pytest.approx([1e-3 * schedule.ratio(n) for n in range(1, 11)])
    assert used[0] == pytest.approx(2.5e-4)


def test_state_is_deepspeeds_and_loading_sets_the_rate_at_once():
    first = _schedule()
    for _ in range(5):
        first.step()
    assert first.state_dict() == {"last_batch_iteration": 4}  # WarmupCosineLR's key and counting
    # Loaded into a run with another base lr (a resume that changed deepspeed.lr): its own lr at the position.
    second = _schedule(lr=2e-3)
    second.optimizer.param_groups[0]["lr"] = 123.0  # what a loaded optimizer state would bring along
    second.load_state_dict(first.state_dict())
    assert second.get_last_lr()[0] == pytest.approx(2e-3 * second.ratio(6))


def test_a_run_shorter_than_its_warm_up_is_warned_about_with_the_peak_it_reaches():
    assert short_warmup_warning(20, 200, 3e-3) is None
    line = short_warmup_warning(20, 5, 3e-3)
    assert line == ("deepspeed.warmup_steps=20 is not below trainer.max_steps=5: the learning rate peaks at 0.00075 "
                    "(deepspeed.lr=0.003) on the last step and never decays")
    # Equal: the last step is the peak, and nothing is left to decay.
    assert "peaks at 0.003 " in short_warmup_warning(5, 5, 3e-3)
