"""train/plots.py: expert-load PNGs drawn from a synthetic metrics.jsonl."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from matplotlib import colormaps
from matplotlib.image import imread

from train.metrics import MetricsFile, read_metrics
from train.plots import PlotSink, expert_series, main, write_expert_plots

NUM_EXPERTS = 8
DEAD = 3  # expert 3 never gets a token


def _layer_figures(step: int) -> dict:
    kept = [0.0 if e == DEAD else 100.0 + 10 * e + step for e in range(NUM_EXPERTS)]
    total = sum(kept)
    return {
        "routed": kept, "kept": kept, "load": [k / total for k in kept], "cv": 0.1 * step, "max_violation": 0.5,
        "drop_fraction": 0.01 * step, "dead_experts": 1.0, "router_entropy": 2.0,
        "experts_per_token": [0.0, 0.1, 0.9] + [0.0] * (NUM_EXPERTS - 2), "no_expert_fraction": 0.0,
    }


def _write_metrics(path: Path, steps: list[int], torn_tail: bool = False) -> None:
    lines = [json.dumps({"event": "eval", "step": 0, "tokens": 0, "val_loss": 8.0, "val_ppl": 2981.0})]
    for step in steps:
        lines.append(json.dumps({"event": "train", "step": step, "loss": 7.0, "experts": {
            "moe_layer_0": _layer_figures(step), "moe_layer_1": _layer_figures(step)}}))
    text = "\n".join(lines) + "\n"
    path.write_text(text + ('{"event": "train", "st' if torn_tail else ""), encoding="utf-8")


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_writes_one_valid_png_per_layer_from_metrics(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    _write_metrics(metrics, [10, 20, 30, 40], torn_tail=True)  # a killed run's torn last line is skipped
    paths = write_expert_plots(metrics, tmp_path / "plots")
    assert [p.name for p in paths] == ["expert_load_moe_layer_0.png", "expert_load_moe_layer_1.png"]
    width, height = _png_size(paths[0])
    assert width >= 800 and height >= 500
    pixels = imread(paths[0])[..., :3]
    # The dead expert's row is drawn in the colour map's "no tokens" end (0 on the colour bar).
    no_tokens = np.asarray(colormaps["RdBu_r"](0.0)[:3])
    assert (np.abs(pixels - no_tokens).max(axis=-1) < 0.02).sum() > 1000


def test_a_failed_redraw_keeps_the_previous_plot_whole(tmp_path, monkeypatch):
    metrics = tmp_path / "metrics.jsonl"
    _write_metrics(metrics, [10, 20])
    paths = write_expert_plots(metrics, tmp_path / "plots")
    before = {p: p.read_bytes() for p in paths}

    def half_written(fig, fname, **kwargs):
        Path(fname).write_bytes(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr("matplotlib.figure.Figure.savefig", half_written)
    _write_metrics(metrics, [10, 20, 30])
    with pytest.raises(OSError, match="disk full"):
        write_expert_plots(metrics, tmp_path / "plots")
    assert {p: p.read_bytes() for p in paths} == before
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(p.name for p in paths)  # no temp file left


def test_series_follow_the_records_in_step_order(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    _write_metrics(metrics, [5, 10, 12])
    series = expert_series(read_metrics(metrics))
    assert sorted(series) == ["moe_layer_0", "moe_layer_1"]
    layer = series["moe_layer_1"]
    assert layer.steps == [5, 10, 12]
    assert layer.drop_fraction == pytest.approx([0.05, 0.10, 0.12])
    assert [row[DEAD] for row in layer.load] == [0.0, 0.0, 0.0]


def test_sink_draws_at_the_end_or_after_every_evaluation(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    _write_metrics(metrics, [10])
    drawn: list[tuple[int, int]] = []
    train_record = {"event": "train", "step": 10}
    eval_record = {"event": "eval", "step": 10}

    end_only = PlotSink(tmp_path, on_plots=lambda step, paths: drawn.append((step, len(paths))))
    end_only.write(train_record)
    end_only.write(eval_record)
    assert drawn == [] and not (tmp_path / "plots").exists()
    end_only.finish({})
    assert drawn == [(10, 2)] and len(list((tmp_path / "plots").glob("*.png"))) == 2

    drawn.clear()
    every_eval = PlotSink(tmp_path, every_eval=True, on_plots=lambda step, paths: drawn.append((step, len(paths))))
    every_eval.write(eval_record)  # no train record yet (step 0's evaluation): nothing to draw
    every_eval.write(train_record)
    every_eval.write(eval_record)
    every_eval.finish({})  # already drawn at the final evaluation
    assert drawn == [(10, 2)]


def _train_record(step: int, cv: float) -> dict:
    figures = {**_layer_figures(step), "cv": cv}
    return {"event": "train", "step": step, "loss": 7.0, "experts": {"moe_layer_0": figures, "moe_layer_1": figures}}


def test_sink_after_a_resume_covers_the_whole_run_once(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    _write_metrics(metrics, [10, 20, 30, 40], torn_tail=True)  # killed after step 40; checkpoint at 20
    drawn: list[int] = []
    # The loop's order: the sink is opened, metrics.jsonl cut back to the checkpoint, then each
    # record goes to the file and after it to the sink.
    sink = PlotSink(tmp_path, every_eval=True, on_plots=lambda step, paths: drawn.append(step))
    log = MetricsFile(metrics, enabled=True)
    log.truncate_after(20)
    for record in (_train_record(30, cv=9.0), {"event": "eval", "step": 30}, _train_record(40, cv=9.0)):
        log.write(record)
        sink.write(record)
    sink.finish({})
    assert drawn == [30, 40]
    for layer in ("moe_layer_0", "moe_layer_1"):
        series = sink.series[layer]
        assert series.steps == [10, 20, 30, 40]
        assert series.cv == pytest.approx([1.0, 2.0, 9.0, 9.0])  # the redone steps, not the cut ones
    assert len(list((tmp_path / "plots").glob("expert_load_*.png"))) == 2


def test_sink_reads_metrics_once_not_at_every_draw(tmp_path, monkeypatch):
    import train.plots

    reads: list[Path] = []
    monkeypatch.setattr(train.plots, "read_metrics", lambda path: reads.append(path) or read_metrics(path))
    metrics = tmp_path / "metrics.jsonl"
    _write_metrics(metrics, [10])
    drawn: list[int] = []
    sink = PlotSink(tmp_path, every_eval=True, on_plots=lambda step, paths: drawn.append(step))
    sink.write({"event": "eval", "step": 10})
    metrics.unlink()  # what is drawn from now on comes from the records the sink was given
    for step in (20, 30):
        sink.write(_train_record(step, cv=5.0))
        sink.write({"event": "eval", "step": step})
    assert drawn == [20, 30] and reads == [metrics]
    assert sink.series["moe_layer_0"].steps == [10, 20, 30]
    assert sink.series["moe_layer_1"].cv == pytest.approx([1.0, 5.0, 5.0])


def test_command_line(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "metrics.jsonl does not exist" in capsys.readouterr().err
    _write_metrics(tmp_path / "metrics.jsonl", [])
    assert main([str(tmp_path)]) == 2  # no train record yet
    _write_metrics(tmp_path / "metrics.jsonl", [1, 2])
    assert main([str(tmp_path), "--out", str(tmp_path / "figures")]) == 0
    assert len(list((tmp_path / "figures").glob("expert_load_*.png"))) == 2
