"""A training process killed with SIGKILL at a random moment resumes on the identical trajectory."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[2]
DETERMINISTIC = ("event", "step", "tokens", "loss", "aux_loss", "lr", "grad_norm", "experts", "val_loss")
STEPS = 12


def _command(run_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "train", "model=gpt_tiny", f"trainer.max_steps={STEPS}", "trainer.micro_batch_size=4",
        "trainer.checkpoint_every=1", "trainer.eval_every=4", "trainer.eval_batches=2", "logging.log_every=1",
        "logging.progress_bar=false", f"data.cache_dir={ROOT / '.cache' / 'data'}", f"trainer.run_dir={run_dir}",
        # Router jitter draws random numbers every step: without the RNG states restored on resume,
        # the trajectories would part (with no random draws, a broken restore would pass unseen).
        "moe.jitter_eps=0.1", *extra,
    ]


def _env() -> dict[str, str]:
    return subprocess_env(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def _run(command: list[str], cwd: Path) -> None:
    result = subprocess.run(command, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]


def _records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: r[k] for k in DETERMINISTIC if k in r} for r in map(json.loads, lines)]


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_metrics(tmp_path):
    # The reference trains alongside the run that is killed (one thread each, on two cores): the
    # trajectory does not depend on timing, and a kill at a random step is random either way.
    reference = tmp_path / "reference"
    reference_log = (tmp_path / "reference.log").open("w+")
    reference_run = subprocess.Popen(_command(reference), cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL,
                                     stderr=reference_log)

    killed = tmp_path / "killed"
    process = subprocess.Popen(_command(killed), cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    kill_after = random.Random().randint(2, STEPS - 5)  # train lines to wait for: a random step, mid-save or not
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        metrics = killed / "metrics.jsonl"
        if metrics.exists() and sum('"train"' in line for line in metrics.read_text().splitlines()) >= kill_after:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    latest = (killed / "checkpoints" / "latest").read_text().strip()
    assert (killed / "checkpoints" / latest / "mp_rank_00_model_states.pt").exists()

    status = reference_run.wait(timeout=300)
    reference_log.seek(0)
    with reference_log:
        assert status == 0, reference_log.read()[-4000:]
    _run(_command(killed, "trainer.resume=true"), tmp_path)
    assert _records(killed) == _records(reference)
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["steps_this_session"] < STEPS
