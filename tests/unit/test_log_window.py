"""train/log_window.py: what the next train record averages, and how long its steps trained."""

from __future__ import annotations

import time

import torch

from train.log_window import LogWindow


def test_sums_skip_non_finite_steps_and_survive_a_checkpoint():
    window = LogWindow(torch.device("cpu"))
    window.add(torch.tensor(2.0, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64), skipped=False)
    window.add(torch.tensor(float("nan"), dtype=torch.float64), torch.tensor(0.1, dtype=torch.float64), skipped=True)
    window.add(torch.tensor(4.0, dtype=torch.float64), torch.tensor(0.25, dtype=torch.float64), skipped=False)
    assert (float(window.loss_sum), float(window.aux_sum), window.steps, window.applied) == (6.0, 0.75, 3, 2)

    saved = window.state()
    resumed = LogWindow(torch.device("cpu"))
    resumed.restore(saved)
    assert (float(resumed.loss_sum), float(resumed.aux_sum), resumed.steps, resumed.applied) == (6.0, 0.75, 3, 2)
    assert resumed.training_seconds() >= saved["seconds"] > 0  # the earlier training time carries over
    resumed.reset()
    assert (float(resumed.loss_sum), resumed.steps, resumed.applied, resumed.earlier_seconds) == (0.0, 0, 0, 0.0)


def test_evaluation_and_saving_time_is_not_training_time():
    window = LogWindow(torch.device("cpu"))
    time.sleep(0.02)  # training
    with window.excluding():
        time.sleep(0.2)  # an evaluation or a checkpoint save
        inside = window.training_seconds()
    time.sleep(0.02)
    assert 0.02 <= inside < 0.15
    assert 0.04 <= window.training_seconds() < 0.17
