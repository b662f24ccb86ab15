"""What the inference commands (moe-eval, moe-generate, moe-export, moe-consolidate) share:
argument errors and user mistakes as one line on stderr with exit status 2, and a quiet import
of DeepSpeed (the model's MoE layers are DeepSpeed modules; no process group is started)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence

import torch

from train.config import ConfigError
from train.one_line_arguments import parsed_as


def quiet_deepspeed() -> None:
    """Keep DeepSpeed's logger to warnings."""
    import deepspeed

    deepspeed.utils.logger.setLevel(logging.WARNING)


def run_command(body: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a command's body; a ConfigError (any user mistake) becomes `error: ...` and exit status 2."""
    try:
        return body(argv) or 0
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    except BrokenPipeError:
        # The reader of the output went away (`moe-generate ... | head`): stop quietly, as a Unix
        # tool does. Python would report the pipe again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


def inference_device(text: str) -> torch.device:
    """--device: cpu, cuda or cuda:N, and a CUDA device only where there is one (the inference
    commands would otherwise fail deep inside .to(device) with a multi-line traceback)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device is available here (use cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def seed(text: str) -> int:
    """--seed: an integer torch's generator takes, 0 to 2**64 - 1."""
    return parsed_as(text, int, lambda value: 0 <= value < 2**64, "an integer from 0 to 2**64 - 1")
