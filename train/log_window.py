"""The steps since the last `train` record of metrics.jsonl: what the next record averages.

Per rank: the LM and auxiliary loss sums of the applied steps, how many steps ran and how many were
applied (not skipped for a non-finite loss), how many tokens they trained on (each step at its own
global batch: a resume may change it) and how long they took to train. Evaluations and
checkpoint saves inside the window are not training time, so they are excluded from it: tokens/s and
MFU measure training only.

A checkpoint saved inside a window carries this rank's part of it (`state`), and a resume at the same
layout takes it back (`restore`): the next record then averages the same steps as in a run that was
never stopped, whatever step the checkpoint fell on (a preemption saves at any step).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


class LogWindow:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        self.aux_sum = torch.zeros_like(self.loss_sum)
        self.reset()

    def reset(self) -> None:
        """Start a new window now (after a record is written)."""
        self.loss_sum.zero_()
        self.aux_sum.zero_()
        self.steps = 0
        self.applied = 0
        self.tokens = 0
        self.earlier_seconds = 0.0  # training time of this window before a resume
        self.start_clock()

    def start_clock(self) -> None:
        self.started = time.perf_counter()
        self.excluded_seconds = 0.0
        self.excluding_since: float | None = None

    def add(self, lm_loss: torch.Tensor, aux_loss: torch.Tensor, skipped: bool, tokens: int) -> None:
        """One optimizer step over `tokens` tokens; a skipped step's loss (NaN or Inf) stays out of the means."""
        if not skipped:
            self.loss_sum += lm_loss
            self.aux_sum += aux_loss
            self.applied += 1
        self.steps += 1
        self.tokens += tokens

    @contextmanager
    def excluding(self) -> Iterator[None]:
        """`with window.excluding(): ...`: the time spent inside is not training time."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the training kernels still queued are training time
        self.excluding_since = time.perf_counter()
        try:
            yield
        finally:
            self.excluded_seconds += time.perf_counter() - self.excluding_since
            self.excluding_since = None

    def training_seconds(self) -> float:
        now = time.perf_counter()
        excluded = self.excluded_seconds + (now - self.excluding_since if self.excluding_since is not None else 0.0)
        return self.earlier_seconds + now - self.started - excluded

    def state(self) -> dict[str, Any]:
        """This rank's part of the window, for a checkpoint."""
        return {"loss_sum": float(self.loss_sum), "aux_sum": float(self.aux_sum), "steps": self.steps,
                "applied": self.applied, "tokens": self.tokens, "seconds": self.training_seconds()}

    def restore(self, state: dict[str, Any], tokens_per_step: int) -> None:
        """Take back a checkpoint's `state`; `tokens_per_step` counts its steps' tokens where it has no
        count (a checkpoint written before the window kept one)."""
        self.reset()
        self.loss_sum.fill_(state["loss_sum"])
        self.aux_sum.fill_(state["aux_sum"])
        self.steps, self.applied, self.earlier_seconds = state["steps"], state["applied"], state["seconds"]
        self.tokens = state.get("tokens", self.steps * tokens_per_step)

