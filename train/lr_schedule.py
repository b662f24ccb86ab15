"""The learning-rate schedule: linear warm-up, then cosine decay to lr * min_ratio.

Optimizer step n (counting from 1) runs at lr * ratio(n):

    ratio(n) = n / W                                          for n <= W (W warm-up steps)
    ratio(n) = m + (1 - m) * (1 + cos(pi * p)) / 2,  p = min(1, (n - W) / (T - W))   after

so the first step already moves the weights (lr / W), step W is the peak, and step T (max_steps)
the floor m. DeepSpeed's WarmupCosineLR, which this replaces, runs the first two steps at lr 0
(its ratio for iterations -1 and 0) and reaches the floor two steps late.

It keeps DeepSpeed's scheduler interface and state (`last_batch_iteration`: optimizer steps taken
minus one), so the engine steps it after each optimizer step, saves and loads it with checkpoints,
and checkpoints written under WarmupCosineLR resume at the same position.
"""

from __future__ import annotations

import math


class WarmupCosine:
    def __init__(self, optimizer, warmup_steps: int, total_steps: int, min_ratio: float) -> None:
        self.optimizer = optimizer
        self.warmup_steps, self.total_steps, self.min_ratio = warmup_steps, total_steps, min_ratio
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.last_batch_iteration = -1
        self._apply()

    def ratio(self, step: int) -> float:
        """The multiple of the base learning rate that optimizer step `step` (from 1) runs at."""
        if step <= self.warmup_steps:
            return step / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_ratio + (1.0 - self.min_ratio) * (1.0 + math.cos(math.pi * progress)) / 2.0

    def last_step_lr(self) -> float:
        """The learning rate the last counted optimizer step ran at (every group has the same); a step
        skipped for a non-finite loss is not counted, as DeepSpeed does not step the schedule then."""
        return self.base_lrs[0] * self.ratio(self.last_batch_iteration + 1)

    def step(self, last_batch_iteration: int | None = None) -> None:
        """After an optimizer step (DeepSpeed's engine calls it): set the next step's learning rate."""
        self.last_batch_iteration = self.last_batch_iteration + 1 if last_batch_iteration is None else last_batch_iteration
        self._apply()

    def get_last_lr(self) -> list[float]:
        """The learning rates the next optimizer step will use."""
        return [group["lr"] for group in self.optimizer.param_groups]

    def get_lr(self) -> list[float]:
        return self.get_last_lr()

    def state_dict(self) -> dict:
        return {"last_batch_iteration": self.last_batch_iteration}

    def load_state_dict(self, state: dict) -> None:
        # The learning rate follows at once: a loaded optimizer state brings the saved run's lr with it.
        self.last_batch_iteration = state["last_batch_iteration"]
        self._apply()

    def _apply(self) -> None:
        next_step = self.last_batch_iteration + 2
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * self.ratio(next_step)


def short_warmup_warning(warmup_steps: int, max_steps: int, lr: float) -> str | None:
    """One line when the run ends before its warm-up does: the learning rate never reaches `lr` and
    there is no decay (a short test run, usually; a real run with a mistyped max_steps, sometimes)."""
    if warmup_steps < max_steps:
        return None
    return (f"deepspeed.warmup_steps={warmup_steps} is not below trainer.max_steps={max_steps}: the learning rate "
            f"peaks at {lr * min(1.0, max_steps / warmup_steps):.3g} (deepspeed.lr={lr:g}) on the last step and never decays")
