"""Submit a training job to Slurm: the sbatch flags from a few plain options, then
launch/slurm/train.sbatch with your Hydra overrides.

    python launch/submit.py --nodes 2 --gpus-per-node 8 --time 04:00:00 --partition gpu \\
        --account my-project --output-dir /scratch/runs -- experiment=h100_350m moe.ep_size=8
    python launch/submit.py --dry-run ...     # print the sbatch command instead of running it

The run directory is <output-dir>/<job-name>-<job id> and Slurm's log <output-dir>/<job-name>-<job id>.out;
a job that is requeued (time limit, preemption) keeps both and resumes from its checkpoint.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BATCH_SCRIPT = ROOT / "launch" / "slurm" / "train.sbatch"


SLURM_TIME = re.compile(r"\d+(:\d+){0,2}|\d+-\d+(:\d+){0,2}|UNLIMITED|INFINITE", re.IGNORECASE)
"""sbatch --time's forms: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S (and no limit)."""


def slurm_seconds(limit: str) -> int | None:
    """A time limit in sbatch --time's forms, in seconds; None for no limit."""
    if limit.upper() in ("UNLIMITED", "INFINITE"):
        return None
    days, _, clock = limit.rpartition("-")
    parts = [int(part) for part in clock.split(":")]
    if days:  # D-H, D-H:M, D-H:M:S
        hours, minutes, seconds = (parts + [0, 0])[:3]
    else:  # M, M:S, H:M:S
        hours, minutes, seconds = [0, *parts, 0][:3] if len(parts) < 3 else parts
    return ((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds


MIN_SECONDS_BEFORE_WARNING = 120
"""Time limit minus --warning-seconds, at least."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8, help="0: CPU ranks (gloo)")
    parser.add_argument("--ranks-per-node", type=int, default=None,
                        help="processes per node (default: one per GPU, or 1 without GPUs)")
    parser.add_argument("--cpus-per-task", type=int, default=None, help="CPU cores per rank (also OMP_NUM_THREADS)")
    parser.add_argument("--time", default="04:00:00", help="time limit, as sbatch --time takes it")
    parser.add_argument("--partition", default=None)
    parser.add_argument("--account", default=None)
    parser.add_argument("--job-name", default="moe-gpt")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/slurm"),
                        help="where the run directory and Slurm's log go (a shared file system)")
    parser.add_argument("--warning-seconds", type=int, default=120,
                        help="SIGUSR1 this long before the time limit: time to finish a step and save a checkpoint")
    parser.add_argument("--sbatch-arg", action="append", default=[], metavar="FLAG",
                        help="any other sbatch flag, e.g. --sbatch-arg=--exclusive (repeatable)")
    parser.add_argument("--wait", action="store_true",
                        help="return when the job has ended and its processes have exited (sbatch --wait, then "
                             "until Slurm no longer lists it as completing)")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch command and exit")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for python -m train (after --)")
    args = parser.parse_args(argv)
    for name in ("nodes", "warning_seconds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not SLURM_TIME.fullmatch(args.time):
        parser.error(f"--time must be a Slurm time limit (minutes, H:MM:SS, D-HH, D-HH:MM:SS, ...), got {args.time!r}")
    limit = slurm_seconds(args.time)
    if limit is not None and limit - args.warning_seconds < MIN_SECONDS_BEFORE_WARNING:
        # A warning during the job's checks requeues it with nothing trained: at every start, forever.
        parser.error(f"--warning-seconds={args.warning_seconds} leaves {limit - args.warning_seconds} s of --time={args.time} "
                     f"before the warning; at least {MIN_SECONDS_BEFORE_WARNING} s are needed (Slurm may signal up to "
                     "60 s early, and a job takes about a minute to check its settings and start its ranks)")
    if "," in str(args.output_dir):
        parser.error(f"--output-dir={args.output_dir}: a comma would split sbatch's --export list; choose another folder")
    if args.gpus_per_node < 0:
        parser.error(f"--gpus-per-node must be >= 0, got {args.gpus_per_node}")
    if args.ranks_per_node is None:
        args.ranks_per_node = args.gpus_per_node or 1
    if args.ranks_per_node < 1:
        parser.error(f"--ranks-per-node must be >= 1, got {args.ranks_per_node}")
    if 0 < args.gpus_per_node < args.ranks_per_node:
        # Each rank takes the GPU of its local rank: the ranks past the last GPU would find none.
        parser.error(f"--ranks-per-node={args.ranks_per_node} is more than --gpus-per-node={args.gpus_per_node} "
                     "(one rank per GPU)")
    return args


def sbatch_command(args: argparse.Namespace) -> list[str]:
    output_dir = args.output_dir.resolve()
    command = [
        "sbatch", "--parsable",
        f"--job-name={args.job_name}",
        f"--nodes={args.nodes}",
        f"--ntasks-per-node={args.ranks_per_node}",
        f"--time={args.time}",
        f"--signal=B:USR1@{args.warning_seconds}",
        f"--chdir={ROOT}",
        f"--output={output_dir}/%x-%j.out",
        # The batch script names the run directory after the job: the same across requeues. It finds
        # the checkout from MOE_GPT_ROOT: SLURM_SUBMIT_DIR is where sbatch ran, not --chdir.
        f"--export=ALL,OUTPUT_DIR={output_dir},MOE_GPT_ROOT={ROOT}",
    ]
    if args.gpus_per_node:
        command.append(f"--gpus-per-node={args.gpus_per_node}")
    if args.cpus_per_task:
        command.append(f"--cpus-per-task={args.cpus_per_task}")
    if args.partition:
        command.append(f"--partition={args.partition}")
    if args.account:
        command.append(f"--account={args.account}")
    if args.wait:
        command.append("--wait")
    return [*command, *args.sbatch_arg, str(BATCH_SCRIPT), *args.overrides]


def override_problem(overrides: list[str], world_size: int) -> str | None:
    """What is wrong with the overrides, in one line (None when they compose and pass the settings'
    checks at this world size), checked here on the login node: a typo must not wait in the queue
    for hours and then fail on the first compute node. A Python without the project's packages
    cannot compose them; the job checks them then."""
    sys.path.insert(0, str(ROOT))
    # Composing imports DeepSpeed, which looks for a GPU and warns when it finds none (a login node
    # has none). Set for the check only: sbatch --export=ALL hands this environment to the job.
    accelerator = os.environ.get("DS_ACCELERATOR")
    os.environ["DS_ACCELERATOR"] = "cpu"
    try:
        from train.cli import settings_problem

        return settings_problem(overrides, world_size, "given by --nodes x --ranks-per-node", also=_check_resume)
    except ImportError as error:
        print(f"note: overrides not checked before submitting ({error}); run this with the project's "
              f"Python (.venv/bin/python) to check them here", file=sys.stderr, flush=True)
        return None
    finally:
        sys.path.remove(str(ROOT))
        if accelerator is None:
            del os.environ["DS_ACCELERATOR"]
        else:
            os.environ["DS_ACCELERATOR"] = accelerator


def _check_resume(run) -> None:
    """The job trains in a run directory of its own, new at its first start, unless the overrides
    name one: trainer.resume=true alone would find nothing there."""
    from train.config import ConfigError

    if run.trainer.resume and not run.trainer.run_dir:
        raise ConfigError("trainer.resume=true: the job's run directory (--output-dir/<job name>-<job id>) is new, "
                          "with nothing to resume; add trainer.run_dir=<the run to continue> (a requeued job "
                          "resumes by itself: the job sets trainer.auto_resume=true)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problem = override_problem(args.overrides, args.nodes * args.ranks_per_node)
    if problem is not None:
        print(f"error: {problem} (nothing submitted)", file=sys.stderr, flush=True)
        return 2
    command = sbatch_command(args)
    if args.dry_run:
        print(shlex.join(command))
        return 0
    if shutil.which("sbatch") is None:
        print("error: sbatch not found on PATH: submit from a Slurm login node (--dry-run prints the command)",
              file=sys.stderr, flush=True)
        return 2
    args.output_dir.mkdir(parents=True, exist_ok=True)  # sbatch does not create the log's directory
    # With --wait, sbatch prints the job id only when the job ends: read it as it comes.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    job_id = process.stdout.readline().strip().split(";")[0]
    if job_id:
        output_dir = args.output_dir.resolve()
        print(f"submitted job {job_id}: run dir {output_dir}/{args.job_name}-{job_id}, "
              f"log {output_dir}/{args.job_name}-{job_id}.out", flush=True)
    status = process.wait()
    if args.wait and job_id:
        wait_while_completing(job_id)
        print(f"job {job_id} ended with status {status}", flush=True)
    return status


def wait_while_completing(job_id: str, timeout: float = 300, poll: float = 0.5) -> None:
    """Wait until no process of the job runs any more.

    `sbatch --wait` returns as soon as the job's state is final, and a cancelled job is final
    (CANCELLED) the moment `scancel` runs, while its ranks still have KillWait seconds to write
    their checkpoint and last metrics. Slurm lists the job as COMPLETING until they have exited.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listed = subprocess.run(["squeue", "--noheader", "--jobs", job_id, "--states", "COMPLETING", "--format", "%i"],
                                capture_output=True, text=True)
        if listed.returncode != 0 or not listed.stdout.strip():  # gone from squeue (MinJobAge) or not completing
            return
        time.sleep(poll)
    print(f"warning: job {job_id} still completing after {timeout:.0f} s", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
