"""Ctrl-C at the terminal: the first stops the run after its step with a checkpoint (exit 130) and
says how to continue; a second stops at once, in one line, with the saved checkpoints intact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ctrl_c_as_at_a_terminal, subprocess_env

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _overrides(run_dir: Path) -> list[str]:
    return [
        "model=gpt_tiny", "trainer.max_steps=100000", "trainer.micro_batch_size=4",
        "trainer.checkpoint_every=0", "trainer.eval_every=0", "logging.log_every=1", "logging.progress_bar=false",
        "logging.plots=off", f"data.cache_dir={ROOT / '.cache' / 'data'}", f"trainer.run_dir={run_dir}",
    ]


def _start(run_dir: Path, cwd: Path, overrides: list[str] | None = None) -> subprocess.Popen:
    command = [sys.executable, "-m", "train", *(overrides or _overrides(run_dir))]
    return subprocess.Popen(command, cwd=cwd, env=subprocess_env(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=ctrl_c_as_at_a_terminal)


def _wait_for_steps(run_dir: Path, steps: int) -> None:
    deadline = time.monotonic() + 240
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.exists() and sum('"train"' in line for line in metrics.read_text().splitlines()) >= steps:
            return
        time.sleep(0.05)
    raise AssertionError("the run did not reach its first steps")


def test_first_ctrl_c_checkpoints_and_exits_130(tmp_path):
    run_dir = tmp_path / "run"
    process = _start(run_dir, tmp_path)
    _wait_for_steps(run_dir, 2)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    assert "Ctrl-C again stops at once" in err
    line = next(line for line in out.splitlines() if line.startswith("interrupted"))
    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    # The hint is the command line's own overrides with this run selected: pasted, it continues the run.
    continued = [*_overrides(run_dir)[:-1], "trainer.resume=true", f"trainer.run_dir={run_dir}"]
    assert f"checkpoint {tag} saved" in line and line.endswith("continue with " + " ".join(continued)), line
    assert (run_dir / "checkpoints" / tag / "mp_rank_00_model_states.pt").exists()
    steps_before = int(tag.rsplit("_", 1)[1])
    again = _start(run_dir, tmp_path, continued)
    _wait_for_steps(run_dir, steps_before + 2)
    again.send_signal(signal.SIGINT)
    _, err = again.communicate(timeout=120)
    assert again.returncode == 130 and "error:" not in err, err[-3000:]


def test_second_ctrl_c_stops_at_once_in_one_line(compose_run, tmp_path, monkeypatch, capsys, ctrl_c_enabled):
    # In process: two signals sent together from outside can merge into one (a pending signal is
    # not queued twice); from inside a step the first is handled before the second is sent.
    from train.cli import train_command
    from train.loop import Trainer

    original_step = Trainer.train_step

    def step_then_two_interrupts(self, step):
        result = original_step(self, step)
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(Trainer, "train_step", step_then_two_interrupts)
    run_dir = tmp_path / "run"
    cfg = compose_run(["model=gpt_tiny", "trainer.max_steps=10", "trainer.micro_batch_size=4", "trainer.checkpoint_every=1",
                       "trainer.eval_every=0", "logging.progress_bar=false", "logging.plots=off",
                       f"data.cache_dir={ROOT / '.cache' / 'data'}", f"trainer.run_dir={run_dir}"])
    with pytest.raises(SystemExit) as stop:
        train_command(cfg)
    assert stop.value.code == 130
    err = capsys.readouterr().err
    assert "interrupted at once: no checkpoint for this step" in err
    # Step 1 (the first) was saved before the step that was interrupted.
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000001"
