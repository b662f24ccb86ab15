"""Non-finite losses: a step whose loss is NaN or Inf changes nothing, and too many in a row stop the run.

How a step is skipped: with fp32 or bf16 there is no loss scaler to skip it for us, and by the
time one micro-batch's loss is known the earlier micro-batches of the step have already put
their gradients into ZeRO's buffers. So a non-finite loss is multiplied by NaN before
`backward` (`poison_if_nonfinite`): the step's gradient norm is then NaN on every rank (ZeRO
all-reduces it), and DeepSpeed's ZeRO optimizer takes its own overflow path, the one fp16 loss
scaling uses: no update of weights or AdamW state, gradients cleared, the learning-rate schedule
not advanced, `engine.skipped_steps` incremented, `engine.was_step_applied()` false. An Inf loss
can have finite gradients (a target logit of -inf), which is why the loss itself is checked.
Multiplying on the device costs no host synchronisation.

The routers' once-per-step statistics of a skipped step are dropped too (`discard_routing_statistics`):
a NaN forward pass would otherwise move the balancing bias or expert-choice thresholds.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from moe.router_state import StepStatefulRouter

EXIT_STATUS = 3
"""Process exit status of a run stopped by non-finite losses (2 is a configuration error)."""


def poison_if_nonfinite(loss: torch.Tensor) -> torch.Tensor:
    """`loss` unchanged (times exactly 1) when finite, NaN (with NaN gradients) otherwise."""
    return loss * torch.where(torch.isfinite(loss), 1.0, float("nan")).to(loss.dtype)


def discard_routing_statistics(model: nn.Module) -> None:
    """Reset what the routers gathered during a skipped step without updating their state
    (statistics of zero observations leave every router buffer as it is)."""
    for router in model.modules():
        if isinstance(router, StepStatefulRouter):
            router.apply_statistics(torch.zeros_like(router.pending_statistics()))


class NonFiniteLossStop(SystemExit):
    """Raised on every rank when `trainer.max_nonfinite_steps` steps in a row were skipped. A
    SystemExit, so a command-line run ends with EXIT_STATUS and the one-line message rank 0
    printed, not a traceback per rank; `train(cfg)` callers can catch it."""

    def __init__(self, message: str) -> None:
        super().__init__(EXIT_STATUS)
        self.message = message

    def __str__(self) -> str:
        return self.message


class NonFiniteStreak:
    """Counts skipped steps in a row; `record` raises NonFiniteLossStop at the limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_a_row = 0

    def record(self, step: int, skipped: bool, latest_checkpoint: Callable[[], str | None]) -> None:
        """`step`: the 1-based step just taken; `latest_checkpoint()`: the tag a resume would load."""
        if not skipped:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            first = step - self.in_a_row + 1
            steps = f"step {step}" if first == step else f"steps {first}-{step}"
            tag = latest_checkpoint()
            kept = f"the last good checkpoint is {tag}" if tag else "no checkpoint was written"
            raise NonFiniteLossStop(
                f"error: {self.in_a_row} non-finite losses in a row ({steps}; trainer.max_nonfinite_steps={self.limit}); "
                f"stopped, {kept}"
            )
