"""In process, without Slurm: a stop signal mid-run checkpoints at the step boundary and raises
Preempted; `trainer.auto_resume=true` on the same run directory continues to the end on the
trajectory of an uninterrupted run (which itself starts fresh under auto_resume: no checkpoint)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from train.loop import Trainer, train
from train.preemption import Preempted

ROOT = Path(__file__).resolve().parents[2]
DETERMINISTIC = ("event", "step", "tokens", "loss", "aux_loss", "lr", "grad_norm", "experts", "val_loss")
STEPS = 6


def _overrides(run_dir: Path) -> list[str]:
    return [
        "model=gpt_tiny", f"trainer.max_steps={STEPS}", "trainer.micro_batch_size=4", "trainer.eval_every=2",
        "trainer.eval_batches=2", "trainer.checkpoint_every=0", "logging.log_every=1", "logging.progress_bar=false",
        "trainer.peak_tflops=1", f"data.cache_dir={ROOT / '.cache' / 'data'}", f"trainer.run_dir={run_dir}",
        "trainer.auto_resume=true",
    ]


def _records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: r[k] for k in DETERMINISTIC if k in r} for r in map(json.loads, lines)]


@pytest.mark.slow
def test_signal_mid_run_checkpoints_then_auto_resume_continues_the_trajectory(compose_run, tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    train(compose_run(_overrides(reference)))

    original_step = Trainer.train_step

    def step_then_signal(self, step):
        result = original_step(self, step)
        if step == 2:  # during the third step, as a scheduler's signal would arrive
            os.kill(os.getpid(), signal.SIGUSR1)
        return result

    preempted = tmp_path / "preempted"
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "train_step", step_then_signal)
        with pytest.raises(Preempted) as stop:
            train(compose_run(_overrides(preempted)))
    assert stop.value.step == 3 and stop.value.code == 75
    assert (preempted / "checkpoints" / "latest").read_text() == "step_00000003"
    assert not (preempted / "summary.json").exists()
    last = json.loads((preempted / "metrics.jsonl").read_text().splitlines()[-1])
    assert last == {"event": "preempted", "step": 3, "tokens": 3 * 4 * 32, "signal": "SIGUSR1",
                    "checkpoint": "step_00000003"}

    summary = train(compose_run(_overrides(preempted)))
    assert summary["steps"] == STEPS and summary["steps_this_session"] == STEPS - 3
    resumed = [r for r in _records(preempted) if r["event"] != "preempted"]
    assert resumed == _records(reference)


@pytest.mark.slow
def test_a_periodic_save_on_the_step_a_job_stops_carries_the_portable_copy(compose_run, tmp_path, monkeypatch):
    """trainer.portable_checkpoint=final: when the stop signal arrives at a step that is also a
    periodic save, that save is the one the job ends on, so it holds the layout-free copy."""
    original_step = Trainer.train_step

    def step_then_signal(self, step):
        result = original_step(self, step)
        if step == 1:  # the second step, whose periodic save (checkpoint_every=2) the job stops on
            os.kill(os.getpid(), signal.SIGUSR1)
        return result

    run_dir = tmp_path / "run"
    overrides = [*_overrides(run_dir), "trainer.checkpoint_every=2", "trainer.portable_checkpoint=final", "trainer.eval_every=0"]
    monkeypatch.setattr(Trainer, "train_step", step_then_signal)
    with pytest.raises(Preempted) as stop:
        train(compose_run(overrides))
    assert stop.value.step == 2
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000002"
    index = json.loads((run_dir / "checkpoints" / "step_00000002" / "portable" / "index.json").read_text())
    assert index["tensors"] is True
