"""bench/gpu_all.sh's plumbing, with a stand-in nvidia-smi: a step's failure is reported and does not
stop the others, and where $OUT is set every finished step is packed into one archive (the device
tool returns a few files only, and a run cut off at its limit must keep what it measured); and every
command line it runs passes the real argument parsers and config checks."""

from __future__ import annotations

import os
import subprocess
import tarfile
from pathlib import Path

from hydra import compose, initialize_config_dir

from train.cli import CONF_DIR

ROOT = Path(__file__).resolve().parents[2]


FAILING_PYTHON = '#!/bin/sh\n[ "$1" = "-c" ] && exit 0\nexit 1\n'
"""A stand-in interpreter: every package is "there" (`-c "import ..."` succeeds, so no wheel is
installed), and anything it is asked to run fails."""


def _run(tmp_path: Path, nvidia_smi: str, only: str, python_script: str = FAILING_PYTHON,
         script: Path = ROOT / "bench" / "gpu_all.sh") -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "nvidia-smi"
    fake.write_text(f"#!/bin/sh\n{nvidia_smi}\n")
    fake.chmod(0o755)
    python = bin_dir / "python"
    python.write_text(python_script)
    python.chmod(0o755)
    out = tmp_path / "out"  # created by the script, as the device tool's is not always there
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "ONLY": only, "OUT": str(out),
           "RESULTS_DIR": str(tmp_path / "results"), "PYTHON": str(python)}
    return subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True,
                          timeout=60)


def _archived(tmp_path: Path) -> dict[str, str]:
    with tarfile.open(tmp_path / "out" / "gpu_results.tar.gz") as archive:
        return {Path(m.name).name: archive.extractfile(m).read().decode() for m in archive.getmembers() if m.isfile()}


