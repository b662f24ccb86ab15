#!/usr/bin/env bash
# Train on one machine with the DeepSpeed launcher: one process per GPU (or CPU ranks with gloo).
#   launch/deepspeed_local.sh 8 experiment=h100_350m moe.ep_size=8
#   launch/deepspeed_local.sh 2 model=gpt_tiny moe.ep_size=2 trainer.max_steps=20    # 2 CPU ranks
# --no_local_rank keeps Hydra's command line clean (DeepSpeed sets LOCAL_RANK in the environment).
#
# Environment (all optional): MASTER_PORT (default 29500; two jobs on one machine need two ports),
# LOG_DIR (one log file per rank there, instead of this terminal), PYTHON (default
# $VENV/bin/python, VENV default .venv; the Docker image sets VENV=/opt/conda), DRY_RUN=1 (print the command, run nothing),
# CUDA_VISIBLE_DEVICES (the GPUs to use, one rank each: NUM_RANKS must be their number). Everything else in the
# environment (NCCL_*, WANDB_*, ...) reaches the ranks as it is.
set -euo pipefail
ranks="${1:?usage: $0 NUM_RANKS [hydra overrides...]}"
shift
[[ "$ranks" =~ ^[1-9][0-9]*$ ]] || { echo "error: NUM_RANKS must be a positive integer, got '$ranks'" >&2; exit 2; }
# LOG_DIR is relative to where the caller ran this, not to the checkout.
log_dir="${LOG_DIR:+$(realpath -m "$LOG_DIR")}"
here="$(cd "$(dirname "$0")/.." && pwd)"
# The ranks run in the checkout, as the Slurm job does: relative paths in the overrides are taken from
# there; the check names the file meant when one is relative to the caller's directory instead.
export MOE_GPT_CALLER_DIR="$PWD"
cd "$here"
source launch/preflight.sh
# DeepSpeed's launcher logs every command and rank it starts at INFO; warnings and failures are kept.
# Given --num_gpus, DeepSpeed's runner ignores CUDA_VISIBLE_DEVICES and takes GPUs 0..N-1 (on a shared
# node, someone else's); without it, the runner runs one rank on each device the variable names.
devices=(--num_gpus "$ranks")
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
  IFS=, read -ra visible <<<"$CUDA_VISIBLE_DEVICES"
  if [ "${#visible[@]}" -ne "$ranks" ]; then
    echo "error: NUM_RANKS is $ranks but CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES names ${#visible[@]} device(s); run one rank per visible device" >&2
    exit 2
  fi
  devices=()
fi
command=("${PYTHON:-${VENV:-.venv}/bin/python}" -m deepspeed.launcher.runner "${devices[@]}" --no_local_rank
  --master_port "${MASTER_PORT:-29500}" --log_level "${DS_LOG_LEVEL:-warning}")
if [ -n "$log_dir" ]; then
  command+=(--enable_each_rank_log "$log_dir")
fi
command+=(--module train "$@")
if [ -n "${DRY_RUN:-}" ]; then
  # The overrides are checked as for a launch (one error line, status 2), where this Python has the
  # project's packages; without them, a note says they were not.
  preflight "${command[0]}" "$ranks" "given by NUM_RANKS" "$@" >/dev/null || exit 2
  printf '%q ' "${command[@]}"
  echo
  exit 0
fi
# The overrides, composed and checked against NUM_RANKS once here: one error line, not one per rank
# (and a dry run's plan printed once).
preflight "${command[0]}" "$ranks" "given by NUM_RANKS" "$@"
if [ "$preflight_device" = planned ]; then exit 0; fi
if [ "$preflight_device" = cpu ]; then
  # CPU ranks: one thread each, or two ranks fight over the same cores; and DeepSpeed told so, rather
  # than warning in every process that it found no GPU.
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
fi
if [ -n "$log_dir" ]; then
  mkdir -p "$log_dir"
  echo "per-rank logs: $log_dir/<date-time>_rank<N>.log"
fi

# Ctrl-C goes to the ranks alone. Left to the terminal it would reach DeepSpeed's runner, which dies
# with a traceback and gives the prompt back while the ranks still run, and its launcher, which
# answers with SIGTERM to the ranks and a SIGKILL 30 s later, however far their checkpoint got. So
# the launcher runs in a process group of its own (set -m), away from the terminal's Ctrl-C, and
# this script hands each Ctrl-C to the ranks: the first makes them checkpoint after the step and
# exit 130 (the launcher passes that status on), a second stops them at once. SIGTERM and SIGHUP
# reach the ranks as SIGTERM: checkpoint and exit. Before the ranks exist (start-up), either stops
# the job through DeepSpeed's own handling; Ctrl-\ (SIGQUIT) stops it at once. A process group off
# the terminal must not read it (it would stop there, silently), so the job's stdin is /dev/null;
# and a watchdog in that group stops the job (SIGTERM, so the ranks still checkpoint) if this script
# is killed outright, by SIGKILL or with its own process group.
runner=""
trapped=0
early=""
signal_ranks() {  # SIGNAL: the ranks, the children of DeepSpeed's per-node launcher
  trapped=1
  if [ -z "$runner" ]; then early=1; return 0; fi  # not started yet: stopped as soon as it is
  "${command[0]}" -c '
import psutil, signal, sys
sig, found = getattr(signal, sys.argv[2]), 0
for process in psutil.Process(int(sys.argv[1])).children(recursive=True):
    try:
        if "deepspeed.launcher.launch" not in " ".join(process.cmdline()):
            continue
        for rank in process.children():
            rank.send_signal(sig)
            found += 1
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        pass
sys.exit(0 if found else 1)
' "$runner" "$1" 2>/dev/null || kill -TERM -- "-$runner" 2>/dev/null || true
}
trap 'signal_ranks SIGINT' INT
trap 'signal_ranks SIGTERM' TERM HUP
trap 'trapped=1; [ -z "$runner" ] || kill -QUIT -- "-$runner" 2>/dev/null || true' QUIT
set -m
"$BASH" -c '
script=$1; shift
# Alive: in /proc and not a zombie (a killed script stays one until its parent reads its status,
# which a parent busy reading the job'"'"'s output may not do for a long time).
alive() { local stat; read -r stat < "/proc/$1/stat" 2>/dev/null || return 1; stat=${stat##*) }; [ "${stat%% *}" != Z ]; }
( while alive "$script"; do sleep 2; done; kill -TERM 0 ) </dev/null >/dev/null 2>&1 &
exec "$@"' watchdog "$$" "${command[@]}" </dev/null &
runner=$!
set +m
if [ -n "$early" ]; then kill -TERM -- "-$runner" 2>/dev/null || true; fi
while :; do
  trapped=0
  status=0
  wait "$runner" || status=$?
  # A trapped signal ends `wait` early, with the launcher still running: wait again.
  [ "$trapped" = 1 ] || break
done
exit "$status"
