"""metrics.jsonl on resume."""

from __future__ import annotations

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