def test_steps_are_packed_into_the_return_folder_as_they_finish(tmp_path):
    result = _run(tmp_path, "echo 'NVIDIA H200, 580.159.04, 143771 MiB'", "device")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "every step passed" in result.stdout
    assert "NVIDIA H200" in _archived(tmp_path)["device.log"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpu_results.tar.gz"]


def test_a_failing_step_is_reported_and_the_next_one_still_runs(tmp_path):
    # The GPU-test step fails at once (the stand-in interpreter); the steps are independent.
    result = _run(tmp_path, "exit 9", "device gpu_tests layer_gpu")
    assert result.returncode == 1
    assert "failed steps: device gpu_tests layer_gpu" in result.stdout
    assert set(_archived(tmp_path)) == {"device.log", "gpu_tests.log", "layer_gpu.log"}


def test_an_unknown_step_name_is_refused_before_anything_runs(tmp_path):
    result = _run(tmp_path, "echo 'NVIDIA H200'", "device e2e_350m_acum1")
    assert result.returncode == 2
    assert "unknown step 'e2e_350m_acum1'" in result.stderr
    assert not (tmp_path / "results").exists()


def test_every_command_line_of_the_script_is_valid(tmp_path, monkeypatch):
    """What each step would run, recorded by a stand-in interpreter and then checked by the real
    argument parsers and config composition: a mistyped flag, variant or override must show up here,
    not on a lent GPU machine whose minutes are counted."""
    from bench import end_to_end, moe_layer
    from train.cli import override_problem
    from train.config import to_run_config

    record = tmp_path / "argv"
    recorder = f'#!/bin/sh\n[ "$1" = "-c" ] && exit 0\nprintf "%s\\037" "$@" >> {record}\necho >> {record}\n'
    result = _run(tmp_path, "echo 'NVIDIA H100'", "", python_script=recorder)
    assert result.returncode == 0, result.stdout + result.stderr
    commands = [line.rstrip("\x1f").split("\x1f") for line in record.read_text().splitlines()]
    modules = [argv[1] for argv in commands]
    assert modules == ["pytest", "bench.moe_layer", "bench.end_to_end", "bench.end_to_end", "bench.moe_layer",
                       "bench.end_to_end", "train", "bench.end_to_end"]
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # --device cuda is asked for
    for argv in commands:
        module, args = argv[1], argv[2:]
        assert argv[0] == "-m", argv
        if module == "bench.moe_layer":
            parsed = moe_layer.parse_args(args)
            assert parsed.device == "cuda" and parsed.shapes == "gpu", args
        elif module == "bench.end_to_end":
            _, names, overrides = end_to_end.parse_args(args)
            assert names and overrides, args
            for name in names:
                implementation, compiled = name.removesuffix("+compile"), name.endswith("+compile")
                with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
                    cfg = compose("config", overrides=[*overrides, f"moe.implementation={implementation}",
                                                       f"trainer.compile={str(compiled).lower()}"])
                to_run_config(cfg)  # the dataclasses' own checks
        elif module == "train":
            assert override_problem(args) is None, args
            with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
                to_run_config(compose("config", overrides=args))
        else:
            assert args[:2] == ["-m", "gpu"] and (ROOT / args[2]).is_dir(), args


def test_a_rerun_of_the_smoke_step_starts_from_an_empty_run_folder(tmp_path):
    # What a cut-off first call left behind: the rerun must not find (and refuse) the old run.
    old_run = tmp_path / "results" / "smoke" / "checkpoints" / "step_2"
    old_run.mkdir(parents=True)
    # A call that does not run the smoke step leaves its results alone.
    result = _run(tmp_path, "echo 'NVIDIA H100'", "device", python_script='#!/bin/sh\nexit 0\n')
    assert result.returncode == 0, result.stdout + result.stderr
    assert old_run.is_dir()
    result = _run(tmp_path, "echo 'NVIDIA H100'", "smoke", python_script='#!/bin/sh\nexit 0\n')
    assert result.returncode == 0, result.stdout + result.stderr
    assert not (tmp_path / "results" / "smoke").exists()


def test_wheels_that_do_not_import_stop_the_run_with_one_error(tmp_path):
    # A copy of the script beside a .whl folder; the stand-in interpreter "installs" the wheels and
    # still cannot import DeepSpeed: one error, before any step spends device time.
    checkout = tmp_path / "checkout"
    (checkout / "bench").mkdir(parents=True)
    (checkout / ".whl").mkdir()
    (checkout / ".whl" / "deepspeed-0-py3-none-any.whl").write_text("")
    script = checkout / "bench" / "gpu_all.sh"
    script.write_text((ROOT / "bench" / "gpu_all.sh").read_text())
    result = _run(tmp_path, "echo 'NVIDIA H100'", "device", python_script='#!/bin/sh\n[ "$1" = "-c" ] && exit 1\nexit 0\n',
                  script=script)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "does not import" in result.stderr
    assert not (tmp_path / "results" / "device.log").exists()


def test_the_gpu_test_step_fails_where_torch_sees_no_gpu():
    """The step runs `pytest -m gpu` with MOE_REQUIRE_CUDA=1: on a machine where every GPU test would
    skip (a CPU-only torch on the GPU box), the step fails instead of passing with nothing run."""
    import sys

    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device: the GPU tests run here")
    assert "step gpu_tests env MOE_REQUIRE_CUDA=1 " in (ROOT / "bench" / "gpu_all.sh").read_text()
    result = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "tests/gpu", "-q", "-p", "no:cacheprovider"],
                            cwd=ROOT, env={**os.environ, "MOE_REQUIRE_CUDA": "1"}, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "MOE_REQUIRE_CUDA=1 but torch sees no CUDA device" in result.stdout + result.stderr


def test_a_step_cut_off_at_the_time_limit_still_returns_what_it_wrote(tmp_path):
    """The device tool kills a call at its limit: the benchmark's JSON (written after each variant)
    and the log so far must already be in the archive, packed while the step runs."""
    import signal
    import time

    writer = ('#!/bin/sh\n[ "$1" = "-c" ] && exit 0\n'
              'echo "done: first variant"\necho \'{"results": [1]}\' > "$RESULTS_DIR/e2e_350m.json"\nexec sleep 60\n')
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("nvidia-smi", "#!/bin/sh\necho 'NVIDIA H100'\n"), ("python", writer)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "ONLY": "device e2e_350m",
           "OUT": str(tmp_path / "out"), "RESULTS_DIR": str(tmp_path / "results"), "PYTHON": str(bin_dir / "python"),
           "PACK_EVERY": "0.5"}
    call = subprocess.Popen(["bash", str(ROOT / "bench" / "gpu_all.sh")], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            archive = tmp_path / "out" / "gpu_results.tar.gz"
            if archive.exists() and "e2e_350m.json" in _archived(tmp_path):
                break
            time.sleep(0.2)
    finally:
        os.killpg(call.pid, signal.SIGKILL)  # as the time limit does: no trap, no last packing
        call.wait()
    archived = _archived(tmp_path)
    assert archived["e2e_350m.json"].strip() == '{"results": [1]}'
    assert "done: first variant" in archived["e2e_350m.log"] and "NVIDIA H100" in archived["device.log"]
