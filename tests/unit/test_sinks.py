"""The run's sinks (plots, W&B): one that fails is dropped with a warning, and the others, and training,
go on."""

from __future__ import annotations

from train.sinks import Sinks


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
