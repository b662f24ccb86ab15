"""launch/submit.py: overrides are checked on the login node, before anything is submitted."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def submit():
    spec = importlib.util.spec_from_file_location("submit", ROOT / "launch" / "submit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_bad_override_is_refused_before_sbatch(submit, monkeypatch, capsys):
    def no_sbatch(*args, **kwargs):
        raise AssertionError("sbatch was called")

    monkeypatch.setattr(submit.subprocess, "Popen", no_sbatch)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    assert submit.main(["--gpus-per-node=0", "--", "model.hiden_size=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: model.hiden_size: Key 'hiden_size' not in 'ModelConfig' (nothing submitted)"]
    # The check's own setting does not reach the job (sbatch --export=ALL passes this environment on).
    assert "DS_ACCELERATOR" not in os.environ


def test_good_overrides_go_through_to_the_batch_script(submit, capsys):
    assert submit.main(["--dry-run", "--nodes=2", "--", "moe=top2", "trainer.max_steps=5"]) == 0
    command = capsys.readouterr().out.strip()
    assert command.startswith("sbatch ") and "--nodes=2" in command
    assert command.endswith("launch/slurm/train.sbatch moe=top2 trainer.max_steps=5")
    # The batch script finds the checkout from MOE_GPT_ROOT (sbatch's directory need not be it).
    assert f",MOE_GPT_ROOT={submit.ROOT} " in command


def test_an_output_dir_with_a_comma_is_refused(submit, capsys):
    with pytest.raises(SystemExit):
        submit.parse_args(["--output-dir", "runs/lr=3e-4,bs=8"])
    assert "--output-dir=runs/lr=3e-4,bs=8: a comma would split sbatch's --export list" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, expected",
    [
        # A setting's own check, and the parallel degrees against nodes x ranks per node.
        (["--", "moe.ep_size=3"], "error: moe.num_experts=8 must be divisible by moe.ep_size=3 (nothing submitted)"),
        (["--nodes=1", "--gpus-per-node=3", "--", "moe.ep_size=2"],
         "error: moe.ep_size=2 must divide the world size 3 given by --nodes x --ranks-per-node (nothing submitted)"),
        (["--nodes=2", "--gpus-per-node=2", "--", "world_size=8"],
         "error: world_size=8 plans a dry run (dry_run=true); this run's world size is 4, given by --nodes x "
         "--ranks-per-node (nothing submitted)"),
        # The job's run directory is new: resume=true alone would find nothing to continue.
        (["--", "trainer.resume=true"],
         "error: trainer.resume=true: the job's run directory (--output-dir/<job name>-<job id>) is new, with nothing "
         "to resume; add trainer.run_dir=<the run to continue> (a requeued job resumes by itself: the job sets "
         "trainer.auto_resume=true) (nothing submitted)"),
    ],
)
def test_settings_are_checked_at_the_job_world_size(submit, monkeypatch, capsys, argv, expected):
    monkeypatch.setattr(submit.subprocess, "Popen", lambda *a, **k: pytest.fail("sbatch was called"))
    assert submit.main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines() == [expected]


def test_more_ranks_than_gpus_on_a_node_are_refused(submit, capsys):
    with pytest.raises(SystemExit) as exit_info:
        submit.parse_args(["--gpus-per-node", "2", "--ranks-per-node", "3"])
    assert exit_info.value.code == 2 and "--ranks-per-node=3 is more than --gpus-per-node=2" in capsys.readouterr().err
    assert submit.parse_args(["--gpus-per-node", "0", "--ranks-per-node", "3"]).ranks_per_node == 3  # CPU ranks


def test_a_malformed_time_limit_is_refused(submit, capsys):
    with pytest.raises(SystemExit) as exit_info:
        submit.parse_args(["--time", "4h"])
    assert exit_info.value.code == 2
    assert "--time must be a Slurm time limit" in capsys.readouterr().err
    for good in ("30", "4:00:00", "1-12", "1-12:30", "2-00:00:00", "UNLIMITED"):
        assert submit.parse_args(["--time", good]).time == good


def test_a_warning_too_close_to_the_start_is_refused(submit, capsys):
    """SIGUSR1 would come during the job's checks, before any rank could save: the job would requeue
    without training at every start (Slurm may send it up to 60 s early)."""
    for time_limit in ("2", "3"):
        with pytest.raises(SystemExit):
            submit.parse_args(["--time", time_limit, "--warning-seconds", "120"])
    assert ("--warning-seconds=120 leaves 60 s of --time=3 before the warning; at least 120 s are needed"
            in capsys.readouterr().err)
    assert submit.parse_args(["--time", "4", "--warning-seconds", "120"]).warning_seconds == 120
    assert submit.parse_args(["--time", "UNLIMITED", "--warning-seconds", "99999"]).warning_seconds == 99999
    assert [submit.slurm_seconds(t) for t in ("30", "30:15", "1:00:00", "2-3", "2-3:04", "2-3:04:05")] == [
        1800, 1815, 3600, 183600, 183840, 183845]


def test_without_slurm_the_error_is_one_line(submit, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(submit.shutil, "which", lambda name: None)
    monkeypatch.setattr(submit.subprocess, "Popen", lambda *a, **k: pytest.fail("sbatch was called"))
    assert submit.main(["--gpus-per-node=0", f"--output-dir={tmp_path / 'out'}", "--", "model=gpt_tiny"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: sbatch not found on PATH: submit from a Slurm login node (--dry-run prints the command)"]
    assert not (tmp_path / "out").exists()
