"""train/log_window.py: what the next train record averages, and how long its steps trained."""

from __future__ import annotations

import torch

import train.log_window
from train.log_window import LogWindow


def test_sums_skip_non_finite_steps_and_survive_a_checkpoint():
    window = LogWindow(torch.device("cpu"))
    window.add(torch.tensor(2.0, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64), skipped=False, tokens=64)
    window.add(torch.tensor(float("nan"), dtype=torch.float64), torch.tensor(0.1, dtype=torch.float64), skipped=True, tokens=64)
    window.add(torch.tensor(4.0, dtype=torch.float64), torch.tensor(0.25, dtype=torch.float64), skipped=False, tokens=64)
    assert (float(window.loss_sum), float(window.aux_sum), window.steps, window.applied, window.tokens) == (6.0, 0.75, 3, 2, 192)

    saved = window.state()
    resumed = LogWindow(torch.device("cpu"))
    # Resumed at half the global batch: the steps before keep the tokens they trained on.
    resumed.restore(saved, tokens_per_step=32)
    assert (float(resumed.loss_sum), float(resumed.aux_sum), resumed.steps, resumed.applied) == (6.0, 0.75, 3, 2)
    resumed.add(torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64), skipped=False, tokens=32)
    assert resumed.tokens == 192 + 32
    assert resumed.training_seconds() >= saved["seconds"] > 0  # the earlier training time carries over
    resumed.reset()
    assert (float(resumed.loss_sum), resumed.steps, resumed.applied, resumed.tokens) == (0.0, 0, 0, 0)
    assert resumed.earlier_seconds == 0.0

    # A checkpoint of before the window counted tokens: its steps count at the batch given.
    older = {key: value for key, value in saved.items() if key != "tokens"}
    resumed.restore(older, tokens_per_step=32)
    assert resumed.tokens == 3 * 32


def test_evaluation_and_saving_time_is_not_training_time(monkeypatch):
    # A clock the test moves by hand: sleeps and a real clock would make the bounds depend on how
    # busy the machine is.
    clock = [100.0]
    monkeypatch.setattr(train.log_window.time, "perf_counter", lambda: clock[0])
    window = LogWindow(torch.device("cpu"))
    clock[0] += 2.0  # training
    with window.excluding():
        clock[0] += 30.0  # an evaluation or a checkpoint save
        inside = window.training_seconds()
    clock[0] += 3.0
    assert inside == 2.0
    assert window.training_seconds() == 5.0
