"""Expert-load plots for people without W&B: PNG files drawn from metrics.jsonl.

One figure per MoE layer, `<run_dir>/plots/expert_load_<layer>.png`: a heatmap of each expert's
share of the kept tokens over training (x = step, y = expert, colour = share relative to an
even split), and below it the drop % and the coefficient of variation over the same steps.

During training the sink reads metrics.jsonl once, at its first record, and then adds the
records it is given, so a resumed run's plots cover the whole run without re-reading the file at
every evaluation. `python -m train.plots RUN_DIR` draws them for any run directory, finished or not.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from train.durable import replace_durably, temporary_sibling
from train.metrics import read_metrics
from train.one_line_arguments import ArgumentParser


@dataclass
class LayerSeries:
    """One MoE layer's figures over the logged steps (columns in step order)."""

    steps: list[int] = field(default_factory=list)
    load: list[list[float]] = field(default_factory=list)
    """[step][expert] share of the kept assignments."""
    drop_fraction: list[float] = field(default_factory=list)
    cv: list[float] = field(default_factory=list)
    dead_experts: list[float] = field(default_factory=list)


def expert_series(records: list[dict[str, Any]]) -> dict[str, LayerSeries]:
    """Per-layer series from the train records that carry expert figures."""
    series: dict[str, LayerSeries] = {}
    for record in records:
        add_expert_figures(series, record)
    return series


def add_expert_figures(series: dict[str, LayerSeries], record: dict[str, Any]) -> None:
    """Append a train record's expert figures to `series`; other records add nothing."""
    if record.get("event") != "train":
        return
    for layer, figures in (record.get("experts") or {}).items():
        s = series.setdefault(layer, LayerSeries())
        s.steps.append(int(record["step"]))
        s.load.append(list(figures["load"]))
        s.drop_fraction.append(float(figures["drop_fraction"]))
        s.cv.append(float(figures["cv"]))
        s.dead_experts.append(float(figures["dead_experts"]))


def layer_order(layers: Iterable[str]) -> list[str]:
    """MoE layer names in model order (moe_layer_2 before moe_layer_10)."""
    return sorted(layers, key=_layer_index)


def _layer_index(name: str) -> int:
    digits = name.rsplit("_", 1)[-1]
    return int(digits) if digits.isdigit() else 0


def plot_layer(layer: str, series: LayerSeries, path: Path, title_suffix: str = "") -> Path:
    """Write one layer's figure to `path` (PNG)."""
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure  # no pyplot: no global state, no display, Agg canvas

    load_SE = np.asarray(series.load, dtype=float)  # S logged steps, E experts
    num_experts = load_SE.shape[1]
    relative_ES = load_SE.T * num_experts  # 1 = an even share
    # Each record averages the window since the previous one: colour the span (previous, step].
    edges = np.asarray([0, *series.steps], dtype=float)

    fig = Figure(figsize=(10, 6.5), layout="constrained")
    heat_ax, line_ax = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1.4])
    mesh = heat_ax.pcolormesh(
        edges, np.arange(num_experts + 1) - 0.5, relative_ES, cmap="RdBu_r",
        norm=TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=2.0), shading="flat",
    )
    colorbar = fig.colorbar(mesh, ax=heat_ax, extend="max", pad=0.01)
    colorbar.set_label("share of kept tokens / even share\n(1 = balanced, 0 = no tokens)")
    heat_ax.set_ylabel("expert")
    heat_ax.set_ylim(num_experts - 0.5, -0.5)  # expert 0 at the top
    tick_every = max(1, num_experts // 16)
    heat_ax.set_yticks(range(0, num_experts, tick_every))
    dead_now = int(series.dead_experts[-1])
    heat_ax.set_title(
        f"{layer}: tokens per expert over training{title_suffix}\n"
        f"last window: drop {100 * series.drop_fraction[-1]:.1f}%, CV {series.cv[-1]:.3f}, dead experts {dead_now}",
        fontsize=11,
    )

    line_ax.plot(series.steps, [100 * d for d in series.drop_fraction], color="tab:red", marker=".", label="drop %")
    line_ax.set_ylabel("drop %", color="tab:red")
    line_ax.set_ylim(bottom=0)
    line_ax.set_xlabel("step")
    line_ax.grid(alpha=0.3)
    cv_ax = line_ax.twinx()
    cv_ax.plot(series.steps, series.cv, color="tab:blue", marker=".", label="CV")
    cv_ax.set_ylabel("CV of kept tokens", color="tab:blue")
    cv_ax.set_ylim(bottom=0)
    line_ax.set_xlim(0, edges[-1])

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path, suffix=".tmp.png")
    try:
        fig.savefig(tmp, dpi=110)
        replace_durably(tmp, path)  # a reader, or the file after a crash, never holds half a plot
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_expert_plots(metrics_path: Path, out_dir: Path, title_suffix: str = "") -> list[Path]:
    """One PNG per MoE layer in `out_dir`; none for a dense model or before the first train record."""
    if not metrics_path.exists():
        return []
    return plot_expert_series(expert_series(read_metrics(metrics_path)), out_dir, title_suffix)


