"""Where a run's records go besides metrics.jsonl: plots and W&B, on rank 0 only.

A sink has `write(record)` (every metrics.jsonl record, after it is on disk) and
`finish(summary)` (once: summary.json's contents at the end of a successful run, or, when a run
stops early for a stop signal or non-finite losses, {"stopped": reason, "steps": last step}, so
the plots are drawn and the W&B run is closed with what was logged).

A sink that fails during the run (a full disk under the plots, W&B's service gone) is dropped with
one warning line, and training goes on: metrics.jsonl holds every record (`python -m train.plots
RUN_DIR` draws the plots from it later), and a week of pre-training should not end, on
rank 0 alone, for a dashboard.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Protocol


class Sink(Protocol):
    def write(self, record: dict[str, Any]) -> None: ...

    def finish(self, summary: dict[str, Any]) -> None: ...


class Sinks:
    """The run's sinks, each called in turn; one that raises is dropped with a warning."""

    def __init__(self, sinks: list[Sink]) -> None:
        self.active = list(sinks)

    def write(self, record: dict[str, Any]) -> None:
        self._each("write", record)

    def finish(self, summary: dict[str, Any]) -> None:
        self._each("finish", summary)

    def _each(self, method: str, argument: dict[str, Any]) -> None:
        for sink in list(self.active):
            try:
                getattr(sink, method)(argument)
            except Exception as error:  # any failure of a dashboard: the run's records are safe
                self.active.remove(sink)
                detail = (str(error).strip().splitlines() or [""])[0][:200]
                print(f"warning     {type(sink).__name__} stopped ({type(error).__name__}: {detail}); training goes on, "
                      "metrics.jsonl keeps every record", file=sys.stderr, flush=True)


def open_sinks(run, is_main: bool, run_dir: Path) -> list[Sink]:
    """The sinks `run.logging` asks for. Other ranks get none: one W&B run and one set of plots
    per job. The plot sink comes first so that its images reach W&B before the W&B run closes."""
    if not is_main:
        return []
    sinks: list[Sink] = []
    wandb_sink = None
    if run.logging.wandb:
        from train.wandb_mode import resolve_mode
        from train.wandb_sink import WandbSink  # wandb is imported only when asked for

        if resolve_mode(run.logging.wandb_mode) != "disabled":
            wandb_sink = WandbSink(run, run_dir)
    if run.logging.plots != "off":
        from train.plots import PlotSink

        sinks.append(PlotSink(run_dir, every_eval=run.logging.plots == "eval",
                              on_plots=wandb_sink.log_images if wandb_sink else None))
    if wandb_sink is not None:
        sinks.append(wandb_sink)
    return sinks
