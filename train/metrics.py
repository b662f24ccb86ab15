"""What a run records: metrics.jsonl lines, per-layer expert figures, the console progress bar."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from moe import MoEAux
from moe.stats import utilisation


class ExpertCounts:
    """Per-MoE-layer routed/kept counts summed over a window of micro-steps, then over ranks."""

    def __init__(self) -> None:
        self.window: list[torch.Tensor] | None = None  # [layers, 2, E] int64 per window
        self.total: torch.Tensor | None = None

    def add(self, moe_aux: list[MoEAux]) -> None:
        if not moe_aux:
            return
        counts = torch.stack([torch.stack([a.routed_E, a.kept_E]) for a in moe_aux]).cpu()
        self.window = counts if self.window is None else self.window + counts

    def reduce_window(self) -> dict[str, Any]:
        """All ranks call this at the same step: it sums the window over ranks, then resets it."""
        if self.window is None:
            return {}
        counts = self.window.clone()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(counts)
        self.window = None
        self.total = counts if self.total is None else self.total + counts
        return figures_per_layer(counts)


def figures_per_layer(counts_L2E: torch.Tensor) -> dict[str, Any]:
    return {f"moe_layer_{i}": utilisation(c[0].tolist(), c[1].tolist()) for i, c in enumerate(counts_L2E)}


def mean_over_ranks(value: float) -> float:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor)
    return float(tensor.item()) / dist.get_world_size()


class MetricsFile:
    """metrics.jsonl: one JSON object per line, flushed and fsynced so a crash loses nothing logged."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, allow_nan=False, default=_finite) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint we resume from: they will be redone."""
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text(encoding="utf-8").splitlines() if json.loads(line)["step"] <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, self.path)


def _finite(value: Any) -> Any:
    raise TypeError(f"not JSON serialisable: {value!r}")


def finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


class Progress:
    """A tqdm bar on rank 0 (loss, tokens/s, MFU; tqdm gives the ETA); silent elsewhere."""

    def __init__(self, total: int, initial: int, show_bar: bool, is_main: bool) -> None:
        self.is_main = is_main
        self.bar = tqdm(
            total=total, initial=initial, disable=not (show_bar and is_main), unit="step", dynamic_ncols=True,
            mininterval=1.0,
        )

    def update(self, steps: int, **figures: str) -> None:
        if figures:
            self.bar.set_postfix(figures, refresh=False)
        self.bar.update(steps)

    def print(self, message: str) -> None:
        if self.is_main:
            tqdm.write(message)

    def close(self) -> None:
        self.bar.close()
