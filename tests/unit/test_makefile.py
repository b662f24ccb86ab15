"""`make clean` removes this checkout's own virtualenv only: in the Docker image VENV names the image's
one Python (/opt/conda), which a `make clean` there must not delete."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_clean_removes_the_checkouts_venv_and_keeps_any_other(tmp_path):
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    shutil.copy(ROOT / "Makefile", checkout / "Makefile")
    (checkout / ".venv").mkdir()
    (checkout / ".venv" / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (checkout / "runs").mkdir()
    image_python = tmp_path / "opt-conda"  # the image's environment: no pyvenv.cfg, not .venv
    (image_python / "bin").mkdir(parents=True)

    kept = subprocess.run(["make", "clean", f"VENV={image_python}"], cwd=checkout, capture_output=True, text=True)
    assert kept.returncode == 0, kept.stderr
    assert image_python.is_dir() and f"keeping {image_python} (not a venv)" in kept.stdout
    assert not (checkout / "runs").exists()

    removed = subprocess.run(["make", "clean"], cwd=checkout, capture_output=True, text=True)
    assert removed.returncode == 0, removed.stderr
    assert not (checkout / ".venv").exists()
