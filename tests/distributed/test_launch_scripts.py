"""launch/deepspeed_local.sh and launch/deepspeed_multinode.sh: the commands they build, and a real
two-node launch through DeepSpeed's pdsh path on this machine (pdsh and ssh replaced by stand-ins
that run each node's command here, in an empty environment as an ssh login would)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ctrl_c_as_at_a_terminal, subprocess_env

from distributed.processes import ROOT, free_port, run, tail

LOCAL = ROOT / "launch" / "deepspeed_local.sh"
MULTINODE = ROOT / "launch" / "deepspeed_multinode.sh"

FAKE_PDSH = r"""#!/usr/bin/env bash
# pdsh -S -f N -w HOST,HOST CMD...: record the arguments, run CMD once per host here with %n = the
# host's index, in an empty environment: only what the command exports reaches the node.
printf '%s\n' "$@" > "$PDSH_RECORD"
while [ $# -gt 0 ]; do case "$1" in -S) shift ;; -f) shift 2 ;; -w) hosts="$2"; shift 2 ;; *) break ;; esac; done
command="$*"
index=0
pids=()
for host in ${hosts//,/ }; do
  env -i HOME="$HOME" PATH="$PATH" bash -c "${command//\%n/$index}" &
  pids+=($!)
  index=$((index + 1))
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""
FAKE_SSH = "#!/bin/sh\n# the launcher's reachability check (ssh HOST hostname)\nexit 0\n"


def _stand_ins(tmp_path: Path, **scripts: str) -> Path:
    """A folder of executable stand-ins (name -> script text), to put first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def _run(script: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """`script` with this process's environment plus `env`, not rank_env(): the scripts must set up their ranks."""
    return run(["bash", str(script), *args], env=subprocess_env(**env), check=False)


def test_local_dry_run_prints_the_launcher_command(tmp_path):
    result = _run(LOCAL, "2", "model=gpt_tiny", "moe.ep_size=2", DRY_RUN="1", LOG_DIR=str(tmp_path / "logs"),
                  MASTER_PORT="29611", PYTHON="python3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        "python3", "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--no_local_rank", "--master_port", "29611",
        "--log_level", "warning", "--enable_each_rank_log", str(tmp_path / "logs"), "--module", "train", "model=gpt_tiny",
        "moe.ep_size=2",
    ]
    bad = _run(LOCAL, "two", DRY_RUN="1")
    assert bad.returncode == 2 and "NUM_RANKS must be a positive integer, got 'two'" in bad.stderr


def test_local_launch_runs_on_the_visible_devices_not_on_the_first_ones():
    """Given --num_gpus, DeepSpeed's runner drops CUDA_VISIBLE_DEVICES and takes GPUs 0..N-1: with the
    variable set, the script leaves the choice to the runner, which then uses exactly those."""
    result = _run(LOCAL, "2", DRY_RUN="1", PYTHON="python3", CUDA_VISIBLE_DEVICES="4,5")
    assert result.returncode == 0, result.stderr
    assert "--num_gpus" not in result.stdout.split() and "deepspeed.launcher.runner" in result.stdout
    mismatch = _run(LOCAL, "3", DRY_RUN="1", PYTHON="python3", CUDA_VISIBLE_DEVICES="4,5")
    assert mismatch.returncode == 2 and "NUM_RANKS is 3 but CUDA_VISIBLE_DEVICES=4,5 names 2 device(s)" in mismatch.stderr


def test_one_remote_host_gets_the_ranks_sent_to_it(tmp_path):
    """With one active host DeepSpeed starts the ranks on the launching machine unless told otherwise."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("far-0 slots=1\nfar-1 slots=1\n")
    one = _run(MULTINODE, str(hostfile), DRY_RUN="1", PYTHON="python3", LOG_DIR="none", NUM_NODES="1")
    assert one.returncode == 0 and one.stdout.split()[-3:] == ["--force_multi", "--module", "train"], one.stdout
    both = _run(MULTINODE, str(hostfile), DRY_RUN="1", PYTHON="python3", LOG_DIR="none")
    assert both.returncode == 0 and "--force_multi" not in both.stdout
    hostfile.write_text("localhost slots=2\n")
    here = _run(MULTINODE, str(hostfile), DRY_RUN="1", PYTHON="python3", LOG_DIR="none")
    assert here.returncode == 0 and "--force_multi" not in here.stdout


def test_multinode_dry_run_names_the_master_and_forwards_the_environment(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\n\nworker-0 slots=8\nworker-1 slots=8\n")
    result = _run(MULTINODE, str(hostfile), "experiment=h100_350m", DRY_RUN="1", PYTHON="python3", LOG_DIR="none",
                  OMP_NUM_THREADS="4", NCCL_IB_DISABLE="1", WANDB_MODE="offline", WANDB_API_KEY="secret",
                  HF_TOKEN="hf_secret", HF_HOME="/data/hf", TORCH_CUDA_ARCH_LIST="8.0;9.0")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    forwarded = {line.strip() for line in lines[1:-1]}
    assert {"OMP_NUM_THREADS=4", "NCCL_IB_DISABLE=1", "WANDB_MODE=offline", "HF_HOME=/data/hf"} <= forwarded
    assert not any(line.startswith(("WANDB_API_KEY", "HF_TOKEN")) for line in forwarded), "secrets stay on the launching node"
    # Shell-quoted: DeepSpeed writes `export NAME=VALUE;` into the command each node's shell parses.
    (arch,) = [line for line in forwarded if line.startswith("TORCH_CUDA_ARCH_LIST=")]
    exported = subprocess.run(["bash", "-c", f'export {arch}; printf %s "$TORCH_CUDA_ARCH_LIST"'], capture_output=True,
                              text=True, check=True)
    assert exported.stdout == "8.0;9.0"
    assert lines[-1].split() == [
        "python3", "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--master_addr", "worker-0",
        "--master_port", "29500", "--no_local_rank", "--log_level", "warning", "--module", "train", "experiment=h100_350m",
    ]
    missing = _run(MULTINODE, str(tmp_path / "nope"), DRY_RUN="1")
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    for name, value in (("GPUS_PER_NODE", "abc"), ("NUM_NODES", "0"), ("NODE_RANK", "-1")):
        bad = _run(MULTINODE, str(hostfile), DRY_RUN="1", **{name: value})
        assert bad.returncode == 2 and bad.stderr.startswith(f"error: {name} must be"), bad.stderr
    hostfile.write_text("# nothing\n")
    empty = _run(MULTINODE, str(hostfile), DRY_RUN="1")
    assert empty.returncode == 2 and "names no host" in empty.stderr


def test_bad_overrides_are_one_line_before_any_rank_starts(tmp_path, capsys):
    logs = tmp_path / "logs"
    local = _run(LOCAL, "3", "model=gpt_tiny", "moe.ep_size=2", PYTHON=sys.executable, LOG_DIR=str(logs))
    assert local.returncode == 2
    assert local.stderr.strip() == "error: moe.ep_size=2 must divide the world size 3 given by NUM_RANKS"
    assert "spawned" not in local.stdout + local.stderr and not logs.exists()
    # What a rank would find at start-up is found by the check too (train.cli.launch_check, called here
    # in process as the scripts call it): a missing data file, an unusable run directory, a typo.
    from train.cli import launch_check

    (tmp_path / "file").write_text("")
    for overrides, expected in ((["data=files", f"data.files=[{tmp_path / 'nope.txt'}]"], "error: data.files: '"),
                                ([f"trainer.run_dir={tmp_path / 'file' / 'run'}"], f"error: trainer.run_dir='{tmp_path}"),
                                (["trainer.resume=true", f"trainer.run_dir={tmp_path / 'gone'}"],
                                 "error: trainer.resume=true but trainer.run_dir="),
                                (["model.hiden_size=3"], "error: model.hiden_size: Key 'hiden_size' not in 'ModelConfig'\n")):
        assert launch_check(["2", "given by NUM_RANKS", *overrides]) == 2
        found = capsys.readouterr()
        assert found.out == "" and found.err.count("\n") == 1 and found.err.startswith(expected), found.err
    # The ranks run in the checkout: a file relative to the caller's directory is named in full.
    (tmp_path / "mine.txt").write_text("some text\n")
    relative = run(["bash", str(LOCAL), "2", "data=files", "data.files=[mine.txt]"], cwd=tmp_path,
                   env=subprocess_env(PYTHON=sys.executable), check=False)
    assert relative.returncode == 2 and relative.stderr.strip() == (
        f"error: data.files: 'mine.txt' does not exist or is not a file (relative paths are taken from the checkout "
        f"{ROOT}, where the ranks run: pass {tmp_path / 'mine.txt'})"), relative.stderr
    # Multi-node: the world size is the slots of the hosts used (here 2 of 3 hosts, 1 slot each).
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# three nodes\nnode-a slots=2\n\nnode-b slots=2\nnode-c slots=2\n")
    multinode = _run(MULTINODE, str(hostfile), "moe.ep_size=4", NUM_NODES="2", GPUS_PER_NODE="1",
                     PYTHON=sys.executable, LOG_DIR=str(logs))
    assert multinode.returncode == 2
    assert multinode.stderr.strip().startswith("error: moe.ep_size=4 must divide the world size 2 given by the hostfile")
    # DRY_RUN previews a launch: the same check, before the command is printed.
    for script, target in ((LOCAL, "2"), (MULTINODE, str(hostfile))):
        preview = _run(script, target, "model.hiden_size=3", DRY_RUN="1", PYTHON=sys.executable)
        assert (preview.returncode, preview.stderr.strip(), preview.stdout) == (
            2, "error: model.hiden_size: Key 'hiden_size' not in 'ModelConfig'", "")
    assert not logs.exists()


def test_a_dry_run_through_the_local_script_plans_once_and_starts_nothing(tmp_path):
    result = _run(LOCAL, "2", "dry_run=true", "world_size=16", "moe.ep_size=8", PYTHON=sys.executable)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("dry run: 16 ranks, expert parallel 8") == 1 and "spawned" not in result.stdout
    assert result.stdout.rstrip().splitlines()[-1].startswith("checkpoint:")  # the plan's last line, not "planned"


@pytest.mark.distributed
def test_two_nodes_through_pdsh_train_with_per_rank_logs_and_forwarded_environment(tmp_path):
    bin_dir = _stand_ins(tmp_path, pdsh=FAKE_PDSH, ssh=FAKE_SSH)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    # A run directory that only a quoted override can name: each node's shell parses the command again.
    run_dir, logs, record = tmp_path / "run_lr=3e-4,bs=8", tmp_path / "logs", tmp_path / "pdsh_args"
    result = _run(
        MULTINODE, str(hostfile), "model=gpt_tiny", "moe.ep_size=2", "trainer.max_steps=2", "trainer.micro_batch_size=4",
        "trainer.eval_every=0", "trainer.eval_batches=2", "logging.log_every=1", "logging.progress_bar=false",
        "trainer.peak_tflops=1", f"data.cache_dir={ROOT / '.cache' / 'data'}", f"trainer.run_dir='{run_dir}'",
        PATH=f"{bin_dir}:{os.environ['PATH']}", PDSH_RECORD=str(record), PYTHON=sys.executable,
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), LOG_DIR=str(logs),
        OMP_NUM_THREADS="1", NCCL_DEBUG="WARN",
    )
    assert result.returncode == 0, tail(result)

    pdsh_args = record.read_text().splitlines()
    assert pdsh_args[:5] == ["-S", "-f", "1024", "-w", "node-a,node-b"]
    exports = pdsh_args[5]
    assert "export OMP_NUM_THREADS=1;" in exports and "export NCCL_DEBUG=WARN;" in exports
    assert {"--node_rank=%n", "--master_addr=127.0.0.1", "--no_local_rank", f"--enable_each_rank_log={logs}",
            "train", "model=gpt_tiny"} <= set(pdsh_args)

    # DeepSpeed prefixes each rank's log with the time its process started, which may differ
    # by a second between the nodes: order by the rank suffix, not by the whole name.
    rank_logs = sorted(logs.glob("*_rank*.log"), key=lambda p: p.name.rsplit("_", 1)[1])
    assert [p.name.rsplit("_", 1)[1] for p in rank_logs] == ["rank0.log", "rank1.log"]
    assert "summary" in rank_logs[0].read_text() and "device      cpu x 2" in rank_logs[0].read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "train"] == [1, 2]


def _job(script: subprocess.Popen) -> list:
    """The script's process and every process it started (the launcher runs in a group of its own)."""
    import psutil

    try:
        root = psutil.Process(script.pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _start_local_training(tmp_path: Path, run_dir: Path) -> subprocess.Popen:
    # The script runs in a session of its own here, so that signalling its process group is what
    # Ctrl-C at a terminal does: SIGINT to every process of the foreground job.
    return subprocess.Popen(
        ["bash", str(LOCAL), "2", "model=gpt_tiny", "moe.ep_size=2", "trainer.max_steps=100000",
         "trainer.micro_batch_size=4", "trainer.checkpoint_every=0", "trainer.eval_every=0", "logging.log_every=1",
         "logging.progress_bar=false", "logging.plots=off", f"data.cache_dir={ROOT / '.cache' / 'data'}",
         f"trainer.run_dir={run_dir}"],
        env=subprocess_env(PYTHON=sys.executable, MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        preexec_fn=ctrl_c_as_at_a_terminal,
    )


def _wait_for_steps(process: subprocess.Popen, metrics: Path, steps: int) -> None:
    deadline = time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text().count('"train"') >= steps):
        assert process.poll() is None and time.monotonic() < deadline, "the ranks did not reach their first steps"
        time.sleep(0.1)


def _no_process_left(processes: list, seconds: float = 10) -> list:
    """Those of `processes` still running after `seconds` (the watchdog polls every 2 s)."""
    import psutil

    def running(process) -> bool:
        try:
            return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + seconds
    while True:
        alive = [p for p in processes if running(p)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def _kill_all(processes: list) -> None:
    import psutil

    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.mark.distributed
@pytest.mark.parametrize(("stop", "status", "line"),
                         [("ctrl-c", 130, "interrupted SIGINT"), ("sigterm", 75, "preempted   SIGTERM")])
def test_local_script_stops_its_ranks_with_a_checkpoint(tmp_path, stop, status, line):
    run_dir = tmp_path / "run"
    process = _start_local_training(tmp_path, run_dir)
    metrics = run_dir / "metrics.jsonl"
    job = []
    try:
        _wait_for_steps(process, metrics, 2)
        job = _job(process)
        if stop == "ctrl-c":
            os.killpg(process.pid, signal.SIGINT)
        else:
            process.send_signal(signal.SIGTERM)  # to the script alone, as a process manager would
        out, _ = process.communicate(timeout=120)
        left = _no_process_left(job)
    finally:
        _kill_all(_job(process) or job)  # only what a failure left running
    assert process.returncode == status, out[-3000:]
    assert "Traceback" not in out and line in out
    # The console holds the run, not the launcher's INFO lines, a no-GPU warning from every process,
    # or each rank's word that it found the dataset.
    assert "[INFO]" not in out and "Setting accelerator to CPU" not in out and out.count("cached dataset") <= 1, out[:3000]
    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert (run_dir / "checkpoints" / tag / "mp_rank_00_model_states.pt").exists()
    events = [json.loads(r) for r in metrics.read_text().splitlines()]
    assert events[-1]["event"] == "preempted" and events[-1]["checkpoint"] == tag
    # Nothing of the job outlives the script: the runner, the launcher, both ranks, the watchdog.
    assert len(job) >= 5 and left == [], left


@pytest.mark.distributed
def test_a_killed_script_takes_its_job_with_it(tmp_path):
    """SIGKILL to the script leaves nobody to forward signals: the watchdog in the launcher's group
    stops the job with SIGTERM, so the ranks still checkpoint."""
    run_dir = tmp_path / "run"
    process = _start_local_training(tmp_path, run_dir)
    job = []
    try:
        _wait_for_steps(process, run_dir / "metrics.jsonl", 2)
        job = _job(process)
        process.kill()
        process.communicate(timeout=30)
        left = _no_process_left(job, seconds=60)
    finally:
        _kill_all(job)  # only what a failure left running
    assert len(job) >= 5 and left == [], left
    events = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "preempted" and events[-1]["signal"] == "SIGTERM"


def _venv(tmp_path: Path) -> Path:
    """A stand-in environment whose interpreter is this one (the Docker image's is /opt/conda)."""
    venv = tmp_path / "image-python"
    (venv / "bin").mkdir(parents=True)
    # A wrapper, not a link: a link to a venv's interpreter outside its venv loses its packages.
    (venv / "bin" / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (venv / "bin" / "python").chmod(0o755)
    return venv


def test_without_python_set_the_launchers_take_the_venv_interpreter(tmp_path):
    # The Docker image has no .venv: it sets VENV=/opt/conda, as the Makefile reads it.
    venv = _venv(tmp_path)
    env = {k: v for k, v in subprocess_env().items() if k != "PYTHON"}
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("worker-0 slots=2\n")
    for script, target in ((LOCAL, "2"), (MULTINODE, str(hostfile))):
        result = run(["bash", str(script), target, "model=gpt_tiny", "moe.ep_size=2"],
                     env={**env, "VENV": str(venv), "DRY_RUN": "1", "LOG_DIR": "none"}, check=False)
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines()[-1].split()[0] == str(venv / "bin" / "python"), (script, result.stdout)


FAKE_SRUN = """#!/bin/sh
# Record what each rank would get, start nothing.
echo "SRUN_CPUS_PER_TASK=${SRUN_CPUS_PER_TASK:-unset} python=$5" > "$SRUN_RECORD"
"""
FAKE_SCONTROL = """#!/bin/sh
case "$*" in "show hostnames"*) echo node-0 ;; *) echo "NodeName=node-0 NodeAddr=10.0.0.7" ;; esac
"""


def test_the_batch_script_hands_its_cpus_per_task_to_srun(tmp_path):
    """Since Slurm 22.05 srun does not take --cpus-per-task from the allocation: each rank would be
    bound to one core unless the script passes it on (SRUN_CPUS_PER_TASK)."""
    bin_dir = _stand_ins(tmp_path, srun=FAKE_SRUN, scontrol=FAKE_SCONTROL)
    record = tmp_path / "srun.txt"
    venv = _venv(tmp_path)
    env = {k: v for k, v in subprocess_env().items() if k != "PYTHON"}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", SRUN_RECORD=str(record), VENV=str(venv), SLURM_SUBMIT_DIR=str(ROOT),
               SLURM_JOB_NAME="t", SLURM_JOB_ID="7", SLURM_JOB_NODELIST="node-0", SLURM_JOB_NUM_NODES="1",
               SLURM_NTASKS="1", SLURM_CPUS_PER_TASK="6", RUN_DIR=str(tmp_path / "run"))
    result = run(["bash", str(ROOT / "launch" / "slurm" / "train.sbatch"), "model=gpt_tiny"], env=env, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert record.read_text().split() == ["SRUN_CPUS_PER_TASK=6", f"python={venv / 'bin' / 'python'}"]


def test_a_job_name_with_hydra_syntax_in_it_is_a_run_directory_not_an_error(tmp_path):
    """The run directory is named after the job: `lr=3e-4,bs=8` would be a syntax error and a sweep in a
    bare Hydra override. The job is also started from a directory other than the checkout, as
    launch/submit.py's --chdir leaves SLURM_SUBMIT_DIR (MOE_GPT_ROOT, which it exports, says where)."""
    srun = '#!/bin/sh\nprintf "%s\\n" "$@" > "$SRUN_RECORD"\n'
    bin_dir = _stand_ins(tmp_path, srun=srun, scontrol=FAKE_SCONTROL)
    record, output_dir = tmp_path / "srun.txt", tmp_path / "out"
    env = {k: v for k, v in subprocess_env().items() if k != "PYTHON"}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", SRUN_RECORD=str(record), VENV=str(_venv(tmp_path)),
               SLURM_SUBMIT_DIR=str(tmp_path), MOE_GPT_ROOT=str(ROOT), SLURM_JOB_NAME="lr=3e-4,bs=8",
               SLURM_JOB_ID="7", SLURM_JOB_NODELIST="node-0", SLURM_JOB_NUM_NODES="1", SLURM_NTASKS="1",
               OUTPUT_DIR=str(output_dir))
    result = run(["bash", str(ROOT / "launch" / "slurm" / "train.sbatch"), "model=gpt_tiny"], env=env, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"trainer.run_dir='{output_dir}/lr=3e-4,bs=8-7'" in record.read_text().splitlines()


def test_a_warning_signal_during_the_batch_scripts_checks_requeues_without_starting_ranks(tmp_path):
    """SIGUSR1 can come while the job still checks its settings (a time limit near the warning): the
    script must neither die of it (no requeue) nor start ranks that would be killed before they save."""
    import signal
    import time

    scontrol = FAKE_SCONTROL.replace("#!/bin/sh\n", '#!/bin/sh\necho "$*" >> "$SCONTROL_RECORD"\n')
    bin_dir = _stand_ins(tmp_path, srun=FAKE_SRUN, scontrol=scontrol)
    venv = _venv(tmp_path)
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\ntouch "{tmp_path / "checking"}"\nsleep 3\nexec "{sys.executable}" "$@"\n')
    env = {k: v for k, v in subprocess_env().items() if k != "PYTHON"}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", SRUN_RECORD=str(tmp_path / "srun.txt"), VENV=str(venv),
               SCONTROL_RECORD=str(tmp_path / "scontrol.txt"), SLURM_SUBMIT_DIR=str(ROOT), SLURM_JOB_NAME="t",
               SLURM_JOB_ID="7", SLURM_JOB_NODELIST="node-0", SLURM_JOB_NUM_NODES="1", SLURM_NTASKS="1",
               RUN_DIR=str(tmp_path / "run"))
    job = subprocess.Popen(["bash", str(ROOT / "launch" / "slurm" / "train.sbatch"), "model=gpt_tiny"], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while not (tmp_path / "checking").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)  # during the check
    out, _ = job.communicate(timeout=120)
    assert job.returncode == 0, out
    assert "SIGUSR1 came before the ranks started; not starting them" in out
    assert not (tmp_path / "srun.txt").exists(), "a rank was started"
    assert "requeue 7" in (tmp_path / "scontrol.txt").read_text()