def plot_expert_series(series: dict[str, LayerSeries], out_dir: Path, title_suffix: str = "") -> list[Path]:
    """One PNG per layer of `series` in `out_dir`, in layer order."""
    return [
        plot_layer(layer, series[layer], out_dir / f"expert_load_{layer}.png", title_suffix)
        for layer in layer_order(series)
    ]


class PlotSink:
    """Draws the run's plots at the end, and after every evaluation with `every_eval` (rank 0 only).

    `on_plots(step, paths)` is told about each new set of files (the W&B sink logs them as images).
    """

    def __init__(self, run_dir: Path, every_eval: bool = False,
                 on_plots: Callable[[int, list[Path]], None] | None = None) -> None:
        self.run_dir = run_dir
        self.every_eval = every_eval
        self.on_plots = on_plots
        self.last_step: int | None = None
        """The last train record's step, None once it has been drawn."""
        self.latest_step = 0
        """The step of the latest record of any kind: images go there, never behind what W&B has
        already logged (a "preempted" or "stopped" record comes after the last train record)."""
        self.series: dict[str, LayerSeries] | None = None
        """The figures to draw, None until the first record (see `_add`)."""
        self.added_step = -1
        """The step of the last train record in `series`."""

    def write(self, record: dict[str, Any]) -> None:
        self._add(record)
        self.latest_step = max(self.latest_step, int(record.get("step", 0)))
        if record.get("event") == "train":
            self.last_step = int(record["step"])
        elif self.every_eval and record.get("event") == "eval" and self.last_step is not None:
            self._draw(int(record["step"]))

    def finish(self, summary: dict[str, Any]) -> None:
        if self.last_step is not None:
            self._draw(self.latest_step)

    def _add(self, record: dict[str, Any]) -> None:
        if self.series is None:
            # Read once, at the first record rather than when opened: the loop opens the sinks before
            # it truncates metrics.jsonl to the checkpoint it resumes from. What is left is the run
            # so far, which the plots cover too.
            self.series = {}
            metrics = self.run_dir / "metrics.jsonl"
            for earlier in read_metrics(metrics) if metrics.exists() else []:
                self._add_train(earlier)
        self._add_train(record)

    def _add_train(self, record: dict[str, Any]) -> None:
        # The file holds each record before the sink is given it, so the first one arrives twice:
        # train steps only go up after the truncation, and one not past the last added is a repeat.
        if record.get("event") == "train" and int(record["step"]) > self.added_step:
            add_expert_figures(self.series, record)
            self.added_step = int(record["step"])

    def _draw(self, step: int) -> None:
        paths = plot_expert_series(self.series or {}, self.run_dir / "plots", f" ({self.run_dir.name})")
        self.last_step = None  # drawn: finish() need not draw the same figures again
        if paths and self.on_plots is not None:
            self.on_plots(step, paths)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m train.plots", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run directory holding metrics.jsonl")
    parser.add_argument("--out", type=Path, default=None, help="where to write the PNGs (default RUN_DIR/plots)")
    args = parser.parse_args(argv)
    metrics = args.run_dir / "metrics.jsonl"
    if not metrics.is_file():
        print(f"error: {metrics} does not exist (expected a run directory holding metrics.jsonl)", file=sys.stderr)
        return 2
    paths = write_expert_plots(metrics, args.out or args.run_dir / "plots", f" ({args.run_dir.name})")
    if not paths:
        print(f"error: {metrics} has no train record with expert figures (a dense model, or no step logged yet)",
              file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
