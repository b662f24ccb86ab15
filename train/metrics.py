"""What a run records: metrics.jsonl lines, per-layer expert figures, the console progress bar."""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from moe import MoEAux
from moe.stats import utilisation
from train.durable import write_text_atomically


class ExpertCounts:
    """Per-MoE-layer routing statistics summed over a window of micro-steps, then over ranks.

    One fp64 row per layer: routed [E], kept [E], experts-per-token histogram [E+1], entropy
    sum, token count; `figures_per_layer` turns rows into named figures.
    """

    def __init__(self, group=None) -> None:
        self.window: torch.Tensor | None = None
        self.total: torch.Tensor | None = None
        self.group = group
        """Ranks to sum over: None = all; with tensor parallelism one rank per tensor-parallel
        group, since its ranks route the same tokens."""

    def add(self, moe_aux: list[MoEAux]) -> None:
        if not moe_aux:
            return
        rows = torch.stack([
            torch.cat([
                a.routed_E.double(), a.kept_E.double(), a.experts_per_token.double(),
                a.entropy_sum.double().view(1), a.experts_per_token.sum().double().view(1),
            ])
            for a in moe_aux
        ])
        self.window = rows if self.window is None else self.window + rows

    def reduce_window(self) -> dict[str, Any]:
        """All ranks call this at the same step: it sums the window over ranks, then resets it."""
        if self.window is None:
            return {}
        rows = self.window.clone()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(rows, group=self.group)
        self.window = None
        rows = rows.cpu()
        self.total = rows if self.total is None else self.total + rows
        return figures_per_layer(rows)


    def through_now(self) -> list[list[float]] | None:
        """The run's counts so far, summed over ranks, for a checkpoint: the total plus the window
        not yet logged (whose steps a resumed run does not train again). Collective, like
        `reduce_window`; leaves the window and the total as they are."""
        if self.window is None:
            return None if self.total is None else self.total.tolist()
        rows = self.window.clone()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(rows, group=self.group)
        rows = rows.cpu()
        return (rows if self.total is None else self.total + rows).tolist()

    def restore(self, rows: list[list[float]] | None, window: list[list[float]] | None = None,
                device: torch.device | None = None) -> None:
        """Continue a resumed run's whole-run counts: from what `through_now` saved, or, at the same
        layout, from the logged total (`total_state`) and this rank's unlogged window (`window_state`),
        which the next record then reduces exactly as if the run had not stopped. The window goes on
        the training `device`: NCCL reduces CUDA tensors only, and a skipped first step after the
        resume would otherwise leave it on the CPU for the next record's reduction."""
        self.total = None if rows is None else torch.tensor(rows, dtype=torch.float64)
        self.window = None if window is None else torch.tensor(window, dtype=torch.float64, device=device)

    def total_state(self) -> list[list[float]] | None:
        """The counts of the records written so far, summed over ranks (the same on every rank)."""
        return None if self.total is None else self.total.tolist()

    def window_state(self) -> list[list[float]] | None:
        """This rank's counts of the steps not yet logged, for a checkpoint (train/log_window.py)."""
        return None if self.window is None else self.window.tolist()


def figures_per_layer(rows: torch.Tensor) -> dict[str, Any]:
    num_experts = (rows.shape[1] - 3) // 3
    figures = {}
    for i, row in enumerate(rows.tolist()):
        routed, kept = row[:num_experts], row[num_experts : 2 * num_experts]
        histogram = row[2 * num_experts : 3 * num_experts + 1]
        figures[f"moe_layer_{i}"] = utilisation(routed, kept, histogram, row[-2], row[-1])
    return figures


def mean_over_ranks(value: float, device: torch.device) -> float:
    """Mean of a per-rank number; on `device` because NCCL reduces CUDA tensors only."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor.item()) / dist.get_world_size()


class MetricsFile:
    """metrics.jsonl: one JSON object per line, flushed and fsynced so a crash loses nothing logged.

    A record that cannot be written (a full disk) is held in memory, with one warning, and written
    before the next one once the disk takes it again. Meanwhile `problem` says why: the next
    checkpoint save then stops every rank (train/checkpoint.py), so that no checkpoint is saved past
    records that never reached the file (a resume redoes the steps after the last checkpoint, and
    logs them again)."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled
        self.held: list[str] = []
        self.problem: str | None = None
        self._maybe_torn = False

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.held.append(json.dumps(record, allow_nan=False, default=_finite) + "\n")
        self.write_held()

    def write_held(self) -> str | None:
        """Append the held records; None once they are on disk, else why not (also in `problem`)."""
        if not self.held:
            return None
        size = None
        try:
            size = self.path.stat().st_size if self.path.exists() else 0
            # After a failed cut-back, the file may end in part of a line: end it, so that the fragment
            # stays a line of its own (skipped by every reader) and does not swallow the next record.
            text = ("\n" if self._maybe_torn else "") + "".join(self.held)
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as error:
            if size is not None and not self._cut_back_to(size):
                self._maybe_torn = True
            if self.problem is None:
                print(f"warning     could not write {self.path} ({error.strerror}): its records are held in memory "
                      "until it can be; the next checkpoint save stops the run if it still cannot", file=sys.stderr,
                      flush=True)
            self.problem = f"could not write {self.path} ({error.strerror}; {len(self.held)} records held in memory)"
            return self.problem
        self.held.clear()
        self.problem = None
        self._maybe_torn = False
        return None

    def report_held(self) -> None:
        """At a stop: a last attempt, and one line if records are still not written (they are lost)."""
        if self.write_held() is not None:
            print(f"warning     {len(self.held)} records not written to {self.path}: {self.problem}", file=sys.stderr,
                  flush=True)

    def _cut_back_to(self, size: int) -> bool:
        """Remove what a failed append left after `size` bytes; whether that worked."""
        try:
            os.truncate(self.path, size)
        except OSError:
            return False
        return True

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint we resume from: they will be redone."""
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line, record in metrics_lines(self.path) if record.get("step", step + 1) <= step]
        write_text_atomically(self.path, "".join(line + "\n" for line in kept))


def metrics_lines(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(line, record) for each line of a metrics.jsonl; a line torn by a kill does not parse and is skipped."""
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        yield line, record


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl; a torn last line (a killed run) is skipped."""
    return [record for _, record in metrics_lines(path)]


def _finite(value: Any) -> Any:
    raise TypeError(f"not JSON serialisable: {value!r}")


def finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def finite_figures(figures: dict[str, float]) -> dict[str, float | None]:
    """`figures` with each NaN or infinity as None (JSON's null: JSON has no NaN)."""
    return {name: finite_or_none(value) for name, value in figures.items()}


def perplexity(loss: float) -> float:
    """exp(loss); inf where that overflows (a diverged model's loss above 709), never an OverflowError."""
    return math.exp(loss) if not loss >= 709.0 else math.inf


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
