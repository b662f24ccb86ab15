"""Where a benchmark writes its JSON: runs/bench/<name>-<time>.json unless --json says otherwise.

Checked before the benchmark runs: a path that cannot be written must not cost
the minutes of measuring (a GPU session has few) and then fail on the last line.
"""

from __future__ import annotations

import datetime
import platform
from pathlib import Path

import torch

from train.output_path import output_problem

DEFAULT_FOLDER = Path("runs/bench")


def json_destination(requested: Path | None, name: str) -> Path:
    """`requested`, or DEFAULT_FOLDER/<name>-<UTC time>.json; the folder is created. ValueError,
    naming --json, when the file could not be written there."""
    if requested is None:
        DEFAULT_FOLDER.mkdir(parents=True, exist_ok=True)
        return DEFAULT_FOLDER / f"{name}-{datetime.datetime.now(datetime.timezone.utc):%Y%m%d-%H%M%S}.json"
    # The file is written beside its final name and renamed over it: through a link, that is
    # beside the file the link names (renaming over the link would replace the link).
    requested = requested.resolve() if requested.is_symlink() else requested
    problem = output_problem(requested, "--json")
    if problem is not None:
        raise ValueError(problem)
    requested.parent.mkdir(parents=True, exist_ok=True)
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
