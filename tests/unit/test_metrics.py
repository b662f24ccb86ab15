"""metrics.jsonl on resume."""

from __future__ import annotations

import torch

from train.metrics import MetricsFile, read_metrics


def test_metrics_truncation_skips_a_line_torn_by_a_kill(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    MetricsFile(path, enabled=True).truncate_after(2)
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'


def test_read_metrics_skips_a_line_torn_by_a_kill(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert read_metrics(path) == [{"step": 1, "loss": 2.0}]


def test_gpu_peak_is_the_datasheet_figure_of_the_exact_part(monkeypatch):
    import torch

    from train.flops import peak_tflops

    cuda = torch.device("cuda", 0)
    for name, peak in [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
                       ("NVIDIA H200", 989.0), ("NVIDIA H200 NVL", 835.0), ("NVIDIA A100-SXM4-80GB", 312.0)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert peak_tflops(cuda, None) == (peak, f"{name} bf16 datasheet")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Some Future GPU")
    value, source = peak_tflops(cuda, None)
    assert value != value and "set trainer.peak_tflops" in source  # NaN: MFU unknown, not invented
    assert peak_tflops(cuda, 500.0) == (500.0, "trainer.peak_tflops")


def test_records_a_full_disk_refuses_are_held_and_written_in_order_once_it_takes_them(tmp_path, monkeypatch, capsys):
    """A full disk: the record stays in memory (one warning), no part of it is left in the file, and
    the next write, once there is room, writes the held records first."""
    import builtins
    import json

    from train import metrics

    path = tmp_path / "metrics.jsonl"
    full = False

    class PartWritten:
        """What a full disk does to a write: some bytes go in, then ENOSPC."""

        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, text):
            self.handle.write(text[: len(text) // 2])
            self.handle.flush()
            raise OSError(28, "No space left on device")

    def disk(file, mode="r", **kwargs):
        handle = builtins.open(file, mode, **kwargs)
        return PartWritten(handle) if full and file == path else handle

    monkeypatch.setattr(metrics, "open", disk, raising=False)
    log = MetricsFile(path, enabled=True)
    log.write({"event": "train", "step": 1})
    full = True
    log.write({"event": "train", "step": 2})
    log.write({"event": "train", "step": 3})
    assert path.read_text() == '{"event": "train", "step": 1}\n'  # the half-written lines were cut back
    assert log.problem == f"could not write {path} (No space left on device; 2 records held in memory)"
    assert log.write_held() == log.problem
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 1 and warnings[0].startswith(f"warning     could not write {path} (No space left on device)")
    full = False
    log.write({"event": "train", "step": 4})
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
    assert log.problem is None and log.write_held() is None
    # Where the torn part cannot be cut back either, it stays a line of its own, which readers skip.
    full = True
    monkeypatch.setattr(metrics.os, "truncate", lambda *args: (_ for _ in ()).throw(OSError(5, "Input/output error")))
    log.write({"event": "train", "step": 5})
    full = False
    log.write({"event": "train", "step": 6})
    assert [record["step"] for _, record in metrics.metrics_lines(path)] == [1, 2, 3, 4, 5, 6]
    assert len(path.read_text().splitlines()) == 7  # the fragment's line, skipped


def test_a_restored_expert_window_goes_on_the_training_device():
    # Under NCCL the next record reduces the window on the GPU; a resume whose first step is skipped
    # (no `add` to move it) used to reach that reduction with the window still on the CPU.
    from train.metrics import ExpertCounts

    counts = ExpertCounts()
    counts.restore([[1.0] * 12], [[2.0] * 12], torch.device("meta"))
    assert counts.window.device.type == "meta" and counts.window.dtype == torch.float64
    assert counts.total.device.type == "cpu"  # the logged total stays where reduce_window keeps it
