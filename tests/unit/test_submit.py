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
