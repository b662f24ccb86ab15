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
    """The run's sinks, each called in turn; one that fails as a dashboard fails (`_dashboard_failures`)
    is dropped with a warning. Any other exception is a bug and is raised."""

    def __init__(self, sinks: list[Sink] | None = None) -> None:
        self.active: list[Sink] = list(sinks or [])

    def write(self, record: dict[str, Any]) -> None:
        for sink in list(self.active):
            self.call(sink, "write", record)

    def finish(self, summary: dict[str, Any]) -> None:
        for sink in list(self.active):
            self.call(sink, "finish", summary)

    def call(self, sink: Sink, method: str, *args: Any) -> None:
        """sink.method(*args), unless the sink was dropped; on a dashboard failure, drop it."""
        if sink not in self.active:
            return
        try:
            getattr(sink, method)(*args)
        except _dashboard_failures() as error:
            self.active.remove(sink)
            detail = (str(error).strip().splitlines() or [""])[0][:200]
            print(f"warning     {type(sink).__name__} stopped ({type(error).__name__}: {detail}); training goes on, "
                  "metrics.jsonl keeps every record", file=sys.stderr, flush=True)


def _dashboard_failures() -> tuple[type[BaseException], ...]:
    """What a dashboard meets that is not its own bug: the file system (a full disk, a lost mount) and,
    where W&B is in use, W&B's errors (its service or the network gone)."""
    failures: list[type[BaseException]] = [OSError]
    if (wandb := sys.modules.get("wandb")) is not None:
        failures.append(wandb.errors.Error)
    return tuple(failures)


def open_sinks(run, is_main: bool, run_dir: Path) -> Sinks:
    """The sinks `run.logging` asks for. Other ranks get none: one W&B run and one set of plots
    per job. The plot sink comes first so that its images reach W&B before the W&B run closes;
    it hands them over through `Sinks.call`, so that W&B failing there drops W&B, not the plots."""
    sinks = Sinks()
    if not is_main:
        return sinks
    wandb_sink = None
    if run.logging.wandb:
        from train.wandb_mode import resolve_mode
        from train.wandb_sink import WandbSink  # wandb is imported only when asked for

        if resolve_mode(run.logging.wandb_mode) != "disabled":
            wandb_sink = WandbSink(run, run_dir)
    if run.logging.plots != "off":
        from train.plots import PlotSink

        on_plots = None if wandb_sink is None else lambda step, paths: sinks.call(wandb_sink, "log_images", step, paths)
        sinks.active.append(PlotSink(run_dir, every_eval=run.logging.plots == "eval", on_plots=on_plots))
    if wandb_sink is not None:
        sinks.active.append(wandb_sink)
    return sinks
