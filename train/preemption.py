"""Stopping cleanly when the scheduler says time is up: checkpoint at the next step boundary on
every rank, then exit with a status the batch script recognises and requeues.

Slurm warns a job before its time limit (`#SBATCH --signal=B:USR1@120`, which
launch/slurm/train.sbatch forwards to the ranks through srun) and sends SIGTERM when it cancels or
preempts it; the deepspeed launcher and Kubernetes send SIGTERM too. The handler only records the
signal: saving from inside a handler could interrupt a collective or a half-written file. At every
step boundary the ranks agree whether any of them got a signal, with one all-reduce of the signal's
number: the signal may reach the ranks at different moments (or only some of them), and a rank that
stopped alone would leave the others waiting forever in their next collective.

Ctrl-C (SIGINT) stops the same way, with a checkpoint, but exits with status 130, which the batch
script does not requeue; a second Ctrl-C stops at once.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

import torch
import torch.distributed as dist

PREEMPTED_EXIT_STATUS = 75
"""EX_TEMPFAIL in sysexits.h ("temporary failure; retry later"): a checkpoint was saved and the
job wants to be started again. launch/slurm/train.sbatch requeues the job on this status."""

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

INTERRUPT_EXIT_STATUS = 130
"""128 + SIGINT, what a shell reports for a job stopped by Ctrl-C: the run was stopped on purpose,
so the batch script must not requeue it (the checkpoint is saved all the same)."""

INTERRUPT_NOTICE = ("interrupt   Ctrl-C: stopping after this step with a checkpoint "
                    "(Ctrl-C again stops at once, without one)\n")


class Preempted(SystemExit):
    """Raised by the training loop after the checkpoint: the process exits with
    PREEMPTED_EXIT_STATUS (a SystemExit passes through Hydra untouched), and a caller that runs
    `train(cfg)` in process can catch it."""

    def __init__(self, step: int, signal_name: str) -> None:
        self.step, self.signal_name = step, signal_name
        super().__init__(INTERRUPT_EXIT_STATUS if self.interrupted else PREEMPTED_EXIT_STATUS)

    @property
    def interrupted(self) -> bool:
        """Stopped by Ctrl-C (a person), not by a scheduler: not to be requeued."""
        return self.signal_name == "SIGINT"

    def __str__(self) -> str:
        return f"{'interrupted' if self.interrupted else 'preempted'} by {self.signal_name}: checkpoint at step {self.step}"


class PreemptionWatch:
    """Context manager: while open, STOP_SIGNALS and a first SIGINT (Ctrl-C) are recorded instead
    of killing the process; on exit the previous handlers come back (tests run several jobs in one
    process). A second SIGINT goes to the previous handler (Python's: KeyboardInterrupt), so a user
    who does not want to wait for the step and its checkpoint can still stop at once."""

    def __init__(self, signals: tuple[signal.Signals, ...] = (*STOP_SIGNALS, signal.SIGINT)) -> None:
        self.signals = signals
        self.received: str | None = None
        self._previous: dict[signal.Signals, object] = {}
        self._group = None
        self._group_ready = False

    def __enter__(self) -> PreemptionWatch:
        # signal.signal only works in the main thread; elsewhere (a notebook's worker thread)
        # the job simply runs without preemption handling.
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                if signum == signal.SIGINT and signal.getsignal(signum) is signal.SIG_IGN:
                    continue  # started with Ctrl-C ignored (a shell's background job): keep it so
                self._previous[signum] = signal.signal(signum, self._record)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
        if signum == signal.SIGINT:
            previous = self._previous.get(signal.SIGINT)
            signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
            if os.environ.get("RANK", "0") == "0":  # Ctrl-C reaches every rank of the terminal's job
                # os.write, not print: the handler may run inside a print to the same stream, and a
                # buffered stream refuses that reentrant call.
                os.write(2, INTERRUPT_NOTICE.encode())

    def agreed(self) -> str | None:
        """Collective (every rank calls it at the same step): None when no rank got a stop signal;
        otherwise the name of the highest-numbered signal any rank got (SIGTERM over SIGUSR1 over
        SIGINT), the same on every rank. So every rank records the signal that stops the run, whichever
        rank it reached first, and exits with the same status: a rank that named its own signal would
        exit 130 for a Ctrl-C that reached it alone, beside peers exiting 75 for it."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return self.received
        number = torch.tensor([0 if self.received is None else signal.Signals[self.received].value], dtype=torch.int32)
        dist.all_reduce(number, op=dist.ReduceOp.MAX, group=self._agreement_group())
        highest = int(number.item())
        return signal.Signals(highest).name if highest else None

    def _agreement_group(self):
        """The signal's number travels on CPU: over a gloo group when the default one is NCCL, so that the
        per-step check never waits for the GPU stream (None = the default group, already gloo)."""
        if not self._group_ready:
            if dist.get_backend() != "gloo":
                self._group = dist.new_group(backend="gloo")
            self._group_ready = True
        return self._group
