"""A whole `train(cfg)` run through the real DeepSpeed engine, with save and resume."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from train.loop import train

ROOT = Path(__file__).resolve().parents[2]
DETERMINISTIC = ("step", "tokens", "loss", "aux_loss", "lr", "grad_norm", "experts", "val_loss")


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _deterministic(record: dict) -> dict:
    return {key: record[key] for key in DETERMINISTIC if key in record}


@pytest.mark.slow
def test_train_then_resume_continues_the_same_trajectory(compose_run, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [
        "model=gpt_tiny",
        "trainer.max_steps=6",
        "trainer.micro_batch_size=4",
        "trainer.grad_accum=2",
        "trainer.checkpoint_every=3",
        "trainer.eval_every=3",
        "trainer.eval_batches=2",
        "logging.log_every=1",
        "logging.progress_bar=false",
        f"data.cache_dir={ROOT / '.cache' / 'data'}",
        f"trainer.run_dir={run_dir}",
    ]
    summary = train(compose_run(overrides))
    assert summary["steps"] == 6
    assert summary["final_val_loss"] < summary["initial_val_loss"]
    assert (run_dir / "config.yaml").exists() and (run_dir / "summary.json").exists()
    first = _records(run_dir / "metrics.jsonl")
    assert [r["step"] for r in first if r["event"] == "train"] == [1, 2, 3, 4, 5, 6]
    layer0 = first[1]["experts"]["moe_layer_0"]
    assert len(layer0["load"]) == 8 and 0.0 <= layer0["drop_fraction"] < 1.0
    # The summary's training-only tokens/s is the logged windows' (evaluations and saves left out),
    # so above the whole-run figure.
    windows = [r for r in first if r["event"] == "train"]
    seconds = sum((now["tokens"] - before) / now["tokens_per_s"]
                  for before, now in zip([0] + [r["tokens"] for r in windows], windows))
    assert summary["training_tokens_per_s"] == pytest.approx(windows[-1]["tokens"] / seconds, rel=1e-9)
    assert summary["training_tokens_per_s"] > summary["tokens_per_s"]
    assert summary["training_mfu"] == pytest.approx(summary["mfu"] * summary["training_tokens_per_s"] / summary["tokens_per_s"])

    ckpt = run_dir / "checkpoints"
    expert_files = sorted(p.name for p in (ckpt / "step_00000006").glob("layer_0_expert_*"))
    assert len(expert_files) == 8, "DeepSpeed writes one file per (MoE layer, expert)"

    # A crash right after step 3's checkpoint: step 6's checkpoint never happened.
    shutil.rmtree(ckpt / "step_00000006")
    (ckpt / "latest").write_text("step_00000003")
    resumed = train(compose_run([*overrides, "trainer.resume=true"]))
    assert resumed["steps"] == 6 and resumed["steps_this_session"] == 3
    second = _records(run_dir / "metrics.jsonl")
    assert [_deterministic(r) for r in second] == [_deterministic(r) for r in first]
    assert resumed["final_val_loss"] == summary["final_val_loss"]
    assert resumed["initial_val_loss"] == summary["initial_val_loss"]


@pytest.mark.slow
def test_an_mfu_above_100_percent_is_flagged_once(compose_run, tmp_path, monkeypatch, capsys):
    # A CPU peak measured while other work held the cores comes out low, and MFU above 100%.
    monkeypatch.setattr("train.flops.measured_cpu_matmul_tflops", lambda: 1e-9)
    train(compose_run(["model=gpt_tiny", "trainer.max_steps=3", "trainer.micro_batch_size=2", "trainer.eval_every=0",
                       "trainer.eval_batches=1", "logging.log_every=1", "logging.progress_bar=false", "logging.plots=off",
                       f"data.cache_dir={ROOT / '.cache' / 'data'}", f"trainer.run_dir={tmp_path / 'run'}"]))
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning     MFU")]
    assert len(warnings) == 1 and "was measured low" in warnings[0] and "trainer.peak_tflops=X" in warnings[0]
    # A peak the user gave is theirs to answer for: no warning.
    train(compose_run(["model=gpt_tiny", "trainer.max_steps=2", "trainer.micro_batch_size=2", "trainer.eval_every=0",
                       "trainer.eval_batches=1", "logging.log_every=1", "logging.progress_bar=false", "logging.plots=off",
                       "trainer.peak_tflops=1e-9", f"data.cache_dir={ROOT / '.cache' / 'data'}",
                       f"trainer.run_dir={tmp_path / 'given'}"]))
    assert "warning     MFU" not in capsys.readouterr().out


@pytest.mark.slow
def test_a_slow_sink_at_an_evaluation_is_not_training_time(compose_run, tmp_path, monkeypatch):
    """What the sinks do with an eval record (logging.plots=eval draws every layer) is left out of
    tokens/s and MFU, as the evaluation itself is. The clock jumps 1000 s while a sink takes the eval
    record; counted as training, that would put the next window's tokens/s near zero. Also: a GPU
    of unknown peak (NaN) gives `peak_tflops: null` in summary.json, which is then strict JSON."""
    import time

    from train.plots import PlotSink

    jumped = [0.0]
    real_clock, draw = time.perf_counter, PlotSink.write
    monkeypatch.setattr(time, "perf_counter", lambda: real_clock() + jumped[0])

    def slow_sink(self, record):
        if record.get("event") == "eval":
            jumped[0] += 1000.0
        draw(self, record)

    monkeypatch.setattr(PlotSink, "write", slow_sink)
    monkeypatch.setattr("train.loop.peak_tflops", lambda device, given: (float("nan"), "an unknown GPU"))
    run_dir = tmp_path / "run"
    summary = train(compose_run(["model=gpt_tiny", "trainer.max_steps=4", "trainer.micro_batch_size=2", "trainer.eval_every=2",
                                 "trainer.eval_batches=1", "logging.log_every=2", "logging.progress_bar=false",
                                 "logging.plots=eval", f"data.cache_dir={ROOT / '.cache' / 'data'}",
                                 f"trainer.run_dir={run_dir}"]))
    assert jumped[0] == 3000.0  # the evaluations at steps 0, 2 and 4
    windows = [r for r in _records(run_dir / "metrics.jsonl") if r["event"] == "train"]
    assert [r["step"] for r in windows] == [2, 4]
    for before, record in zip([0, windows[0]["tokens"]], windows):
        assert (record["tokens"] - before) / record["tokens_per_s"] < 500, record  # the window's seconds
    assert summary["training_tokens_per_s"] > summary["tokens"] / 500
    written = json.loads((run_dir / "summary.json").read_text(), parse_constant=lambda name: pytest.fail(name))
    assert written["peak_tflops"] is None and written["mfu"] is None


@pytest.mark.slow
def test_a_plot_sink_that_fails_mid_run_leaves_training_going(compose_run, tmp_path, monkeypatch, capsys):
    """The plots are drawn at every evaluation (logging.plots=eval); the disk under them fills at the
    second: one warning, and the run ends as usual with every record in metrics.jsonl."""
    from train.plots import PlotSink

    draw = PlotSink.write

    def full_disk(self, record):
        if record.get("event") == "eval" and record["step"] >= 2:
            raise OSError(28, "No space left on device")
        draw(self, record)

    monkeypatch.setattr(PlotSink, "write", full_disk)
    run_dir = tmp_path / "run"
    summary = train(compose_run(["model=gpt_tiny", "trainer.max_steps=4", "trainer.micro_batch_size=2", "trainer.eval_every=2",
                                 "trainer.eval_batches=1", "logging.log_every=1", "logging.progress_bar=false",
                                 "logging.plots=eval", f"data.cache_dir={ROOT / '.cache' / 'data'}",
                                 f"trainer.run_dir={run_dir}"]))
    assert summary["steps"] == 4 and (run_dir / "summary.json").is_file()
    assert [r["step"] for r in _records(run_dir / "metrics.jsonl") if r["event"] == "eval"] == [0, 2, 4]
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning     PlotSink")]
    assert warnings == ["warning     PlotSink stopped (OSError: [Errno 28] No space left on device); training goes on, "
                        "metrics.jsonl keeps every record"]


@pytest.mark.slow
def test_existing_run_dir_is_not_overwritten(compose_run, tmp_path):
    from train.config import ConfigError

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    with pytest.raises(ConfigError, match="already holds a run"):
        train(compose_run(["model=gpt_tiny", f"trainer.run_dir={run_dir}"]))


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides, expected_keys",
    [
        (["moe=expert_choice"], {"final_val_loss_batch", "final_val_loss_causal"}),
        (["moe=top2_auxfree", "trainer.grad_accum=2"], set()),
        (["moe=top2_shared", "moe.score_func=sigmoid", "moe.drop_policy=probability"], set()),
        (["moe.implementation=deepspeed", "moe.top_k=2"], set()),
    ],
)
def test_routing_variants_train_end_to_end(compose_run, tmp_path, overrides, expected_keys):
    run_dir = tmp_path / "run"
    summary = train(compose_run([
        "model=gpt_tiny", *overrides, "trainer.max_steps=6", "trainer.micro_batch_size=4", "trainer.eval_every=3",
        "deepspeed.warmup_steps=1",
        "trainer.eval_batches=2", "logging.log_every=2", "logging.progress_bar=false",
        f"data.cache_dir={ROOT / '.cache' / 'data'}", f"trainer.run_dir={run_dir}",
    ]))
    assert expected_keys <= summary.keys()
    # Six tiny steps say nothing about quality (the smoke test above checks learning); they must
    # run every path and produce finite losses and routing statistics.
    assert all(math.isfinite(summary[k]) for k in ("final_val_loss", "final_train_loss", *expected_keys))
    for layer in summary["experts"].values():
        assert sum(layer["routed"]) > 0
    if "moe=top2_auxfree" in overrides:
        import torch

        state = torch.load(run_dir / "checkpoints" / "step_00000006" / "mp_rank_00_model_states.pt", weights_only=False)
        biases = [v for k, v in state["module"].items() if k.endswith("selection_bias")]
        assert biases and all(b.dtype == torch.float32 for b in biases) and any(b.abs().sum() > 0 for b in biases)


@pytest.mark.slow
def test_keep_checkpoints_leaves_the_newest_and_a_resume_continues(compose_run, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [
        # fp32 spelled out: the dry run plans `auto` as bf16 (for GPUs), the CPU trains it in fp32.
        "model=gpt_tiny", "deepspeed.precision=fp32", "trainer.micro_batch_size=4", "trainer.checkpoint_every=1",
        "trainer.keep_checkpoints=2",
        "trainer.eval_every=0", "trainer.eval_batches=1", "logging.progress_bar=false", "logging.plots=off",
        f"data.cache_dir={ROOT / '.cache' / 'data'}", f"trainer.run_dir={run_dir}",
    ]  # fmt: skip
    train(compose_run([*overrides, "trainer.max_steps=5"]))
    checkpoints = run_dir / "checkpoints"

    def tags() -> list[str]:  # DeepSpeed also drops its zero_to_fp32.py script there
        return sorted(p.name for p in checkpoints.iterdir() if p.name.startswith("step_"))

    assert tags() == ["step_00000004", "step_00000005"]
    # The dry run's estimate of a checkpoint's size is what a save really writes (within 10%).
    plan = train(compose_run([*overrides, "trainer.max_steps=5", "dry_run=true", "world_size=1"]))
    written = sum(p.stat().st_size for p in (checkpoints / "step_00000005").rglob("*") if p.is_file())
    assert written == pytest.approx(plan["checkpoint_gib_per_save"] * 2**30, rel=0.1)
    resumed = train(compose_run([*overrides, "trainer.max_steps=7", "trainer.resume=true"]))
    assert resumed["steps"] == 7 and resumed["steps_this_session"] == 2
    assert tags() == ["step_00000006", "step_00000007"]
    assert (checkpoints / "latest").read_text() == "step_00000007"


@pytest.mark.slow
def test_the_console_carries_no_library_noise(tmp_path):
    """What a run prints is the run's: DeepSpeed's and megatron-core's start-up chatter (no GPU found,
    a process group created, a scheduler asked for its rate in its own constructor, Apex absent) is
    kept out, as the README's sample output shows."""
    import subprocess
    import sys

    from conftest import subprocess_env

    env = {k: v for k, v in subprocess_env(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1").items() if k != "DS_ACCELERATOR"}
    result = subprocess.run(
        [sys.executable, "-m", "train", "model=gpt_tiny", "trainer.max_steps=2", "trainer.micro_batch_size=2",
         "trainer.eval_batches=1", "deepspeed.warmup_steps=1", "logging.progress_bar=false", "logging.plots=off",
         f"data.cache_dir={ROOT / '.cache' / 'data'}", f"trainer.run_dir={tmp_path / 'run'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    console = result.stdout + result.stderr
    for noise in ("Setting accelerator to CPU", "No existing process group found",
                  "Attempting to get learning rate", "Transformer Engine and Apex"):
        assert noise not in console, f"{noise!r} in:\n{console}"
    assert "done        val loss" in result.stdout
