"""Where a benchmark writes its JSON: runs/bench/<name>-<time>.json unless --json says otherwise.

Checked before the benchmark runs: a path whose folder is missing or not writable must not cost
the minutes of measuring (a GPU session has few) and then fail on the last line.
"""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

import torch

DEFAULT_FOLDER = Path("runs/bench")


def json_destination(requested: Path | None, name: str) -> Path:
    """`requested`, or DEFAULT_FOLDER/<name>-<UTC time>.json (the folder is created). ValueError,
    naming --json, when the file could not be written there."""
    if requested is None:
        DEFAULT_FOLDER.mkdir(parents=True, exist_ok=True)
        return DEFAULT_FOLDER / f"{name}-{datetime.datetime.now(datetime.timezone.utc):%Y%m%d-%H%M%S}.json"
    if requested.exists() and not requested.resolve().is_file():
        raise ValueError(f"--json {requested}: not a regular file; expected a file path")
    # The file is written beside its final name and renamed over it: through a link, that is
    # beside the file the link names (renaming over the link would replace the link).
    requested = requested.resolve() if requested.is_symlink() else requested
    folder = requested.parent
    if not folder.is_dir():
        raise ValueError(f"--json {requested}: no such folder {folder}")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"--json {requested}: folder {folder} is not writable")
    return requested


def device_name(device: torch.device) -> str:
    """What the figures were measured on, for the JSON beside them: the GPU's name, or the CPU's model
    and the threads torch uses (CPU timings mean little without both)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = ""
    return f"{model or platform.processor() or 'cpu'}, {torch.get_num_threads()} threads"
