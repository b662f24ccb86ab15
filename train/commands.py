"""What the inference commands (moe-eval, moe-generate, moe-export, moe-consolidate) share:
argument errors and user mistakes as one line on stderr with exit status 2, and a quiet import
of DeepSpeed (the model's MoE layers are DeepSpeed modules; no process group is started)."""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from train.config import ConfigError
from train.one_line_arguments import ArgumentParser  # noqa: F401 (the inference commands take it from here)


def output_problem(path: Path, flag: str, folder: bool = False) -> str | None:
    """Why `path` cannot be written as this command's output (a file, or a `folder`), checked before
    any work; None when it can. A path to be created needs every existing part above it to be a
    folder, and the nearest one writable."""
    if path.exists() and path.is_dir() != folder:
        return f"{flag} {path}: {'a file' if folder else 'a folder'}; expected a {'folder' if folder else 'file'} path"
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                return f"{flag} {path}: {parent} is not a folder"
            if not os.access(parent, os.W_OK | os.X_OK):
                return f"{flag} {path}: {parent} is not writable"
            return None
    return None


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


def _parsed(text: str, convert: Callable[[str], Any], valid: Callable[[Any], bool], expected: str) -> Any:
    """`convert(text)` when it converts and is `valid`, else argparse's one-line error naming `expected`."""
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not valid(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _parsed(text, int, lambda value: value >= 1, "a positive integer")


def non_negative_int(text: str) -> int:
    return _parsed(text, int, lambda value: value >= 0, "an integer >= 0")


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


def positive_float(text: str) -> float:
    return _parsed(text, float, lambda value: math.isfinite(value) and value > 0, "a finite number > 0")


def seed(text: str) -> int:
    """--seed: an integer torch's generator takes, 0 to 2**64 - 1."""
    return _parsed(text, int, lambda value: 0 <= value < 2**64, "an integer from 0 to 2**64 - 1")
