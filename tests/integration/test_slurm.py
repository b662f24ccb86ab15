"""The project's own Slurm script on a real Slurm (Debian's slurmctld + slurmd, brought up by
slurm_cluster.py): jobs go in through launch/submit.py -> sbatch launch/slurm/train.sbatch, and run
as they would on a cluster, with srun starting one rank per task on each of two emulated nodes.

Skipped without the Slurm packages or without root; `.ci/run` installs the packages, so CI runs them.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import subprocess_env
from slurm_cluster import LocalSlurm, missing_requirement

ROOT = Path(__file__).resolve().parents[2]
DETERMINISTIC = ("event", "step", "tokens", "loss", "aux_loss", "lr", "grad_norm", "experts", "val_loss")
TRAINING = [
    "model=gpt_tiny", "trainer.micro_batch_size=4", "trainer.eval_batches=2", "logging.log_every=1",
    "logging.progress_bar=false", "trainer.peak_tflops=1", f"data.cache_dir={ROOT / '.cache' / 'data'}",
    "deepspeed.warmup_steps=1",  # six steps must train: the default warm-up (20) would barely move the weights
]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """One cluster of two emulated nodes for the module; stopped even when a test fails."""
    reason = missing_requirement()
    if reason:
        pytest.skip(reason)
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"), nodes=2)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _submit(cluster: LocalSlurm, output_dir: Path, nodes: int, overrides: list[str]) -> subprocess.Popen:
    """launch/submit.py --wait: returns once the job has ended, requeues included."""
    command = [sys.executable, str(ROOT / "launch" / "submit.py"), "--wait", f"--nodes={nodes}", "--gpus-per-node=0",
               "--time=10", f"--output-dir={output_dir}", "--", *TRAINING, *overrides]
    env = subprocess_env(SLURM_CONF=str(cluster.conf), PYTHON=sys.executable, PYTHONPATH=str(ROOT))
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _job_id(submission: subprocess.Popen) -> str:
    first = submission.stdout.readline()
    match = re.match(r"submitted job (\d+)", first)
    assert match, f"launch/submit.py printed {first!r}{submission.stdout.read()}"
    return match.group(1)


def _finish(submission: subprocess.Popen, timeout: float = 900) -> str:
    # Generous: it only matters when something is broken, and a busy 2-core machine runs other tests' ranks beside these.
    output, _ = submission.communicate(timeout=timeout)
    return output


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _deterministic(records: list[dict]) -> list[dict]:
    return [{k: r[k] for k in DETERMINISTIC if k in r} for r in records if r["event"] != "preempted"]


def _wait_for_step(run_dir: Path, step: int, submission: subprocess.Popen, timeout: float = 600) -> None:
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if metrics.exists() and any(r["event"] == "train" and r["step"] >= step for r in _records(run_dir)):
                return
        except json.JSONDecodeError:  # read while a line was being written
            pass
        assert submission.poll() is None, f"the job ended before step {step}: {submission.stdout.read()}"
        time.sleep(0.2)
    raise AssertionError(f"no step {step} in {metrics} after {timeout:.0f} s")


def test_smoke_job_through_the_sbatch_script_finishes_with_a_checkpoint(slurm, tmp_path):
    output_dir = tmp_path / "runs"
    submission = _submit(slurm, output_dir, nodes=1, overrides=["trainer.max_steps=6", "trainer.checkpoint_every=3"])
    job_id = _job_id(submission)
    output = _finish(submission)
    assert submission.returncode == 0, output
    run_dir = output_dir / f"moe-gpt-{job_id}"
    log = (output_dir / f"moe-gpt-{job_id}.out").read_text()
    assert f"[slurm] job {job_id}, start 1" in log and "1 rank(s)" in log, log
    assert "[slurm] training exited with status 0" in log, log

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["steps_this_session"] == 6
    assert summary["final_val_loss"] < summary["initial_val_loss"]
    assert [r["step"] for r in _records(run_dir) if r["event"] == "train"] == [1, 2, 3, 4, 5, 6]
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_00000006"
    for tag in ("step_00000003", "step_00000006"):
        assert (checkpoints / tag / "mp_rank_00_model_states.pt").exists()


def test_a_job_whose_data_is_missing_stops_with_one_line_before_any_rank(slurm, tmp_path):
    # launch/submit.py checks the overrides on the login node; a data file is looked for where the job runs.
    output_dir = tmp_path / "runs"
    submission = _submit(slurm, output_dir, nodes=2, overrides=["data=files", f"data.files=[{tmp_path / 'gone.txt'}]"])
    job_id = _job_id(submission)
    output = _finish(submission)
    assert submission.returncode == 2, output
    log = (output_dir / f"moe-gpt-{job_id}.out").read_text()
    assert log.count("error: ") == 1 and f"error: data.files: '{tmp_path / 'gone.txt'}' does not exist" in log, log
    assert "[slurm] not started" in log and "start 1" not in log, log


def test_preempted_two_node_job_checkpoints_requeues_and_resumes_on_the_same_trajectory(slurm, tmp_path):
    """Two ranks on two emulated nodes get the time-limit warning mid-run; the job saves, requeues
    itself, resumes from the checkpoint and ends at max_steps with the metrics of an uninterrupted
    run, submitted alongside as the reference."""
    steps = 40
    overrides = [f"trainer.max_steps={steps}", "moe.ep_size=2", "trainer.eval_every=10", "trainer.checkpoint_every=100"]
    reference = _submit(slurm, tmp_path / "reference", nodes=2, overrides=overrides)
    preempted = _submit(slurm, tmp_path / "preempted", nodes=2, overrides=overrides)
    reference_id, job_id = _job_id(reference), _job_id(preempted)
    run_dir = tmp_path / "preempted" / f"moe-gpt-{job_id}"
    _wait_for_step(run_dir, 3, preempted)
    # Exactly what `#SBATCH --signal=B:USR1@120` delivers before the time limit: SIGUSR1 to the batch script.
    slurm.run(["scancel", "--signal=USR1", "--batch", job_id])
    output = _finish(preempted)
    assert preempted.returncode == 0, output
    reference_output = _finish(reference)
    assert reference.returncode == 0, reference_output

    log = (tmp_path / "preempted" / f"moe-gpt-{job_id}.out").read_text()
    assert "SIGUSR1 received" in log and f"requeueing job {job_id}" in log, log
    assert f"[slurm] job {job_id}, start 2" in log and "2 node(s)" in log and "2 rank(s)" in log, log
    records = _records(run_dir)
    (stop,) = [r for r in records if r["event"] == "preempted"]
    assert stop["signal"] == "SIGUSR1" and 3 <= stop["step"] < steps, stop
    assert stop["checkpoint"] == f"step_{stop['step']:08d}"
    assert f"resuming at step {stop['step']}" in log, log
    assert (run_dir / "checkpoints" / stop["checkpoint"] / "mp_rank_00_model_states.pt").exists()

    # Every step once, in order, and bitwise the values of the run nobody interrupted.
    assert [r["step"] for r in records if r["event"] == "train"] == list(range(1, steps + 1))
    reference_dir = tmp_path / "reference" / f"moe-gpt-{reference_id}"
    assert _deterministic(records) == _deterministic(_records(reference_dir))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == steps and summary["steps_this_session"] == steps - stop["step"]
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{steps:08d}"


def test_cancelled_job_saves_a_checkpoint_and_is_not_requeued(slurm, tmp_path):
    """scancel means stop: the ranks get SIGTERM, save, and the job ends without a restart."""
    output_dir = tmp_path / "runs"
    submission = _submit(slurm, output_dir, nodes=1, overrides=["trainer.max_steps=200", "trainer.eval_every=0",
                                                                "trainer.checkpoint_every=0"])
    job_id = _job_id(submission)
    run_dir = output_dir / f"moe-gpt-{job_id}"
    _wait_for_step(run_dir, 3, submission)
    slurm.run(["scancel", job_id])
    output = _finish(submission)

    log = (output_dir / f"moe-gpt-{job_id}.out").read_text()
    assert "SIGTERM received" in log and "requeueing" not in log and "start 2" not in log, log + output
    stops = [r for r in _records(run_dir) if r["event"] == "preempted"]
    assert len(stops) == 1, log + output
    (stop,) = stops
    assert stop["signal"] == "SIGTERM" and 3 <= stop["step"] < 200
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{stop['step']:08d}"
    assert not (run_dir / "summary.json").exists()
