"""The run's sinks (plots, W&B): one that fails is dropped with a warning, and the others, and training,
go on."""

from __future__ import annotations

import pytest

from train.sinks import Sinks, open_sinks


class _Recorder:
    def __init__(self) -> None:
        self.records, self.summaries = [], []

    def write(self, record):
        self.records.append(record)

    def finish(self, summary):
        self.summaries.append(summary)


class _FullDisk(_Recorder):
    def write(self, record):
        if record["step"] >= 2:
            raise OSError(28, "No space left on device")
        super().write(record)


def test_a_failing_sink_is_dropped_with_one_warning_and_the_others_go_on(capsys):
    failing, healthy = _FullDisk(), _Recorder()
    sinks = Sinks([failing, healthy])
    for step in range(1, 5):
        sinks.write({"event": "train", "step": step})
    sinks.finish({"steps": 4})
    assert [r["step"] for r in failing.records] == [1] and failing.summaries == []  # not called again
    assert [r["step"] for r in healthy.records] == [1, 2, 3, 4] and healthy.summaries == [{"steps": 4}]
    warnings = capsys.readouterr().err.splitlines()
    assert warnings == ["warning     _FullDisk stopped (OSError: [Errno 28] No space left on device); training goes on, "
                        "metrics.jsonl keeps every record"]
    assert sinks.active == [healthy]


def test_a_bug_in_a_sink_is_raised_not_dropped():
    class Broken(_Recorder):
        def write(self, record):
            raise KeyError("experts")

    sinks = Sinks([Broken()])
    with pytest.raises(KeyError):
        sinks.write({"event": "train", "step": 1})


def test_wandb_failing_on_the_plots_images_drops_wandb_and_keeps_the_plots(compose_run, tmp_path, monkeypatch, capsys):
    """The plot sink hands its images to W&B (open_sinks wires it through Sinks.call): W&B's failure
    there must not take the plots with it."""
    pytest.importorskip("wandb")
    from train import plots, wandb_sink
    from train.config import to_run_config

    class Plots(_Recorder):
        def __init__(self, run_dir, every_eval, on_plots):
            super().__init__()
            self.on_plots = on_plots

        def write(self, record):
            super().write(record)
            self.on_plots(record["step"], [tmp_path / "expert_load_moe_layer_0.png"])

    class Wandb(_Recorder):
        def __init__(self, run, run_dir):
            super().__init__()

        def log_images(self, step, paths):
            raise ConnectionError("the W&B service is gone")

    monkeypatch.setattr(plots, "PlotSink", Plots)
    monkeypatch.setattr(wandb_sink, "WandbSink", Wandb)
    run = to_run_config(compose_run(["logging=wandb", "logging.wandb_mode=offline", "logging.plots=eval"]))
    sinks = open_sinks(run, is_main=True, run_dir=tmp_path)
    plot_sink, _ = sinks.active
    for step in (1, 2):
        sinks.write({"event": "eval", "step": step})
    assert sinks.active == [plot_sink] and [r["step"] for r in plot_sink.records] == [1, 2]
    assert capsys.readouterr().err.startswith("warning     Wandb stopped (ConnectionError: the W&B service is gone)")
